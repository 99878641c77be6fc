"""Shared fixtures: settings for tests and a real in-process Hypercorn server on port 0."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import trio

from trio_ws.hosting.launcher import RunningServer, serve
from trio_ws.settings import Settings

StartServer = Callable[..., Awaitable[RunningServer]]


@pytest.fixture
def settings() -> Settings:
    # Periodic and presence frames off unless a test asks for them: frame sequences are
    # predictable.
    return Settings(
        port=0, broadcast_interval=0, presence_interval=0, ping_interval=0, log_level="DEBUG"
    )


@pytest.fixture
def start_server(nursery: trio.Nursery, settings: Settings) -> StartServer:
    """Start a real Hypercorn server (the launcher's ``serve``) with ``settings`` changed by
    keyword arguments; signals stay with pytest, tests call ``hub.request_drain``."""

    async def start(**changes: Any) -> RunningServer:
        server: RunningServer = await nursery.start(
            partial(serve, settings.with_changes(**changes), handle_signals=False)
        )
        return server

    return start


@pytest.fixture
async def server(start_server: StartServer) -> RunningServer:
    return await start_server()


_LAYERS = ("unit", "integration", "system")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with the folder it lives in, so ``-m unit`` (or ``-m "not system"``)
    selects a layer from anywhere."""
    for item in items:
        for layer in _LAYERS:
            if f"/tests/{layer}/" in item.path.as_posix():
                item.add_marker(getattr(pytest.mark, layer))
