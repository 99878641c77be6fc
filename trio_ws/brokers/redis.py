"""The Redis broker: every broadcast of the cluster goes through one Redis Stream.

Theory of operation:

* **Publish**: a message gets this process's next sequence number and joins ``pending``; one
  publisher task sends whatever is pending with ``XADD`` (pipelined, ``MAXLEN ~ stream_maxlen``),
  in order. A message stays pending until the reader sees it come back from the stream, so
  nothing is forgotten between a send and a crash of Redis.
* **Deliver**: one reader task per process loops on ``XREAD BLOCK`` from the last id it saw and
  hands every entry to the hub in stream order, which is the cluster's one global order; the
  stream id is the message id. Stream-as-transport rather than Pub/Sub: there is no subscription
  to lose, and the last id seen is the whole recovery state (``bench/broker_transport.py``
  measures both; README "Scaling" has the figures).
* **Once**: entries carry their origin instance and its sequence number. A reader skips an entry
  whose sequence number is not above the last one seen from that origin: a message re-sent after
  an outage (because its first ``XADD`` may or may not have landed) is delivered once.
* **Outage**: on the first error the broker is *down*: every pending message not yet delivered
  here is delivered to this process's clients at once (id ``None``), and so is every message
  published until Redis answers again; clients of each process keep talking. The broker retries
  with backoff; once Redis answers it replays the stream from its last id (what others sent
  meanwhile), and the publisher re-sends everything pending (what this process sent meanwhile),
  which the other processes then deliver and this one skips.
* **Cluster**: :mod:`trio_ws.brokers.membership` (heartbeat, cluster view, periodic claim).
* **Bounded**: the stream keeps at most ``stream_maxlen`` entries, which the settings derive
  from a byte budget (``TRIO_WS_REDIS_STREAM_MAX_BYTES``); one pipeline and one read hold a
  bounded number of bytes. A write Redis refuses for memory (OOM) makes the stream shorter
  (``XTRIM``, as the log decides) and is sent again; errors are described without the
  command's arguments, which carry messages' text.

The decisions (what to deliver, skip, send again, replay) are
:mod:`trio_ws.brokers.cluster_log`'s, which does no I/O; this module does the I/O and tells the
log what happened.

Never wedged: only the broker's own tasks run Redis commands (a resuming client's history is
asked for through a :class:`~trio_ws.brokers.mailbox.Mailbox`, so no handler's cancellation
reaches coredis); every command has a deadline; and an outage ends the *session*: the coredis
client and its connection pool are thrown away, and the next session starts with new ones, so
nothing a cancelled or timed-out command left behind in the pool carries over. A watchdog
(:class:`~trio_ws.brokers.cluster_log.StallWatch`) ends a session that is up but no longer
moving, whatever the reason.

No coredis retry policy and no coredis Pub/Sub: every command fails fast and this module owns
the reconnect (coredis's Pub/Sub reconnect can end silently).
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import anyio
import coredis
import coredis.exceptions
import trio
from coredis.retry import NoRetryPolicy
from coredis.tokens import PureToken

from trio_ws.brokers.cluster_log import (
    PENDING_MAX_BYTES,
    ClusterLog,
    HistoryRead,
    HistoryRequest,
    Resync,
    StallWatch,
    StreamInfo,
    describe_error,
    error_class,
)
from trio_ws.brokers.entries import Entry, decode_entry, encode_entry
from trio_ws.brokers.mailbox import Mailbox
from trio_ws.brokers.membership import KICK, IdRequest, Membership
from trio_ws.core.broker import (
    Broker,
    BrokerState,
    BrokerUnavailableError,
    ClusterView,
    History,
    Member,
    Outgoing,
)
from trio_ws.core.words import loggable, plural
from trio_ws.settings import redact_url

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from coredis.response.types import StreamEntry

    #: A command a caller asks the broker to run: given the client, it answers True or False.
    Command = Callable[[coredis.Redis[str]], Awaitable[bool]]

LOGGER = logging.getLogger(__name__)

#: How long ``XREAD`` blocks on the server; a read may take this plus ``COMMAND_TIMEOUT_S``.
BLOCK_MS = 1000
#: Most entries one ``XREAD`` returns, and most ``XADD`` in one pipeline.
BATCH = 500
#: Most bytes of messages in one ``XADD`` pipeline (at least one message): Redis holds the
#: whole pipeline in memory while it runs it.
PIPELINE_BYTES = 1 << 20
#: Most bytes one ``XREAD`` may return, counted with entries of the maximum size: Redis holds
#: the reply in memory until it is sent.
READ_BYTES = 4 << 20
#: Fewest entries one ``XREAD`` asks for, however large they may be.
READ_MIN = 10
#: A command (connect included) that takes longer means a dead or half-open connection.
COMMAND_TIMEOUT_S = 5.0
HEARTBEAT_S = 2.0
INSTANCE_TTL_S = 10.0
RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 2.0

#: Everything that means "Redis did not answer as it should": the broker goes down and retries.
BROKER_ERRORS: tuple[type[Exception], ...] = (
    coredis.exceptions.RedisError,
    OSError,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    trio.TooSlowError,
)


@dataclass(frozen=True, slots=True)
class _Joined:
    """This process in the cluster, from :meth:`RedisBroker.run` on: each part needs its
    instance id."""

    member: Member
    log: ClusterLog
    membership: Membership


class RedisBroker(Broker):
    """Broadcasts through a Redis Stream; see the module docstring.

    ``stall_timeout`` (default: twice the command timeout plus the read's block time) is how
    long the broker may be up without moving before the watchdog calls it an outage.
    """

    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "trio_ws",
        stream_maxlen: int = 10_000,
        stream_max_bytes: int | None = None,
        max_entry_bytes: int = 0,
        pending_limit: int = 10_000,
        pending_max_bytes: int = PENDING_MAX_BYTES,
        connect_timeout: float = COMMAND_TIMEOUT_S,
        command_timeout: float = COMMAND_TIMEOUT_S,
        heartbeat_s: float = HEARTBEAT_S,
        instance_ttl_s: float = INSTANCE_TTL_S,
        stall_timeout: float | None = None,
    ) -> None:
        self.url = url
        self.stream = f"{prefix}:broadcasts"
        self._prefix = prefix
        self._stream_maxlen = stream_maxlen
        #: Only for the logs: the budget that ``stream_maxlen`` was derived from.
        self._stream_max_bytes = stream_max_bytes
        #: Entries per read: as many maximum-size entries as fit in READ_BYTES.
        self._read_count = BATCH
        if max_entry_bytes > 0:
            self._read_count = max(READ_MIN, min(BATCH, READ_BYTES // max_entry_bytes))
        self._pending_limit = pending_limit
        self._pending_max_bytes = pending_max_bytes
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._heartbeat_s = heartbeat_s
        self._instance_ttl_s = instance_ttl_s
        if stall_timeout is None:
            stall_timeout = 2 * command_timeout + BLOCK_MS / 1000
        self._watch = StallWatch(stall_timeout)
        self._joined: _Joined | None = None  # from run() on
        self._cluster: ClusterView | None = None
        #: Ends the current session (cancelled on an outage); None between sessions.
        self._session: trio.CancelScope | None = None
        self._work = trio.Event()
        self._space = trio.lowlevel.ParkingLot()
        self._histories: Mailbox[HistoryRequest, History] = Mailbox()
        self._commands: Mailbox[Command, bool] = Mailbox()
        #: Claims and releases of client ids, in order; those waiting share one pipeline.
        self._ids: Mailbox[IdRequest, bool] = Mailbox()
        self.history_requests = 0
        self.history_reads = 0
        self.stalls = 0

    # -- the Broker interface ------------------------------------------------------------------

    @property
    def state(self) -> BrokerState:
        return BrokerState.UP if self._joined is None else self._joined.log.state

    def cluster(self) -> ClusterView | None:
        return self._cluster

    async def run(
        self, member: Member, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._joined = _Joined(
            member,
            ClusterLog(
                member.instance_id,
                pending_limit=self._pending_limit,
                pending_max_bytes=self._pending_max_bytes,
                skipped_limit=self._stream_maxlen,
                stream_cap=self._stream_maxlen,
            ),
            Membership(self._prefix, member.instance_id, self._instance_ttl_s),
        )
        await self._run_session(first=True, task_status=task_status)
        delay = RECONNECT_MIN_S
        while True:
            # Equal jitter: instances restarted together do not reconnect in lockstep.
            await trio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, RECONNECT_MAX_S)
            if await self._run_session(first=False):
                delay = RECONNECT_MIN_S

    async def publish(self, message: Outgoing) -> None:
        joined = self._require_joined()
        log, member = joined.log, joined.member
        while log.publish_must_wait:
            # Backpressure: the sender's reader task waits; Redis is slower than the senders.
            await self._space.park()
        dropped_before = log.statistics().dropped_during_outages
        for broadcast in log.publish(message):
            member.deliver(broadcast)
        dropped = log.statistics().dropped_during_outages
        if dropped > dropped_before and (dropped == 1 or dropped % 1000 == 0):
            LOGGER.warning(
                "broker: %d messages sent during the outage will not reach other processes "
                "(more than %d, or more than %d bytes, waiting for Redis)",
                dropped,
                self._pending_limit,
                self._pending_max_bytes,
            )
        self._work.set()

    @property
    def last_id(self) -> str | None:
        last_id = "0-0" if self._joined is None else self._joined.log.last_id
        return None if last_id == "0-0" else last_id

    async def history(self, since: str, *, limit: int, max_bytes: int) -> History:
        """From the stream, up to what the reader has delivered here (what comes later reaches
        the client live), without the copies that the reader skipped as duplicates.

        The broker's history task reads it, together with the other requests that arrived
        meanwhile; the caller only waits (and may be cancelled). ``complete`` is False when
        the entry ``since`` names is no longer in the stream (trimmed, or lost in a Redis
        restart), when some did not fit, or when Redis is down.
        """
        self.history_requests += 1
        if self._require_joined().log.state is BrokerState.DOWN:
            return History([], False)
        answer = await self._histories.ask(HistoryRequest(since, limit, max_bytes))
        return History([], False) if answer is None else answer

    async def claim_periodic(self, slot: int, interval: float) -> bool:
        if self.state is BrokerState.DOWN:
            return True  # each process keeps its own clients informed during an outage
        won = await self._commands.ask(functools.partial(self._claim_periodic, slot, interval))
        return True if won is None else won  # None: Redis went down meanwhile

    async def claim_id(self, client_id: str, claim: str, presented: str | None) -> bool:
        if self.state is BrokerState.DOWN:
            return True  # each process decides for its own clients during an outage
        granted = await self._ids.ask(IdRequest(client_id, claim, presented, claim=True))
        return True if granted is None else granted  # None: Redis went down meanwhile

    def release_id(self, client_id: str, claim: str) -> None:
        if self._joined is None or self.state is BrokerState.DOWN:
            return  # the next session writes the held ids anew
        self._ids.post(IdRequest(client_id, claim, None, claim=False))

    async def kick_elsewhere(self, client_id: str) -> bool:
        if self.state is BrokerState.DOWN:
            return False  # nobody else can be asked: the caller answers for this process
        held = await self._commands.ask(functools.partial(self._kick, client_id))
        return bool(held)  # None: Redis went down meanwhile

    async def leave(self) -> None:
        membership = self._require_joined().membership
        membership.leaving = True  # no heartbeat may register this process again
        if self.state is BrokerState.DOWN:
            return  # the entry expires by itself; do not hold the exit for a timeout
        left = None
        with trio.move_on_after(self._command_timeout, shield=True):
            left = await self._commands.ask(self._leave)
        if left:
            LOGGER.info("broker: instance %s left the cluster", membership.instance_id)
        else:
            LOGGER.info(
                "broker: could not leave the cluster; the entry expires in %gs",
                self._instance_ttl_s,
            )

    def health(self) -> dict[str, Any]:
        if self._joined is None:
            return {"kind": self.kind, "state": self.state.value, "url": redact_url(self.url)}
        stats = self._joined.log.statistics()
        down_for = None
        if stats.down_since is not None:
            down_for = round(trio.current_time() - stats.down_since, 3)
        return {
            "kind": self.kind,
            "state": stats.state.value,
            "url": redact_url(self.url),
            "stream": self.stream,
            "last_id": stats.last_id,
            "pending": stats.pending,
            "pending_bytes": stats.pending_bytes,
            "outages": stats.outages,
            "down_for_s": down_for,
            "last_error": stats.last_error or None,
            "delivered_during_outages": stats.delivered_during_outages,
            "dropped_during_outages": stats.dropped_during_outages,
            "resent_after_outages": stats.resent_after_outages,
            "replayed_after_outages": stats.replayed_after_outages,
            "duplicates_skipped": stats.duplicates_skipped,
            "trims_after_refusals": stats.trims_after_refusals,
            "stalls": self.stalls,
            "history_requests": self.history_requests,
            "history_reads": self.history_reads,
        }

    # -- sessions ------------------------------------------------------------------------------

    async def _run_session(
        self, *, first: bool, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> bool:
        """One coredis client, from connecting to its first error (or the watchdog's verdict).

        ``first``: at startup, connect (or raise :class:`BrokerUnavailableError`); afterwards,
        resync. Returns whether Redis answered.
        """
        client = self._new_client()
        connected = False
        failure: Exception | None = None
        with trio.CancelScope() as self._session:
            try:
                # coredis's client runs a task group: whatever leaves this block is a group.
                async with client:
                    with trio.fail_after(self._connect_timeout):
                        await (self._connect(client) if first else self._resync(client))
                    connected = True
                    task_status.started()
                    await self._serve(client)
            except* BROKER_ERRORS as errors:
                failure = _first_leaf(errors)
        ended_here = self._session.cancel_called  # by _fail, which reported the outage
        self._session = None
        # Nobody is left to answer these; and nothing more will be asked before the next
        # session, since the broker is down (or shutting down).
        self._histories.give_up()
        self._commands.give_up()
        self._ids.give_up()
        if failure is not None and first and not connected:
            raise BrokerUnavailableError(
                f"cannot reach Redis at {redact_url(self.url)}: {_describe(failure)}"
            ) from None
        if failure is not None and not ended_here:
            self._go_down("unreachable", _describe(failure))
        return connected

    def _new_client(self) -> coredis.Redis[str]:
        return coredis.Redis.from_url(
            self.url,
            decode_responses=True,
            retry_policy=NoRetryPolicy(),
            connect_timeout=self._connect_timeout,
            stream_timeout=BLOCK_MS / 1000 + self._command_timeout,
        )

    async def _connect(self, client: coredis.Redis[str]) -> None:
        log = self._require_joined().log
        log.start(await self._run_id(client), await self._stream_info(client))
        await self._heartbeat(client)
        await self._write_ids(client)
        budget = ""
        if self._stream_max_bytes is not None:
            budget = f", {self._stream_max_bytes / (1 << 20):g} MiB"
        LOGGER.info(
            "broker: Redis at %s, stream %s from id %s (at most %d entries%s), instance %s; "
            "cluster: %d instances, %d connections",
            redact_url(self.url),
            self.stream,
            log.last_id,
            self._stream_maxlen,
            budget,
            log.origin,
            self._cluster.instances if self._cluster else 0,
            self._cluster.connections if self._cluster else 0,
        )

    async def _resync(self, client: coredis.Redis[str]) -> None:
        """After an outage: the log chooses where to replay from and what to send again."""
        run_id, stream = await self._run_id(client), await self._stream_info(client)
        # This process is a member again, holding its ids, before any claim is answered.
        await self._heartbeat(client)
        await self._write_ids(client)
        resync = self._require_joined().log.on_resync(run_id, stream, trio.current_time())
        _report_resync(resync, redact_url(self.url), self.stream)

    async def _serve(self, client: coredis.Redis[str]) -> None:
        """The session's tasks, until one of them fails (then :meth:`_fail` cancels them)."""
        self._watch.restart(trio.current_time(), self._require_joined().log.own_confirmed)
        self._work.set()  # anything queued meanwhile is sent now
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_loop, client)
            nursery.start_soon(self._publish_loop, client)
            nursery.start_soon(self._heartbeat_loop, client)
            nursery.start_soon(self._history_loop, client)
            nursery.start_soon(self._command_loop, client)
            nursery.start_soon(self._ids_loop, client)
            nursery.start_soon(self._watchdog)

    def _fail(self, condition: str, reason: str) -> None:
        """End the session: an outage until the next one resyncs."""
        self._go_down(condition, reason)
        if self._session is not None:
            self._session.cancel()

    def _go_down(self, condition: str, reason: str) -> None:
        """``condition``: "unreachable" or "stalled"; ``reason``: the error, or the numbers."""
        joined = self._require_joined()
        log, member = joined.log, joined.member
        went_down = log.state is BrokerState.UP
        flushed = log.on_error(reason, trio.current_time())
        for broadcast in flushed:
            member.deliver(broadcast)
        if not went_down:
            return
        self._space.unpark_all()  # waiting senders now deliver locally
        LOGGER.warning(
            "broker: Redis at %s %s (%s): broadcasts reach this process's clients only until "
            "it is back; %d messages in flight delivered here now; reconnecting with a new client",
            redact_url(self.url),
            condition,
            reason,
            len(flushed),
        )

    def _command_failed(self, error: Exception) -> None:
        self._fail("unreachable", _describe(error))

    async def _relieve(self, client: coredis.Redis[str], error: Exception) -> bool:
        """A command failed with ``error``. If Redis refused it for memory, trim the stream as
        the log decides and return True: the caller tries again. Otherwise end the session
        (an outage) and return False."""
        log = self._require_joined().log
        if not isinstance(error, coredis.exceptions.ResponseError):
            self._command_failed(error)
            return False
        description = _describe(error)
        code = error_class(type(error).__name__, str(error))
        trim = log.on_refused(code, description, trio.current_time())
        if trim is None:
            self._command_failed(error)
            return False
        try:
            with trio.fail_after(self._command_timeout):
                removed = await client.xtrim(
                    self.stream, trim_strategy=PureToken.MAXLEN, threshold=trim.keep
                )
        except BROKER_ERRORS as trim_error:
            self._command_failed(trim_error)
            return False
        if trim.report:
            LOGGER.warning(
                "broker: Redis refused a write (%s): trimmed the stream to its newest %d "
                "entries (%d removed) and trying again; %s since the last warning. Give Redis more "
                "memory or lower TRIO_WS_REDIS_STREAM_MAX_BYTES",
                description,
                trim.keep,
                removed,
                plural(trim.since_report, "trim"),
            )
        return True

    # -- the session's tasks -------------------------------------------------------------------

    async def _read_loop(self, client: coredis.Redis[str]) -> None:
        joined = self._require_joined()
        log, member = joined.log, joined.member
        while True:
            try:
                with trio.fail_after(BLOCK_MS / 1000 + self._command_timeout):
                    response = await client.xread(
                        {self.stream: log.last_id}, count=self._read_count, block=BLOCK_MS
                    )
            except BROKER_ERRORS as error:
                self._command_failed(error)
                return
            self._watch.read_finished(trio.current_time())
            entries = response.get(self.stream, ()) if response else ()
            for entry in entries:
                for broadcast in log.on_entry(str(entry.identifier), _decode(entry)):
                    member.deliver(broadcast)
            log.read_finished(full=len(entries) >= self._read_count)
            self._space.unpark_all()

    async def _publish_loop(self, client: coredis.Redis[str]) -> None:
        log = self._require_joined().log
        while True:
            batch = log.next_batch(BATCH, PIPELINE_BYTES)
            if not batch:
                self._work = trio.Event()
                await self._work.wait()
                continue
            try:
                with trio.fail_after(self._command_timeout):
                    async with client.pipeline(transaction=False) as pipe:
                        for pending in batch:
                            pipe.xadd(
                                self.stream,
                                encode_entry(log.origin, pending.seq, pending.message),
                                trim_strategy=PureToken.MAXLEN,
                                trim_operator=PureToken.APPROXIMATELY,
                                threshold=self._stream_maxlen,
                            )
            except BROKER_ERRORS as error:
                if await self._relieve(client, error):
                    continue  # the same batch again, into a shorter stream
                return
            log.batch_sent(batch)

    async def _heartbeat_loop(self, client: coredis.Redis[str]) -> None:
        membership = self._require_joined().membership
        while True:
            await trio.sleep(self._heartbeat_s)
            if membership.leaving:
                return
            try:
                with trio.fail_after(self._command_timeout):
                    await self._heartbeat(client)
            except BROKER_ERRORS as error:
                if await self._relieve(client, error):
                    continue  # the next heartbeat, into a shorter stream
                return

    async def _history_loop(self, client: coredis.Redis[str]) -> None:
        """Answers the history requests that arrived since the last read, with one read."""
        log = self._require_joined().log
        while True:
            requests = await self._histories.take_all()
            try:
                questions = [request.question for request in requests]
                read = log.plan_histories(questions)
                try:
                    with trio.fail_after(self._command_timeout):
                        entries, anchors_found = await self._read_history(client, read)
                except coredis.exceptions.ResponseError as error:
                    # Redis answered, with an error about this read: not an outage.
                    LOGGER.info("broker: could not read history: %s", _describe(error))
                    continue
                except BROKER_ERRORS as error:
                    self._command_failed(error)
                    return
                answers = log.answer_histories(questions, read, entries, anchors_found)
                for request, answer in zip(requests, answers, strict=True):
                    request.reply(answer)
            finally:
                for request in requests:
                    request.give_up()  # unless answered: the caller gets an incomplete history

    async def _read_history(
        self, client: coredis.Redis[str], read: HistoryRead
    ) -> tuple[Sequence[tuple[str, Entry | None]], set[str]]:
        """The range (newest first) and which anchors exist, in one pipeline."""
        if not read.count and not read.anchors:
            return [], set()  # no request can be in the stream
        self.history_reads += 1
        async with client.pipeline(transaction=False) as pipe:
            range_request = None
            if read.count:
                range_request = pipe.xrevrange(
                    self.stream, read.newest, read.oldest, count=read.count
                )
            anchor_requests = [pipe.xrange(self.stream, a, a, count=1) for a in read.anchors]
        entries = await range_request if range_request is not None else ()
        anchors_found = set()
        for anchor, request in zip(read.anchors, anchor_requests, strict=True):
            if await request:
                anchors_found.add(anchor)
        return [(str(entry.identifier), _decode(entry)) for entry in entries], anchors_found

    async def _command_loop(self, client: coredis.Redis[str]) -> None:
        """Runs the commands that callers asked for (periodic claims, leaving)."""
        while True:
            requests = await self._commands.take_all()
            try:
                for request in requests:
                    answer = await self._run_command(client, request.question)
                    if answer is None:
                        return  # the session is over
                    request.reply(answer)
            finally:
                for request in requests:
                    request.give_up()

    async def _run_command(self, client: coredis.Redis[str], command: Command) -> bool | None:
        """``command``'s answer; once more after a trim for memory. None: the session ends."""
        try:
            with trio.fail_after(self._command_timeout):
                return await command(client)
        except BROKER_ERRORS as error:
            if not await self._relieve(client, error):
                return None
        try:
            with trio.fail_after(self._command_timeout):
                return await command(client)
        except BROKER_ERRORS as error:
            self._command_failed(error)
            return None

    async def _ids_loop(self, client: coredis.Redis[str]) -> None:
        """Runs the claims and releases of client ids that arrived meanwhile, in order, in one
        pipeline: a reconnect storm of thousands of clients costs a few round trips."""
        membership = self._require_joined().membership
        while True:
            requests = await self._ids.take_all()
            try:
                try:
                    with trio.fail_after(self._command_timeout):
                        answers = await membership.run_id_requests(
                            client, [request.question for request in requests]
                        )
                except BROKER_ERRORS as error:
                    self._command_failed(error)
                    return
                for request, answer in zip(requests, answers, strict=True):
                    request.reply(answer)
            finally:
                for request in requests:
                    request.give_up()  # unless answered: a claim is then granted

    async def _watchdog(self) -> None:
        log = self._require_joined().log
        while True:
            await trio.sleep(self._watch.stall_timeout / 4)
            stall = self._watch.check(trio.current_time(), log.pending, log.own_confirmed)
            if stall is not None:
                self.stalls += 1
                self._fail("stalled", f"{stall}; last id {log.last_id}")
                return

    # -- commands ------------------------------------------------------------------------------

    async def _heartbeat(self, client: coredis.Redis[str]) -> None:
        joined = self._require_joined()
        connections, draining = joined.member.local_state()
        view = await joined.membership.heartbeat(client, connections, draining, trio.current_time())
        if view is not None:
            self._cluster = view
        evictions = await joined.membership.take_evictions(client)
        kicked = [client_id for client_id, claim in evictions if claim == KICK]
        replaced = [(client_id, claim) for client_id, claim in evictions if claim != KICK]
        if kicked:
            joined.member.kicked_elsewhere(kicked)
        if replaced:
            joined.member.replaced_elsewhere(replaced)

    async def _claim_periodic(self, slot: int, interval: float, client: coredis.Redis[str]) -> bool:
        won = await self._require_joined().membership.claim_periodic(client, slot, interval)
        if won:
            await self._heartbeat(client)  # the periodic message reports a fresh cluster count
        return won

    async def _write_ids(self, client: coredis.Redis[str]) -> None:
        joined = self._require_joined()
        await joined.membership.write_ids(client, joined.member.held_ids())

    async def _kick(self, client_id: str, client: coredis.Redis[str]) -> bool:
        return await self._require_joined().membership.kick(client, client_id)

    async def _leave(self, client: coredis.Redis[str]) -> bool:
        await self._require_joined().membership.leave(client)
        return True

    async def _run_id(self, client: coredis.Redis[str]) -> str:
        info = await client.info("server")
        return str(info.get("run_id", ""))

    async def _stream_info(self, client: coredis.Redis[str]) -> StreamInfo | None:
        """The stream's ends (``XINFO STREAM``), or None if there is no stream (yet, or any
        more)."""
        try:
            info = cast("Mapping[str, Any]", await client.xinfo_stream(self.stream))
        except coredis.exceptions.ResponseError as error:
            if "no such key" in str(error).lower():
                return None
            raise
        return StreamInfo(
            str(info["last-generated-id"]), str(info.get("max-deleted-entry-id") or "0-0")
        )

    def _require_joined(self) -> _Joined:
        if self._joined is None:
            raise RuntimeError("RedisBroker used before run()")
        return self._joined


def _report_resync(resync: Resync, url: str, stream: str) -> None:
    """Log what :meth:`ClusterLog.on_resync` decided: one line, plus a warning for each thing
    that went wrong with the stream meanwhile."""
    if resync.stream == "gone":
        LOGGER.warning(
            "broker: stream %s is gone (Redis restarted without persistence?): reading the "
            "new one from its start",
            stream,
        )
    elif resync.stream == "restored":
        LOGGER.warning(
            "broker: stream %s ends at %s, before the last id seen here (%s): Redis was "
            "restored from an older snapshot; reading on from its end",
            stream,
            resync.replay_from,
            resync.last_id_before,
        )
    elif resync.stream == "trimmed":
        LOGGER.warning(
            "broker: the outage outlasted the replay window: entries after %s were trimmed "
            "from the stream (TRIO_WS_REDIS_STREAM_MAXLEN, TRIO_WS_REDIS_STREAM_MAX_BYTES); "
            "some broadcasts did not reach this process's clients",
            resync.last_id_before,
        )
    if resync.restarted is not None:
        old, new = resync.restarted
        LOGGER.warning(
            "broker: Redis restarted (run_id %s -> %s): sending this process's recent "
            "messages again in case it lost them",
            old[:8],
            new[:8],
        )
    LOGGER.info(
        "broker: Redis at %s is back after %.2fs; replaying the stream after %s, "
        "re-sending %d messages sent here meanwhile",
        url,
        resync.down_for,
        resync.replay_from,
        resync.resending,
    )


def _decode(entry: StreamEntry) -> Entry | None:
    """The entry, or None (and a warning) for one that trio_ws did not write."""
    # decode_responses=True: coredis's types allow bytes, the values are str.
    try:
        return decode_entry(cast("Mapping[str, str]", entry.field_values))
    except (KeyError, ValueError) as error:
        LOGGER.warning(
            "broker: skipped stream entry %s not written by trio_ws (%s)",
            entry.identifier,
            loggable(repr(error)),
        )
        return None


def _describe(error: BaseException) -> str:
    """Short, and never the command's arguments (see :func:`describe_error`)."""
    if isinstance(error, trio.TooSlowError):
        return "no answer within the command timeout"
    answered = isinstance(error, coredis.exceptions.ResponseError)
    return describe_error(type(error).__name__, str(error), redis_answered=answered)


def _first_leaf(group: BaseExceptionGroup[Exception]) -> Exception:
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return cast("Exception", first)
