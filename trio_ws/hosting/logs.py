"""Logging for operators: one line per event, with the process id (several workers share a log).

Two formats (``TRIO_WS_LOG_FORMAT``): ``text``, one readable line, and ``json``, one JSON
object per line for log shippers (:class:`JsonFormatter`): ``time``, ``level``, ``logger``,
``message``, ``pid``, ``instance``, and ``client`` and ``event`` when the line is about one
client (the code passes them as ``extra={"client": ..., "event": ...}``).

Also the accept loop's errors: Hypercorn serves its listeners with ``trio.serve_listeners``,
which logs every failed ``accept()`` (EMFILE when the process is out of file descriptors, also
ENFILE, ENOMEM, ENOBUFS) on the ``trio.serve_listeners`` logger, with a traceback, and retries
every 0.1 s: ten tracebacks a second for as long as it lasts. :class:`AcceptErrorFilter` lets one
line through per interval, with the count, and no traceback.
"""

from __future__ import annotations

import json
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


#: Names this process in JSON lines (the hub's instance id, once there is a hub).
_instance: str | None = None


def set_instance(instance_id: str) -> None:
    global _instance  # one process, one instance id
    _instance = instance_id


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback goes into ``exc_info``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
            "instance": _instance,
        }
        for key in ("client", "event"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        # ensure_ascii: a client string (already cut by loggable()) cannot break the line.
        return json.dumps(entry, ensure_ascii=True, default=str)


def _iso(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


def make_formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(LOG_FORMAT)


def configure_logging(level: int, log_format: str = "text") -> None:
    """Send ``trio_ws`` logs (and the accept loop's errors) to stderr at ``level``, in
    ``log_format`` (``text`` or ``json``), unless the host already set up logging.

    Idempotent: a second call only changes the level and the format.
    """
    install_accept_error_filter()
    logger = logging.getLogger("trio_ws")
    logger.setLevel(level)
    ours = [handler for handler in logger.handlers if getattr(handler, "_trio_ws", False)]
    for handler in ours:
        handler.setFormatter(make_formatter(log_format))
    if logging.getLogger().handlers or ours:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(log_format))
    handler._trio_ws = True  # type: ignore[attr-defined]  # marks our own handler
    logger.addHandler(handler)
    logging.getLogger(ACCEPT_LOGGER).addHandler(handler)
