"""The Quart-Trio shell: HTTP routes and the WebSocket handler, translating to the hub.

Per connection: one reader task (client frames -> ``Hub.publish``), one writer task (outbox ->
socket), and the handler itself waiting for a close request from the core. The connection is
removed from the registry in ``finally``, however it ended (client close, TCP reset, server
close, cancellation).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from quart import render_template, websocket
from quart_trio import QuartTrio

from trio_ws import __version__
from trio_ws.core import protocol
from trio_ws.core.broker import BrokerUnavailableError
from trio_ws.core.hub import REFUSED_REASON, Hub, HubState
from trio_ws.core.protocol import ClientIdError, CloseCode, ResumeError
from trio_ws.hosting import modes as runmode
from trio_ws.hosting.compose import create_hub, tune_gc
from trio_ws.hosting.logs import configure_logging
from trio_ws.hosting.modes import RunMode
from trio_ws.hosting.sockets import set_stall_timeout_on_listeners
from trio_ws.settings import Settings
from trio_ws.shell.sinks import DirectWriter

if TYPE_CHECKING:
    from trio_ws.core.registry import Connection

LOGGER = logging.getLogger(__name__)

#: How long a close handshake may take before we give up on it.
CLOSE_TIMEOUT_S = 5.0


def templates_dir() -> Path:
    """The page's folder: inside the package when installed, the repository's ``templates/``
    when running from a checkout (or an editable install)."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "templates"
    if packaged.is_dir():
        return packaged
    return package.parent / "templates"


def create_app(
    settings: Settings | None = None,
    *,
    hub: Hub | None = None,
    run_mode: RunMode | None = None,
) -> QuartTrio:
    """Build the app. Without arguments it reads ``TRIO_WS_*`` and detects the run mode.

    Errors: :class:`trio_ws.SettingsError` for an invalid environment variable.
    """
    if settings is None:
        settings = Settings.from_env(os.environ)
    configure_logging(settings.log_level_number)
    hub = hub if hub is not None else create_hub(settings)
    app = QuartTrio(__name__, template_folder=str(templates_dir()))
    app.extensions["trio_ws.core.hub"] = hub
    # No redirects: a WebSocket client cannot follow them, and every malformed client id
    # ("/ws//", "/ws/a/") must reach the handler to be refused with 1008 and a reason.
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False

    @app.while_serving
    async def lifespan() -> Any:
        mode = run_mode if run_mode is not None else runmode.detect()
        app.extensions["trio_ws.mode"] = mode
        runmode.log_startup(mode, settings, version=__version__)
        if mode in (RunMode.HYPERCORN_WORKER, RunMode.HYPERCORN_INPROCESS):
            runmode.prepare_worker(settings)
            tuned = set_stall_timeout_on_listeners(settings.stall_timeout)
            LOGGER.info("TCP_USER_TIMEOUT %gs set on %d listeners", settings.stall_timeout, tuned)
        tune_gc()
        try:
            await app.nursery.start(hub.run)
        except* BrokerUnavailableError as group:
            if mode is RunMode.EMBEDDED:
                raise
            runmode.exit_at_startup(str(group.exceptions[0]))
        if mode in (RunMode.HYPERCORN_WORKER, RunMode.HYPERCORN_INPROCESS):
            app.nursery.start_soon(runmode.own_signals, hub, mode)
            app.nursery.start_soon(runmode.exit_watchdog, hub, runmode.exit_watchdog_s(settings))
        yield
        # Lifespan shutdown: normally the drain is long over. A host that shuts down without
        # one (an embedding test, a custom runner) still gets every client closed with 1001.
        if hub.state is not HubState.STOPPED:
            hub.force_close("lifespan shutdown before a drain")
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await hub.wait_stopped()

    @app.get("/")
    async def index() -> str:
        return await render_template("index.html", version=__version__)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        report = hub.health()
        mode = app.extensions.get("trio_ws.mode")
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

    # <path:...> and "/ws/" so that every malformed id ("", "a/b", "%2F") reaches the handler
    # and gets 1008 with a reason rather than an HTTP 404 at the handshake.
    @app.websocket("/ws")
    @app.websocket("/ws/", defaults={"client_id": ""})
    @app.websocket("/ws/<path:client_id>")
    async def ws(client_id: str | None = None) -> None:
        await _handle_websocket(hub, settings, client_id)

    return app


