"""Logging for operators: one line per event, with the process id (several workers share a log).

Also the accept loop's errors: Hypercorn serves its listeners with ``trio.serve_listeners``,
which logs every failed ``accept()`` (EMFILE when the process is out of file descriptors, also
ENFILE, ENOMEM, ENOBUFS) on the ``trio.serve_listeners`` logger, with a traceback, and retries
every 0.1 s: ten tracebacks a second for as long as it lasts. :class:`AcceptErrorFilter` lets one
line through per interval, with the count, and no traceback.
"""

from __future__ import annotations

import logging
import sys
import time

from trio_ws.core.throttle import Throttle

LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"

#: The logger of trio's accept loop (trio/_highlevel_serve_listeners.py), which Hypercorn uses.
ACCEPT_LOGGER = "trio.serve_listeners"
#: At most one accept-error line per this many seconds.
ACCEPT_ERROR_LOG_EVERY_S = 10.0


class AcceptErrorFilter(logging.Filter):
    """Rate-limits the accept loop's "accept returned EMFILE" records: the first one, then at
    most one per ``interval_s``, rewritten to one line with the count."""

    def __init__(self, interval_s: float = ACCEPT_ERROR_LOG_EVERY_S) -> None:
        super().__init__()
        self._throttle = Throttle(interval_s)

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("accept returned"):
            return True
        count = self._throttle.event(time.monotonic())
        if count is None:
            return False
        error = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        text = record.args[1] if isinstance(record.args, tuple) and len(record.args) > 1 else ""
        record.msg = (
            "accept() failed with %s (%s), %d time(s) since the last such line: the process is "
            "out of file descriptors (or memory); new connections wait in the listen queue "
            "meanwhile. Next line in %gs at most; see TRIO_WS_MAX_CONNECTIONS and the file "
            "limit in docs/operations.md"
        )
        record.args = (error, text, count, self._throttle.interval_s)
        record.exc_info = None
        record.exc_text = None
        return True


def install_accept_error_filter() -> None:
    """Idempotent: put one :class:`AcceptErrorFilter` on trio's accept logger."""
    logger = logging.getLogger(ACCEPT_LOGGER)
    if not any(isinstance(f, AcceptErrorFilter) for f in logger.filters):
        logger.addFilter(AcceptErrorFilter())


def configure_logging(level: int) -> None:
    """Send ``trio_ws`` logs (and the accept loop's errors) to stderr at ``level``, unless the
    host already set up logging.

    Idempotent: a second call only changes the level.
    """
    install_accept_error_filter()
    logger = logging.getLogger("trio_ws")
    logger.setLevel(level)
    if logging.getLogger().handlers or any(
        getattr(handler, "_trio_ws", False) for handler in logger.handlers
    ):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler._trio_ws = True  # type: ignore[attr-defined]  # marks our own handler
    logger.addHandler(handler)
    logging.getLogger(ACCEPT_LOGGER).addHandler(handler)
