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
* **Cluster**: every ``HEARTBEAT_S`` each process writes its connection count to a key that
  expires after ``INSTANCE_TTL_S`` (a crashed process drops out), and reads the others'. The
  periodic message of each interval is sent by whichever process first claims its slot with
  ``SET NX``.

No coredis retry policy and no coredis Pub/Sub: every command fails fast and this module owns
the reconnect (see ``shared/notes/redis.md`` on coredis's Pub/Sub reconnect ending silently).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import random
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import anyio
import coredis
import coredis.exceptions
import trio
from coredis.retry import NoRetryPolicy
from coredis.tokens import PureToken

from trio_ws.core.broker import (
    Broadcast,
    Broker,
    BrokerState,
    BrokerUnavailableError,
    ClusterView,
    History,
    Member,
    Outgoing,
)
from trio_ws.core.protocol import parse_message_id
from trio_ws.settings import redact_url

if TYPE_CHECKING:
    from collections.abc import Mapping

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
#: Own messages kept after they were seen in the stream, to send again if Redis restarts
#: (and may have lost entries that other processes had not read yet).
RECENT_LIMIT = 1000
#: Origins remembered for de-duplication; each process start is a new origin.
SEEN_ORIGINS_LIMIT = 10_000

#: Everything that means "Redis did not answer as it should": the broker goes down and retries.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    coredis.exceptions.RedisError,
    OSError,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    trio.TooSlowError,
)


@dataclass(slots=True)
class _Pending:
    seq: int
    message: Outgoing
    #: Already delivered to this process's clients (published or flushed during an outage).
    delivered: bool = False


def encode_entry(origin: str, seq: int, message: Outgoing) -> dict[str, str]:
    """The stream entry's fields (short names: every entry is read by every process)."""
    fields = {"o": origin, "q": str(seq), "k": message.kind, "ts": repr(message.ts)}
    if message.kind == "message":
        fields["f"] = message.sender
        fields["t"] = message.text
    else:
        fields["n"] = str(message.active_connections)
    return fields


