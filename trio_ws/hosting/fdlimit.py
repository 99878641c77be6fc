"""The file limit: every WebSocket is a file descriptor, and so is everything else.

At start-up the soft ``RLIMIT_NOFILE`` is raised to the hard limit (the soft one is often 1,024
while the hard one is far higher), and ``max_connections`` is lowered, with one WARNING, if it
does not fit under the limit with a reserve of descriptors left over. The reserve is what keeps
``/health``, ``/ready``, the listeners, Redis and the handshakes being refused with 1013 working
when the WebSockets are at their cap: without it the process runs out of descriptors, its
accept loop fails (EMFILE) and nobody, monitoring included, gets in.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trio_ws.core.limits import Admission

LOGGER = logging.getLogger(__name__)

#: Descriptors kept for everything that is not an admitted WebSocket (or half the limit, when
#: the limit is tiny).
FD_RESERVE = 100


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


def apply_file_limit(admission: Admission) -> None:
    """Raise the soft file limit, then fit ``admission``'s cap under it (one WARNING if
    lowered)."""
    limit = raise_soft_limit()
    if limit is None:
        return
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
