"""Command line of the launcher: ``python -m trio_ws`` and ``trio-ws``.

Flags override the ``TRIO_WS_*`` environment variables, which override the defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING

import trio

from trio_ws import __version__
from trio_ws.hosting import launcher as serving
from trio_ws.hosting.logs import configure_logging
from trio_ws.settings import (
    LOG_CONNECTIONS,
    LOG_LEVELS,
    Settings,
    SettingsError,
    on_off,
    parse_proxies,
)

LOGGER = logging.getLogger(__name__)

if TYPE_CHECKING:
    from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-ws",
        description="WebSocket broadcast server with a graceful drain on SIGTERM/SIGINT. "
        "Every flag has a TRIO_WS_* environment variable (--drain-timeout: "
        "TRIO_WS_DRAIN_TIMEOUT, ...); flags win.",
    )
    add = parser.add_argument
    add("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all IPv4)")
    add("--port", type=int, help="TCP port (default 8000; 0 picks a free one)")
    add("--drain-timeout", type=float, metavar="S", help="drain deadline in seconds (1800)")
    add("--broadcast-interval", type=float, metavar="S", help="periodic message, 0=off (10)")
    add(
        "--presence-interval",
        type=float,
        metavar="S",
        help="count updates at most every S, 0=off (1)",
    )
    add("--progress-interval", type=float, metavar="S", help="drain progress log interval (10)")
    add("--max-message-size", type=int, metavar="BYTES", help="largest client frame (65536)")
    add("--compression", type=on_off, metavar="on|off", help="permessage-deflate (off)")
    add("--queue-size", type=int, metavar="N", help="frames queued per client before 4008 (4096)")
    add(
        "--outbox-bytes",
        type=int,
        metavar="BYTES",
        help="bytes queued per client before 4008 (1 MiB)",
    )
    add("--ping-interval", type=float, metavar="S", help="WebSocket ping interval, 0=off (20)")
    add("--stall-timeout", type=float, metavar="S", help="TCP_USER_TIMEOUT, 0=kernel's (30)")
    add("--log-level", type=str.upper, choices=LOG_LEVELS, help="log level (INFO)")
    add("--certfile", help="TLS certificate (PEM); serve wss:// and https://")
    add("--keyfile", help="TLS private key (PEM)")
    add("--redis-url", metavar="URL", help="broadcast through Redis (redis://host:6379/0)")
    add("--redis-prefix", metavar="PREFIX", help="prefix of every Redis key (trio_ws)")
    add("--redis-stream-maxlen", type=int, metavar="N", help="replay window in broadcasts (10000)")
    add("--publish-rate", type=float, metavar="N", help="messages/s per connection, 0=off (10)")
    add("--publish-burst", type=int, metavar="N", help="messages at once per connection (20)")
    add(
        "--publish-bytes-rate",
        type=int,
        metavar="BYTES",
        help="bytes/s per connection, 0=off (65536)",
    )
    add(
        "--max-connections",
        type=int,
        metavar="N",
        help="WebSockets per process; more: 1013 (10000)",
    )
    add(
        "--max-connections-per-ip",
        type=int,
        metavar="N",
        help="WebSockets per client address, 0=off (0)",
    )
    add(
        "--handshake-rate-per-ip",
        type=float,
        metavar="R",
        help="handshakes per second per client address, 0=off (0)",
    )
    add(
        "--trusted-proxies",
        type=parse_proxies,
        metavar="CIDRS",
        help="proxies whose X-Forwarded-For is believed, comma-separated (none)",
    )
    add(
        "--log-connections",
        type=str.lower,
        choices=LOG_CONNECTIONS,
        help="a line per connect and disconnect, or a summary every 10 s (each)",
    )
    add("--version", action="version", version=f"trio_ws {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(os.environ, **vars(args))
    except SettingsError as error:
        parser.exit(2, f"trio-ws: error: {error}\n")
    for path in (settings.certfile, settings.keyfile):
        if path is not None and not os.path.isfile(path):
            parser.exit(2, f"trio-ws: error: no such file: {path}\n")
    configure_logging(settings.log_level_number)
    try:
        trio.run(serving.serve, settings)
    except* OSError as group:
        # Cannot bind, cannot resolve the host, bad certificate: one line, not a traceback.
        LOGGER.debug("startup failed", exc_info=group)
        first = group.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        parser.exit(
            1, f"trio-ws: error: cannot serve on {settings.host}:{settings.port}: {first}\n"
        )
    return 0
