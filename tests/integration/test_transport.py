"""The direct sink on a real socket pair: partial writes are completed before anything else."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import trio
from hypercorn.protocol.ws_stream import ASGIWebsocketState
from wsproto.connection import ConnectionState

from trio_ws.core.outbox import Written
from trio_ws.core.protocol import Frame, ws_text_frame
from trio_ws.shell.sinks import DirectSink, _FlushFirstLock


def raw(data: bytes) -> Frame:
    """A frame whose wire bytes are ``data`` exactly."""
    return Frame("-", wire=data)


async def no_asgi_send(message: dict[str, object]) -> None:
    raise AssertionError(f"the direct sink wrote through ASGI: {message}")


def direct_sink(
    ws_stream: SimpleNamespace, sock: trio.socket.SocketType, lock: trio.Lock
) -> DirectSink:
    return DirectSink(no_asgi_send, ws_stream, trio.SocketStream(sock), lock)


def open_ws_stream() -> SimpleNamespace:
    # The three attributes of Hypercorn's WSStream that the writer reads.
    return SimpleNamespace(
        closed=False,
        state=ASGIWebsocketState.CONNECTED,
        connection=SimpleNamespace(state=ConnectionState.OPEN),
    )


async def read_exactly(sock: trio.socket.SocketType, size: int) -> bytes:
    data = b""
    with trio.fail_after(5):
        while len(data) < size:
            data += await sock.recv(size - len(data))
    return data


async def test_hypercorn_waits_for_a_half_written_frame() -> None:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    lock = trio.Lock()
    writer = direct_sink(open_ws_stream(), a, lock)
    frame = ws_text_frame(b"z" * 300_000)  # far more than the socket buffers hold
    assert writer.try_write(raw(frame)) is Written.PARTIAL
    assert writer.try_write(raw(b"next")) is Written.NOTHING  # nothing jumps a pending frame
    hypercorn_lock = _FlushFirstLock(lock, writer)

    async def hypercorn_sends_a_pong() -> None:
        async with hypercorn_lock:
            await trio.SocketStream(a).send_all(b"PONG")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hypercorn_sends_a_pong)
        received = await read_exactly(b, len(frame) + 4)
    assert received == frame + b"PONG"
    a.close()
    b.close()


async def test_writer_send_finishes_the_pending_frame_first() -> None:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer = direct_sink(open_ws_stream(), a, trio.Lock())
    first, second = ws_text_frame(b"1" * 200_000), ws_text_frame(b"2" * 1000)
    assert writer.try_write(raw(first)) is Written.PARTIAL
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.write, [raw(second)])
        received = await read_exactly(b, len(first) + len(second))
    assert received == first + second
    a.close()
    b.close()


async def test_nothing_is_written_once_the_websocket_is_closing() -> None:
    a, b = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ws_stream = open_ws_stream()
    writer = direct_sink(ws_stream, a, trio.Lock())
    ws_stream.connection.state = ConnectionState.REMOTE_CLOSING
    assert writer.try_write(raw(b"late")) is Written.ALL  # dropped: the connection is ending
    assert not await writer.write([raw(b"late")])
    a.close()
    with trio.fail_after(1):
        assert await b.recv(10) == b""
    b.close()
