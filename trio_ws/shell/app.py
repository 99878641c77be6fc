"""The Quart-Trio app: the page, ``/health`` and ``/ready`` through Quart, ``/ws`` through the
lean endpoint (:mod:`trio_ws.shell.websocket`). Nothing here starts or stops anything: the
host's lifespan (``trio_ws.hosting``) does.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quart import Response, render_template, request
from quart_trio import QuartTrio

from trio_ws import __version__
from trio_ws.core.health import health_report, public_health
from trio_ws.shell import api
from trio_ws.shell.headers import COMMON_HEADERS, DEFAULT_CSP, page_csp
from trio_ws.shell.hypercorn_limits import WebSocketLimits
from trio_ws.shell.sinks import DirectPath
from trio_ws.shell.websocket import WebSocketEndpoint, is_websocket_path

#: How long a request body may take to arrive.
BODY_TIMEOUT_S = 10

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
    #: The /metrics server, when TRIO_WS_METRICS_PORT is set (set by the host's lifespan).
    metrics: Any = None
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
        hub.settings.max_message_size,
        compression=hub.settings.compression,
        own_pings=True,
        on_protocol_error=hub.note_protocol_error,
    )

    # Request bodies (only ``POST /publish`` takes one) are bounded before they are read whole.
    app.config["MAX_CONTENT_LENGTH"] = api.body_limit(hub.settings.max_message_size)
    app.config["BODY_TIMEOUT"] = BODY_TIMEOUT_S
    key = hub.settings.api_key

    if lifespan is not None:
        app.while_serving(partial(lifespan, app))

    @app.after_request
    async def security_headers(response: Response) -> Response:
        for name, value in COMMON_HEADERS.items():
            response.headers.setdefault(name, value)
        response.headers.setdefault("Content-Security-Policy", DEFAULT_CSP)
        return response

    @app.get("/")
    async def index() -> Response:
        html = await render_template("index.html", version=__version__)
        return Response(
            html,
            content_type="text/html; charset=utf-8",
            headers={"Content-Security-Policy": page_csp(html)},
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        detail = hub.settings.health_detail or (
            key is not None and api.bearer_matches(request.headers.get("Authorization"), key)
        )
        if not detail:
            return public_health(hub)
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

    if key is not None:
        api.register(app, hub, key)

    return app
