"""The hub: the server's core, with no knowledge of Quart, Hypercorn or Redis.

It owns the registry and hands broadcasts to a broker (``trio_ws.brokers``: in-process by
default, Redis for a cluster), which numbers them and delivers every broadcast of the cluster back
through :meth:`Hub.deliver`. :meth:`Hub.run` runs three sibling tasks in whatever nursery the
host gives it: the broker, the periodic broadcaster (in its own cancel scope, cancelled when the
drain starts) and the drain watcher (:class:`trio_ws.core.drain.Drain`, whose ``drain()`` runs
under its ``move_on_after`` deadline). The broker keeps delivering the cluster's broadcasts to
the clients still here until the drain is over; then :meth:`Hub.wait_stopped` returns, which is
what the host turns into "shut down now".

Sync methods never block; only ``run``, ``resume``, ``publish`` and ``wait_*`` are async.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from trio_ws.core import protocol
from trio_ws.core.broker import Broadcast, Broker, BrokerState, Outgoing
from trio_ws.core.drain import Drain, DrainPolicy
from trio_ws.core.forwarded import TrustedProxies
from trio_ws.core.limits import Admission, LimitPolicy
from trio_ws.core.protocol import CloseCode, Frame
from trio_ws.core.registry import Connection, Registry
from trio_ws.core.words import loggable, plural

if TYPE_CHECKING:
    from collections.abc import Callable

    from trio_ws.settings import Settings

LOGGER = logging.getLogger(__name__)

REFUSED_REASON = "server is shutting down; reconnect to another instance"

#: Most bytes one socket write may carry when a client's writer catches up on a backlog. The
#: write is shielded (no half frames on the wire), so this also bounds what a client that reads
#: at a trickle can make a close or a pong wait for.
BATCH_LIMIT_BYTES = 64 * 1024

#: ``log_connections=summary``: one line with the connects and disconnects of each interval.
CONNECTION_SUMMARY_INTERVAL_S = 10.0


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
        self.registry = Registry(on_evicted=self._evicted)
        #: Names this process in the welcome frame, /health and the cluster.
        self.instance_id = instance_id if instance_id is not None else protocol.new_instance_id()
        self.broker = broker
        self.drain = Drain(
            DrainPolicy(
                deadline_s=settings.drain_timeout, progress_every_s=settings.progress_interval
            ),
            wall_clock,
        )
        #: The connection limits, applied by the endpoint before :meth:`connect`.
        self.admission = Admission(
            LimitPolicy(
                max_connections=settings.max_connections,
                max_connections_per_ip=settings.max_connections_per_ip,
                handshake_rate_per_ip=settings.handshake_rate_per_ip,
            )
        )
        #: Whose X-Forwarded-For / Forwarded names the client.
        self.trusted_proxies = TrustedProxies(settings.trusted_proxies)
        self._wall_clock = wall_clock
        self.messages_broadcast = 0
        self._attempts = 0
        self._finished = trio.Event()
        #: Set when the connection count changed; the presence task announces it, coalesced.
        self._presence_changed = trio.Event()
        self._presence_announced: int | None = None
        self.started_wall = wall_clock()
        #: Connects and disconnects are logged one by one at INFO, or (``summary``) at DEBUG
        #: and counted here for a summary line (:meth:`_summarize_connections`).
        self._connection_level = (
            logging.INFO if settings.log_connections == "each" else logging.DEBUG
        )
        self._connects_counted = 0
        self._disconnects_counted = 0
        self._summary_since = 0.0

    # -- state ---------------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        """True from the drain request on: new connections are refused."""
        return self.drain.requested

    def not_ready_reason(self) -> str | None:
        """Why a load balancer should send new clients elsewhere, or None if it need not."""
        if self.drain.requested:
            return "draining"
        if self.broker.state is not BrokerState.UP:
            return "broker unavailable"
        if self.admission.full:
            return "at the connection limit"
        return None

    def wall_time(self) -> float:
        return self._wall_clock()

    @property
    def uptime_s(self) -> float:
        return self._wall_clock() - self.started_wall

    # -- connections ---------------------------------------------------------------------------

    def connect(
        self,
        client_id: str | None,
        peer: str,
        *,
        resuming: bool = False,
        attempt: int | None = None,
    ) -> Connection:
        """Register a new client and queue its welcome frame (``resuming``: :meth:`resume`
        queues it, with the history).

        ``attempt`` (from :meth:`new_attempt`, when the attempt reached the server) orders the
        attempts for one id, and the newest wins: a connected one that started earlier is asked
        to close with 4500, so a reconnecting client is never locked out by its own stale
        connection; and an attempt that started before the one already connected (a client
        that gave up on it and retried, and whose retry got through first) is refused with
        :class:`~trio_ws.core.protocol.StaleAttemptError`, never replacing the newer one.

        Errors: :class:`trio_ws.core.protocol.ClientIdError` for a bad id;
        :class:`~trio_ws.core.protocol.StaleAttemptError` (above); :class:`RuntimeError` if the
        hub is draining (callers check :attr:`draining` and refuse with 1001 first).
        """
        if self.draining:
            raise RuntimeError("the hub is draining; refuse the connection with 1001")
        if attempt is None:
            attempt = self.new_attempt()
        if client_id is None:
            client_id = protocol.new_client_id()
        else:
            protocol.validate_client_id(client_id)
            current = self.registry.get(client_id)
            if current is not None and current.attempt > attempt:
                LOGGER.info(
                    "client %s: a stale attempt from %s refused, a newer connection from %s "
                    "is already here",
                    client_id,
                    peer,
                    current.peer,
                )
                raise protocol.StaleAttemptError("a newer connection for this id is already here")
        now = self._wall_clock()
        connection = Connection(
            client_id,
            peer=peer,
            connected_at=now,
            queue_size=self.settings.queue_size,
            max_bytes=self.settings.outbox_bytes,
            batch_limit=BATCH_LIMIT_BYTES,
            attempt=attempt,
        )
        previous = self.registry.add(connection)
        if not resuming:
            connection.offer(self._welcome(connection))
        self._presence_changed.set()
        if previous is not None:
            previous.request_close(CloseCode.REPLACED, "replaced by a newer connection")
            LOGGER.info(
                "client %s reconnected from %s: older connection from %s closed with 4500",
                client_id,
                peer,
                previous.peer,
            )
        self._connects_counted += 1
        if LOGGER.isEnabledFor(self._connection_level):
            LOGGER.log(
                self._connection_level,
                "client %s connected from %s, %s",
                client_id,
                peer,
                plural(len(self.registry), "active connection"),
            )
        return connection

    def new_attempt(self) -> int:
        """Number a connection attempt as it reaches the server, before any wait: attempts for
        one client id are ordered by it (see :meth:`connect`)."""
        self._attempts += 1
        return self._attempts

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
        started, so live broadcasts wait in its outbox while the history is read. The newest
        broadcasts that fit in ``resume_bytes`` (and half a queue) are replayed: a client that
        missed more is told its history is incomplete. Resumes that arrive together share one
        read of the broker's history.
        """
        history = await self.broker.history(
            since,
            limit=max(1, self.settings.queue_size // 2),
            max_bytes=self.settings.resume_bytes,
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
            loggable(since),
            len(replayed),
            "" if history.complete else ", some were no longer available",
        )

    def disconnect(self, connection: Connection) -> None:
        """Forget ``connection`` (idempotent); called however the connection ended."""
        if not self.registry.remove(connection):
            return
        self._presence_changed.set()
        if self.drain.requested:
            self.drain.note_gone(connection, len(self.registry))
            return
        self._disconnects_counted += 1
        if LOGGER.isEnabledFor(self._connection_level):
            LOGGER.log(
                self._connection_level,
                "client %s disconnected after %.1fs, %s",
                connection.client_id,
                self._wall_clock() - connection.connected_at,
                plural(len(self.registry), "active connection"),
            )

    def _evicted(self, connection: Connection) -> None:
        if self.drain.requested:
            self.drain.note_gone(connection, len(self.registry))

    def note_refused(self, peer: str) -> None:
        self.drain.note_refused(peer)

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
        self.messages_broadcast += 1
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
        return self.drain.request(reason)

    def force_close(self, reason: str) -> None:
        """Close every client now, drain or not."""
        self.drain.force(reason)

    async def wait_stopped(self) -> None:
        """Return once the drain is over (every client gone or closed)."""
        await self.drain.wait_stopped()

    async def wait_finished(self) -> None:
        """Return once :meth:`run` is done: the drain is over and the broker has left the
        cluster. A host that cancels the hub's tasks earlier cuts the leaving short."""
        await self._finished.wait()

    # -- the tasks -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the broker, the periodic broadcaster and the drain watcher; return when the
        drain is over.

        Errors: :class:`trio_ws.core.broker.BrokerUnavailableError` before ``started`` if the
        broker cannot be reached.
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(self.broker.run, self)
            periodic = trio.CancelScope()
            nursery.start_soon(self._broadcast_periodically, periodic)
            nursery.start_soon(self._watch_drain, periodic)
            nursery.start_soon(self._announce_presence)
            if self._connection_level != logging.INFO:
                nursery.start_soon(self._summarize_connections)
            task_status.started()
            await self.drain.wait_stopped()
            await self.broker.leave()
            self._finished.set()
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

    async def _announce_presence(self) -> None:
        """Tell this process's clients the connection count when it changes, at most once per
        ``presence_interval``: a reconnect storm of thousands of clients costs each client one
        frame a second, not one per arrival. Local only (no broker, no history): the count is
        the cluster's as this process sees it."""
        interval = self.settings.presence_interval
        if interval <= 0:
            return
        while True:
            await self._presence_changed.wait()
            self._presence_changed = trio.Event()
            count = self.cluster_connections()
            if count != self._presence_announced:
                self._presence_announced = count
                frame = protocol.presence_frame(active_connections=count, ts=self._wall_clock())
                self.registry.broadcast(Frame(frame))
            await trio.sleep(interval)

    async def _summarize_connections(self) -> None:
        """``log_connections=summary``: every interval in which clients came or went, one line
        with how many (the drain logs its own departures)."""
        self._summary_since = trio.current_time()
        while True:
            await trio.sleep(CONNECTION_SUMMARY_INTERVAL_S)
            self.log_connection_summary()

    def log_connection_summary(self) -> None:
        """Log the connects and disconnects counted since the last summary, if any."""
        now = trio.current_time()
        connects, disconnects = self._connects_counted, self._disconnects_counted
        if connects or disconnects:
            self._connects_counted = self._disconnects_counted = 0
            LOGGER.info(
                "connections in the last %.1fs: %d connected, %d disconnected, %s",
                now - self._summary_since,
                connects,
                disconnects,
                plural(len(self.registry), "active connection"),
            )
        self._summary_since = now

    async def _watch_drain(self, periodic: trio.CancelScope) -> None:
        await self.drain.wait_requested()
        periodic.cancel()
        if self._connection_level != logging.INFO:
            self.log_connection_summary()  # the drain logs every departure from here on
        await self.drain.watch(self.registry)
