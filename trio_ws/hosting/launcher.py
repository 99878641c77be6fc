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

from trio_ws.hosting.compose import create_hub
from trio_ws.hosting.modes import (
    SHUTDOWN_SIGNALS,
    RunMode,
    exit_watchdog,
    exit_watchdog_s,
    on_signal,
)
from trio_ws.hosting.sockets import set_stall_timeout_on_listeners
from trio_ws.shell.app import create_app

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from trio_ws.core.hub import Hub
    from trio_ws.settings import Settings

LOGGER = logging.getLogger(__name__)

#: What Hypercorn may still wait for after the drain: in-flight HTTP requests, close replies.
SHUTDOWN_GRACE_S = 0.1


@dataclass(frozen=True, slots=True)
class RunningServer:
    """What :func:`serve` hands to ``nursery.start``: where it listens, and its hub."""

    binds: list[str]
    hub: Hub
    app: QuartTrio
    #: Set when Hypercorn has closed every connection and :func:`serve` is about to return.
    finished: trio.Event

    @property
    def ws_url(self) -> str:
        return self.binds[0].replace("http", "ws", 1) + "/ws"


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    # By the time the trigger returns the drain has closed every WebSocket. What Hypercorn would
    # still wait for is its own ping task of each closed connection, which only notices the close
    # after its next ping interval (hypercorn/protocol/ws_stream.py ``_send_pings``): waiting for
    # it would delay the exit by up to ``ping_interval`` for nothing.
    config.graceful_timeout = SHUTDOWN_GRACE_S
    config.websocket_max_message_size = settings.transport_max_message_size
    config.websocket_ping_interval = settings.ping_interval or None
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
    app = create_app(settings, hub=hub, run_mode=RunMode.LAUNCHER)
    config = hypercorn_config(settings)
    finished = trio.Event()
    async with trio.open_nursery() as nursery:
        if handle_signals:
            await nursery.start(_forward_signals, hub)
            nursery.start_soon(exit_watchdog, hub, exit_watchdog_s(settings))

        async def serve_then_stop(*, task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                await hypercorn.trio.serve(
                    app, config, shutdown_trigger=hub.wait_stopped, task_status=task_status
                )
            finally:
                nursery.cancel_scope.cancel()

        binds: list[str] = await nursery.start(serve_then_stop)
        tuned = set_stall_timeout_on_listeners(settings.stall_timeout)
        LOGGER.info(
            "listening on %s (TCP_USER_TIMEOUT %gs on %d listeners)",
            " ".join(binds),
            settings.stall_timeout,
            tuned,
        )
        task_status.started(RunningServer(binds=binds, hub=hub, app=app, finished=finished))
    finished.set()
    LOGGER.info("server stopped")


async def _forward_signals(hub: Hub, *, task_status: trio.TaskStatus[None]) -> None:
    # Kept open until the server has stopped: a signal arriving late is consumed here instead of
    # being re-raised under its default action.
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            on_signal(hub, signum)
