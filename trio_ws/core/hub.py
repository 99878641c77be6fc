"""The hub: the server's core, with no knowledge of Quart or Hypercorn.

It owns the registry and hands broadcasts to a broker (:mod:`trio_ws.core.broker`: in-process by
default, Redis for a cluster), which numbers them and delivers every broadcast of the cluster back
through :meth:`Hub.deliver`. It runs three sibling tasks in whatever nursery the host gives it:
the broker, the periodic broadcaster (in its own cancel scope, cancelled when the drain starts)
and the drain watcher (which waits for a drain request, warns every client, then runs
:func:`trio_ws.core.drain.drain` under its ``move_on_after`` deadline). The broker keeps delivering
the cluster's broadcasts to the clients still here until the drain is over; then
:meth:`Hub.wait_stopped` returns, which is what the serving layer turns into "shut down now".

Sync methods never block; only ``run`` and ``wait_*`` are async.
"""

from __future__ import annotations

import enum
import logging
import signal
import time
from typing import TYPE_CHECKING, Any

import trio

from trio_ws.core import protocol
from trio_ws.core.broker import Broadcast, Broker, BrokerState, Outgoing
from trio_ws.core.drain import DrainOutcome, DrainPolicy, drain
from trio_ws.core.protocol import CloseCode, Frame
from trio_ws.core.registry import Connection, Registry

if TYPE_CHECKING:
    from collections.abc import Callable

    from trio_ws.settings import Settings

LOGGER = logging.getLogger(__name__)

REFUSED_REASON = "server is shutting down; reconnect to another instance"

#: Most bytes one socket write may carry when a client's writer catches up on a backlog. The
#: write is shielded (no half frames on the wire), so this also bounds what a client that reads
#: at a trickle can make a close or a pong wait for.
BATCH_LIMIT_BYTES = 64 * 1024

#: Most bytes of history one resuming client is replayed (approximately: see
#: :class:`trio_ws.core.broker.HistoryBudget`); one that missed more is told its history is
#: incomplete. It bounds what one reconnect costs, in memory and on the wire.
RESUME_BUDGET_BYTES = 1 << 20


