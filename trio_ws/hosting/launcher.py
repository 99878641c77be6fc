"""The launcher behind ``python -m trio_ws``: Hypercorn's public ``serve`` with our own trigger.

Signals go to this process. The first SIGTERM or SIGINT starts the drain (the hub warns every
client and refuses new ones with 1001 while Hypercorn keeps listening); the ``shutdown_trigger``
returns only when the drain is over, so Hypercorn's short ``graceful_timeout`` starts when there
is nothing left to cancel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import hypercorn.trio
import trio
from hypercorn.config import Config

from trio_ws.hosting.compose import build_app, create_hub
from trio_ws.hosting.modes import RunMode, configure_hypercorn
from trio_ws.hosting.signals import exit_watchdog, exit_watchdog_s, forward_signals
from trio_ws.hosting.sockets import tune_listeners

if TYPE_CHECKING:
    from trio_ws.core.hub import Hub
    from trio_ws.settings import Settings
    from trio_ws.shell.app import TrioWsApp

LOGGER = logging.getLogger(__name__)

#: What Hypercorn may still wait for after the drain: in-flight HTTP requests, close replies.
SHUTDOWN_GRACE_S = 0.1
#: Pending TCP connections the kernel queues for accept() (Hypercorn's default is 100). A
#: reconnect storm after another instance's drain arrives all at once: with a short queue the
#: kernel drops SYNs, and each dropped one costs its client a 1 s retransmission. The kernel
#: caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096


@dataclass(frozen=True, slots=True)
class RunningServer:
    """What :func:`serve` hands to ``nursery.start``: where it listens, and its hub."""

    binds: list[str]
    hub: Hub
    app: TrioWsApp
    #: Set when Hypercorn has closed every connection and :func:`serve` is about to return.
    finished: trio.Event

    @property
    def ws_url(self) -> str:
        return self.binds[0].replace("http", "ws", 1) + "/ws"


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    # By the time the trigger returns the drain has closed every WebSocket: what Hypercorn
    # would still wait for (an HTTP request in flight) gets little time.
    configure_hypercorn(config, settings, graceful_timeout_s=SHUTDOWN_GRACE_S)
    config.backlog = LISTEN_BACKLOG
    config.certfile = settings.certfile
    config.keyfile = settings.keyfile
    config.accesslog = None
    return config


async def serve(
    settings: Settings,
    *,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until a drain has finished.

    With ``handle_signals`` (the default; needs the main thread) SIGTERM and SIGINT are owned by
    this function for its whole life. Without it, call ``RunningServer.hub.request_drain``.
    """
    hub = create_hub(settings)
    app = build_app(settings, hub=hub, run_mode=RunMode.LAUNCHER)
    config = hypercorn_config(settings)
    finished = trio.Event()
    async with trio.open_nursery() as nursery:
        if handle_signals:
            # Open until the process ends (see forward_signals).
            await nursery.start(forward_signals, hub.drain)
            nursery.start_soon(exit_watchdog, hub.drain, exit_watchdog_s(settings))

        async def serve_then_stop(*, task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await hypercorn.trio.serve(
                    app, config, shutdown_trigger=hub.wait_stopped, task_status=task_status
                )
            finally:
                nursery.cancel_scope.cancel()

        binds: list[str] = await nursery.start(serve_then_stop)
        # Hypercorn creates the listeners after the app's startup: tune them now.
        tune_listeners(settings)
        LOGGER.info("listening on %s", " ".join(binds))
        task_status.started(RunningServer(binds=binds, hub=hub, app=app, finished=finished))
    finished.set()
    LOGGER.info("server stopped")
