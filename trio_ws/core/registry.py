"""The registry of live connections: who is connected, and a bounded outbox for each.

Theory of operation:

* A :class:`Connection` is the core's view of one client: its id, peer, connect time, its
  :class:`~trio_ws.core.outbox.Outbox` and a one-shot close request. The shell runs the outbox's
  writer, and closes the socket with the requested code when asked.
* Everything that can be decided without waiting is synchronous (trio's design rule): ``add``,
  ``remove``, ``broadcast`` and ``close_all`` never block and never touch a socket, so one stalled
  client cannot delay a broadcast to the others. Only :meth:`Registry.wait_empty` is async.
* A client whose outbox is full when a frame arrives is *slow*: it is removed at once (so it gets
  no further frames and holds no more memory) and asked to close with 4008. It is never silently
  fed less.
* Connections are registered by *slot*. Without tokens the slot is the client id, so ids are
  unique; with tokens a user (the token's ``sub``) may hold several connections, and each has a
  slot of its own, named after its resume key (:meth:`trio_ws.core.hub.Hub.connect`). Adding a
  connection to a slot already taken returns the older connection, which the caller closes with
  4500. Removal is by identity, so the older connection's late cleanup cannot remove its
  successor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from trio_ws.core.liveness import NOT_WATCHED
from trio_ws.core.outbox import Outbox
from trio_ws.core.protocol import CloseCode, Frame, parse_message_id
from trio_ws.core.words import plural

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from trio_ws.core.stats import WriteStats

LOGGER = logging.getLogger(__name__)


class Connection:
    """One connected client, as the core sees it: who, since when, its outbox, and whether it
    was asked to close."""

    __slots__ = (
        "__weakref__",  # the pinger's groups (core/liveness.py) do not keep a gone client alive
        "_close_scope",
        "attempt",
        "authenticated",
        "client_id",
        "close_code",
        "close_reason",
        "closing",
        "connected_at",
        "final_frame",
        "heard_at",
        "outbox",
        "peer",
        "ping_slot",
        "resume_floor",
        "resume_key",
        "slot",
    )

    def __init__(
        self,
        client_id: str,
        *,
        peer: str,
        connected_at: float,
        queue_size: int,
        batch_limit: int = 0,
        max_bytes: int | None = None,
        attempt: int = 0,
        resume_key: str | None = None,
        slot: str | None = None,
        authenticated: bool = False,
        write_stats: WriteStats | None = None,
    ) -> None:
        self.client_id = client_id
        #: Where the registry keeps it: the client id, or with tokens one slot per connection.
        self.slot = client_id if slot is None else slot
        #: The secret its welcome carries; a reconnect that presents it may replace it.
        self.resume_key = resume_key
        #: True when the connection presented a valid token (its id is the token's ``sub``).
        self.authenticated = authenticated
        #: When the attempt reached the server, as a sequence number: the newest wins.
        self.attempt = attempt
        self.peer = peer
        #: Wall-clock time (seconds since the epoch) of the handshake.
        self.connected_at = connected_at
        self.outbox = Outbox(
            max_frames=queue_size, max_bytes=max_bytes, batch_limit=batch_limit, stats=write_stats
        )
        self.close_code: int | None = None
        self.close_reason = ""
        #: A frame the shell writes just before the close frame (an ``error`` frame), if any.
        self.final_frame: Frame | None = None
        #: Set with the close request: the connection takes no more frames.
        self.closing = False
        #: The shell's scope around this connection's reading and writing, cancelled by a
        #: close request so that the shell sends the close frame at once.
        self._close_scope: trio.CancelScope | None = None
        #: Set while a resumed client may still be offered broadcasts it was replayed (or had
        #: before): frames with an id at or below it are dropped, until a newer one passes.
        self.resume_floor: tuple[int, int] | None = None
        #: When bytes last arrived from the client (trio's clock), stamped by the shell as it
        #: reads; and the slot the pinger pings it in (core/liveness.py).
        self.heard_at = 0.0
        self.ping_slot = NOT_WATCHED

    def __repr__(self) -> str:
        return f"<Connection {self.client_id} from {self.peer}>"

    @property
    def writer(self) -> str:
        """How frames reach this client's socket ("direct", "asgi"; "" before the writer runs)."""
        return self.outbox.writer

    def offer(self, frame: Frame) -> bool:
        """Deliver ``frame`` without waiting (see :mod:`trio_ws.core.outbox`). False if the
        outbox is full."""
        if self.resume_floor is not None and frame.message_id is not None:
            if parse_message_id(frame.message_id) <= self.resume_floor:
                return True  # the client has it already
            self.resume_floor = None  # broadcasts arrive in id order: no more old ones
        return self.outbox.offer(frame)

    def take_queued(self) -> list[Frame]:
        return self.outbox.take_queued()

    def request_close(self, code: int, reason: str, final: Frame | None = None) -> bool:
        """Ask the shell to close this connection, after writing ``final`` if given (what is
        still queued is dropped); the first request wins. Idempotent."""
        if self.closing:
            return False
        self.close_code, self.close_reason = code, reason
        self.final_frame = final
        self.closing = True
        if self._close_scope is not None:
            self._close_scope.cancel()
        return True

    @property
    def close_requested(self) -> bool:
        return self.closing

    def bind_close(self, scope: trio.CancelScope) -> None:
        """Have a close request cancel ``scope`` (the shell's reading and writing).

        A request made before this call cancels it at once.
        """
        self._close_scope = scope
        if self.closing:
            scope.cancel()


