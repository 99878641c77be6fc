"""A small command-line client: ``python -m trio_ws.client``.

It prints every frame it receives, one line each (described, or with ``--raw`` the JSON exactly
as received), sends every line typed on stdin as a message, and can leave by itself a given time
after the server's ``shutdown`` warning, which is how well-behaved clients drain away. It is what
the README's drain scenarios use.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

if TYPE_CHECKING:
    from collections.abc import Sequence

    from trio_websocket import CloseReason, WebSocketConnection

#: Exit status after Ctrl+C, as a shell reports a process killed by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130
#: How long Ctrl+C waits for the server to answer the close frame before leaving anyway.
CLOSE_TIMEOUT_S = 1.0
READ_SIZE = 65536

EPILOG = f"""\
Every line read from stdin is sent as a message, blank lines excepted. When
stdin ends (Ctrl+D, or the end of a pipe or file), the client stops reading and
stays connected, unless --leave-at-eof. Started in the background of a terminal
(with &), it does not read the terminal. Ctrl+C closes the connection (waiting
at most {CLOSE_TIMEOUT_S:g} s for the server's answer) and exits with status {EXIT_INTERRUPTED}.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trio_ws.client",
        description="Watch a trio_ws server and talk to it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("client_id", nargs="?", help="client id (default: assigned by server)")
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws", help="%(default)s")
    parser.add_argument(
        "--token",
        default=os.environ.get("TRIO_WS_TOKEN"),
        help="signed token for a server that requires one, sent as Authorization: Bearer "
        "(default: $TRIO_WS_TOKEN, which keeps it out of the process list)",
    )
    parser.add_argument(
        "--send",
        action="append",
        default=[],
        metavar="TEXT",
        help="send TEXT after the welcome (repeatable), before the lines from stdin",
    )
    parser.add_argument(
        "--leave-after-warning",
        type=float,
        metavar="S",
        help="disconnect S seconds after the shutdown warning (default: stay)",
    )
    parser.add_argument(
        "--leave-after", type=float, metavar="S", help="disconnect S seconds after connecting"
    )
    parser.add_argument(
        "--leave-at-eof",
        action="store_true",
        help="disconnect when stdin ends (default: stay connected)",
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="print each frame's JSON exactly as received, one per line; the client's own "
        "lines (closed, leaving, errors) then go to stderr, so stdout is JSON Lines",
    )
    return parser


def describe(frame: dict[str, Any]) -> str | None:
    """One line for a frame of a known type; None for any other frame."""
    kind = frame.get("type")
    try:
        if kind == "welcome":
            return (
                f"welcome: I am {frame['client_id']} on instance {frame.get('instance')}, "
                f"{frame['active_connections']} connected"
            )
        if kind == "message":
            return f"message {frame['id']} from {frame['from']}: {frame['text']}"
        if kind == "periodic":
            return f"periodic {frame['id']}: {frame['active_connections']} connected"
        if kind == "presence":
            return f"presence: {frame['active_connections']} connected"
        if kind == "shutdown":
            return f"SHUTDOWN WARNING: {frame['reason']} (forced close in {frame['seconds_left']}s)"
        if kind == "error":
            return f"ERROR {frame['error']}: {frame['reason']}"
    except KeyError:
        pass
    return None


def parse(message: str | bytes) -> dict[str, Any]:
    """The frame's JSON object; empty when the frame is not one."""
    if isinstance(message, bytes):
        return {}
    try:
        frame = json.loads(message)
    except ValueError:
        return {}
    return frame if isinstance(frame, dict) else {}


class Printer:
    """The client's output: one line per frame, and its own status lines."""

    def __init__(self, name: str, *, raw: bool, out: list[str] | None = None) -> None:
        self.name = name
        self.raw = raw
        self.out = out

    def _print(self, line: str, *, to_stderr: bool) -> None:
        if self.out is not None:
            self.out.append(line)
        # Written at once, in order: a reader of stdout that stops reading stalls this client,
        # which then stops reading the server, as any slow client would.
        print(line, file=sys.stderr if to_stderr else sys.stdout, flush=True)

    def status(self, text: str) -> None:
        self._print(f"[{self.name}] {text}", to_stderr=self.raw)

    def frame(self, message: str | bytes, frame: dict[str, Any]) -> None:
        if isinstance(message, bytes):
            self.status(f"binary frame: {len(message)} bytes")
        elif self.raw:
            self._print(message, to_stderr=False)
        else:
            self.status(describe(frame) or f"unknown frame: {message}")

    def closed(self, reason: CloseReason | None) -> None:
        if reason is None:
            self.status("closed")
        else:
            self.status(f"closed: code {reason.code} ({reason.reason or reason.name})")


class Interrupt:
    """Ctrl+C: the first ends the session, then closes politely; a second stops that wait."""

    def __init__(self) -> None:
        self.happened = False
        self.connected = False
        self.whole = trio.CancelScope()
        self.session = trio.CancelScope()

    async def watch_sigint(self, *, task_status: trio.TaskStatus[None]) -> None:
        # A handler of our own instead of KeyboardInterrupt, which trio raises wherever it lands
        # (inside trio_websocket's tasks too) and wraps in exception groups.
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            task_status.started()
            async for _ in signals:
                if self.happened or not self.connected:
                    self.whole.cancel()
                self.session.cancel()
                self.happened = True


async def read_some(fd: int) -> bytes:
    # A thread rather than trio.lowlevel.FdStream: FdStream sets O_NONBLOCK on the open file,
    # which a terminal shares with the shell, and it cannot wait on a regular file or /dev/null.
    # A blocked read cannot be interrupted, so a cancelled one is abandoned; trio's worker
    # threads are daemons and do not hold up the exit.
    return await trio.to_thread.run_sync(os.read, fd, READ_SIZE, abandon_on_cancel=True)


async def send_line(ws: WebSocketConnection, line: bytes) -> None:
    text = line.decode(errors="replace").removesuffix("\r")
    if text.strip():
        await ws.send_message(text)


async def send_lines(
    ws: WebSocketConnection, fd: int, printer: Printer, *, leave_at_eof: bool
) -> None:
    """Send each line read from ``fd``; at its end, leave if asked to."""
    pending = b""
    try:
        while True:
            try:
                chunk = await read_some(fd)
            except OSError as error:
                printer.status(f"stopped reading stdin: {error}")
                return
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                await send_line(ws, line)
        await send_line(ws, pending)
    except ConnectionClosed:
        return  # the receiving loop reports the close
    if leave_at_eof:
        printer.status("leaving at the end of stdin")
        await ws.aclose()


async def talk(
    ws: WebSocketConnection, args: argparse.Namespace, printer: Printer, stdin_fd: int | None
) -> None:
    """Print frames and send messages until the connection is closed, by either side."""
    async with trio.open_nursery() as nursery:

        async def leave_in(seconds: float) -> None:
            await trio.sleep(seconds)
            printer.status(f"leaving after {seconds:g}s")
            await ws.aclose()

        if args.leave_after is not None:
            nursery.start_soon(leave_in, args.leave_after)
        try:
            while True:
                message = await ws.get_message()
                frame = parse(message)
                printer.frame(message, frame)
                if frame.get("type") == "welcome":
                    for text in args.send:
                        await ws.send_message(text)
                    if stdin_fd is not None:
                        nursery.start_soon(
                            partial(send_lines, leave_at_eof=args.leave_at_eof),
                            ws,
                            stdin_fd,
                            printer,
                        )
                        stdin_fd = None
                if frame.get("type") == "shutdown" and args.leave_after_warning is not None:
                    nursery.start_soon(leave_in, args.leave_after_warning)
        except ConnectionClosed:
            printer.closed(ws.closed)
            nursery.cancel_scope.cancel()


async def run(
    args: argparse.Namespace,
    out: list[str] | None = None,
    *,
    stdin_fd: int | None = None,
    handle_sigint: bool = False,
) -> int:
    """Connect and talk; return 0 (left by itself or closed by the server), 1 (cannot connect)
    or 130 (SIGINT, handled only with ``handle_sigint``). Reads lines from ``stdin_fd`` if given.
    """
    printer = Printer(args.client_id or "client", raw=args.raw, out=out)
    url = args.url.rstrip("/") + (f"/{args.client_id}" if args.client_id else "")
    interrupt = Interrupt()
    status = 0
    async with trio.open_nursery() as nursery:
        if handle_sigint:
            await nursery.start(interrupt.watch_sigint)
        with interrupt.whole:
            try:
                headers = (
                    [(b"authorization", f"Bearer {args.token}".encode())] if args.token else None
                )
                async with open_websocket_url(url, extra_headers=headers) as ws:
                    interrupt.connected = True
                    with interrupt.session:
                        await talk(ws, args, printer, stdin_fd)
                    if interrupt.session.cancelled_caught:
                        with trio.move_on_after(CLOSE_TIMEOUT_S):
                            await ws.aclose(1001, "interrupted")
            except (OSError, HandshakeError) as error:
                printer.status(f"cannot connect to {url}: {error}")
                status = 1
        nursery.cancel_scope.cancel()
    if interrupt.happened:
        printer.status("interrupted")
        return EXIT_INTERRUPTED
    return status


def readable_stdin() -> int | None:
    """Fd 0, unless it is a terminal this process is in the background of: reading it would
    stop the process (SIGTTIN), as it would a client started with ``&`` for a drain."""
    try:
        if os.isatty(0) and os.tcgetpgrp(0) != os.getpgrp():
            return None
    except OSError:
        pass  # a terminal that is not ours: reading it does not stop us
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return trio.run(partial(run, args, stdin_fd=readable_stdin(), handle_sigint=True))
    except* KeyboardInterrupt:
        # Ctrl+C in the instant before run() handles SIGINT itself.
        Printer(args.client_id or "client", raw=args.raw).status("interrupted")
    return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
