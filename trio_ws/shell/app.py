"""The Quart-Trio app: the page, ``/health`` and ``/ready`` through Quart, ``/ws`` through the
lean endpoint (:mod:`trio_ws.shell.websocket`). Nothing here starts or stops anything: the
host's lifespan (``trio_ws.hosting``) does.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quart import render_template
from quart_trio import QuartTrio

from trio_ws import __version__
from trio_ws.core.health import health_report
from trio_ws.shell.hypercorn_limits import WebSocketLimits
from trio_ws.shell.sinks import DirectPath
from trio_ws.shell.websocket import WebSocketEndpoint, is_websocket_path

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable

    from trio_ws.core.hub import Hub

    #: Start-up, ``yield`` while serving, shutdown (Quart's ``while_serving``).
    Lifespan = Callable[["TrioWsApp"], AsyncGenerator[None, None]]


def templates_dir() -> Path:
    """The page's folder: inside the package when installed, the repository's ``templates/``
    when running from a checkout (or an editable install)."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "templates"
    if packaged.is_dir():
        return packaged
    return package.parent / "templates"


class TrioWsApp(QuartTrio):
    """A QuartTrio app that hands WebSockets on ``/ws`` to the lean endpoint.

    Dispatching here, before Quart sees the scope, keeps ASGI ``send`` unwrapped: the direct
    write path needs the callable Hypercorn gave (never wrap it in a middleware).
    """

    hub: Hub
    #: Whether new connections may write directly to Hypercorn's sockets (set by the host).
    direct: DirectPath
    #: How the process was started, for /health (set by the host's lifespan).
    run_mode: Any = None
    #: What one incoming message may be, applied inside Hypercorn (shell/hypercorn_limits.py).
    websocket_limits: WebSocketLimits

    #: One endpoint serves every connection (made again if the host replaces ``direct``).
    _endpoint: WebSocketEndpoint | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and is_websocket_path(scope["path"]):
            endpoint = self._endpoint
            if (
                endpoint is None
                or endpoint.hub is not self.hub
                or endpoint.direct is not self.direct
            ):
                endpoint = self._endpoint = WebSocketEndpoint(self.hub, self.direct)
            await endpoint(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


def create_app(hub: Hub, *, lifespan: Lifespan | None = None) -> TrioWsApp:
    """The app for ``hub``; ``lifespan`` runs around serving (start-up before, shutdown after)."""
    app = TrioWsApp(__name__, template_folder=str(templates_dir()))
    app.hub = hub
    app.direct = DirectPath()
    app.websocket_limits = WebSocketLimits(
        hub.settings.max_message_size, compression=hub.settings.compression
    )

    if lifespan is not None:
        app.while_serving(partial(lifespan, app))

    @app.get("/")
    async def index() -> str:
        return await render_template("index.html", version=__version__)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        report = health_report(hub)
        mode = app.run_mode
        report.update(
            pid=os.getpid(),
            version=__version__,
            mode=mode.value if mode is not None else None,
        )
        return report

    @app.get("/ready")
    async def ready() -> tuple[dict[str, Any], int]:
        reason = hub.not_ready_reason()
        if reason is None:
            return {"ready": True}, 200
        return {"ready": False, "reason": reason}, 503

    return app
