"""Command line of the launcher: ``python -m trio_ws`` and ``trio-ws``; and ``trio-ws token``,
which mints a development token with the configured key.

Flags override the ``TRIO_WS_*`` environment variables, which override the defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from trio_ws import __version__
from trio_ws.core.protocol import CLIENT_ID_PATTERN
from trio_ws.core.tokens import mint_token, policy_from_settings
from trio_ws.hosting import launcher as serving
from trio_ws.hosting.logs import configure_logging
from trio_ws.settings import (
    LOG_CONNECTIONS,
    LOG_FORMATS,
    LOG_LEVELS,
    Settings,
    SettingsError,
    on_off,
    parse_list,
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
        "TRIO_WS_DRAIN_TIMEOUT, ...); flags win. `trio-ws token --help`: mint a development "
        "token.",
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
    add(
        "--pong-timeout",
        type=float,
        metavar="S",
        help="close a client silent this long after a ping with 4010, 0=off (20)",
    )
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
        "--redis-stream-max-bytes",
        type=int,
        metavar="BYTES",
        help="Redis memory the stream may take (67108864)",
    )
    add(
        "--allowed-origins",
        type=parse_list,
        metavar="ORIGINS",
        help="origins whose pages may connect, comma-separated; * any (same origin)",
    )
    add("--jwt-secret-file", metavar="FILE", help="HMAC secret for tokens; turns tokens on")
    add(
        "--jwt-public-key-file",
        metavar="PEM",
        help="public key for RS256/ES256 tokens; turns tokens on",
    )
    add("--jwt-algorithm", metavar="ALG", help="the one algorithm tokens use (HS256)")
    add("--jwt-audience", metavar="AUD", help="required token aud (none)")
    add("--jwt-issuer", metavar="ISS", help="required token iss (none)")
    add(
        "--redis-pending-max-bytes",
        type=int,
        metavar="BYTES",
        help="memory held in messages waiting for Redis (33554432)",
    )
    add("--log-format", type=str.lower, choices=LOG_FORMATS, help="text or json lines (text)")
    add("--metrics-port", type=int, metavar="PORT", help="serve /metrics on PORT, 0=off (0)")
    add("--metrics-host", metavar="HOST", help="address of the metrics port (127.0.0.1)")
    add(
        "--log-connections",
        type=str.lower,
        choices=LOG_CONNECTIONS,
        help="a line per connect and disconnect, or a summary every 10 s (each)",
    )
    add("--version", action="version", version=f"trio_ws {__version__}")
    return parser


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``1h``, ``7d`` -> seconds."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", text)
    if match is None or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (say 90s, 30m, 1h or 7d)")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * unit


def client_id(text: str) -> str:
    if CLIENT_ID_PATTERN.fullmatch(text) is None:
        raise argparse.ArgumentTypeError("must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return text


def build_token_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trio-ws token",
        description="Print a signed token for development, made with the key the server is "
        "configured with (TRIO_WS_JWT_SECRET or TRIO_WS_JWT_SECRET_FILE, TRIO_WS_JWT_ALGORITHM, "
        "_AUDIENCE, _ISSUER). Production tokens come from your identity provider.",
    )
    parser.add_argument("--sub", required=True, type=client_id, help="the client id it proves")
    parser.add_argument(
        "--ttl", type=parse_duration, default=3600.0, help="lifetime: 90s, 30m, 1h, 7d (1h)"
    )
    parser.add_argument(
        "--private-key-file",
        metavar="PEM",
        help="signing key, for a public-key algorithm (RS256, ES256, ...)",
    )
    return parser


def token_main(argv: Sequence[str]) -> int:
    """``trio-ws token --sub alice --ttl 1h``: print a token, exit 0; 2 when tokens are not
    configured or cannot be signed here."""
    parser = build_token_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(os.environ)
        policy = policy_from_settings(settings, lambda path: Path(path).read_text())
        if policy is None:
            parser.exit(
                2,
                "trio-ws token: error: tokens are off; set TRIO_WS_JWT_SECRET or "
                "TRIO_WS_JWT_SECRET_FILE first\n",
            )
        private_key = None
        if args.private_key_file is not None:
            private_key = Path(args.private_key_file).read_text()
        token = mint_token(policy, args.sub, args.ttl, time.time(), private_key=private_key)
    except (SettingsError, ValueError, OSError) as error:
        parser.exit(2, f"trio-ws token: error: {error}\n")
    sys.stdout.write(token + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["token"]:
        return token_main(arguments[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(os.environ, **vars(args))
    except SettingsError as error:
        parser.exit(2, f"trio-ws: error: {error}\n")
    for path in (settings.certfile, settings.keyfile):
        if path is not None and not os.path.isfile(path):
            parser.exit(2, f"trio-ws: error: no such file: {path}\n")
    try:  # the token key, read now to report a missing or short file in one line
        policy_from_settings(settings, lambda path: Path(path).read_text())
    except (OSError, ValueError) as error:
        parser.exit(2, f"trio-ws: error: cannot use the token key: {error}\n")
    configure_logging(settings.log_level_number, settings.log_format)
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
