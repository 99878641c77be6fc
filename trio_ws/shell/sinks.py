"""Direct writes of pre-built WebSocket frames to the socket Hypercorn holds for a connection.

Why: Quart's ``websocket.send`` goes through Quart's ASGI layer, Hypercorn's WSStream and
wsproto, a lock and a shielded ``send_all`` for every frame to every client; profiling showed
that path as most of the server's CPU in a broadcast. Server frames are unmasked, so the bytes
of a frame are the same for every client: :class:`trio_ws.core.protocol.Frame` builds them once per
broadcast. Two ways to write them:

* :meth:`DirectWriter.try_write`, called by the broadcast itself for a client with nothing
  queued: one non-blocking ``send()`` on the socket, no task switch at all. This is the usual
  case. If the kernel takes only part of the frame, the rest is kept as *pending* and the
  client's writer task is woken to finish it.
* :meth:`DirectWriter.send`, from the client's writer task, for a backlog: one write for all
  the queued frames.

How it stays correct: it finds Hypercorn's objects for this connection through the ASGI send
callable that Quart holds (private attributes of Quart and Hypercorn, checked on the way and
abandoned for Quart's ``send`` when anything is not as expected, with a log line). It writes
only while Hypercorn's send lock is free, and replaces that lock by one that first completes a
pending frame, so Hypercorn's own frames (pings, pongs, close) never land inside one of ours. It
writes data frames only while the WebSocket is open, so none follows a close frame.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import ASGIWebsocketState
from wsproto.connection import ConnectionState

from trio_ws.core.registry import Written

if TYPE_CHECKING:
    from types import TracebackType

LOGGER = logging.getLogger(__name__)

_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
_fallback_logged = False


class DirectWriter:
    """Writes complete WebSocket frames for one connection, bypassing Quart and wsproto."""

    __slots__ = ("_lock", "_pending", "_raw", "_stream", "_ws_stream")

    def __init__(self, ws_stream: Any, stream: Any, lock: trio.Lock) -> None:
        self._ws_stream = ws_stream
        self._stream = stream
        self._lock = lock
        self._pending: memoryview | None = None
        # Plain TCP: the stdlib socket under trio's, for a synchronous non-blocking send().
        socket = getattr(stream, "socket", None) if isinstance(stream, trio.SocketStream) else None
        self._raw = getattr(socket, "_sock", None)

    @classmethod
    def find(cls, quart_websocket: Any) -> DirectWriter | None:
        """The writer for this Quart websocket, or None (then use ``websocket.send``)."""
        try:
            app_send = quart_websocket._send.args[0]  # partial(send_data, <ASGI send>)
            ws_stream = app_send.__self__  # hypercorn.protocol.ws_stream.WSStream
            protocol = ws_stream.send.__self__
            # HTTP/1.1 only: over HTTP/2 (RFC 8441) the WebSocket is one stream of a multiplexed
            # connection and its bytes must go inside HTTP/2 DATA frames.
            if not isinstance(protocol, H11Protocol):
                raise TypeError(f"WebSocket over {type(protocol).__name__}")
            tcp_server = protocol.send.__self__  # type: ignore[attr-defined]  # TCPServer
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
                    "direct socket writes unavailable (%s): sending through Quart, which is "
                    "slower and sends a backlog frame by frame (logged once)",
                    error,
                )
            return None
        writer = cls(ws_stream, stream, lock)
        # Hypercorn takes tcp_server.send_lock for each of its writes (hypercorn/trio/
        # tcp_server.py, protocol_send); from now on that lock first completes our pending frame.
        tcp_server.send_lock = _FlushFirstLock(lock, writer)
        return writer

    def is_open(self) -> bool:
        ws_stream = self._ws_stream
        return (
            not ws_stream.closed
            and ws_stream.state is ASGIWebsocketState.CONNECTED
            and ws_stream.connection.state is ConnectionState.OPEN
        )

    def try_write(self, data: bytes) -> Written:
        """Write ``data`` now if the socket is free; never waits. Sync: called by broadcasts."""
        raw = self._raw
        if raw is None or self._pending is not None or self._lock.locked():
            return Written.NOTHING
        if not self.is_open():
            return Written.ALL  # dropped: the connection is closing
        try:
            sent = raw.send(data)
        except BlockingIOError:
            return Written.NOTHING
        except OSError:
            return Written.ALL  # dropped: Hypercorn's reader sees the broken socket
        if sent == len(data):
            return Written.ALL
        self._pending = memoryview(data)[sent:]
        return Written.PARTIAL

    async def send(self, data: bytes) -> bool:
        """Finish a pending frame, then write ``data`` (complete frames); False if closed.

        Cancellation: writes finish under a shield, as Hypercorn's own do, so the stream never
        holds half a frame; TCP_USER_TIMEOUT bounds how long.
        """
        if self._raw is not None and not self._lock.locked():
            self._lock.acquire_nowait()  # free: take it without a task switch
        else:
            await self._lock.acquire()
        try:
            await self.flush_pending()
            if not data:
                return True
            if not self.is_open():
                return False
            sent = 0
            if self._raw is not None:
                try:
                    sent = self._raw.send(data)
                except BlockingIOError:
                    sent = 0
            if sent < len(data):
                with trio.CancelScope(shield=True):
                    await self._stream.send_all(memoryview(data)[sent:])
        except _TRANSPORT_ERRORS:
            return False  # Hypercorn's reader sees the broken socket and ends the connection
        finally:
            self._lock.release()
        return True

    async def flush_pending(self) -> None:
        """Complete a frame left half-written by :meth:`try_write` (caller holds the lock).

        If the connection ends abnormally before anyone flushes (the peer vanished, or
        Hypercorn cancelled the connection at its graceful timeout), the peer sees a cut-off
        frame where it would have seen a dropped connection: it is gone either way.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            with trio.CancelScope(shield=True):
                await self._stream.send_all(pending)
        except _TRANSPORT_ERRORS:
            pass  # the connection is broken; Hypercorn's reader ends it


class _FlushFirstLock:
    """Hypercorn's send lock, which first completes a frame we left half-written."""

    def __init__(self, lock: trio.Lock, writer: DirectWriter) -> None:
        self._lock = lock
        self._writer = writer

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        await self._lock.acquire()
        try:
            await self._writer.flush_pending()
        except BaseException:
            self._lock.release()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lock.release()
