"""How the process was started, and the Hypercorn settings every mode shares.

* ``launcher`` (``python -m trio_ws``, ``trio-ws``): :mod:`trio_ws.hosting.launcher`; our own
  process owns the signals. Public Hypercorn API only.
* ``hypercorn-inprocess`` and ``hypercorn-worker``: under Hypercorn's command line,
  :mod:`trio_ws.hosting.hypercorn_cli`.
* ``embedded``: any other host (tests, a custom runner); signals are the host's, which starts
  the drain with ``Hub.request_drain``.
"""

from __future__ import annotations

import enum
import logging
import os
from typing import TYPE_CHECKING

from trio_ws.core.drain import CLOSE_GRACE_S

if TYPE_CHECKING:
    from hypercorn.config import Config

    from trio_ws.settings import Settings

LOGGER = logging.getLogger(__name__)

#: Extra time Hypercorn gives connections beyond our drain deadline under its command line, so
#: that it never cancels a connection before the drain has closed it properly.
GRACE_MARGIN_S = CLOSE_GRACE_S + 10.0


#: A request's headers must be complete this long after the accept (after the TLS handshake),
#: and a keep-alive connection may idle this long between requests: Hypercorn's
#: ``keep_alive_timeout``, which bytes do not extend (docs/design/hypercorn.md, "Connections
#: that never become WebSockets").
HEADER_TIMEOUT_S = 5.0
#: A TLS handshake must be done this long after the accept (Hypercorn's default is 60 s).
TLS_HANDSHAKE_TIMEOUT_S = 10.0

#: The only application protocol offered in a TLS handshake.
HTTP_ALPN = ("http/1.1",)


class RunMode(enum.Enum):
    LAUNCHER = "launcher"
    HYPERCORN_INPROCESS = "hypercorn-inprocess"
    HYPERCORN_WORKER = "hypercorn-worker"
    EMBEDDED = "embedded"


def configure_hypercorn(config: Config, settings: Settings, *, graceful_timeout_s: float) -> None:
    """Set what trio_ws needs of a Hypercorn config, in every mode (the launcher's new config,
    or the one a CLI worker was given, which Hypercorn reads for each new connection)."""
    if float(config.graceful_timeout) < graceful_timeout_s:
        LOGGER.info(
            "raising this worker's graceful_timeout from %gs to %gs so the drain can finish",
            config.graceful_timeout,
            graceful_timeout_s,
        )
    config.graceful_timeout = graceful_timeout_s
    # Exactly ours (Hypercorn's default is 16 MiB): shell/hypercorn_limits.py applies it, in
    # bytes, while a message arrives. Under --workers 0 this config is out of reach; the
    # limit, which comes from the app, holds there too.
    config.websocket_max_message_size = settings.max_message_size
    # No ping task per connection: the hub's one pinger pings every connection
    # (TRIO_WS_PING_INTERVAL) and closes the silent ones. Under --workers 0, where this config
    # is out of reach, shell/hypercorn_limits.py turns Hypercorn's pings off as a client joins.
    config.websocket_ping_interval = None
    # No HTTP/2 over TLS (ALPN offers only HTTP/1.1): browsers then open their WebSockets over
    # HTTP/1.1, where the direct writer works, and never reach Hypercorn's HTTP/2 code. Cleartext
    # HTTP/2 cannot be turned off in Hypercorn; docs/design/hypercorn.md, "HTTP/2".
    config.alpn_protocols = list(HTTP_ALPN)
    # Connections that have not sent a whole request: closed this soon, and capped in number
    # (shell/hypercorn_guard.py).
    config.keep_alive_timeout = HEADER_TIMEOUT_S
    config.ssl_handshake_timeout = TLS_HANDSHAKE_TIMEOUT_S


def log_startup(mode: RunMode, settings: Settings, *, version: str, workers: int) -> None:
    LOGGER.info(
        "trio_ws %s starting: mode=%s pid=%d workers=%d %s",
        version,
        mode.value,
        os.getpid(),
        workers,
        settings.describe(),
    )
    if mode is RunMode.HYPERCORN_WORKER:
        LOGGER.warning(
            "mode hypercorn-worker: during a drain Hypercorn's parent closes this worker's "
            "listener, so new connections (and /health, /ready) go unanswered instead of "
            "getting 1001 or 503, and a second SIGINT sent to the parent alone cannot force the "
            "close (signal the process group); run `python -m trio_ws` or "
            "`hypercorn --workers 0` to avoid both"
        )
    if workers > 1 and settings.redis_url is None:
        LOGGER.warning(
            "%d Hypercorn workers without a broker: broadcasts reach only this worker's "
            "clients; set TRIO_WS_REDIS_URL so that every worker shares every broadcast",
            workers,
        )
    if mode is RunMode.EMBEDDED:
        LOGGER.info("mode embedded: signals are left to the host, which starts the drain")
