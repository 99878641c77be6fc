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
  published until Redis answers again; clients of each process keep talking. The reader retries
  with backoff; once Redis answers it replays the stream from its last id (what others sent
  meanwhile), and the publisher re-sends everything pending (what this process sent meanwhile),
  which the other processes then deliver and this one skips.
* **Cluster**: :mod:`trio_ws.brokers.membership` (heartbeat, cluster view, periodic claim).

The decisions (what to deliver, skip, send again, replay) are :mod:`trio_ws.brokers.cluster_log`'s,
which does no I/O; this module does the I/O and hands it what happened.

No coredis retry policy and no coredis Pub/Sub: every command fails fast and this module owns
the reconnect (coredis's Pub/Sub reconnect can end silently).
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any, cast

import anyio
import coredis
import coredis.exceptions
import trio
from coredis.retry import NoRetryPolicy
from coredis.tokens import PureToken

from trio_ws.brokers.cluster_log import ClusterLog, HistoryRequest, StreamInfo
from trio_ws.brokers.entries import Entry, decode_entry, encode_entry
from trio_ws.brokers.membership import Membership
from trio_ws.core.broker import (
    Broker,
    BrokerState,
    BrokerUnavailableError,
    ClusterView,
    History,
    Member,
    Outgoing,
)
from trio_ws.settings import redact_url

if TYPE_CHECKING:
    from collections.abc import Mapping

    from coredis.response.types import StreamEntry

LOGGER = logging.getLogger(__name__)

#: How long ``XREAD`` blocks on the server; a command may take this plus ``COMMAND_TIMEOUT_S``.
BLOCK_MS = 1000
#: Most entries one ``XREAD`` returns, and most ``XADD`` in one pipeline.
BATCH = 500
#: A command (connect included) that takes longer means a dead or half-open connection.
COMMAND_TIMEOUT_S = 5.0
HEARTBEAT_S = 2.0
INSTANCE_TTL_S = 10.0
RECONNECT_MIN_S = 0.05
RECONNECT_MAX_S = 2.0

#: Everything that means "Redis did not answer as it should": the broker goes down and retries.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    coredis.exceptions.RedisError,
    OSError,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    trio.TooSlowError,
)


