"""The command-line client: in process against a real server, and as a real process fed by a
pipe or a terminal and sent SIGINT by PID."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import termios
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import trio
from trio_websocket import open_websocket_url

from tests.wsutil import next_frame, wait_until
from trio_ws.client import CLOSE_TIMEOUT_S, build_parser, run
from trio_ws.hosting.launcher import RunningServer

CLIENT = [sys.executable, "-m", "trio_ws.client"]
WELCOME = r"^\[{}\] welcome: I am {} "


async def test_client_prints_frames_and_drains_away_after_the_warning(
    server: RunningServer,
) -> None:
    out: list[str] = []
    args = build_parser().parse_args(
        ["alice", "--url", server.ws_url, "--send", "hi <all>", "--leave-after-warning", "0.1"]
    )
    async with trio.open_nursery() as nursery:

        async def drain_soon() -> None:
            while len(out) < 2:  # noqa: ASYNC110  # the client's own output is the signal
                await trio.sleep(0.01)
            server.hub.request_drain("SIGTERM")

        nursery.start_soon(drain_soon)
        with trio.fail_after(5):
            assert await run(args, out) == 0
    instance = server.hub.instance_id
    assert out[0] == f"[alice] welcome: I am alice on instance {instance}, 1 connected"
    assert re.match(r"\[alice\] message \d+-\d+ from alice: hi <all>", out[1]), out[1]
    assert out[2].startswith("[alice] SHUTDOWN WARNING: server is shutting down (SIGTERM)")
    assert out[3:] == ["[alice] leaving after 0.1s", "[alice] closed: code 1000 (NORMAL_CLOSURE)"]


async def test_client_reports_an_unreachable_server() -> None:
    out: list[str] = []
    args = build_parser().parse_args(["--url", "ws://127.0.0.1:1/ws"])
    assert await run(args, out) == 1
    assert out[0].startswith("[client] cannot connect to ws://127.0.0.1:1/ws")


@dataclass
class Lines:
    """One output stream of a process, line by line as it arrives."""

    lines: list[str] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)
    ended: bool = False

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def _add(self, lines: Sequence[bytes]) -> None:
        # A terminal ends lines with \r\n.
        self.lines.extend(line.decode(errors="replace").removesuffix("\r") for line in lines)
        self._changed.set()
        self._changed = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        buffer = b""
        with contextlib.suppress(trio.BrokenResourceError):  # a terminal's end is EIO
            while chunk := await stream.receive_some():
                *complete, buffer = (buffer + chunk).split(b"\n")
                self._add(complete)
        self.ended = True
        self._add([buffer] if buffer else [])

    async def wait_for(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        """The first line that matches ``pattern``."""
        regex = re.compile(pattern)
        with trio.fail_after(timeout):
            while True:
                for line in self.lines:
                    if match := regex.search(line):
                        return match
                if self.ended:
                    raise AssertionError(f"no line matches {pattern!r}:\n{self.text}")
                await self._changed.wait()


@dataclass
class ClientProcess:
    process: trio.Process
    keyboard: trio.abc.SendStream
    stdout: Lines = field(default_factory=Lines)
    stderr: Lines = field(default_factory=Lines)

    async def type(self, data: bytes) -> None:
        await self.keyboard.send_all(data)

    async def end_input(self) -> None:
        await self.keyboard.aclose()

    def interrupt(self) -> float:
        """SIGINT by PID, as Ctrl+C sends it; return the monotonic time it was sent."""
        os.kill(self.process.pid, signal.SIGINT)
        return time.monotonic()

    async def wait_exit(self, timeout: float = 10) -> int:
        with trio.fail_after(timeout):
            return await self.process.wait()


def _default_sigint() -> None:
    # As a terminal's foreground job has it, even when pytest itself runs with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _terminal_session() -> None:
    _default_sigint()
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@asynccontextmanager
async def client_process(*args: str) -> AsyncIterator[ClientProcess]:
    """``python -m trio_ws.client ARGS`` with stdin, stdout and stderr pipes; killed (by PID)
    if the test left it running."""
    process = await trio.lowlevel.open_process(
        [*CLIENT, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_default_sigint,
    )
    stdin, stdout, stderr = process.stdin, process.stdout, process.stderr
    assert stdin is not None
    assert stdout is not None
    assert stderr is not None
    client = ClientProcess(process, stdin)
    async with stdin, stdout, stderr, _pumping(client, stdout, stderr):
        yield client


@asynccontextmanager
async def terminal_process(argv: Sequence[str]) -> AsyncIterator[ClientProcess]:
    """``argv`` in a new session whose controlling terminal is a fresh pty; what it writes is
    ``stdout``, what the test types is its keyboard (Ctrl+C included)."""
    main, secondary = os.openpty()
    try:
        process = await trio.lowlevel.open_process(
            list(argv),
            stdin=secondary,
            stdout=secondary,
            stderr=secondary,
            preexec_fn=_terminal_session,
        )
    finally:
        os.close(secondary)
    terminal = trio.lowlevel.FdStream(main)
    client = ClientProcess(process, terminal)
    async with terminal, _pumping(client, terminal):
        yield client


@asynccontextmanager
async def _pumping(
    client: ClientProcess,
    stdout: trio.abc.ReceiveStream,
    stderr: trio.abc.ReceiveStream | None = None,
) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.stdout.pump, stdout)
        if stderr is not None:
            nursery.start_soon(client.stderr.pump, stderr)
        try:
            yield
        finally:
            pid = client.process.pid
            if client.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
            with trio.move_on_after(5, shield=True):
                await client.process.wait()
            # Whatever still holds the output open (nothing should) must not hang the test.
            nursery.cancel_scope.deadline = trio.current_time() + 5


async def test_stdin_lines_are_sent_and_come_back_as_broadcasts(server: RunningServer) -> None:
    with trio.fail_after(20):
        async with (
            open_websocket_url(server.ws_url + "/watcher") as watcher,
            client_process("bob", "--url", server.ws_url) as bob,
        ):
            assert (await next_frame(watcher))["type"] == "welcome"
            await bob.stdout.wait_for(WELCOME.format("bob", "bob"))
            await bob.type(b"hello there\n\n \t\nsecond line\r\n")
            for text in ("hello there", "second line"):
                await bob.stdout.wait_for(rf"^\[bob\] message \S+ from bob: {text}$")
            await bob.type(b"third ")
            await bob.type(b"in two writes\n")
            await bob.stdout.wait_for(r"^\[bob\] message \S+ from bob: third in two writes$")
            # At the end of stdin bob stays connected: it still receives.
            await bob.end_input()
            await watcher.send_message("still there?")
            await bob.stdout.wait_for(r"^\[bob\] message \S+ from watcher: still there\?$")
            assert bob.process.returncode is None
            frames = [await next_frame(watcher) for _ in range(4)]
    # The blank lines were never sent.
    assert [(f["from"], f["text"]) for f in frames] == [
        ("bob", "hello there"),
        ("bob", "second line"),
        ("bob", "third in two writes"),
        ("watcher", "still there?"),
    ]
    assert bob.stderr.lines == []


async def test_leave_at_eof_sends_the_last_line_then_closes(server: RunningServer) -> None:
    with trio.fail_after(20):
        async with (
            open_websocket_url(server.ws_url + "/watcher") as watcher,
            client_process("carol", "--url", server.ws_url, "--leave-at-eof") as carol,
        ):
            await next_frame(watcher)
            await carol.stdout.wait_for(WELCOME.format("carol", "carol"))
            await carol.type(b"no newline at the end")
            await carol.end_input()
            assert await carol.wait_exit() == 0
            frame = await next_frame(watcher)
    assert (frame["from"], frame["text"]) == ("carol", "no newline at the end")
    assert "[carol] leaving at the end of stdin" in carol.stdout.lines
    assert carol.stdout.lines[-1] == "[carol] closed: code 1000 (NORMAL_CLOSURE)"


async def test_raw_prints_each_frame_exactly_as_received(server: RunningServer) -> None:
    with trio.fail_after(20):
        async with (
            open_websocket_url(server.ws_url + "/watcher") as watcher,
            client_process("dave", "--url", server.ws_url, "--raw", "--send", 'say "hé"') as dave,
        ):
            await next_frame(watcher)
            broadcast = await watcher.get_message()
            assert isinstance(broadcast, str)
            await dave.stdout.wait_for(f"^{re.escape(broadcast)}$")
            dave.interrupt()
            assert await dave.wait_exit() == 130
    welcome, message = dave.stdout.lines  # stdout holds the frames and nothing else
    assert message == broadcast
    assert json.loads(message)["text"] == 'say "hé"'
    assert json.loads(welcome)["type"] == "welcome"
    assert json.loads(welcome)["client_id"] == "dave"
    assert dave.stderr.lines == ["[dave] interrupted"]


async def test_sigint_ends_the_client_quietly_with_status_130(server: RunningServer) -> None:
    with trio.fail_after(20):
        async with client_process("erin", "--url", server.ws_url) as erin:
            await erin.stdout.wait_for(WELCOME.format("erin", "erin"))
            assert len(server.hub.registry) == 1
            # stdin is an open pipe with nothing to read: the client waits on it meanwhile.
            erin.interrupt()
            assert await erin.wait_exit() == 130
        await wait_until(lambda: len(server.hub.registry) == 0)
    assert "Traceback" not in erin.stderr.text
    assert erin.stderr.lines == []
    assert erin.stdout.lines[-1] == "[erin] interrupted"


async def start_silent_server(
    nursery: trio.Nursery, frames: Sequence[str], received: list[tuple[int, str]]
) -> int:
    """A WebSocket server on loopback that sends ``frames``, records the close frame it gets,
    and never answers it; return its port."""

    async def handle(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some()
        key = re.search(rb"(?i)sec-websocket-key: *(\S+)", request)
        assert key is not None
        digest = hashlib.sha1(key.group(1) + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + base64.b64encode(digest) + b"\r\n\r\n"
        )
        for text in frames:
            payload = text.encode()
            assert len(payload) < 126
            await stream.send_all(bytes([0x81, len(payload)]) + payload)
        data = b""
        while len(data) < 2 or len(data) < 6 + (data[1] & 0x7F):
            chunk = await stream.receive_some()
            assert chunk, "the client closed the TCP connection without a close frame"
            data += chunk
        assert data[0] == 0x88, data  # FIN + close; the client sent nothing before it
        mask, payload = data[2:6], data[6 : 6 + (data[1] & 0x7F)]
        payload = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        received.append((int.from_bytes(payload[:2], "big"), payload[2:].decode()))
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def test_sigint_closes_politely_but_does_not_wait_long(nursery: trio.Nursery) -> None:
    received: list[tuple[int, str]] = []
    port = await start_silent_server(nursery, ['{"type":"surprise","n":1}'], received)
    with trio.fail_after(20):
        async with client_process("--url", f"ws://127.0.0.1:{port}/ws") as frank:
            await frank.stdout.wait_for(r'^\[client\] unknown frame: \{"type":"surprise","n":1\}$')
            sent = frank.interrupt()
            assert await frank.wait_exit() == 130
            waited = time.monotonic() - sent
    assert received == [(1001, "interrupted")]
    # It waited for the answer that never came, and not much longer.
    assert CLOSE_TIMEOUT_S <= waited < CLOSE_TIMEOUT_S + 2, waited
    assert frank.stdout.lines[-1] == "[client] interrupted"
    assert "Traceback" not in frank.stderr.text


async def test_in_a_terminal_typed_lines_are_sent_and_ctrl_c_ends_quietly(
    server: RunningServer,
) -> None:
    with trio.fail_after(20):
        async with terminal_process([*CLIENT, "gina", "--url", server.ws_url]) as gina:
            await gina.stdout.wait_for(WELCOME.format("gina", "gina"))
            await gina.type(b"typed by hand\n")
            await gina.stdout.wait_for(r"^\[gina\] message \S+ from gina: typed by hand$")
            await gina.type(b"\x03")  # Ctrl+C: the terminal sends SIGINT to its foreground job
            assert await gina.wait_exit() == 130
    assert "Traceback" not in gina.stdout.text
    assert gina.stdout.lines[-1].endswith("[gina] interrupted")


async def test_in_the_background_of_a_terminal_it_does_not_read_it(
    server: RunningServer,
) -> None:
    # As the README's drain scenarios run clients: `client ... &` in an interactive shell. A job
    # in the background that reads its terminal is stopped (SIGTTIN) and never leaves.
    # --leave-after bounds its life; stopped and orphaned, it would get SIGHUP.
    client = shlex.join([*CLIENT, "hal", "--url", server.ws_url, "--leave-after", "1"])
    with trio.fail_after(20):
        async with terminal_process(["bash", "-c", f"set -m; {client} & wait $!; echo $?"]) as hal:
            status = await hal.stdout.wait_for(r"^(\d+)$")
    assert status.group(1) == "0", hal.stdout.text
    assert "[hal] leaving after 1s" in hal.stdout.lines
