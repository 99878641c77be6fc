"""Brokers: what carries a broadcast from the process that received it to every process.

A broker takes :class:`Outgoing` messages (``publish``) and hands every broadcast of the whole
cluster, each once and in one global order, to its ``deliver`` callback as a :class:`Broadcast`
with the broker's id. The hub encodes the frame and fans it out to this process's clients.

* :class:`LocalBroker` (the default) is one process's cluster: ``publish`` delivers at once, with
  no task switch and no copy.
* :class:`trio_ws.brokers.redis.RedisBroker` carries broadcasts through a Redis Stream, for
  several Hypercorn workers or instances.

Ids look like Redis Stream ids in both: ``"<milliseconds>-<sequence>"``, increasing. Clients
treat them as opaque strings. A message delivered while a Redis broker is unreachable has no
broker id (``None``): it reaches this process's clients at once and the rest of the cluster when
Redis is back.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import trio

from trio_ws.core.protocol import utf8_size

Kind = Literal["message", "periodic"]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A broadcast as published: a client's text, or the periodic server message."""

    kind: Kind
    ts: float
    sender: str = ""
    text: str = ""
    #: For ``periodic``: the connection count it reports (the cluster's with a shared broker).
    active_connections: int = 0


@dataclass(frozen=True, slots=True)
class Broadcast:
    """A broadcast as delivered: an :class:`Outgoing` with the broker's id (None in an outage)."""

    id: str | None
    message: Outgoing


class Member(Protocol):
    """The process a broker serves (the hub)."""

    #: Names this process in the cluster.
    instance_id: str

    def deliver(self, broadcast: Broadcast) -> None:
        """Fan ``broadcast`` out to this process's clients. Sync: it never blocks."""

    def local_state(self) -> tuple[int, bool]:
        """This process's connection count, and whether it is draining."""

    def held_ids(self) -> dict[str, str]:
        """The client ids this process's connections hold (without tokens), each with its
        claim (the digest of its resume key, and which connection): what the cluster's id
        claims must say about this process."""

    def replaced_elsewhere(self, claims: list[tuple[str, str]]) -> None:
        """These ``(client id, claim)`` were taken over on another process by a reconnect that
        presented the key: close the connections that made them."""

    def kicked_elsewhere(self, client_ids: list[str]) -> None:
        """An operator asked another process to close these clients: close them here (4503)."""


#: What a broadcast counts in a history's byte budget besides its text and sender: about what
#: its frame adds (id, timestamp, field names).
BROADCAST_OVERHEAD_BYTES = 64


def approximate_size(message: Outgoing) -> int:
    """About the bytes ``message`` takes in a frame, for history budgets: its text in UTF-8
    (frames carry non-ASCII text unescaped), not its length in characters."""
    return utf8_size(message.text) + len(message.sender) + BROADCAST_OVERHEAD_BYTES


class HistoryBudget:
    """What a history may still take: ``limit`` broadcasts and ``max_bytes`` bytes (each
    counted as :func:`approximate_size`). Histories take the newest broadcasts first."""

    __slots__ = ("_bytes_left", "_count_left")

    def __init__(self, limit: int, max_bytes: int) -> None:
        self._count_left = limit
        self._bytes_left = max_bytes

    def take(self, message: Outgoing) -> bool:
        """Count ``message`` in, if it fits; False (and nothing counted) if it does not."""
        size = approximate_size(message)
        if self._count_left <= 0 or size > self._bytes_left:
            return False
        self._count_left -= 1
        self._bytes_left -= size
        return True


@dataclass(frozen=True, slots=True)
class History:
    """Broadcasts after a client's last seen id, oldest first, for a resuming client."""

    broadcasts: list[Broadcast]
    #: False if some broadcasts after that id are no longer kept, or could not be read: the
    #: client has missed something it cannot get back.
    complete: bool


class BrokerState(enum.Enum):
    UP = "up"
    DOWN = "down"


class BrokerUnavailableError(RuntimeError):
    """The broker cannot be reached when the server starts."""


@dataclass(frozen=True, slots=True)
class ClusterView:
    """The cluster as last seen: live instances and their connections."""

    instances: int
    connections: int
    draining_instances: int
    #: trio clock time of the reading.
    as_of: float
    #: This process's own count in ``connections``: the hub swaps in its current count.
    own_connections: int = 0


class Broker(abc.ABC):
    """The interface the hub uses. Sync methods never block."""

    kind: str

    @abc.abstractmethod
    async def run(
        self, member: Member, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect, report started, then hand every broadcast to ``member.deliver`` until
        cancelled.

        Errors: :class:`BrokerUnavailableError` if the broker cannot be reached at startup.
        """

    @abc.abstractmethod
    async def publish(self, message: Outgoing) -> None:
        """Send ``message`` to the whole cluster (this process included, through ``deliver``).

        May wait while too many messages are on their way (backpressure on the sender).
        """

    @property
    @abc.abstractmethod
    def last_id(self) -> str | None:
        """The id of the latest broadcast delivered to this process, if any."""

    @abc.abstractmethod
    async def history(self, since: str, *, limit: int, max_bytes: int) -> History:
        """The broadcasts after ``since`` (a valid message id) that were delivered to this
        process by now, oldest first: the newest ones that fit in ``limit`` broadcasts and
        ``max_bytes`` bytes (see :class:`HistoryBudget`).

        ``complete`` is False when some were left out, or are no longer kept.
        """

    async def claim_periodic(self, slot: int, interval: float) -> bool:
        """Whether this process sends the periodic message of ``slot``: one for the cluster."""
        return True

    async def claim_id(self, client_id: str, claim: str, presented: str | None) -> bool:
        """Claim ``client_id`` for this process across the cluster (``claim``: the digest of
        the connection's resume key, a dot, and a number naming the connection): False if a
        connection on another process holds it and ``presented`` (the digest of the key the
        attempt presented) is not its digest; True otherwise, the claim then this process's,
        and the other process is told to close its connection. One process is the whole
        cluster by default: the hub's registry has decided already."""
        return True

    def release_id(self, client_id: str, claim: str) -> None:  # noqa: B027  (a hook)
        """This process's connection for ``client_id`` (``claim``) is gone: drop its claim,
        unless it has changed meanwhile. Sync: the broker does it later, in order with the
        claims."""

    async def kick_elsewhere(self, client_id: str) -> bool:
        """Ask the other processes of the cluster to close ``client_id`` (4503): True if one
        of them holds the id (without tokens; with tokens, their connections are closed all
        the same, but not counted). One process is the whole cluster by default."""
        return False

    async def leave(self) -> None:  # noqa: B027  (a hook: nothing to do by default)
        """The drain is over: stop counting this process in the cluster."""

    @property
    def state(self) -> BrokerState:
        return BrokerState.UP

    def cluster(self) -> ClusterView | None:
        """The latest view of the cluster, or None if the broker does not share one."""
        return None

    def health(self) -> dict[str, Any]:
        return {"kind": self.kind, "state": self.state.value}