class RedisBroker(Broker):
    """Broadcasts through a Redis Stream; see the module docstring."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "trio_ws",
        stream_maxlen: int = 10_000,
        pending_limit: int = 10_000,
        connect_timeout: float = COMMAND_TIMEOUT_S,
        command_timeout: float = COMMAND_TIMEOUT_S,
        heartbeat_s: float = HEARTBEAT_S,
        instance_ttl_s: float = INSTANCE_TTL_S,
    ) -> None:
        self.url = url
        self.stream = f"{prefix}:broadcasts"
        self._prefix = prefix
        self._stream_maxlen = stream_maxlen
        self._pending_limit = pending_limit
        self._connect_timeout = connect_timeout
        self._heartbeat_s = heartbeat_s
        self._instance_ttl_s = instance_ttl_s
        self._client: coredis.Redis[str] = coredis.Redis.from_url(
            url,
            decode_responses=True,
            retry_policy=NoRetryPolicy(),
            connect_timeout=connect_timeout,
            stream_timeout=BLOCK_MS / 1000 + command_timeout,
        )
        # Set by run(): they need this process's instance id.
        self._member: Member | None = None
        self._log: ClusterLog | None = None
        self._membership: Membership | None = None
        self._cluster: ClusterView | None = None
        self._up = trio.Event()
        self._up.set()
        self._work = trio.Event()
        self._space = trio.lowlevel.ParkingLot()

    # -- the Broker interface ------------------------------------------------------------------

    @property
    def state(self) -> BrokerState:
        return BrokerState.UP if self._log is None else self._log.state

    def cluster(self) -> ClusterView | None:
        return self._cluster

    async def run(
        self, member: Member, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._member = member
        self._log = ClusterLog(
            member.instance_id, pending_limit=self._pending_limit, skipped_limit=self._stream_maxlen
        )
        self._membership = Membership(self._prefix, member.instance_id, self._instance_ttl_s)
        started = False
        try:
            # coredis's client runs a task group: whatever leaves this block is a group.
            async with self._client:
                await self._connect()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_loop)
                    nursery.start_soon(self._publish_loop)
                    nursery.start_soon(self._heartbeat_loop)
                    started = True
                    task_status.started()
        except BaseExceptionGroup as group:
            unavailable, _ = group.split(BrokerUnavailableError)
            if unavailable is not None and not started:
                raise _first_leaf(unavailable) from None
            _, rest = group.split(BROKER_ERRORS)
            if rest is not None:
                raise  # cancellation, or a bug
            # The client failed on its way out (Redis gone at shutdown), or underneath the
            # running tasks: either way no broker is left; say so rather than seem up.
            LOGGER.warning("broker: the Redis client stopped: %s", _describe(_first_leaf(group)))
            self._mark_down(_first_leaf(group))

    async def _connect(self) -> None:
        log, member = self._require_log(), self._require_member()
        try:
            with trio.fail_after(self._connect_timeout):
                log.start(await self._run_id(), await self._stream_info())
                await self._heartbeat()
        except BROKER_ERRORS as error:
            raise BrokerUnavailableError(
                f"cannot reach Redis at {redact_url(self.url)}: {_describe(error)}"
            ) from None
        LOGGER.info(
            "broker: Redis at %s, stream %s from id %s, instance %s; cluster: %d instances, "
            "%d connections",
            redact_url(self.url),
            self.stream,
            log.last_id,
            member.instance_id,
            self._cluster.instances if self._cluster else 0,
            self._cluster.connections if self._cluster else 0,
        )

    async def publish(self, message: Outgoing) -> None:
        log, member = self._require_log(), self._require_member()
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
                "(more than %d waiting for Redis)",
                dropped,
                self._pending_limit,
            )
        self._work.set()

    @property
    def last_id(self) -> str | None:
        last_id = self._require_log().last_id if self._log is not None else "0-0"
        return None if last_id == "0-0" else last_id

    async def history(self, since: str, limit: int) -> History:
        """From the stream, up to what the reader has delivered here (what comes later reaches
        the client live), without the copies that the reader skipped as duplicates.

        ``complete`` is False when the entry ``since`` names is no longer in the stream
        (trimmed, or lost in a Redis restart), or there is more than ``limit``.
        """
        log = self._require_log()
        if log.state is BrokerState.DOWN:
            return History([], False)
        requests = [HistoryRequest(since, limit)]
        read = log.plan_histories(requests)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                range_request = (
                    pipe.xrevrange(self.stream, read.newest, read.oldest, count=read.count)
                    if read.count
                    else None
                )
                anchor_requests = [pipe.xrange(self.stream, a, a, count=1) for a in read.anchors]
            entries = await range_request if range_request is not None else ()
            anchors_found = {
                anchor
                for anchor, request in zip(read.anchors, anchor_requests, strict=True)
                if await request
            }
        except BROKER_ERRORS as error:
            LOGGER.info("broker: could not read history after %s: %s", since, _describe(error))
            return History([], False)
        decoded = [(str(entry.identifier), _decode(entry)) for entry in entries]
        return log.answer_histories(requests, read, decoded, anchors_found)[0]

    async def claim_periodic(self, slot: int, interval: float) -> bool:
        if self.state is BrokerState.DOWN:
            return True  # each process keeps its own clients informed during an outage
        try:
            won = await self._require_membership().claim_periodic(self._client, slot, interval)
            if won:
                await self._heartbeat()  # the periodic message reports a fresh cluster count
        except BROKER_ERRORS as error:
            self._mark_down(error)
            return True
        return won

    async def leave(self) -> None:
        membership = self._require_membership()
        membership.leaving = True  # no heartbeat may register this process again
        if self.state is BrokerState.DOWN:
            return  # the entry expires by itself; do not hold the exit for a timeout
        with trio.move_on_after(COMMAND_TIMEOUT_S, shield=True):
            try:
                await membership.leave(self._client)
                LOGGER.info("broker: instance %s left the cluster", membership.instance_id)
            except BROKER_ERRORS as error:
                LOGGER.info(
                    "broker: could not leave the cluster (%s); the entry expires in %gs",
                    _describe(error),
                    self._instance_ttl_s,
                )

    def health(self) -> dict[str, Any]:
        if self._log is None:
            return {"kind": self.kind, "state": self.state.value, "url": redact_url(self.url)}
        stats = self._log.statistics()
        return {
            "kind": self.kind,
            "state": stats.state.value,
            "url": redact_url(self.url),
            "stream": self.stream,
            "last_id": stats.last_id,
            "pending": stats.pending,
            "outages": stats.outages,
            "down_for_s": None
            if stats.down_since is None
            else round(trio.current_time() - stats.down_since, 3),
            "last_error": stats.last_error or None,
            "delivered_during_outages": stats.delivered_during_outages,
            "dropped_during_outages": stats.dropped_during_outages,
            "resent_after_outages": stats.resent_after_outages,
            "replayed_after_outages": stats.replayed_after_outages,
            "duplicates_skipped": stats.duplicates_skipped,
        }

    # -- state changes -------------------------------------------------------------------------

    def _mark_down(self, error: BaseException) -> None:
        log, member = self._require_log(), self._require_member()
        went_down = log.state is BrokerState.UP
        flushed = log.on_error(_describe(error), trio.current_time())
        for broadcast in flushed:
            member.deliver(broadcast)
        if not went_down:
            return
        self._up = trio.Event()
        self._space.unpark_all()  # waiting senders now deliver locally
        LOGGER.warning(
            "broker: Redis at %s unreachable (%s): broadcasts reach this process's clients "
            "only until it is back; %d messages in flight delivered here now; reconnecting",
            redact_url(self.url),
            log.statistics().last_error,
            len(flushed),
        )

    async def _resync(self) -> None:
        """After an outage: the log chooses where to replay from and what to send again."""
        log = self._require_log()
        resync = log.on_resync(await self._run_id(), await self._stream_info(), trio.current_time())
        if resync.stream == "gone":
            LOGGER.warning(
                "broker: stream %s is gone (Redis restarted without persistence?): reading the "
                "new one from its start",
                self.stream,
            )
        elif resync.stream == "restored":
            LOGGER.warning(
                "broker: stream %s ends at %s, before the last id seen here (%s): Redis was "
                "restored from an older snapshot; reading on from its end",
                self.stream,
                resync.replay_from,
                resync.last_id_before,
            )
        elif resync.stream == "trimmed":
            LOGGER.warning(
                "broker: the outage outlasted the replay window: entries after %s were trimmed "
                "from the stream (TRIO_WS_REDIS_STREAM_MAXLEN); some broadcasts did not reach "
                "this process's clients",
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
            redact_url(self.url),
            resync.down_for,
            resync.replay_from,
            resync.resending,
        )
        self._up.set()
        self._work.set()

    # -- the tasks -----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        log, member = self._require_log(), self._require_member()
        delay = RECONNECT_MIN_S
        while True:
            try:
                if log.state is BrokerState.DOWN:
                    await self._resync()
                response = await self._client.xread(
                    {self.stream: log.last_id}, count=BATCH, block=BLOCK_MS
                )
            except BROKER_ERRORS as error:
                self._mark_down(error)
                # Equal jitter: instances restarted together do not reconnect in lockstep.
                await trio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            delay = RECONNECT_MIN_S
            entries = response.get(self.stream, ()) if response else ()
            for entry in entries:
                for broadcast in log.on_entry(str(entry.identifier), _decode(entry)):
                    member.deliver(broadcast)
            log.read_finished(full=len(entries) >= BATCH)
            self._space.unpark_all()

    async def _publish_loop(self) -> None:
        log = self._require_log()
        while True:
            await self._up.wait()
            batch = log.next_batch(BATCH)
            if not batch:
                self._work = trio.Event()
                await self._work.wait()
                continue
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for pending in batch:
                        pipe.xadd(
                            self.stream,
                            encode_entry(log.origin, pending.seq, pending.message),
                            trim_strategy=PureToken.MAXLEN,
                            trim_operator=PureToken.APPROXIMATELY,
                            threshold=self._stream_maxlen,
                        )
            except BROKER_ERRORS as error:
                self._mark_down(error)
                continue
            log.batch_sent(batch)

    async def _heartbeat_loop(self) -> None:
        membership = self._require_membership()
        while True:
            await trio.sleep(self._heartbeat_s)
            await self._up.wait()
            if membership.leaving:
                return
            try:
                await self._heartbeat()
            except BROKER_ERRORS as error:
                self._mark_down(error)

    async def _heartbeat(self) -> None:
        connections, draining = self._require_member().local_state()
        view = await self._require_membership().heartbeat(
            self._client, connections, draining, trio.current_time()
        )
        if view is not None:
            self._cluster = view

    # -- commands ------------------------------------------------------------------------------

    async def _run_id(self) -> str:
        info = await self._client.info("server")
        return str(info.get("run_id", ""))

    async def _stream_info(self) -> StreamInfo | None:
        """The stream's ends (``XINFO STREAM``), or None if there is no stream (yet, or any
        more)."""
        try:
            info = cast("Mapping[str, Any]", await self._client.xinfo_stream(self.stream))
        except coredis.exceptions.ResponseError as error:
            if "no such key" in str(error).lower():
                return None
            raise
        return StreamInfo(
            str(info["last-generated-id"]), str(info.get("max-deleted-entry-id") or "0-0")
        )

    def _require_member(self) -> Member:
        if self._member is None:
            raise RuntimeError("RedisBroker used before run()")
        return self._member

    def _require_log(self) -> ClusterLog:
        if self._log is None:
            raise RuntimeError("RedisBroker used before run()")
        return self._log

    def _require_membership(self) -> Membership:
        if self._membership is None:
            raise RuntimeError("RedisBroker used before run()")
        return self._membership


def _decode(entry: StreamEntry) -> Entry | None:
    """The entry, or None (and a warning) for one that trio_ws did not write."""
    # decode_responses=True: coredis's types allow bytes, the values are str.
    try:
        return decode_entry(cast("Mapping[str, str]", entry.field_values))
    except (KeyError, ValueError) as error:
        LOGGER.warning(
            "broker: skipped stream entry %s not written by trio_ws (%r)", entry.identifier, error
        )
        return None


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
