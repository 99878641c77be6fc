"""The guard around Hypercorn's connection task: installed in every app, and failing closed on a
Hypercorn it was not checked against (trio_ws/shell/hypercorn_guard.py)."""

from __future__ import annotations

import sys

import pytest
from hypercorn.trio.tcp_server import TCPServer

from tests.procutil import running
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
