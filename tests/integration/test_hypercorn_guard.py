"""The guard around Hypercorn's connection task: installed in every app, and failing closed on a
Hypercorn it was not checked against (trio_ws/shell/hypercorn_guard.py)."""

from __future__ import annotations

import sys

import pytest
import trio
from hypercorn.events import Updated
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.trio.tcp_server import TCPServer

from tests.conftest import StartServer
from tests.procutil import running
from tests.wsutil import http_get, wait_until
from trio_ws.hosting.compose import build_app
from trio_ws.settings import Settings
from trio_ws.shell import hypercorn_guard


def test_build_app_installs_the_guard_once() -> None:
    build_app(Settings(port=0))
    guarded = TCPServer.run
    assert getattr(guarded, "_trio_ws_guarded", False)
    build_app(Settings(port=0))
    assert TCPServer.run is guarded  # not wrapped twice


def test_the_installed_hypercorn_is_verified() -> None:
    assert hypercorn_guard.check() is None


def test_an_unverified_release_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hypercorn_guard, "VERIFIED_HYPERCORN", ("0.0.1",))
    assert hypercorn_guard.check() == "Hypercorn 0.18.0 is not a verified release"


def test_a_changed_connection_task_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    async def run(self: TCPServer) -> None:  # the stream is no longer closed in a finally
        await self.protocol.initiate()

    monkeypatch.setattr(TCPServer, "run", run)
    assert hypercorn_guard.check() == (
        "TCPServer.run no longer uses TaskGroup, ProtocolWrapper, _read_data, _close, stream"
    )
    with pytest.raises(hypercorn_guard.HypercornGuardError, match="refusing to run without"):
        hypercorn_guard.install()
    assert TCPServer.run is run


def test_a_changed_idle_timer_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cap on waiting connections follows Hypercorn's Updated events and relies on its
    keep-alive timeout: without them it would count nothing, so the server does not start."""

    async def protocol_send(self: TCPServer, event: object) -> None:
        await self.stream.send_all(b"")  # Updated no longer starts or stops the idle timer

    monkeypatch.setattr(TCPServer, "protocol_send", protocol_send)
    assert hypercorn_guard.check() == (
        "TCPServer.protocol_send no longer starts and stops the idle timer on Updated"
    )
    monkeypatch.undo()

    async def idle_timeout(self: TCPServer) -> None:
        pass

    monkeypatch.setattr(TCPServer, "_idle_timeout", idle_timeout)
    assert hypercorn_guard.check() == (
        "TCPServer no longer closes a connection after keep_alive_timeout"
    )


def test_an_http2_start_that_changed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wrapper tells Hypercorn that a new HTTP/2 connection is idle: if Hypercorn ever does
    it itself (or the method is gone), the wrapper is not the one checked."""

    async def initiate(self: H2Protocol, *args: object) -> None:
        await self.send(Updated(idle=True))

    monkeypatch.setattr(H2Protocol, "initiate", initiate)
    assert hypercorn_guard.check() == (
        "H2Protocol.initiate is gone, or now reports whether it is idle"
    )


async def test_the_launcher_refuses_to_start_unguarded() -> None:
    code = (
        "import trio_ws.shell.hypercorn_guard as guard; guard.VERIFIED_HYPERCORN = ('0.0.1',); "
        "from trio_ws.hosting.cli import main; main()"
    )
    argv = [sys.executable, "-c", code, "--host", "127.0.0.1", "--port", "0"]
    async with running(argv, ready=False) as server:
        assert await server.wait_exit(timeout=20) == 1
    assert server.count(r"cannot start: Hypercorn 0\.18\.0 is not a verified release") == 1
    assert server.count("Running on") == 0
    assert server.count("Traceback") == 0


async def test_at_the_waiting_cap_the_oldest_waiting_connection_is_closed(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cap 2: a third silent socket closes the first; a request that arrives whole is served,
    closing the oldest waiting one in its turn."""
    server = await start_server()
    monkeypatch.setattr(hypercorn_guard, "_waiting_limit", 2)
    host, port = server.binds[0].split("://", 1)[1].rsplit(":", 1)

    async def connect() -> trio.SocketStream:
        return await trio.open_tcp_stream(host, int(port))

    async def closed(stream: trio.SocketStream) -> bool:
        with trio.move_on_after(2):
            try:
                return await stream.receive_some() == b""
            except trio.BrokenResourceError:
                return True
        return False

    first, second, third = await connect(), await connect(), await connect()
    assert await closed(first)
    assert hypercorn_guard.waiting_count() == 2
    status, _ = await http_get(server.binds[0], "/health")
    assert status == 200
    assert await closed(second)
    assert not await closed(third)  # the newest silent one is still there
    for stream in (first, second, third):
        await stream.aclose()
    await wait_until(lambda: hypercorn_guard.waiting_count() == 0)
