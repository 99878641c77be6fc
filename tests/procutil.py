"""A server in a real process: started on a free port, its log read line by line, signalled by
PID, and always stopped by the test that started it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

BIN = os.path.dirname(sys.executable)


def console_script(name: str) -> str:
    path = shutil.which(name, path=BIN)
    assert path is not None, f"{name} is not installed next to {sys.executable}"
    return path


LAUNCHER = [sys.executable, "-m", "trio_ws", "--host", "127.0.0.1", "--port", "0"]


def hypercorn(*extra: str) -> list[str]:
    return [
        console_script("hypercorn"),
        "--worker-class",
        "trio",
        "--bind",
        "127.0.0.1:0",
        *extra,
        "trio_ws.app:app",
    ]


@dataclass
class ServerProcess:
    process: trio.Process
    lines: list[str] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)
    exited_at: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    async def _pump(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            if complete:
                self.lines.extend(line.decode(errors="replace") for line in complete)
                self._changed.set()
                self._changed = trio.Event()
        if buffer:
            self.lines.append(buffer.decode(errors="replace"))
        self._changed.set()

    async def wait_for_line(
        self, pattern: str, timeout: float = 10, start: int = 0
    ) -> re.Match[str]:
        """The first log line from index ``start`` on that matches ``pattern``."""
        regex = re.compile(pattern)
        with trio.fail_after(timeout):
            while True:
                for line in self.lines[start:]:
                    if match := regex.search(line):
                        return match
                if self.process.returncode is not None and self._changed.is_set():
                    raise AssertionError(f"process exited without logging {pattern!r}:\n{self.log}")
                await self._changed.wait()

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        return sum(1 for line in self.lines if regex.search(line))

    async def base_url(self) -> str:
        match = await self.wait_for_line(r"Running on (http://127\.0\.0\.1:\d+)")
        return match.group(1)

    async def ws_url(self) -> str:
        return (await self.base_url()).replace("http", "ws", 1) + "/ws"

    def send(self, signum: int) -> float:
        """Signal the process (by PID); return the monotonic time it was sent."""
        os.kill(self.pid, signum)
        return time.monotonic()

    def send_group(self, signum: int) -> float:
        """Signal the whole process group, as systemd or a terminal's Ctrl+C does."""
        os.killpg(self.pid, signum)
        return time.monotonic()

    async def wait_exit(self, timeout: float = 10) -> int:
        with trio.fail_after(timeout):
            returncode = await self.process.wait()
        return returncode


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@asynccontextmanager
async def running(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    ready: bool = True,
    sigint_ignored: bool = False,
) -> AsyncIterator[ServerProcess]:
    """Start ``argv`` in its own process group; kill it (by PID) if the test left it running.

    ``sigint_ignored`` starts it the way a shell starts a background job: SIGINT ignored.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
            preexec_fn=_ignore_sigint if sigint_ignored else None,
        )
        server = ServerProcess(process)
        nursery.start_soon(server._pump)
        try:
            if ready:
                await server.wait_for_line(r"Running on http://", timeout=20)
            yield server
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            with trio.move_on_after(5, shield=True):
                await process.wait()
            nursery.cancel_scope.cancel()
