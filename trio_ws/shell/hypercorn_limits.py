"""Size before memory: the message-size limit applied while Hypercorn receives a message, and
permessage-deflate negotiated only when asked for, with inflation capped at the same limit.

With Hypercorn 0.18.0 alone (``hypercorn/protocol/ws_stream.py``; tests in
tests/system/test_message_limits.py):

* ``WebsocketBuffer.extend`` adds a piece of a message to its buffer *then* checks
  ``websocket_max_message_size``, in characters for text. After its 1009 it keeps the
  connection open until the client answers, never clears the buffer, and goes on adding
  everything the client sends: 40 MB streamed after an oversized frame stayed in memory, and the
  socket stayed open (and counted as a client) for as long as the client liked;
* ``Handshake.accept`` accepts permessage-deflate whenever a client offers it, and wsproto
  inflates each piece of a frame whole before anything checks a size: 100 KB on the wire became
  100 MB in memory.

:func:`install` replaces ``WSStream._handle_events`` (the loop over wsproto's events) with one
that counts each message in bytes of UTF-8 *before* buffering a piece, and at the first byte
over the limit sends 1009, drops what it buffered and closes the connection at once, as the
application does with its own 1009; the application hears ``websocket.disconnect``. It also
sends the close code when wsproto itself gives up on the stream (a protocol error, an
inflation over the cap), where Hypercorn closed without one, and tells the app (a count for
``/health``, a DEBUG line). And it wraps ``WSStream._accept`` so that the handshake negotiates
no extension, or (compression on) a permessage-deflate whose inflation stops at the limit + 1
byte (:class:`CappedDeflate`), and so that Hypercorn starts no ping task for an app that pings
by itself.

Liveness: the same loop runs after each piece of data Hypercorn feeds wsproto, so it stamps
``heard_at`` on the connection that :func:`watch_reads` tied to the stream: the hub's pinger
closes a connection that stays silent after a ping (``trio_ws.core.liveness``).

The limit and the compression policy are the application's (:class:`WebSocketLimits`, read from
``TrioWsApp.websocket_limits``), so they hold in every run mode, including
``hypercorn --workers 0`` where trio_ws cannot reach Hypercorn's configuration. Another app
keeps Hypercorn's ``websocket_max_message_size`` and its deflate, capped.

It fails closed like :mod:`trio_ws.shell.hypercorn_guard`: on a Hypercorn or wsproto not checked
here, :func:`install` raises :class:`HypercornLimitsError` and the server does not start.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, Protocol

import trio
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.ws_stream import Handshake, WebsocketBuffer, WSStream
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Message, Ping
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason
from wsproto.handshake import server_extensions_handshake

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from wsproto.frame_protocol import FrameDecoder, FrameProtocol

#: Releases whose ws_stream.py (Hypercorn) and extensions.py (wsproto) were read for this.
VERIFIED_HYPERCORN = ("0.18.0",)
VERIFIED_WSPROTO = ("1.3.2",)
_MARK = "_trio_ws_limited"

#: What the replaced and wrapped code must still be, by the names its code uses (looked up when
#: checked: Hypercorn's own, under this module's wrapper once installed).
_EXPECTED: dict[tuple[type, str], tuple[str, ...]] = {
    (WSStream, "_handle_events"): (
        "connection", "events", "buffer", "extend", "FrameTooLargeError", "app_put",
        "to_message", "clear", "_send_wsproto_event", "StreamClosed", "stream_id",
    ),
    (WSStream, "_accept"): (
        "handshake", "accept", "connection", "send", "websocket_ping_interval", "_send_pings",
    ),
    (WSStream, "handle"): ("StreamClosed", "closed", "app_put", "receive_data", "_handle_events"),
    (Handshake, "accept"): ("extensions", "server_extensions_handshake", "PerMessageDeflate"),
    (WebsocketBuffer, "__init__"): ("value", "length", "max_length"),
    (PerMessageDeflate, "__init__"): (
        "_decompressor", "_inbound_compressed", "_inbound_is_compressible",
    ),
}  # fmt: skip


class HypercornLimitsError(RuntimeError):
    """The installed Hypercorn or wsproto is not the one this module was checked against."""


@dataclass(frozen=True, slots=True)
class WebSocketLimits:
    """What an app allows in one incoming WebSocket message, and what it does itself."""

    #: Largest message, in bytes (of UTF-8, for text); larger: 1009.
    max_message_size: int
    #: Whether to negotiate permessage-deflate when a client offers it.
    compression: bool
    #: The app pings its connections itself (trio_ws's one pinger): Hypercorn's ping task per
    #: connection is turned off, whatever ``websocket_ping_interval`` says.
    own_pings: bool = False
    #: Told of each frame wsproto refused as malformed: (close code, what, peer).
    on_protocol_error: Callable[[int, str, str], None] | None = None
    #: Connections closed here, by close code (1009 over the size, 1002/1007 for wsproto's
    #: parse errors), for /metrics. The counter object is shared; the dataclass stays frozen.
    closed: Counter[int] = field(default_factory=Counter)


def install() -> None:
    """Patch Hypercorn's WebSocket stream (once per process); raise
    :class:`HypercornLimitsError` if the installed releases were not checked."""
    if getattr(WSStream._handle_events, _MARK, False):
        return
    problem = check()
    if problem is not None:
        raise HypercornLimitsError(
            f"{problem}: refusing to run without the message-size limit that keeps a client "
            "from filling memory; install a verified Hypercorn "
            f"{', '.join(VERIFIED_HYPERCORN)} and wsproto {', '.join(VERIFIED_WSPROTO)}"
        )
    original_accept = WSStream._accept

    async def _accept(self: WSStream, message: Any) -> None:
        limits = _limits(self)
        self._trio_ws_limits = limits  # type: ignore[attr-defined]
        _negotiate(self.handshake, limits)
        if limits.own_pings and self.config.websocket_ping_interval is not None:
            # The app pings (one task for all): no ping task per connection. Set on the
            # worker's shared config, the only switch Hypercorn reads (in every run mode,
            # --workers 0 included, where trio_ws has no other way to its config).
            self.config.websocket_ping_interval = None
        await original_accept(self, message)

    setattr(_handle_events, _MARK, True)
    _handle_events.__wrapped__ = WSStream._handle_events  # type: ignore[attr-defined]
    _accept.__wrapped__ = original_accept  # type: ignore[attr-defined]
    WSStream._handle_events = _handle_events  # type: ignore[method-assign]
    WSStream._accept = _accept  # type: ignore[method-assign]


def check() -> str | None:
    """Why the patch cannot be installed here, or None if it can."""
    for package, verified in (("hypercorn", VERIFIED_HYPERCORN), ("wsproto", VERIFIED_WSPROTO)):
        installed = version(package)
        if installed not in verified:
            return f"{package} {installed} is not a verified release"
    for (owner, attribute), names in _EXPECTED.items():
        function = getattr(owner, attribute, None)
        function = getattr(function, "__wrapped__", function)
        code = getattr(function, "__code__", None)
        where = f"{owner.__name__}.{attribute}"
        if code is None:
            return f"{where} is gone"
        missing = [name for name in names if name not in code.co_names]
        if missing:
            return f"{where} no longer uses {', '.join(missing)}"
    return None


def _limits(stream: WSStream) -> WebSocketLimits:
    """The app's limits (Hypercorn wraps the ASGI app: ``stream.app.app``), or Hypercorn's."""
    own = getattr(getattr(stream.app, "app", None), "websocket_limits", None)
    configured = int(stream.config.websocket_max_message_size)
    if isinstance(own, WebSocketLimits):
        if own.max_message_size <= configured:
            return own  # shared by every stream, not a copy per connection
        return replace(own, max_message_size=configured)
    return WebSocketLimits(configured, compression=True)


def _negotiate(handshake: Handshake, limits: WebSocketLimits) -> None:
    """Make ``handshake.accept`` negotiate what ``limits`` allow (called before it runs)."""
    offers = handshake.extensions
    # Hypercorn negotiates from this list: empty, it offers nothing and builds a connection
    # whose permessage-deflate is never enabled (a compressed frame is then a protocol error).
    handshake.extensions = None
    if not limits.compression or not offers:
        return
    accept = handshake.accept

    def accept_capped(
        subprotocol: str | None, additional_headers: Iterable[tuple[bytes, bytes]]
    ) -> tuple[int, list[tuple[bytes, bytes]], Connection]:
        status, headers, _ = accept(subprotocol, additional_headers)
        # Synchronous, like Hypercorn's: the connection has its capped extension before any
        # frame can reach it.
        deflate = CappedDeflate(limits.max_message_size)
        accepted = server_extensions_handshake(offers, [deflate])
        if accepted:
            headers.append((b"sec-websocket-extensions", accepted))
        return status, headers, Connection(ConnectionType.SERVER, [deflate])

    handshake.accept = accept_capped  # type: ignore[method-assign]


class CappedDeflate(PerMessageDeflate):
    """permessage-deflate that inflates at most ``limit`` + 1 bytes of one message, then fails
    the stream with 1009; and asks the client not to keep its context between messages, so an
    idle connection holds no inflater (``client_no_context_takeover``)."""

    def __init__(self, limit: int) -> None:
        super().__init__(client_no_context_takeover=True, server_no_context_takeover=True)
        self.limit = limit
        self.inflated = 0

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        assert self._decompressor is not None
        room = self.limit - self.inflated + 1
        try:
            out = self._decompressor.decompress(bytes(data), room)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self.inflated += len(out)
        if self.inflated > self.limit or self._decompressor.unconsumed_tail:
            self._decompressor = None  # whatever it holds is never inflated
            return CloseReason.MESSAGE_TOO_BIG
        return out

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        message_ends = fin and bool(self._inbound_is_compressible)
        result = super().frame_inbound_complete(proto, fin)
        if message_ends:
            if isinstance(result, bytes) and self.inflated + len(result) > self.limit:
                return CloseReason.MESSAGE_TOO_BIG
            self.inflated = 0
        return result


def _utf8_size(data: str | bytes) -> int:
    if isinstance(data, str) and not data.isascii():
        return len(data.encode("utf-8", "surrogatepass"))
    return len(data)


class Heard(Protocol):
    """What :func:`watch_reads` stamps (``trio_ws.core.registry.Connection``)."""

    heard_at: float


def watch_reads(send: Any, connection: Heard) -> bool:
    """Stamp ``connection.heard_at`` (trio's clock) whenever bytes arrive on the WebSocket
    behind this ASGI ``send``; False if there is no Hypercorn stream behind it."""
    stream = getattr(send, "__self__", None)  # WSStream.app_send
    if not isinstance(stream, WSStream):
        return False
    stream._trio_ws_heard = connection  # type: ignore[attr-defined]
    return True


async def _handle_events(self: WSStream) -> None:
    """Hypercorn's loop over wsproto's events, with the limit applied before buffering.

    Hypercorn calls it after each piece of data it feeds wsproto: the moment to note that the
    client is alive (one clock read per read, whatever it holds: a pong, a frame, a part).
    """
    heard = getattr(self, "_trio_ws_heard", None)
    if heard is not None:
        heard.heard_at = trio.current_time()
    limits: WebSocketLimits = getattr(self, "_trio_ws_limits", None) or _limits(self)
    for event in self.connection.events():
        if isinstance(event, Message):
            size = self.buffer.length + _utf8_size(event.data)
            if size > limits.max_message_size:
                self.buffer.clear()
                await _refuse(self, CloseReason.MESSAGE_TOO_BIG, limits)
                return
            self.buffer.extend(event)
            self.buffer.length = size  # in bytes from now on, whatever extend counted
            if event.message_finished:
                assert self.app_put is not None
                await self.app_put(self.buffer.to_message())
                self.buffer.clear()
        elif isinstance(event, Ping):
            await self._send_wsproto_event(event.response())
        elif isinstance(event, CloseConnection):
            state = self.connection.state
            if state is ConnectionState.REMOTE_CLOSING:
                await self._send_wsproto_event(event.response())
            elif state is ConnectionState.OPEN:
                # wsproto gave up on the stream (ParseFailed): say why before closing.
                if event.code != CloseReason.MESSAGE_TOO_BIG and limits.on_protocol_error:
                    limits.on_protocol_error(int(event.code), _kind(event), _peer(self))
                await _refuse(self, event.code, limits)
                return
            await self.send(StreamClosed(stream_id=self.stream_id))
            return


def _kind(event: CloseConnection) -> str:
    """What was wrong, in wsproto's fixed words; for bad UTF-8 (whose message quotes a byte of
    the client's), only that."""
    if event.code == CloseReason.INVALID_FRAME_PAYLOAD_DATA:
        return "invalid UTF-8"
    return event.reason or "malformed frame"


def _peer(stream: WSStream) -> str:
    client = stream.client
    return f"{client[0]}:{client[1]}" if client else "<unknown>"


async def _refuse(self: WSStream, code: int, limits: WebSocketLimits) -> None:
    """Send ``code`` and close the connection now: nothing more is read or kept. The app gets
    ``websocket.disconnect`` (Hypercorn's StreamClosed), as after its own close."""
    limits.closed[int(code)] += 1
    reason = None
    if code == CloseReason.MESSAGE_TOO_BIG:
        reason = f"message larger than {limits.max_message_size} bytes"
    await self._send_wsproto_event(CloseConnection(code=code, reason=reason))
    await self.send(StreamClosed(stream_id=self.stream_id))
