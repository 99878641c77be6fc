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
    async def history(self, since: str, limit: int) -> History:
        """Up to ``limit`` broadcasts after ``since`` (a valid message id) that were delivered
        to this process by now, oldest first (the newest ones if there are more)."""

    async def claim_periodic(self, slot: int, interval: float) -> bool:
        """Whether this process sends the periodic message of ``slot``: one for the cluster."""
        return True

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
