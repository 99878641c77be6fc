"""Client-side helpers for tests: frame decoding, polling with a bound, raw WebSocket sockets."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

#: Frames the helpers pass over: ``presence`` comes whenever the count changes (coalesced, on
#: its own clock), so a test that reads a sequence of broadcasts would race with it.
SKIPPED_TYPES = frozenset({"presence"})


async def next_frame(ws: WebSocketConnection, timeout: float = 5) -> dict[str, Any]:
    """The next frame from the server but ``presence`` (docs/protocol.md): one JSON object."""
    with trio.fail_after(timeout):
        while True:
            message = await ws.get_message()
            assert isinstance(message, str)
            frame: dict[str, Any] = json.loads(message)
            if frame.get("type") not in SKIPPED_TYPES:
                return frame


async def frames_until_closed(ws: WebSocketConnection, timeout: float = 10) -> list[dict[str, Any]]:
    """Read every frame until the server closes; the close reason is then on ``ws.closed``."""
    out: list[dict[str, Any]] = []
    with trio.fail_after(timeout):
        while True:
            try:
                message = await ws.get_message()
            except ConnectionClosed:
                return out
            assert isinstance(message, str)
            frame = json.loads(message)
            if frame.get("type") not in SKIPPED_TYPES:
                out.append(frame)


async def close_code(ws: WebSocketConnection, timeout: float = 10) -> tuple[int, str | None]:
    await frames_until_closed(ws, timeout)
    assert ws.closed is not None
    return ws.closed.code, ws.closed.reason


async def wait_until(predicate: Callable[[], bool], timeout: float = 5, step: float = 0.01) -> None:
    """Poll ``predicate`` (a state of another process or of the kernel) within ``timeout``."""
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110  # no event exists for what is polled
            await trio.sleep(step)


async def raw_handshake(
    host: str,
    port: int,
    path: str = "/ws",
    rcvbuf: int | None = None,
    *,
    source: str | None = None,
    headers: str = "",
) -> trio.socket.SocketType:
    """A socket that has completed a WebSocket handshake and reads nothing more.

    ``rcvbuf`` shrinks the receive buffer (set before connecting, so the window is small), which
    makes a client that never reads fill up fast. ``source`` binds the client's address (any of
    127.0.0.0/8 on Linux: several "clients" on loopback); ``headers`` are extra header lines,
    each ending in CRLF.
    """
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source is not None:
        await sock.bind((source, 0))
    await sock.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    await sock.send(
        (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{headers}\r\n"
        ).encode()
    )
    response = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in response:
            chunk = await sock.recv(1)  # byte by byte: leave every frame after the headers unread
            assert chunk, "server closed during the handshake"
            response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def reset(sock: trio.socket.SocketType) -> None:
    """Close with an RST instead of a FIN: an abrupt network failure as the server sees it."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def http_get(base_url: str, path: str, timeout: float = 5) -> tuple[int, str]:
    """GET ``path`` over a fresh connection; return the status and the body."""
    host_port = base_url.split("://", 1)[1]
    host, port = host_port.rsplit(":", 1)
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(
                f"GET {path} HTTP/1.1\r\nHost: {host_port}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some()
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:])
            while len(body) < int(headers["content-length"]):
                body += await stream.receive_some()
    return int(lines[0].split(" ", 2)[1]), body.decode()


async def http_request(
    base_url: str,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 5,
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request over a fresh connection: the status, the headers (names in lower
    case) and the body. A ``Content-Length`` is sent for ``body`` unless ``headers`` has one
    (``""`` to send none)."""
    host_port = base_url.split("://", 1)[1]
    host, port = host_port.rsplit(":", 1)
    sent = {"Host": host_port, "Connection": "close", **(headers or {})}
    if body or method in ("POST", "PUT"):
        sent.setdefault("Content-Length", str(len(body)))
    sent = {name: value for name, value in sent.items() if value}  # "" leaves a header out
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in sent.items())
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(head.encode() + b"\r\n" + body)
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some()
            raw_head, _, answer = data.partition(b"\r\n\r\n")
            lines = raw_head.decode("latin-1").split("\r\n")
            received = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                received[name.strip().lower()] = value.strip()
            # Hypercorn keeps the connection open a while even after "Connection: close".
            while len(answer) < int(received.get("content-length", "0")):
                answer += await stream.receive_some()
    return int(lines[0].split(" ", 2)[1]), received, answer


async def http_json(base_url: str, path: str) -> tuple[int, dict[str, Any]]:
    status, body = await http_get(base_url, path)
    parsed: dict[str, Any] = json.loads(body)
    return status, parsed


async def next_server_frame(
    sock: trio.socket.SocketType, buffer: bytes
) -> tuple[int, bytes, bytes]:
    """The next unmasked server frame from a raw socket, given what was read past the last one:
    (opcode, payload, what was read past this one)."""

    async def need(count: int) -> None:
        nonlocal buffer
        while len(buffer) < count:
            chunk = await sock.recv(65536)
            assert chunk, "connection ended without a close frame"
            buffer += chunk

    await need(2)
    opcode, length = buffer[0] & 0x0F, buffer[1] & 0x7F
    header = 2
    if length == 126:
        await need(4)
        length, header = int.from_bytes(buffer[2:4], "big"), 4
    elif length == 127:
        await need(10)
        length, header = int.from_bytes(buffer[2:10], "big"), 10
    await need(header + length)
    return opcode, buffer[header : header + length], buffer[header + length :]


async def read_server_frames(
    sock: trio.socket.SocketType, timeout: float = 10
) -> list[tuple[int, bytes]]:
    """Read unmasked server frames from a raw socket until a close frame; (opcode, payload)."""
    buffer = b""
    frames: list[tuple[int, bytes]] = []
    with trio.fail_after(timeout):
        while True:
            opcode, payload, buffer = await next_server_frame(sock, buffer)
            frames.append((opcode, payload))
            if opcode == 0x8:
                return frames
