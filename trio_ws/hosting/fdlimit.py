"""The file limit: every WebSocket is a file descriptor, and so is everything else.

At start-up the soft ``RLIMIT_NOFILE`` is raised to the hard limit (the soft one is often 1,024
while the hard one is far higher), and ``max_connections`` is lowered, with one WARNING, if it
does not fit under the limit with a reserve of descriptors left over. The reserve is what keeps
``/health``, ``/ready``, the listeners, Redis and the handshakes being refused with 1013 working
when the WebSockets are at their cap: without it the process runs out of descriptors, its
accept loop fails (EMFILE) and nobody, monitoring included, gets in.

Connections that have not sent their request yet are not WebSockets and not counted by
``max_connections``; they take descriptors all the same. So they are capped too (by
:mod:`trio_ws.shell.hypercorn_guard`, which closes the oldest at the cap), at what is left under
the file limit once the WebSockets are at their cap and :data:`OTHER_FILES` are set aside.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from trio_ws.shell import hypercorn_guard

if TYPE_CHECKING:
    from trio_ws.core.limits import Admission

LOGGER = logging.getLogger(__name__)

#: Descriptors kept for everything that is not an admitted WebSocket (or half the limit, when
#: the limit is tiny).
FD_RESERVE = 100
#: Of what is left once the WebSockets are at their cap: descriptors kept for the listeners,
#: Redis, logs and the like, not for connections waiting for their request.
OTHER_FILES = 50


def raise_soft_limit() -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard one; return the soft limit now in force, or
    None where there is no such limit (Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == resource.RLIM_INFINITY or soft >= hard:
        return None if soft == resource.RLIM_INFINITY else soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as error:
        LOGGER.info("file limit: could not raise the soft limit %d to %d: %s", soft, hard, error)
        return soft
    LOGGER.info("file limit: soft limit raised from %d to the hard limit %d", soft, hard)
    return hard


def fitting_max_connections(max_connections: int, file_limit: int) -> int:
    """The largest cap at or under ``max_connections`` that leaves the reserve free."""
    reserve = min(FD_RESERVE, file_limit // 2)
    return max(1, min(max_connections, file_limit - reserve))


def fitting_waiting(max_connections: int, file_limit: int) -> int:
    """Most connections waiting for their request that fit beside ``max_connections``
    WebSockets and :data:`OTHER_FILES` (at most ``hypercorn_guard.WAITING_MAX``, at least 1)."""
    spare = file_limit - max_connections - OTHER_FILES
    return max(1, min(hypercorn_guard.WAITING_MAX, spare))


def apply_file_limit(admission: Admission) -> None:
    """Raise the soft file limit, then fit ``admission``'s cap under it (one WARNING if
    lowered), and the cap on connections waiting for their request beside it."""
    limit = raise_soft_limit()
    if limit is None:
        hypercorn_guard.limit_waiting(hypercorn_guard.WAITING_MAX)
        return
    _fit_max_connections(admission, limit)
    waiting = fitting_waiting(admission.policy.max_connections, limit)
    hypercorn_guard.limit_waiting(waiting)
    if waiting < hypercorn_guard.WAITING_MAX:
        LOGGER.info(
            "file limit %d: at most %d connections waiting for their request (the oldest is "
            "closed to make room)",
            limit,
            waiting,
        )


def _fit_max_connections(admission: Admission, limit: int) -> None:
    wanted = admission.policy.max_connections
    fitting = fitting_max_connections(wanted, limit)
    if fitting < wanted:
        admission.lower_max_connections(fitting)
        LOGGER.warning(
            "max_connections lowered to %d: the file limit (RLIMIT_NOFILE) is %d and %d "
            "descriptors are kept for /health, the listeners, Redis and handshakes; raise the "
            "hard limit (LimitNOFILE=, ulimit -Hn, --ulimit nofile=) to %d to serve "
            "TRIO_WS_MAX_CONNECTIONS=%d",
            fitting,
            limit,
            limit - fitting,
            wanted + FD_RESERVE,
            wanted,
        )