def decode_entry(fields: Mapping[str, str]) -> tuple[str, int, Outgoing]:
    """``(origin, seq, message)`` from an entry's fields.

    Errors: :class:`ValueError` or :class:`KeyError` for an entry trio_ws did not write.
    """
    kind = fields["k"]
    ts = float(fields["ts"])
    if kind == "message":
        message = Outgoing("message", ts, sender=fields["f"], text=fields["t"])
    elif kind == "periodic":
        message = Outgoing("periodic", ts, active_connections=int(fields["n"]))
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return fields["o"], int(fields["q"]), message


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
        self._heartbeat_s = heartbeat_s
        self._instance_ttl_s = instance_ttl_s
        self._connect_timeout = connect_timeout
        self._client: coredis.Redis[str] = coredis.Redis.from_url(
            url,
            decode_responses=True,
            retry_policy=NoRetryPolicy(),
            connect_timeout=connect_timeout,
            stream_timeout=BLOCK_MS / 1000 + command_timeout,
        )
        self.stream = f"{prefix}:broadcasts"
        self._instances_key = f"{prefix}:instances"
        self._instance_prefix = f"{prefix}:instance:"
        self._periodic_prefix = f"{prefix}:periodic:"
        self._stream_maxlen = stream_maxlen
        self._pending_limit = pending_limit
        self._member: Member | None = None

        self._state = BrokerState.UP
        self._up = trio.Event()
        self._up.set()
        self._work = trio.Event()
        self._space = trio.lowlevel.ParkingLot()
        self._seq = 0
        self._pending: collections.deque[_Pending] = collections.deque()
        self._unsent: collections.deque[_Pending] = collections.deque()
        self._own_confirmed = 0
        #: Our latest messages confirmed in the stream, sent again if Redis restarts.
        self._recent: collections.deque[_Pending] = collections.deque(maxlen=RECENT_LIMIT)
        self._redis_run_id = ""
        self._seen: dict[str, int] = {}
        #: Stream ids of the copies the reader skipped (bounded), kept out of histories too.
        self._skipped: set[str] = set()
        self._skipped_order: collections.deque[str] = collections.deque()
        self._last_id = "0-0"
        self._cluster: ClusterView | None = None

        # For /health and the logs.
        self._down_since: float | None = None
        self._last_error = ""
        self.outages = 0
        self.duplicates_skipped = 0
        self.delivered_in_outage = 0
        self.dropped_in_outage = 0
        self.resent = 0
        self.replayed = 0
        self._replaying = False
        self._leaving = False

    # -- the Broker interface ------------------------------------------------------------------

    @property
    def state(self) -> BrokerState:
        return self._state

    def cluster(self) -> ClusterView | None:
        return self._cluster

    async def run(
        self, member: Member, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._member = member
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
        member = self._require_member()
        try:
            with trio.fail_after(self._connect_timeout):
                self._redis_run_id = await self._run_id()
                self._last_id = await self._stream_end()
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
            self._last_id,
            member.instance_id,
            self._cluster.instances if self._cluster else 0,
            self._cluster.connections if self._cluster else 0,
        )

    async def publish(self, message: Outgoing) -> None:
        member = self._require_member()
        while self._state is BrokerState.UP and len(self._pending) >= self._pending_limit:
            # Backpressure: the sender's reader task waits; Redis is slower than the senders.
            await self._space.park()
        if self._state is BrokerState.DOWN and message.kind == "periodic":
            # Each process informs its own clients during an outage; sent to the cluster
            # afterwards, these would arrive as a burst of stale counts.
            member.deliver(Broadcast(None, message))
            return
        self._seq += 1
        pending = _Pending(self._seq, message)
        if self._state is BrokerState.DOWN:
            pending.delivered = True
            self.delivered_in_outage += 1
            member.deliver(Broadcast(None, message))
            if len(self._pending) >= self._pending_limit:
                dropped = self._pending.popleft()
                with contextlib.suppress(ValueError):
                    self._unsent.remove(dropped)
                self.dropped_in_outage += 1
                if self.dropped_in_outage == 1 or self.dropped_in_outage % 1000 == 0:
                    LOGGER.warning(
                        "broker: %d messages sent during the outage will not reach other "
                        "processes (more than %d waiting for Redis)",
                        self.dropped_in_outage,
                        self._pending_limit,
                    )
        self._pending.append(pending)
        self._unsent.append(pending)
        self._work.set()

    @property
    def last_id(self) -> str | None:
        return None if self._last_id == "0-0" else self._last_id

    async def history(self, since: str, limit: int) -> History:
        """From the stream, up to what the reader has delivered here (what comes later reaches
        the client live), without the copies that the reader skipped as duplicates.

        ``complete`` is False when the entry ``since`` names is no longer in the stream
        (trimmed, or lost in a Redis restart), or there is more than ``limit``.
        """
        if self._state is BrokerState.DOWN:
            return History([], False)
        until = self._last_id
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                entries_request = pipe.xrevrange(self.stream, until, "(" + since, count=limit + 1)
                anchor_request = pipe.xrange(self.stream, since, since, count=1)
            entries, anchor = await entries_request, await anchor_request
        except BROKER_ERRORS as error:
            LOGGER.info("broker: could not read history after %s: %s", since, _describe(error))
            return History([], False)
        if parse_message_id(until) <= parse_message_id(since):
            entries = ()  # the reader has not passed ``since``: everything after it comes live
        complete = bool(anchor) and len(entries) <= limit
        seen: set[tuple[str, int]] = set()
        out: list[Broadcast] = []
        for entry in reversed(entries[:limit]):
            entry_id = str(entry.identifier)
            if entry_id in self._skipped:
                continue
            try:
                origin, seq, message = decode_entry(cast("Mapping[str, str]", entry.field_values))
            except (KeyError, ValueError):
                continue
            if (origin, seq) not in seen:
                seen.add((origin, seq))
                out.append(Broadcast(entry_id, message))
        return History(out, complete)

    async def claim_periodic(self, slot: int, interval: float) -> bool:
        if self._state is BrokerState.DOWN:
            return True  # each process keeps its own clients informed during an outage
        try:
            won = await self._client.set(
                f"{self._periodic_prefix}{slot}",
                self._require_member().instance_id,
                condition=PureToken.NX,
                px=max(1000, math.ceil(interval * 3000)),
            )
            if won:
                await self._heartbeat()  # the periodic message reports a fresh cluster count
        except BROKER_ERRORS as error:
            self._mark_down(error)
            return True
        return bool(won)

    async def leave(self) -> None:
        member = self._require_member()
        self._leaving = True  # no heartbeat may register this process again
        if self._state is BrokerState.DOWN:
            return  # the entry expires by itself; do not hold the exit for a timeout
        with trio.move_on_after(COMMAND_TIMEOUT_S, shield=True):
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.delete([self._instance_prefix + member.instance_id])
                    pipe.srem(self._instances_key, [member.instance_id])
                LOGGER.info("broker: instance %s left the cluster", member.instance_id)
            except BROKER_ERRORS as error:
                LOGGER.info(
                    "broker: could not leave the cluster (%s); the entry expires in %gs",
                    _describe(error),
                    self._instance_ttl_s,
                )

    def health(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "kind": self.kind,
            "state": self._state.value,
            "url": redact_url(self.url),
            "stream": self.stream,
            "last_id": self._last_id,
            "pending": len(self._pending),
            "outages": self.outages,
            "down_for_s": None,
            "last_error": self._last_error or None,
            "delivered_during_outages": self.delivered_in_outage,
            "dropped_during_outages": self.dropped_in_outage,
            "resent_after_outages": self.resent,
            "replayed_after_outages": self.replayed,
            "duplicates_skipped": self.duplicates_skipped,
        }
        if self._down_since is not None:
            report["down_for_s"] = round(trio.current_time() - self._down_since, 3)
        return report

    # -- state changes -------------------------------------------------------------------------

    def _mark_down(self, error: BaseException) -> None:
        self._last_error = _describe(error)
        if self._state is BrokerState.DOWN:
            return
        self._state = BrokerState.DOWN
        self._up = trio.Event()
        self._down_since = trio.current_time()
        self.outages += 1
        member = self._require_member()
        flushed = 0
        for pending in self._pending:
            if not pending.delivered:
                pending.delivered = True
                flushed += 1
                member.deliver(Broadcast(None, pending.message))
        self.delivered_in_outage += flushed
        # Any of them may or may not have reached the stream: send them all again, readers
        # skip what they already have.
        # Recent messages queued again after a Redis restart (older than anything pending)
        # stay queued: a second error before they were sent must not drop them.
        self._unsent = collections.deque(
            [*(p for p in self._unsent if p.seq <= self._own_confirmed), *self._pending]
        )
        self._space.unpark_all()  # waiting senders now deliver locally
        LOGGER.warning(
            "broker: Redis at %s unreachable (%s): broadcasts reach this process's clients "
            "only until it is back; %d messages in flight delivered here now; reconnecting",
            redact_url(self.url),
            self._last_error,
            flushed,
        )

    def _mark_up(self, replay_from: str) -> None:
        if self._state is BrokerState.UP:
            return
        down_for = trio.current_time() - (self._down_since or trio.current_time())
        self._state = BrokerState.UP
        self._down_since = None
        self._replaying = True
        self.resent += len(self._unsent)
        LOGGER.info(
            "broker: Redis at %s is back after %.2fs; replaying the stream after %s, "
            "re-sending %d messages sent here meanwhile",
            redact_url(self.url),
            down_for,
            replay_from,
            len(self._unsent),
        )
        self._up.set()
        self._work.set()

    # -- the tasks -----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        delay = RECONNECT_MIN_S
        while True:
            try:
                if self._state is BrokerState.DOWN:
                    await self._resync()
                response = await self._client.xread(
                    {self.stream: self._last_id}, count=BATCH, block=BLOCK_MS
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
                # decode_responses=True: coredis's types allow bytes, the values are str.
                self._on_entry(str(entry.identifier), cast("Mapping[str, str]", entry.field_values))
            if self._replaying and len(entries) < BATCH:
                self._replaying = False

    async def _resync(self) -> None:
        """After an outage: choose where to replay from, and what to send again.

        If Redis restarted (its ``run_id`` changed) it may have lost the newest entries, which
        some processes may not have read yet: this process sends its recent messages again
        (readers skip what they have). If the stream is gone or was recreated, it is read from
        its start; otherwise from the last id seen here.
        """
        run_id = await self._run_id()
        info = await self._stream_info()
        replay_from = self._last_id
        if info is None:
            LOGGER.warning(
                "broker: stream %s is gone (Redis restarted without persistence?): reading the "
                "new one from its start",
                self.stream,
            )
            replay_from = "0-0"
        elif parse_message_id(str(info["last-generated-id"])) < parse_message_id(self._last_id):
            # Restored from an older snapshot: everything in it was read here already.
            replay_from = str(info["last-generated-id"])
            LOGGER.warning(
                "broker: stream %s ends at %s, before the last id seen here (%s): Redis was "
                "restored from an older snapshot; reading on from its end",
                self.stream,
                replay_from,
                self._last_id,
            )
        elif parse_message_id(str(info.get("max-deleted-entry-id") or "0-0")) > parse_message_id(
            self._last_id
        ):
            LOGGER.warning(
                "broker: the outage outlasted the replay window: entries after %s were trimmed "
                "from the stream (TRIO_WS_REDIS_STREAM_MAXLEN); some broadcasts did not reach "
                "this process's clients",
                self._last_id,
            )
        if run_id != self._redis_run_id:
            LOGGER.warning(
                "broker: Redis restarted (run_id %s -> %s): sending this process's last %d "
                "messages again in case it lost them",
                self._redis_run_id[:8],
                run_id[:8],
                len(self._recent),
            )
            self._redis_run_id = run_id
            self._unsent = collections.deque([*self._recent, *self._pending])
        self._last_id = replay_from
        self._mark_up(replay_from)

    async def _run_id(self) -> str:
        info = await self._client.info("server")
        return str(info.get("run_id", ""))

    def _on_entry(self, entry_id: str, fields: Mapping[str, str]) -> None:
        self._last_id = entry_id
        try:
            origin, seq, message = decode_entry(fields)
        except (KeyError, ValueError) as error:
            LOGGER.warning(
                "broker: skipped stream entry %s not written by trio_ws (%r)", entry_id, error
            )
            return
        member = self._require_member()
        if origin == member.instance_id:
            self._confirm_own(seq, entry_id)
            return
        if seq <= self._seen.get(origin, 0):
            self._skip(entry_id)
            return
        # Least recently seen first: when the map is full, the origin evicted is long gone.
        self._seen.pop(origin, None)
        if len(self._seen) >= SEEN_ORIGINS_LIMIT:
            self._seen.pop(next(iter(self._seen)))
        self._seen[origin] = seq
        if self._replaying:
            self.replayed += 1
        member.deliver(Broadcast(entry_id, message))

    def _confirm_own(self, seq: int, entry_id: str) -> None:
        """One of ours came back from the stream: deliver it here (unless done) and forget it."""
        if seq <= self._own_confirmed:
            self._skip(entry_id)
            return
        self._own_confirmed = seq
        member = self._require_member()
        while self._pending and self._pending[0].seq <= seq:
            pending = self._pending.popleft()
            self._recent.append(pending)
            if pending.delivered:
                continue
            # An earlier message of ours that never came back cannot be: it was sent first.
            # Deliver it here all the same rather than lose it.
            member.deliver(Broadcast(entry_id if pending.seq == seq else None, pending.message))
        self._space.unpark_all()

    def _skip(self, entry_id: str) -> None:
        self.duplicates_skipped += 1
        self._skipped.add(entry_id)
        self._skipped_order.append(entry_id)
        if len(self._skipped_order) > self._stream_maxlen:
            self._skipped.discard(self._skipped_order.popleft())

    async def _publish_loop(self) -> None:
        while True:
            await self._up.wait()
            if not self._unsent:
                self._work = trio.Event()
                await self._work.wait()
                continue
            batch = [self._unsent[i] for i in range(min(BATCH, len(self._unsent)))]
            origin = self._require_member().instance_id
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for pending in batch:
                        pipe.xadd(
                            self.stream,
                            encode_entry(origin, pending.seq, pending.message),
                            trim_strategy=PureToken.MAXLEN,
                            trim_operator=PureToken.APPROXIMATELY,
                            threshold=self._stream_maxlen,
                        )
            except BROKER_ERRORS as error:
                self._mark_down(error)
                continue
            # Sent; they stay pending until the reader sees them in the stream.
            for pending in batch:
                # _mark_down may have rebuilt the queue meanwhile: only drop what was sent.
                if self._unsent and self._unsent[0] is pending:
                    self._unsent.popleft()

    async def _heartbeat_loop(self) -> None:
        while True:
            await trio.sleep(self._heartbeat_s)
            await self._up.wait()
            if self._leaving:
                return
            try:
                await self._heartbeat()
            except BROKER_ERRORS as error:
                self._mark_down(error)

    async def _heartbeat(self) -> None:
        """Write this process's entry (it expires unless renewed) and read everyone's."""
        member = self._require_member()
        connections, draining = member.local_state()
        info = json.dumps(
            {
                "connections": connections,
                "draining": draining,
                "pid": os.getpid(),
                "host": socket.gethostname(),
            }
        )
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.set(
                self._instance_prefix + member.instance_id,
                info,
                px=int(self._instance_ttl_s * 1000),
            )
            pipe.sadd(self._instances_key, [member.instance_id])
            members_request = pipe.smembers(self._instances_key)
        members = sorted(await members_request)
        values = await self._client.mget([self._instance_prefix + m for m in members])
        gone = [m for m, value in zip(members, values, strict=True) if value is None]
        if gone:
            await self._client.srem(self._instances_key, gone)
        alive = [json.loads(value) for value in values if value is not None]
        self._cluster = ClusterView(
            instances=len(alive),
            connections=sum(int(entry["connections"]) for entry in alive),
            draining_instances=sum(1 for entry in alive if entry["draining"]),
            as_of=trio.current_time(),
            own_connections=connections,
        )

    async def _stream_end(self) -> str:
        """The id of the stream's newest entry ever, so reading starts with what comes next."""
        info = await self._stream_info()
        return "0-0" if info is None else str(info["last-generated-id"])

    async def _stream_info(self) -> Mapping[str, Any] | None:
        """``XINFO STREAM``, or None if there is no stream (yet, or any more)."""
        try:
            return cast("Mapping[str, Any]", await self._client.xinfo_stream(self.stream))
        except coredis.exceptions.ResponseError as error:
            if "no such key" in str(error).lower():
                return None
            raise

    def _require_member(self) -> Member:
        if self._member is None:
            raise RuntimeError("RedisBroker used before run()")
        return self._member


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first