@dataclass(frozen=True, slots=True)
class RegistryStatistics:
    connections: int
    total_connected: int
    slow_disconnects: int
    replaced: int


class Registry:
    """The live connections, by slot (the client id unless tokens allow several per id)."""

    def __init__(self, on_evicted: Callable[[Connection], None] | None = None) -> None:
        self._connections: dict[str, Connection] = {}
        #: Told of every connection the registry removes by itself (slow consumers), since the
        #: shell's later ``Hub.disconnect`` finds it gone already.
        self._on_evicted = on_evicted
        self._empty = trio.Event()
        self._empty.set()
        self._total_connected = 0
        self._slow_disconnects = 0
        self._replaced = 0

    def __len__(self) -> int:
        return len(self._connections)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._connections.values()))

    def __contains__(self, connection: object) -> bool:
        return (
            isinstance(connection, Connection)
            and self._connections.get(connection.slot) is connection
        )

    def get(self, slot: str) -> Connection | None:
        """The connection in ``slot``: without tokens, the slot is the client id."""
        return self._connections.get(slot)

    def add(self, connection: Connection) -> Connection | None:
        """Register ``connection``; return the older connection in the same slot, if any.

        The older connection is no longer registered; the caller decides how to close it.
        """
        previous = self._connections.pop(connection.slot, None)
        self._connections[connection.slot] = connection
        self._total_connected += 1
        if previous is not None:
            self._replaced += 1
        if self._empty.is_set():
            self._empty = trio.Event()
        return previous

    def remove(self, connection: Connection) -> bool:
        """Unregister ``connection`` if it is the one registered in its slot."""
        if self._connections.get(connection.slot) is not connection:
            return False
        del self._connections[connection.slot]
        if not self._connections:
            self._empty.set()
        return True

    def broadcast(self, frame: Frame) -> int:
        """Queue ``frame`` for every connection; return how many took it.

        A connection whose outbox is full is removed and asked to close with 4008.
        """
        slow: list[Connection] = []
        delivered = 0
        for connection in self._connections.values():
            if connection.closing:
                continue  # its writer has stopped: queueing would only overflow the outbox
            if connection.offer(frame):
                delivered += 1
            else:
                slow.append(connection)
        for connection in slow:
            self.remove(connection)
            self._slow_disconnects += 1
            connection.request_close(CloseCode.SLOW_CONSUMER, "slow consumer: outbox overflowed")
            LOGGER.warning(
                "client %s (%s) disconnected (slow consumer): outbox full at %d frames, %d "
                "bytes; %s left",
                connection.client_id,
                connection.peer,
                len(connection.outbox),
                connection.outbox.queued_bytes,
                plural(len(self._connections), "connection"),
                extra={"client": connection.client_id, "event": "evicted"},
            )
            if self._on_evicted is not None:
                self._on_evicted(connection)
        return delivered

    def close_all(self, code: int, reason: str) -> int:
        """Ask every connection to close; return how many were asked.

        Each request is separate: a failure with one client is logged and the others still close.
        """
        asked = 0
        for connection in self:
            try:
                if connection.request_close(code, reason):
                    asked += 1
            except Exception:
                LOGGER.exception("could not close client %s; closing the others", connection)
        return asked

    async def wait_empty(self) -> None:
        """Return as soon as no connection is registered (at once if none is)."""
        await self._empty.wait()

    def statistics(self) -> RegistryStatistics:
        return RegistryStatistics(
            connections=len(self._connections),
            total_connected=self._total_connected,
            slow_disconnects=self._slow_disconnects,
            replaced=self._replaced,
        )
