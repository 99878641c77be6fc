"""A small command-line client: ``python -m trio_ws.client``.

It prints every frame it receives, one line each, can send messages, and can leave by itself a
given time after the server's ``shutdown`` warning, which is how well-behaved clients drain away.
It is what the README's drain scenarios use.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

if TYPE_CHECKING:
    from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trio_ws.client", description="Watch a trio_ws server and talk to it."
    )
    parser.add_argument("client_id", nargs="?", help="client id (default: assigned by server)")
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws", help="%(default)s")
    parser.add_argument(
        "--send",
        action="append",
        default=[],
        metavar="TEXT",
        help="send TEXT after the welcome (repeatable)",
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
    return parser


def describe(frame: dict[str, object]) -> str:
    kind = frame.get("type")
    if kind == "welcome":
        return (
            f"welcome: I am {frame['client_id']} on instance {frame.get('instance')}, "
            f"{frame['active_connections']} connected"
        )
    if kind == "message":
        return f"message {frame['id']} from {frame['from']}: {frame['text']}"
    if kind == "periodic":
        return f"periodic {frame['id']}: {frame['active_connections']} connected"
    if kind == "shutdown":
        return f"SHUTDOWN WARNING: {frame['reason']} (forced close in {frame['seconds_left']}s)"
    return f"unknown frame: {frame}"


async def run(args: argparse.Namespace, out: list[str] | None = None) -> int:
    """Connect, print, and return 0 (left by itself or closed by the server) or 1 (error)."""

    def emit(line: str) -> None:
        line = f"[{args.client_id or 'client'}] {line}"
        if out is not None:
            out.append(line)
        print(line, flush=True)

    url = args.url.rstrip("/") + (f"/{args.client_id}" if args.client_id else "")
    try:
        async with open_websocket_url(url) as ws, trio.open_nursery() as nursery:

            async def leave_in(seconds: float) -> None:
                await trio.sleep(seconds)
                emit(f"leaving after {seconds:g}s")
                await ws.aclose()

            if args.leave_after is not None:
                nursery.start_soon(leave_in, args.leave_after)
            while True:
                try:
                    message = await ws.get_message()
                except ConnectionClosed as closed:
                    reason = closed.reason
                    if reason is None:
                        emit("closed")
                    else:
                        emit(f"closed: code {reason.code} ({reason.reason or reason.name})")
                    nursery.cancel_scope.cancel()
                    return 0
                frame = json.loads(message)
                emit(describe(frame))
                if frame.get("type") == "welcome":
                    for text in args.send:
                        await ws.send_message(text)
                if frame.get("type") == "shutdown" and args.leave_after_warning is not None:
                    nursery.start_soon(leave_in, args.leave_after_warning)
    except (OSError, HandshakeError) as error:
        emit(f"cannot connect to {url}: {error}")
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return trio.run(run, args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
