"""Sinks: how an outbox's frames reach a client's socket (see :mod:`trio_ws.core.outbox`).

* :class:`DirectSink` writes pre-built WebSocket frames straight to the socket Hypercorn holds
  for an HTTP/1.1 connection. Server frames are not masked, so a frame's bytes are the same for
  every client and are built once per broadcast; a write-through is one non-blocking
  ``send()`` with no task switch. Going through ASGI instead costs Hypercorn's WSStream, wsproto,
  a lock and a shielded ``send_all`` per frame per client, which profiling showed as most of the
  server's CPU in a broadcast.
* :class:`AsgiSink` sends through the ASGI ``send`` callable: slower, and the fallback wherever
  the direct path is not available (WebSockets over HTTP/2, a Hypercorn whose internals differ).

This module and :mod:`trio_ws.shell.hypercorn_guard` are the only places that touch private
attributes of Hypercorn. Those used here are checked once at start-up
(:func:`check_direct_path`), and again for each connection on the way in; anything unexpected
falls back to :class:`AsgiSink` with one log line. Tests assert which path ran
(``Connection.writer``). docs/design/write-path.md explains why Hypercorn's own frames can
never land inside one of ours.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import struct
from typing import TYPE_CHECKING, Any

import hypercorn
import trio
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import ASGIWebsocketState, WSStream
from hypercorn.trio.tcp_server import TCPServer
from wsproto.connection import ConnectionState
from wsproto.events import Ping

from trio_ws.core.outbox import Written
from trio_ws.core.protocol import PING

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence
    from types import TracebackType

    from trio_ws.core.protocol import Frame

    AsgiSend = Callable[[dict[str, Any]], Awaitable[None]]

LOGGER = logging.getLogger(__name__)

#: Hypercorn releases whose internals the direct path was checked against.
CHECKED_HYPERCORN = ("0.18.",)

_TRANSPORT_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


def check_direct_path() -> str | None:
    """Why the direct path cannot be used with the installed Hypercorn, or None if it can.

    Checks the attributes :meth:`DirectSink.find` relies on, without a connection: the
    methods by name, and the attributes that ``__init__`` sets by the names its code uses.
    """
    version = getattr(hypercorn, "__version__", None) or _installed_version()
    if not version.startswith(CHECKED_HYPERCORN):
        return f"Hypercorn {version} is not one of the checked releases {CHECKED_HYPERCORN}"
    needs = {
        WSStream.__init__: ("send", "closed", "state"),
        WSStream._accept: ("connection",),
        WSStream._send_wsproto_event: ("connection", "send"),
        TCPServer.__init__: ("stream", "send_lock"),
    }
    for init, names in needs.items():
        # Hypercorn's own code, under shell/hypercorn_limits.py's wrapper if it is installed.
        code = getattr(init, "__wrapped__", init).__code__
        missing = [name for name in names if name not in code.co_names]
        if missing:
            return f"{init.__qualname__} no longer sets {', '.join(missing)}"
    for cls, method in ((WSStream, "app_send"), (TCPServer, "protocol_send")):
        if not callable(getattr(cls, method, None)):
            return f"{cls.__name__}.{method} is gone"
    return None


def _installed_version() -> str:
    from importlib.metadata import version

    return version("hypercorn")


class DirectPath:
    """Whether new connections may use :class:`DirectSink`: decided once, at start-up."""

    def __init__(self, *, enabled: bool = True) -> None:
        reason = check_direct_path() if enabled else "turned off"
        self.enabled = reason is None
        if reason is not None:
            LOGGER.warning(
                "direct socket writes unavailable (%s): sending through ASGI, which is slower "
                "and sends a backlog frame by frame",
                reason,
            )

    def open_sink(self, send: AsgiSend) -> DirectSink | AsgiSink:
        if self.enabled:
            direct = DirectSink.find(send)
            if direct is not None:
                return direct
        return AsgiSink(send)


class AsgiSink:
    """Frames through the ASGI ``send`` callable, one at a time.

    ASGI has no ping: :data:`~trio_ws.core.protocol.PING` goes through Hypercorn's WebSocket
    stream behind ``send`` (over HTTP/2, inside its DATA frames), as Hypercorn's own pings did.
    Behind another host there is none, :attr:`can_ping` is False, and the connection is not
    pinged (nor closed for not answering).
    """

    __slots__ = ("_send", "_ws_stream")
    kind = "asgi"

    def __init__(self, send: AsgiSend) -> None:
        self._send = send
        ws_stream = getattr(send, "__self__", None)  # WSStream.app_send, under Hypercorn
        pingable = isinstance(ws_stream, WSStream) and hasattr(ws_stream, "_send_wsproto_event")
        self._ws_stream = ws_stream if pingable else None

    @property
    def can_ping(self) -> bool:
        return self._ws_stream is not None

    def try_write(self, frame: Frame) -> Written:
        return Written.NOTHING

    def peer_gone(self) -> bool:
        """Whether the client has certainly gone (ASGI cannot tell before a read: False)."""
        return False

    async def write(self, frames: Sequence[Frame]) -> bool:
        for frame in frames:
            if frame is PING:
                await self._ping()
            elif frame.text:  # WAKE (empty) is only ever queued for a direct sink
                await self._send({"type": "websocket.send", "text": frame.text})
        return True

    async def _ping(self) -> None:
        ws_stream = self._ws_stream
        if (
            ws_stream is not None
            and not ws_stream.closed
            and ws_stream.state is ASGIWebsocketState.CONNECTED
        ):
            await ws_stream._send_wsproto_event(Ping())

    async def close(self, code: int, reason: str) -> None:
        await self._send({"type": "websocket.close", "code": code, "reason": reason})

    def limit_writes(self, deadline: float) -> None:
        """The connection is closing: give up on writes still unfinished at ``deadline``
        (trio's clock), and abort the connection. (ASGI: nothing to bound.)"""

    def abort(self) -> None:
        """End the TCP connection now, without a close handshake (ASGI: cannot)."""


class DirectSink(AsgiSink):
    """Whole WebSocket frames written to Hypercorn's socket for one HTTP/1.1 connection.

    Writes only while Hypercorn's send lock is free, and replaces that lock with one that first
    completes a frame left half-written here, so Hypercorn's own frames (pings, pongs, close)
    never land inside one of ours. Writes data frames only while the WebSocket is open, so none
    follows a close frame. Closes through ASGI, so Hypercorn's state machine sees the close.
    """

    __slots__ = ("_deadline", "_lock", "_pending", "_raw", "_shield", "_socket", "_stream")
    kind = "direct"

    def __init__(self, send: AsgiSend, ws_stream: Any, stream: Any, lock: trio.Lock) -> None:
        super().__init__(send)
        self._ws_stream: Any = ws_stream
        self._stream = stream
        self._lock = lock
        self._pending: memoryview | None = None
        # Plain TCP: the stdlib socket under trio's, for a synchronous non-blocking send().
        trio_socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._raw = getattr(trio_socket, "_sock", None)
        #: The TCP socket, under TLS too, for :meth:`abort`.
        self._socket = trio_socket or getattr(
            getattr(stream, "transport_stream", None), "socket", None
        )
        #: Once closing: when an unfinished write is given up (trio's clock), and the shielded
        #: scope of the write in progress, if any.
        self._deadline = math.inf
        self._shield: trio.CancelScope | None = None

    @classmethod
    def find(cls, send: AsgiSend) -> DirectSink | None:
        """The direct sink behind this ASGI ``send``, or None (then use :class:`AsgiSink`)."""
        try:
            ws_stream = send.__self__  # type: ignore[attr-defined]  # WSStream.app_send
            protocol = ws_stream.send.__self__
            # HTTP/1.1 only: over HTTP/2 (RFC 8441) the WebSocket is one stream of a multiplexed
            # connection and its bytes must go inside HTTP/2 DATA frames.
            if not isinstance(protocol, H11Protocol):
                raise TypeError(f"WebSocket over {type(protocol).__name__}")
            tcp_server = protocol.send.__self__  # type: ignore[attr-defined]
            stream, lock = tcp_server.stream, tcp_server.send_lock
            if not isinstance(ws_stream, WSStream) or not isinstance(lock, trio.Lock):
                raise TypeError(type(ws_stream).__name__)
            if not isinstance(stream, trio.abc.Stream):
                raise TypeError(type(stream).__name__)
        except (AttributeError, TypeError) as error:
            LOGGER.debug("direct socket writes unavailable for this connection: %s", error)
            return None
        sink = cls(send, ws_stream, stream, lock)
        # Hypercorn takes tcp_server.send_lock for each of its writes (TCPServer.protocol_send);
        # from now on that lock first completes our pending frame.
        tcp_server.send_lock = _FlushFirstLock(lock, sink)
        return sink

    def is_open(self) -> bool:
        ws_stream = self._ws_stream
        return (
            not ws_stream.closed
            and ws_stream.state is ASGIWebsocketState.CONNECTED
            and ws_stream.connection.state is ConnectionState.OPEN
        )

    def peer_gone(self) -> bool:
        """Whether the client has closed or reset its end: a non-blocking peek, no read."""
        if not self.is_open():
            return True
        if self._raw is None:
            return False
        try:
            peeked: bytes = self._raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # reset
        return peeked == b""

    def try_write(self, frame: Frame) -> Written:
        raw = self._raw
        if raw is None or self._pending is not None or self._lock.locked():
            return Written.NOTHING
        if not self.is_open():
            return Written.ALL  # dropped: the connection is closing
        data = frame.wire
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

    async def write(self, frames: Sequence[Frame]) -> bool:
        """Cancellation: writes finish under a shield, as Hypercorn's own do, so the stream
        never holds half a frame; TCP_USER_TIMEOUT bounds how long."""
        data = frames[0].wire if len(frames) == 1 else b"".join(f.wire for f in frames)
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
                return await self._send_shielded(memoryview(data)[sent:])
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
        # A broken connection: Hypercorn's reader ends it.
        with contextlib.suppress(*_TRANSPORT_ERRORS):
            await self._send_shielded(pending)

    async def _send_shielded(self, data: memoryview) -> bool:
        """``send_all`` that no cancellation interrupts, so no half frame is left on the wire;
        bounded by :meth:`limit_writes` once the connection is closing: a client that takes
        nothing until then is aborted (False)."""
        with trio.CancelScope(shield=True, deadline=self._deadline) as scope:
            self._shield = scope
            try:
                await self._stream.send_all(data)
            finally:
                self._shield = None
        if scope.cancelled_caught:
            self.abort()
            return False
        return True

    def limit_writes(self, deadline: float) -> None:
        self._deadline = deadline
        if self._shield is not None:
            self._shield.deadline = deadline

    def abort(self) -> None:
        """Reset the TCP connection (SO_LINGER 0): a write blocked on it, ours or Hypercorn's,
        fails at once, Hypercorn ends the connection, and the kernel frees its buffers rather
        than keep trying to deliver them."""
        sock = self._socket
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RDWR)


class _FlushFirstLock:
    """Hypercorn's send lock, which first completes a frame we left half-written."""

    __slots__ = ("_lock", "_sink")

    def __init__(self, lock: trio.Lock, sink: DirectSink) -> None:
        self._lock = lock
        self._sink = sink

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        await self._lock.acquire()
        try:
            await self._sink.flush_pending()
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