class HubState(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


class Hub:
    """Connections, broadcasts, the periodic message and the drain."""

    def __init__(
        self,
        settings: Settings,
        *,
        broker: Broker,
        instance_id: str | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.registry = Registry()
        #: Names this process in the welcome frame, /health and the cluster.
        self.instance_id = instance_id if instance_id is not None else protocol.new_instance_id()
        self.broker = broker
        self.policy = DrainPolicy(
            deadline_s=settings.drain_timeout, progress_every_s=settings.progress_interval
        )
        self._wall_clock = wall_clock
        self._messages_broadcast = 0
        self._refused = 0
        self._state = HubState.SERVING
        self._drain_requested = trio.Event()
        self._force = trio.Event()
        self._stopped = trio.Event()
        self._drain_reason = ""
        self._drain_started_at: float | None = None  # trio clock
        self._drain_started_wall: float | None = None
        self._drain_at_start = 0
        self.outcome: DrainOutcome | None = None
        self._started_wall = wall_clock()

    # -- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> HubState:
        return self._state

    @property
    def draining(self) -> bool:
        """True from the drain request on: new connections are refused."""
        return self._state is not HubState.SERVING

    def is_ready(self) -> bool:
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        if self._state is not HubState.SERVING:
            return "draining"
        if self.broker.state is not BrokerState.UP:
            return "broker unavailable"
        return None

    # -- connections ---------------------------------------------------------------------------

    def connect(self, client_id: str | None, peer: str, *, resuming: bool = False) -> Connection:
        """Register a new client and queue its welcome frame (``resuming``: :meth:`resume`
        queues it, with the history).

        An older connection with the same id is asked to close with 4500: the newest wins, so a
        reconnecting client is never locked out by its own stale connection.

        Errors: :class:`trio_ws.core.protocol.ClientIdError` for a bad id; :class:`RuntimeError` if
        the hub is draining (callers check :attr:`draining` and refuse with 1001 first).
        """
        if self.draining:
            raise RuntimeError("the hub is draining; refuse the connection with 1001")
        if client_id is None:
            client_id = protocol.new_client_id()
        else:
            protocol.validate_client_id(client_id)
        now = self._wall_clock()
        connection = Connection(
            client_id,
            peer=peer,
            connected_at=now,
            queue_size=self.settings.queue_size,
            batch_limit=BATCH_LIMIT_BYTES,
        )
        previous = self.registry.add(connection)
        if not resuming:
            connection.offer(self._welcome(connection))
        if previous is not None:
            previous.request_close(CloseCode.REPLACED, "replaced by a newer connection")
            LOGGER.info(
                "client %s reconnected from %s: older connection from %s closed with 4500",
                client_id,
                peer,
                previous.peer,
            )
        LOGGER.info(
            "client %s connected from %s, %d active connections",
            client_id,
            peer,
            len(self.registry),
        )
        return connection

    def _welcome(self, connection: Connection, resumed: dict[str, object] | None = None) -> Frame:
        return Frame(
            protocol.welcome_frame(
                client_id=connection.client_id,
                active_connections=self.cluster_connections(),
                instance=self.instance_id,
                last_id=self.broker.last_id,
                ts=self._wall_clock(),
                resumed=resumed,
            )
        )

    async def resume(self, connection: Connection, since: str) -> None:
        """Queue the welcome, then the broadcasts after ``since`` that the client missed, then
        whatever arrived live meanwhile (once each, in order).

        ``connection`` comes from ``connect(..., resuming=True)`` and its writer has not
        started, so live broadcasts wait in its outbox while the history is read. At most half
        a queue is replayed: a client that missed more is told its history is incomplete.
        """
        history = await self.broker.history(
            since, limit=max(1, self.settings.queue_size // 2), max_bytes=RESUME_BUDGET_BYTES
        )
        if connection.closing:
            return
        live = connection.take_queued()
        replayed = [self._frame(broadcast) for broadcast in history.broadcasts]
        welcome = self._welcome(
            connection, {"since": since, "replayed": len(replayed), "complete": history.complete}
        )
        for frame in (welcome, *replayed):
            if not connection.offer(frame):
                connection.request_close(CloseCode.SLOW_CONSUMER, "too much to replay")
                return
        # From here on, a broadcast the client already has (up to ``since``, or replayed just
        # now) is dropped: the live ones queued meanwhile, and any still on their way here (a
        # reader of this process that had not yet passed ``since``).
        newest = history.broadcasts[-1].id if history.broadcasts else None
        connection.resume_floor = protocol.parse_message_id(newest or since)
        for frame in live:
            if not connection.offer(frame):
                connection.request_close(CloseCode.SLOW_CONSUMER, "too much to replay")
                return
        LOGGER.info(
            "client %s resumed after %s: %d broadcasts replayed%s",
            connection.client_id,
            since,
            len(replayed),
            "" if history.complete else ", some were no longer available",
        )

    def disconnect(self, connection: Connection) -> None:
        """Forget ``connection`` (idempotent); called however the connection ended."""
        if not self.registry.remove(connection):
            return
        duration = self._wall_clock() - connection.connected_at
        if self._state is HubState.DRAINING and self._drain_started_at is not None:
            elapsed = trio.current_time() - self._drain_started_at
            LOGGER.info(
                "drain: client %s %s after %.1fs of drain, %d connections remain",
                connection.client_id,
                "was closed" if connection.close_requested else "left",
                elapsed,
                len(self.registry),
            )
        else:
            LOGGER.info(
                "client %s disconnected after %.1fs, %d active connections",
                connection.client_id,
                duration,
                len(self.registry),
            )

    def note_refused(self, peer: str) -> None:
        self._refused += 1
        LOGGER.info("refused a new connection from %s during the drain (1001)", peer)

    # -- broadcasting --------------------------------------------------------------------------

    async def publish(self, sender: str, text: str) -> None:
        """Broadcast a client's text to every client of the cluster, the sender included.

        With the in-process broker the frames are queued before this returns; with Redis it
        may wait while too many messages are on their way (backpressure on this sender only).
        """
        await self.broker.publish(Outgoing("message", self._wall_clock(), sender, text))

    async def broadcast_periodic(self) -> None:
        await self.broker.publish(
            Outgoing("periodic", self._wall_clock(), active_connections=self.cluster_connections())
        )

    def deliver(self, broadcast: Broadcast) -> None:
        """Called by the broker for every broadcast of the cluster, in order: one JSON encoding,
        then a fan-out to this process's clients that never waits for a socket."""
        self._messages_broadcast += 1
        self.registry.broadcast(self._frame(broadcast))

    @staticmethod
    def _frame(broadcast: Broadcast) -> Frame:
        message = broadcast.message
        if message.kind == "message":
            text = protocol.message_frame(
                message_id=broadcast.id, sender=message.sender, text=message.text, ts=message.ts
            )
        else:
            text = protocol.periodic_frame(
                message_id=broadcast.id,
                active_connections=message.active_connections,
                ts=message.ts,
            )
        return Frame(text, broadcast.id)

    def local_state(self) -> tuple[int, bool]:
        return len(self.registry), self.draining

    def cluster_connections(self) -> int:
        """The cluster's connection count: the other processes' as last seen (every 2 s with
        Redis), plus this process's own as of now."""
        cluster = self.broker.cluster()
        if cluster is None:
            return len(self.registry)
        return max(cluster.connections - cluster.own_connections, 0) + len(self.registry)

    # -- drain control -------------------------------------------------------------------------

    def request_drain(self, reason: str) -> bool:
        """Start the drain (idempotent); return True if this call started it."""
        if self._drain_requested.is_set():
            return False
        self._drain_reason = reason
        self._state = HubState.DRAINING
        self._drain_requested.set()
        return True

    def force_close(self, reason: str) -> None:
        """Close every client now, drain or not (an operator pressing Ctrl+C twice)."""
        LOGGER.warning("%s: closing every connection now", reason)
        self.request_drain(reason)
        self._force.set()

    def handle_signal(self, signum: int) -> None:
        """The first SIGTERM/SIGINT starts the drain; a second SIGINT forces it.

        A repeated SIGTERM never forces: process managers repeat it (Hypercorn's parent sends
        it to its workers more than once) without meaning "now".
        """
        name = signal.Signals(signum).name
        if not self.draining:
            LOGGER.info("received %s: starting the drain", name)
            self.request_drain(name)
        elif signum == signal.SIGINT and not self._stopped.is_set():
            self.force_close(f"received a second {name}")
        else:
            LOGGER.info("received %s again: the drain goes on", name)

    async def wait_stopped(self) -> None:
        """Return once the drain is over (every client gone or closed)."""
        await self._stopped.wait()

    # -- the tasks -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the broker, the periodic broadcaster and the drain watcher; return when the
        drain is over.

        Errors: :class:`trio_ws.core.broker.BrokerUnavailableError` before ``started`` if the broker
        cannot be reached.
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(self.broker.run, self)
            periodic = trio.CancelScope()
            nursery.start_soon(self._broadcast_periodically, periodic)
            nursery.start_soon(self._watch_for_drain, periodic)
            task_status.started()
            await self._stopped.wait()
            await self.broker.leave()
            nursery.cancel_scope.cancel()

    async def _broadcast_periodically(self, scope: trio.CancelScope) -> None:
        interval = self.settings.broadcast_interval
        if interval <= 0:
            return
        with scope:
            next_at = trio.current_time() + interval
            while True:
                await trio.sleep_until(next_at)
                # One periodic message per interval for the whole cluster: the slot is the
                # same in every process (wall clock), and the broker lets one of them send it.
                slot = int(self._wall_clock() // interval)
                if await self.broker.claim_periodic(slot, interval):
                    await self.broadcast_periodic()
                next_at += interval

    async def _watch_for_drain(self, periodic: trio.CancelScope) -> None:
        await self._drain_requested.wait()
        periodic.cancel()
        self._drain_started_at = trio.current_time()
        self._drain_started_wall = self._wall_clock()
        self._drain_at_start = len(self.registry)
        deadline_wall = self._drain_started_wall + self.policy.deadline_s
        LOGGER.info(
            "drain started (%s): %d connections, deadline %gs (at %s)",
            self._drain_reason,
            self._drain_at_start,
            self.policy.deadline_s,
            protocol.iso_time(deadline_wall),
        )
        warned = self.registry.broadcast(
            Frame(
                protocol.shutdown_frame(
                    reason=f"server is shutting down ({self._drain_reason}); please reconnect",
                    seconds_left=self.policy.deadline_s,
                    ts=self._drain_started_wall,
                )
            )
        )
        LOGGER.info("drain: warned %d clients", warned)
        try:
            self.outcome = await drain(self.registry, self.policy, self._force)
        finally:
            self._state = HubState.STOPPED
            self._stopped.set()

    # -- reporting -----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """What ``/health`` reports: the original design's fields plus drain progress."""
        now = self._wall_clock()
        stats = self.registry.statistics()
        status = self._state.value
        if self._state is HubState.SERVING:
            status = "ok" if self.broker.state is BrokerState.UP else "degraded"
        cluster = self.broker.cluster()
        report: dict[str, Any] = {
            "status": status,
            "instance": self.instance_id,
            "active_connections": stats.connections,
            "cluster": None
            if cluster is None
            else {
                "instances": cluster.instances,
                "connections": self.cluster_connections(),
                "draining_instances": cluster.draining_instances,
                "age_s": round(trio.current_time() - cluster.as_of, 3),
            },
            "broker": self.broker.health(),
            "shutdown_in_progress": self.draining,
            "timestamp": protocol.iso_time(now),
            "uptime_s": round(now - self._started_wall, 3),
            "connections_total": stats.total_connected,
            "slow_disconnects": stats.slow_disconnects,
            "replaced_connections": stats.replaced,
            "messages_broadcast": self._messages_broadcast,
            "refused_during_drain": self._refused,
            "drain": None,
        }
        if self._drain_started_at is not None and self._drain_started_wall is not None:
            elapsed = trio.current_time() - self._drain_started_at
            report["drain"] = {
                "reason": self._drain_reason,
                "started_at": protocol.iso_time(self._drain_started_wall),
                "elapsed_s": round(elapsed, 3),
                "time_left_s": round(
                    self.policy.time_left(self._drain_started_at, trio.current_time()), 3
                ),
                "deadline_s": self.policy.deadline_s,
                "connections_at_start": self._drain_at_start,
            }
        return report
