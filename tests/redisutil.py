"""A real redis-server for a test: on a free loopback port, nothing on disk, stopped by PID.

It can be killed (SIGKILL, as a crash) and started again on the same port, empty, as a Redis
without persistence comes back after a restart.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    def __init__(
        self, executable: str, port: int, directory: str, extra: tuple[str, ...] = ()
    ) -> None:
        self.executable = executable
        self.port = port
        self.directory = directory
        #: More redis-server options, such as ``("--maxmemory", "20mb")``.
        self.extra = extra
        self.process: trio.Process | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        assert self.process is None or self.process.returncode is not None
        self.starts += 1
        self.process = await trio.lowlevel.open_process(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
                "--logfile",
                os.path.join(self.directory, f"redis-{self.starts}.log"),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with trio.fail_after(10):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    assert self.process.returncode is None, "redis-server exited at startup"
                    await trio.sleep(0.02)
                    continue
                await stream.send_all(b"PING\r\n")
                reply = await stream.receive_some(64)
                await stream.aclose()
                if reply.startswith(b"+PONG"):
                    return
                await trio.sleep(0.02)

    async def kill(self) -> None:
        """SIGKILL: a crash, with no goodbye to the clients."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            with trio.move_on_after(5, shield=True):
                await self.process.wait()


def redis_executable() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.fail(
            "redis-server is not installed: the cluster tests need a real Redis "
            "(Debian: apt-get install redis-server; .ci/run installs it)"
        )
    return path


@asynccontextmanager
async def redis_server(directory: str, *extra: str) -> AsyncIterator[RedisServer]:
    server = RedisServer(redis_executable(), free_port(), directory, extra)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
