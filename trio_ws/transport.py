"""Direct writes of pre-built WebSocket frames to the socket Hypercorn holds for a connection.

Why: Quart's ``websocket.send`` goes through Quart's ASGI layer, Hypercorn's WSStream and
wsproto, a lock and a shielded ``send_all`` for every frame to every client; profiling showed
that path as most of the server's CPU in a broadcast. Server frames are unmasked, so the bytes
of a frame are the same for every client: :class:`trio_ws.protocol.Frame` builds them once per
broadcast, and this writer puts a client's whole backlog on the socket with one ``send()``,
synchronously when the kernel takes it all (the usual case), without a trio round trip.

How it stays correct: it finds Hypercorn's objects for this connection through the ASGI send
callable that Quart holds (private attributes of Quart and Hypercorn, checked on the way and
abandoned for Quart's ``send`` when anything is not as expected, with a log line); it writes
only while Hypercorn's send lock is free, and holds it while a write is incomplete, so its frames
never interleave with Hypercorn's own (pings, pongs, close); and it writes only while the
WebSocket is open, so no data frame follows a close frame. Control frames stay with Hypercorn.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from hypercorn.protocol.ws_stream import ASGIWebsocketState
from wsproto.connection import ConnectionState

LOGGER = logging.getLogger(__name__)

_fallback_logged = False


class DirectWriter:
    """Writes complete WebSocket frames for one connection, bypassing Quart and wsproto."""

    __slots__ = ("_lock", "_raw", "_stream", "_ws_stream")

    def __init__(self, ws_stream: Any, stream: Any, lock: trio.Lock) -> None:
        self._ws_stream = ws_stream
        self._stream = stream
        self._lock = lock
        # Plain TCP: the stdlib socket under trio's, for a synchronous non-blocking send().
        socket = getattr(stream, "socket", None) if isinstance(stream, trio.SocketStream) else None
        self._raw = getattr(socket, "_sock", None)

    @classmethod
    def find(cls, quart_websocket: Any) -> DirectWriter | None:
        """The writer for this Quart websocket, or None (then use ``websocket.send``)."""
        try:
            app_send = quart_websocket._send.args[0]  # partial(send_data, <ASGI send>)
            ws_stream = app_send.__self__  # hypercorn.protocol.ws_stream.WSStream
            tcp_server = ws_stream.send.__self__.send.__self__  # H11Protocol -> TCPServer
            stream, lock = tcp_server.stream, tcp_server.send_lock
            if type(ws_stream).__name__ != "WSStream" or not isinstance(lock, trio.Lock):
                raise TypeError(type(ws_stream).__name__)
            if not isinstance(stream, trio.abc.Stream):
                raise TypeError(type(stream).__name__)
        except (AttributeError, IndexError, TypeError) as error:
            global _fallback_logged
            if not _fallback_logged:
                _fallback_logged = True
                LOGGER.warning(
                    "direct socket writes unavailable (%r): sending through Quart, which is "
                    "slower and sends a backlog frame by frame",
                    error,
                )
            return None
        return cls(ws_stream, stream, lock)

    def is_open(self) -> bool:
        ws_stream = self._ws_stream
        return (
            not ws_stream.closed
            and ws_stream.state is ASGIWebsocketState.CONNECTED
            and ws_stream.connection.state is ConnectionState.OPEN
        )

    async def send(self, data: bytes) -> bool:
        """Write ``data`` (complete frames); False if the connection is no longer open.

        Cancellation: an incomplete write finishes under a shield, as Hypercorn's own writes
        do, so the stream never holds half a frame; TCP_USER_TIMEOUT bounds how long.
        """
        if not self.is_open():
            return False
        raw = self._raw
        if raw is not None and not self._lock.locked():
            self._lock.acquire_nowait()
            try:
                try:
                    sent = raw.send(data)
                except BlockingIOError:
                    sent = 0
                if sent < len(data):
                    with trio.CancelScope(shield=True):
                        await self._stream.send_all(memoryview(data)[sent:])
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                return False  # Hypercorn's reader sees the broken socket and ends the connection
            finally:
                self._lock.release()
            return True
        try:
            async with self._lock:
                if not self.is_open():
                    return False
                with trio.CancelScope(shield=True):
                    await self._stream.send_all(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True