async def _handle_websocket(hub: Hub, settings: Settings, client_id: str | None) -> None:
    # The proxy costs a context lookup per call; the handler's tasks share the real object.
    ws = websocket._get_current_object()  # type: ignore[attr-defined]
    client = ws.scope.get("client")
    peer = f"{client[0]}:{client[1]}" if client else "<unknown>"
    # Accept first: closing before the handshake would answer HTTP 403, which clients treat as
    # fatal; a close frame carries a code they can act on.
    await ws.accept()
    if hub.draining:
        hub.note_refused(peer)
        await _close(ws, CloseCode.GOING_AWAY, REFUSED_REASON, peer)
        return
    since = ws.args.get("since") or None
    try:
        if since is not None:
            protocol.validate_since(since)
        connection = hub.connect(client_id, peer, resuming=since is not None)
    except (ClientIdError, ResumeError) as error:
        LOGGER.info("refused %s from %s: %s", ws.full_path, peer, error)
        await _close(ws, CloseCode.POLICY_VIOLATION, str(error), peer)
        return
    try:
        if since is not None:
            await hub.resume(connection, since)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write, ws, connection)
            nursery.start_soon(_read, ws, connection, hub, settings.max_message_size)
            await connection.wait_close_requested()
            nursery.cancel_scope.cancel()
        assert connection.close_code is not None
        await _close(ws, connection.close_code, connection.close_reason, connection.client_id)
    finally:
        hub.disconnect(connection)


async def _write(ws: Any, connection: Connection) -> None:
    """Drain the outbox into the socket: a backlog goes out in one write (see transport.py).

    While nothing is queued, broadcasts write to the socket themselves (``write_through``) and
    this task sleeps. Each iteration has a cancellation point and, unless a held-over frame is
    waiting, a schedule point in ``receive_batch``: a send that returns at once after the peer
    closed cannot spin (the send-after-close livelock in the notes on Hypercorn).
    """
    direct = DirectWriter.find(ws)
    connection.writer = "quart" if direct is None else "direct"
    if direct is None:
        while True:
            for frame in await connection.receive_batch():
                if frame.text:  # WAKE (empty) is only ever queued for the direct writer
                    await ws.send(frame.text)
            await trio.lowlevel.checkpoint()
    connection.write_through = direct.try_write
    try:
        while True:
            # receive_batch() returns a held-over frame without a checkpoint, and a write the
            # socket takes at once has none either: let a cancellation in here.
            await trio.lowlevel.checkpoint_if_cancelled()
            batch = await connection.receive_batch()
            # False means the connection is closing: what is queued is dropped with it.
            await direct.send(batch[0].wire if len(batch) == 1 else b"".join(f.wire for f in batch))
    finally:
        connection.write_through = None


async def _read(ws: Any, connection: Connection, hub: Hub, max_size: int) -> None:
    while True:
        data = await ws.receive()
        if not isinstance(data, str):
            connection.request_close(
                CloseCode.UNSUPPORTED_DATA, "binary frames are not supported; send text"
            )
            return
        # len() counts characters; UTF-8 needs at most 4 bytes for each.
        if len(data) > max_size or (
            len(data) * 4 > max_size and len(data.encode("utf-8")) > max_size
        ):
            connection.request_close(
                CloseCode.MESSAGE_TOO_BIG, f"message larger than {max_size} bytes"
            )
            return
        await hub.publish(connection.client_id, data)


async def _close(ws: Any, code: int, reason: str, who: str) -> None:
    """Send a close frame; an error here concerns this client only, so log it and move on."""
    with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True) as scope:
        try:
            await ws.close(code, reason)
        except Exception as error:
            LOGGER.warning("error closing client %s with %d: %r", who, code, error)
    if scope.cancelled_caught:
        LOGGER.warning("client %s did not take its close frame within %gs", who, CLOSE_TIMEOUT_S)
