"""Hostile clients for tests: raw WebSocket frames, a bystander that must keep being served,
and the checks that a server process outlived an attack."""

from __future__ import annotations

import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from tests.procutil import ServerProcess
from tests.wsutil import next_frame

TEXT, BINARY, CLOSE, PING = 0x1, 0x2, 0x8, 0x9


def client_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
) -> bytes:
    """One client frame, well-formed unless asked otherwise: ``rsv`` sets RSV1-3 (0-7),
    ``masked=False`` omits the mask clients must send, ``length`` claims another length."""
    claimed = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0xF)])
    mask_bit = 0x80 if masked else 0
    if claimed < 126:
        head += bytes([mask_bit | claimed])
    elif claimed < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", claimed)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", claimed)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def masked_bulk(opcode: int, size: int) -> bytes:
    """A large masked frame of ``size`` ASCII characters, built fast (mask of zeros)."""
    frame = client_frame(opcode, b"", length=size)
    return frame[:-4] + b"\0\0\0\0" + b"x" * size


async def read_until_close_frame(sock: trio.socket.SocketType, timeout: float = 10) -> bytes:
    """Read until the bytes of a server close frame (opcode 8, two-byte code) have arrived;
    return everything read. Good enough for short server frames (pings, closes)."""
    data = b""
    with trio.fail_after(timeout):
        while (at := data.find(b"\x88")) < 0 or len(data) < at + 4:
            chunk = await sock.recv(65536)
            assert chunk, "connection ended without a close frame"
            data += chunk
    return data


async def wait_closed(sock: trio.socket.SocketType, timeout: float = 10) -> None:
    """Read and discard until the server ends the TCP connection (FIN or reset)."""
    with trio.fail_after(timeout):
        while True:
            try:
                if not await sock.recv(65536):
                    return
            except ConnectionResetError:
                return


@asynccontextmanager
async def bystander(url: str, name: str = "bystander") -> AsyncIterator[WebSocketConnection]:
    """A well-behaved client, connected (welcome read) before the attack starts."""
    async with open_websocket_url(f"{url}/{name}") as ws:
        assert (await next_frame(ws))["type"] == "welcome"
        yield ws


async def assert_still_served(server: ServerProcess, url: str, ws: WebSocketConnection) -> None:
    """The process is alive and a broadcast sent after the attack reaches ``ws``."""
    with trio.move_on_after(0.5):  # a process that is going down: let it finish, and say so
        await server.process.wait()
    assert server.process.returncode is None, f"server exited:\n{server.log[-3000:]}"
    async with open_websocket_url(f"{url}/after-attack") as sender:
        await next_frame(sender)
        await sender.send_message("after the attack")
        with trio.fail_after(5):
            while True:
                frame = await next_frame(ws)
                if frame["type"] == "message" and frame["text"] == "after the attack":
                    break
    assert server.process.returncode is None, f"server exited:\n{server.log[-3000:]}"
