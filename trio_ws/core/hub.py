"""The hub: the server's core, with no knowledge of Quart, Hypercorn or Redis.

It owns the registry and hands broadcasts to a broker (``trio_ws.brokers``: in-process by
default, Redis for a cluster), which numbers them and delivers every broadcast of the cluster back
through :meth:`Hub.deliver`. :meth:`Hub.run` runs its sibling tasks in whatever nursery the
host gives it: the broker, the periodic broadcaster (in its own cancel scope, cancelled when the
drain starts), the pinger (one task for every connection: :mod:`trio_ws.core.liveness` says
whom to ping and whom to close, with 4010, for not answering) and the drain watcher
(:class:`trio_ws.core.drain.Drain`, whose ``drain()`` runs
under its ``move_on_after`` deadline). The broker keeps delivering the cluster's broadcasts to
the clients still here until the drain is over; then :meth:`Hub.wait_stopped` returns, which is
what the host turns into "shut down now".

Sync methods never block; only ``run``, ``resume``, ``publish`` and ``wait_*`` are async.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import TYPE_CHECKING

import trio

from trio_ws.core import protocol
from trio_ws.core.broker import Broadcast, Broker, BrokerState, Outgoing
from trio_ws.core.drain import Drain, DrainPolicy
from trio_ws.core.forwarded import TrustedProxies
from trio_ws.core.limits import REFUSAL_LOG_EVERY_S, Admission, LimitPolicy
from trio_ws.core.liveness import LivenessPolicy, LivenessSchedule
from trio_ws.core.origins import OriginPolicy
from trio_ws.core.protocol import PING, RESUME_KEY_PATTERN, CloseCode, Frame
from trio_ws.core.registry import Connection, Registry
from trio_ws.core.stats import LATENCY_SAMPLE_EVERY, HubStats, WriteStats
from trio_ws.core.throttle import Throttle
from trio_ws.core.tokens import EXPIRED_REASON
from trio_ws.core.words import loggable, plural

if TYPE_CHECKING:
    from collections.abc import Callable

    from trio_ws.core.tokens import TokenPolicy
    from trio_ws.settings import Settings

LOGGER = logging.getLogger(__name__)

REFUSED_REASON = "server is shutting down; reconnect to another instance"
NO_PONG_REASON = "no answer to a ping in time; reconnect"

#: The close reason of 4009: another connection holds the id, and no valid key was presented.
ID_IN_USE_REASON = "client id in use; retry later"

#: Most bytes one socket write may carry when a client's writer catches up on a backlog. The
#: write is shielded (no half frames on the wire), so this also bounds what a client that reads
#: at a trickle can make a close or a pong wait for.
BATCH_LIMIT_BYTES = 64 * 1024

#: The pinger lets other tasks run after this many pings: a tick's pings never hold the event
#: loop for longer than one batch (about a millisecond), whatever the number of connections.
PING_BATCH = 256
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
        token_policy: TokenPolicy | None = None,
    ) -> None:
        self.settings = settings
        #: How tokens are verified; None: tokens are off (the default).
        self.token_policy = token_policy
        #: Which pages may open a WebSocket (the ``Origin`` check, before the handshake).
        self.origins = OriginPolicy(settings.allowed_origins)
        #: The pace of the refusal lines: a flood of refusals costs a handshake each, not a
        #: log line each.
        self.origin_refusals = Throttle(REFUSAL_LOG_EVERY_S)
        self.token_refusals = Throttle(REFUSAL_LOG_EVERY_S)
        #: Counters for /metrics, read when a scrape asks (trio_ws/core/stats.py).
        self.stats = HubStats()
        self.write_stats = WriteStats()
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
        #: Whom the pinger pings, and whom it closes for not answering.
        self.liveness: LivenessSchedule[Connection] = LivenessSchedule(
            LivenessPolicy(ping_interval=settings.ping_interval, pong_timeout=settings.pong_timeout)
        )
        self.messages_broadcast = 0
        #: Client messages refused by ``TRIO_WS_CLIENT_PUBLISH``, and their log lines' pace.
        self.publishes_refused = 0
        self._refused_log = Throttle(REFUSAL_LOG_EVERY_S)
        #: Clients closed with 4010 (silent after a ping), and frames refused as malformed.
        self.no_pong_disconnects = 0
        self.protocol_errors = 0
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
        resume_key: str | None = None,
        authenticated: bool = False,
    ) -> Connection:
        """Register a new client and queue its welcome frame (``resuming``: :meth:`resume`
        queues it, with the history).

        Who may take a slot (docs/protocol.md, "Resume keys"): without tokens, an id is held by
        one connection, and another attempt for it is refused with
        :class:`~trio_ws.core.protocol.IdInUseError` (4009) unless it presents that
        connection's ``resume_key``: a genuine reconnect, which replaces the stale connection
        at once (4500) and keeps its key. With tokens (``authenticated``: the id is the token's
        ``sub``), a user may hold several connections, one slot each, named by its key: a
        reconnect that presents a key replaces only the connection that had it.

        ``attempt`` (from :meth:`new_attempt`, when the attempt reached the server) orders the
        attempts for one slot: an attempt that started before the connection already there (a
        client that gave up on it and retried, and whose retry got through first) is refused
        with :class:`~trio_ws.core.protocol.StaleAttemptError`, never replacing the newer one.

        Errors: :class:`trio_ws.core.protocol.ClientIdError` for a bad id;
        :class:`~trio_ws.core.protocol.IdInUseError`,
        :class:`~trio_ws.core.protocol.StaleAttemptError` (above); :class:`RuntimeError` if the
        hub is draining (callers check :attr:`draining` and refuse with 1001 first).
        """
        if self.draining:
            raise RuntimeError("the hub is draining; refuse the connection with 1001")
        if attempt is None:
            attempt = self.new_attempt()
        if resume_key is not None and RESUME_KEY_PATTERN.fullmatch(resume_key) is None:
            resume_key = None  # not one this server issued: as if none was presented
        if client_id is None:
            client_id = protocol.new_client_id()
        else:
            protocol.validate_client_id(client_id)
        # A key presented is kept (a tab's key stays the same for its whole life, and the
        # cluster's claim can then verify it on any instance); a new one otherwise.
        key = resume_key or protocol.new_resume_key()
        slot = _slot(client_id, key) if authenticated else client_id
        current = self.registry.get(slot)
        if current is not None:
            if current.attempt > attempt:
                LOGGER.info(
                    "client %s: a stale attempt from %s refused, a newer connection from %s "
                    "is already here",
                    client_id,
                    peer,
                    current.peer,
                )
                raise protocol.StaleAttemptError("a newer connection for this id is already here")
            if not authenticated and (
                resume_key is None or not hmac.compare_digest(resume_key, current.resume_key or "")
            ):
                LOGGER.info(
                    "client %s: attempt from %s refused with 4009, the id is held by a "
                    "connection from %s and %s",
                    client_id,
                    peer,
                    current.peer,
                    "no resume key was presented"
                    if resume_key is None
                    else "the resume key presented is not its",
                )
                raise protocol.IdInUseError(ID_IN_USE_REASON)
        now = self._wall_clock()
        connection = Connection(
            client_id,
            peer=peer,
            connected_at=now,
            queue_size=self.settings.queue_size,
            max_bytes=self.settings.outbox_bytes,
            batch_limit=BATCH_LIMIT_BYTES,
            attempt=attempt,
            resume_key=key,
            slot=slot,
            authenticated=authenticated,
            write_stats=self.write_stats,
        )
        previous = self.registry.add(connection)
        if not resuming:
            connection.offer(self._welcome(connection))
        self._presence_changed.set()
        if previous is not None:
            previous.request_close(CloseCode.REPLACED, "replaced by a newer connection")
            LOGGER.info(
                "client %s reconnected from %s with its resume key: older connection from %s "
                "closed with 4500",
                client_id,
                peer,
                previous.peer,
            )
        self._connects_counted += 1
        if LOGGER.isEnabledFor(self._connection_level):
            LOGGER.log(
                self._connection_level,
                "client %s connected from %s%s, %s",
                client_id,
                peer,
                " (token)" if authenticated else "",
                plural(len(self.registry), "active connection"),
                extra={"client": client_id, "event": "connected"},
            )
        return connection

    async def claim_across_cluster(self, connection: Connection, presented: str | None) -> bool:
        """Whether ``connection`` (just registered by :meth:`connect`) may keep its id across
        the cluster: False when a connection on another process holds the id and ``presented``
        is not its resume key (the caller then disconnects it and closes it with 4009).
        Authenticated connections (tokens) claim nothing: a user may hold several."""
        if connection.authenticated or connection.resume_key is None:
            return True
        valid = presented is not None and RESUME_KEY_PATTERN.fullmatch(presented) is not None
        granted = await self.broker.claim_id(
            connection.client_id,
            claim_value(connection.resume_key, connection.attempt),
            key_digest(presented) if valid and presented is not None else None,
        )
        if not granted:
            LOGGER.info(
                "client %s: attempt from %s refused with 4009, the id is held by a connection "
                "on another instance and %s",
                connection.client_id,
                connection.peer,
                "no resume key was presented" if presented is None else "the key is not its",
            )
        return granted

    def held_ids(self) -> dict[str, str]:
        """The ids this process's connections hold without tokens, with their claims."""
        return {
            connection.client_id: claim_value(connection.resume_key, connection.attempt)
            for connection in self.registry
            if not connection.authenticated and connection.resume_key is not None
        }

    def replaced_elsewhere(self, claims: list[tuple[str, str]]) -> None:
        """Each ``(client id, claim)`` was taken over by a reconnect on another instance that
        presented the key: close the connection that made that claim, if it is still here,
        with 4500 (a connection made since, with another claim, stays)."""
        for client_id, claim in claims:
            connection = self.registry.get(client_id)
            if (
                connection is None
                or connection.authenticated
                or connection.resume_key is None
                or claim_value(connection.resume_key, connection.attempt) != claim
            ):
                continue
            if connection.request_close(CloseCode.REPLACED, "replaced by a newer connection"):
                LOGGER.info(
                    "client %s (%s): reconnected with its resume key on another instance, "
                    "closed with 4500",
                    client_id,
                    connection.peer,
                )

    async def close_when_expired(self, connection: Connection, expires_at: float) -> None:
        """Close ``connection`` with 4502 when its token expires (``expires_at``, wall-clock
        seconds); the shell runs this beside the connection's reader and writer."""
        await trio.sleep(max(0.0, expires_at - self._wall_clock()))
        if connection.request_close(CloseCode.TOKEN_EXPIRED, EXPIRED_REASON):
            self.stats.token_expiries += 1
            LOGGER.info(
                "client %s (%s): token expired, closed with 4502",
                connection.client_id,
                connection.peer,
            )

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
                resume_key=connection.resume_key,
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
        stats = self.stats
        stats.resumes += 1
        stats.replayed += len(replayed)
        if not history.complete:
            stats.resumes_incomplete += 1
        LOGGER.info(
            "client %s resumed after %s: %d broadcasts replayed%s",
            connection.client_id,
            loggable(since),
            len(replayed),
            "" if history.complete else ", some were no longer available",
            extra={"client": connection.client_id, "event": "resumed"},
        )

    def watch(self, connection: Connection) -> None:
        """Ping ``connection`` from now on, and close it with 4010 if it stops answering.

        The shell calls this once it stamps ``connection.heard_at`` as bytes arrive and its
        sink can write a ping; a connection never watched is never pinged nor closed for it.
        """
        self.liveness.watch(connection, trio.current_time())

    def note_protocol_error(self, code: int, kind: str, peer: str) -> None:
        """A client's frame broke the WebSocket protocol and the shell closed it with
        ``code``: counted, and logged at DEBUG level (``kind`` says what, never the bytes)."""
        self.protocol_errors += 1
        LOGGER.debug("protocol error from %s, closed with %d: %s", peer, code, loggable(kind))

    def disconnect(self, connection: Connection) -> None:
        """Forget ``connection`` (idempotent); called however the connection ended."""
        self.liveness.forget(connection)
        if not self.registry.remove(connection):
            return
        if not connection.authenticated and connection.resume_key is not None:
            self.broker.release_id(
                connection.client_id, claim_value(connection.resume_key, connection.attempt)
            )
        self._count_closed(connection)
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
                extra={"client": connection.client_id, "event": "disconnected"},
            )

    def kick(self, client_id: str, who: str) -> bool:
        """Close this process's connections for ``client_id`` with 4503 (closed by the
        operator): the one holding the id, or with tokens every tab of that user. False if
        none is connected here. ``who`` names the requester in the log."""
        closed = False
        for connection in self.registry:
            if connection.client_id != client_id or connection.closing:
                continue
            connection.request_close(CloseCode.CLOSED_BY_OPERATOR, "closed by the operator")
            LOGGER.info(
                "client %s (%s) closed with 4503 by the operator (%s)",
                client_id,
                connection.peer,
                who,
            )
            self.stats.kicks += 1
            closed = True
        return closed

    async def kick_anywhere(self, client_id: str, who: str) -> bool:
        """:meth:`kick` here, and ask the broker to close ``client_id`` on the other processes
        of the cluster: True if it was connected here or holds its id on another process."""
        here = self.kick(client_id, who)
        elsewhere = await self.broker.kick_elsewhere(client_id)
        return here or elsewhere

    def kicked_elsewhere(self, client_ids: list[str]) -> None:
        """An operator asked another process of the cluster to close these clients."""
        for client_id in client_ids:
            self.kick(client_id, "through another instance")

    def note_publish_refused(self, connection: Connection, policy: str) -> None:
        """Count a client message the publish policy refused; log it, at most one line per
        :data:`~trio_ws.core.limits.REFUSAL_LOG_EVERY_S` with the count."""
        self.publishes_refused += 1
        count = self._refused_log.event(trio.current_time())
        if count is not None:
            LOGGER.info(
                "client %s (%s): message refused by TRIO_WS_CLIENT_PUBLISH=%s (%d refused "
                "since the last line)",
                connection.client_id,
                connection.peer,
                policy,
                count,
            )

    def _count_closed(self, connection: Connection) -> None:
        code = connection.close_code
        self.stats.closed["none" if code is None else str(code)] += 1

    def _evicted(self, connection: Connection) -> None:
        self._count_closed(connection)
        if self.drain.requested:
            self.drain.note_gone(connection, len(self.registry))

    def note_refused(self, peer: str) -> None:
        """A connection refused because the hub is draining (1001)."""
        self.drain.note_refused(peer)

    def note_invalid(self, reason: str) -> None:
        """A connection refused before it was registered for what it asked or presented:
        ``origin`` (HTTP 403), ``token`` (4501), ``id_in_use`` (4009), ``bad_request`` (1008:
        an invalid client id or resume position), ``stale_attempt`` (4500). A fixed set: it is
        a label of ``/metrics``."""
        self.stats.refused[reason] += 1

    def note_api_publish(self, *, accepted: bool) -> None:
        """A message of ``POST /publish`` the broker took (202), or could not take (503)."""
        self.stats.api_publishes["accepted" if accepted else "refused"] += 1

    def note_limit_hit(self, limit: str) -> None:
        """A connection closed for breaking a per-connection limit (``publish_rate``,
        ``message_size``, ``binary``)."""
        self.stats.limits_hit[limit] += 1

    # -- broadcasting --------------------------------------------------------------------------

    async def publish(self, sender: str, text: str) -> None:
        """Broadcast a client's text to every client of the cluster, the sender included.

        With the in-process broker the frames are queued before this returns; with Redis it
        may wait while too many messages are on their way (backpressure on this sender only).
        """
        self.stats.messages_received += 1
        await self.broker.publish(Outgoing("message", self._wall_clock(), sender, text))

    async def broadcast_periodic(self) -> None:
        await self.broker.publish(
            Outgoing("periodic", self._wall_clock(), active_connections=self.cluster_connections())
        )

    def deliver(self, broadcast: Broadcast) -> None:
        """Called by the broker for every broadcast of the cluster, in order: one JSON encoding,
        then a fan-out to this process's clients that never waits for a socket.

        Counted once per broadcast, never per client (trio_ws/core/stats.py)."""
        self.messages_broadcast += 1
        frame = self._frame(broadcast)
        delivered = self.registry.broadcast(frame)
        stats = self.stats
        stats.deliveries += delivered
        if delivered:
            stats.bytes_delivered += delivered * len(frame.wire)
        message = broadcast.message
        if message.kind == "message":
            stats.message_broadcasts += 1
        else:
            stats.periodic_broadcasts += 1
        if self.messages_broadcast % LATENCY_SAMPLE_EVERY == 0:
            lag = max(0.0, self._wall_clock() - message.ts)
            stats.latency.observe(lag)
            stats.last_lag = lag

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
            nursery.start_soon(self._ping_periodically)
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

    async def _ping_periodically(self) -> None:
        """One task pings every connection: each tick, the pre-built :data:`PING` frame goes
        to the connections whose slot comes round, through their outboxes (with nothing
        queued, one non-blocking ``send()`` each), and the silent ones are closed with 4010.
        It runs through the drain too: clients still connected need their pings."""
        schedule = self.liveness
        if not schedule.policy.pings:
            return
        timeout = schedule.policy.pong_timeout
        while True:
            due = schedule.tick(trio.current_time())
            if due.overdue:
                self._close_silent(due.overdue, timeout)
            for done, connection in enumerate(due.ping, 1):
                # A connection that left since the tick (during a batch's checkpoint) is
                # no longer watched: nothing to write to.
                if connection.ping_slot >= 0 and not connection.closing:
                    connection.offer(PING)  # a full outbox: the next broadcast evicts it
                if done % PING_BATCH == 0:
                    await trio.lowlevel.checkpoint()
            assert schedule.next_tick is not None
            await trio.sleep_until(schedule.next_tick)

    def _close_silent(self, overdue: list[Connection], timeout: float) -> None:
        closed = [c for c in overdue if c.request_close(CloseCode.NO_PONG, NO_PONG_REASON)]
        if not closed:
            return
        self.no_pong_disconnects += len(closed)
        # One line per tick, not per client: a network cut can silence thousands at once.
        first = closed[0]
        LOGGER.info(
            "closed %s with 4010: nothing received within %gs of a ping (first: client %s from %s)",
            plural(len(closed), "silent connection"),
            timeout,
            first.client_id,
            first.peer,
        )

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


def key_digest(resume_key: str) -> str:
    """What the cluster stores of a resume key: a digest, never the key itself."""
    return hashlib.sha256(resume_key.encode()).hexdigest()[:32]


def claim_value(resume_key: str, attempt: int) -> str:
    """What a connection's claim on its id says in the cluster: its key's digest (another
    instance compares a presented key with it) and its attempt number (which connection of
    this process made the claim)."""
    return f"{key_digest(resume_key)}.{attempt}"


def _slot(client_id: str, resume_key: str) -> str:
    """The registry slot of an authenticated connection: its id and a digest of its key (the
    key itself stays out of anything that might be printed)."""
    return f"{client_id}#{key_digest(resume_key)}"
