"""Logging for operators: one line per event, with the process id (several workers share a log)."""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def configure_logging(level: int) -> None:
    """Send ``trio_ws`` logs to stderr at ``level``, unless the host already set up logging.

    Idempotent: a second call only changes the level.
    """
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
