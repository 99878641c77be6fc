"""The Redis broker's bookkeeping, without I/O: what to deliver here, what to send to the
stream, and how to come back from an outage with every broadcast delivered once.

The shell (:mod:`trio_ws.brokers.redis`) talks to Redis and tells a :class:`ClusterLog` what
happened: a message published here, an entry read from the stream, a batch sent, an error,
Redis answering again. Each method returns at once, with the broadcasts to hand to this
process's clients now, oldest first. Nothing here awaits, reads a clock or logs: times come in
as ``now`` arguments, and what the shell should report comes back as values.

The rules (tests/unit/test_cluster_log.py has a row for each):

* **Publish**: a message gets this process's next sequence number. It is *pending* until the
  reader sees it come back from the stream, and *unsent* until a batch carrying it was sent.
* **Deliver**: an entry of another origin is delivered with its stream id, unless its sequence
  number is not above the last one seen from that origin: then it is a copy, skipped. One of
  ours is delivered when it comes back, with any earlier pending one that never did.
* **Outage** (:meth:`ClusterLog.on_error`): every pending message not yet delivered here is
  delivered now, with id None, and so is every message published until Redis answers again;
  periodic messages published meanwhile stay local. Every pending message is sent again later:
  its first send may or may not have landed, and readers skip the copies.
* **Resync** (:meth:`ClusterLog.on_resync`): read on from the last id seen here; from the
  stream's start if the stream is gone; from its end if Redis came back from an older snapshot.
  If Redis restarted (a new ``run_id``), also send the recent confirmed messages again: it may
  have lost entries that other processes had not read yet.
* **History**: the broadcasts after a resuming client's ``since``, up to what the reader has
  delivered here, without the copies the reader skipped: the newest that fit in the request's
  budget. Complete only if the ``since`` entry is still in the stream and nothing was left out.
  The requests that arrive together are answered from one read.
* **Refused** (:meth:`ClusterLog.on_refused`): Redis answered a write with an error. Out of
  memory (``OOM``): trim the stream to half the entries, then to half again at each refusal in
  a row, and send again; only if even an empty stream does not help is Redis down. Any other
  refusal (``NOPERM``, ``READONLY``...) is an outage: retried after a backoff, as after any
  error, so the cluster is ready again as soon as Redis accepts writes.
* **Errors, described** (:func:`describe_error`): a short line with the command's name and
  Redis's error class, never the command's arguments (a message's text).
* **Stall** (:class:`StallWatch`): a broker that is up but has stopped moving (messages wait to
  come back from the stream, or no read has finished for ``stall_timeout``) is treated as down.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from trio_ws.core.broker import (
    BROADCAST_OVERHEAD_BYTES,
    Broadcast,
    BrokerState,
    History,
    HistoryBudget,
    Outgoing,
    approximate_size,
)
from trio_ws.core.protocol import parse_message_id
from trio_ws.core.words import loggable

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

    from trio_ws.brokers.entries import Entry

#: Own messages kept after they were seen in the stream, to send again if Redis restarts
#: (and may have lost entries that other processes had not read yet); also at most
#: ``pending_max_bytes`` of them.
RECENT_LIMIT = 1000
#: Origins remembered for de-duplication; each process start is a new origin.
SEEN_ORIGINS_LIMIT = 10_000
#: Bytes of pending messages (each counted as :func:`approximate_size`) when none are given:
#: 512 messages of 64 KiB.
PENDING_MAX_BYTES = 32 * 1024 * 1024
#: Each half of a Redis Stream id is an unsigned 64-bit number: Redis refuses a larger one.
STREAM_ID_PART_MAX = 2**64 - 1
#: Seconds between two warnings about writes refused for memory (the first is said at once).
REFUSAL_REPORT_EVERY_S = 10.0


@dataclass(slots=True)
class Pending:
    """A message of this process on its way through the stream."""

    seq: int
    message: Outgoing
    #: What it counts against the pending byte budget (:func:`approximate_size`).
    size: int = 0
    #: Already delivered to this process's clients (published or flushed during an outage).
    delivered: bool = False


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """The stream's ends, as ``XINFO STREAM`` reports them."""

    last_generated_id: str
    #: The newest id trimmed or deleted from the stream ("0-0" if none).
    max_deleted_id: str = "0-0"


@dataclass(frozen=True, slots=True)
class Resync:
    """What :meth:`ClusterLog.on_resync` decided, for the shell to report."""

    replay_from: str
    #: The last id this process had read before the outage.
    last_id_before: str
    #: "gone": read the new stream from its start; "restored": Redis came back from an older
    #: snapshot, read on from its end; "trimmed": entries this process never read are lost.
    stream: Literal["kept", "gone", "restored", "trimmed"]
    #: ``(old, new)`` run ids if Redis restarted.
    restarted: tuple[str, str] | None
    #: Own messages queued to be sent again.
    resending: int
    down_for: float


@dataclass(frozen=True, slots=True)
class Trim:
    """What :meth:`ClusterLog.on_refused` decided: trim the stream to its newest ``keep``
    entries, then run the refused command again."""

    keep: int
    #: Refusals in a row, this one included.
    refusals: int
    #: Whether the shell should log it now (the first, then one every REFUSAL_REPORT_EVERY_S).
    report: bool
    #: Trims since the last report, this one included.
    since_report: int


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    """A resuming client's question: what came after ``since``, the newest that fit in
    ``limit`` broadcasts and ``max_bytes`` bytes."""

    since: str
    limit: int
    max_bytes: int

    @property
    def most(self) -> int:
        """The most broadcasts that can fit: each counts at least the overhead."""
        return min(self.limit, self.max_bytes // BROADCAST_OVERHEAD_BYTES)


@dataclass(frozen=True, slots=True)
class HistoryRead:
    """The reads that answer a batch of history requests at once.

    One range, newest first, from what the reader has delivered here down to the earliest
    ``since`` (included: whether that entry is still there says whether nothing was trimmed),
    plus a check of each ``since`` that the reader has not reached yet.
    """

    newest: str
    oldest: str
    #: Most entries to read in the range; 0 if no range is needed.
    count: int
    #: ``since`` ids at or past ``newest``: only whether each is in the stream is asked.
    anchors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LogStatistics:
    """The log's counters, for /health and the logs."""

    state: BrokerState
    last_id: str
    pending: int
    outages: int
    #: ``now`` as given to the :meth:`ClusterLog.on_error` that started the current outage.
    down_since: float | None
    last_error: str
    delivered_during_outages: int
    dropped_during_outages: int
    resent_after_outages: int
    replayed_after_outages: int
    duplicates_skipped: int
    #: Times the stream was trimmed harder because Redis refused a write for memory.
    trims_after_refusals: int
    #: What the pending messages count against ``pending_max_bytes``.
    pending_bytes: int = 0


class ClusterLog:
    """The exactly-once state of one process in the cluster; see the module docstring."""

    def __init__(
        self,
        origin: str,
        *,
        pending_limit: int,
        skipped_limit: int,
        pending_max_bytes: int = PENDING_MAX_BYTES,
        stream_cap: int = 10_000,
        recent_limit: int = RECENT_LIMIT,
        origins_limit: int = SEEN_ORIGINS_LIMIT,
    ) -> None:
        self.origin = origin
        #: Most entries the stream keeps (XADD's MAXLEN): where trimming after a refusal starts.
        self.stream_cap = stream_cap
        self._pending_limit = pending_limit
        self._pending_max_bytes = pending_max_bytes
        self._pending_bytes = 0
        self._skipped_limit = skipped_limit
        self._origins_limit = origins_limit
        self._state = BrokerState.UP
        self._seq = 0
        self._pending: collections.deque[Pending] = collections.deque()
        self._unsent: collections.deque[Pending] = collections.deque()
        self._own_confirmed = 0
        self._recent: collections.deque[Pending] = collections.deque()
        self._recent_limit = recent_limit
        self._recent_bytes = 0
        self._run_id = ""
        #: Last sequence number seen per origin, least recently seen first.
        self._seen: dict[str, int] = {}
        #: Stream ids of the copies skipped (bounded), kept out of histories too.
        self._skipped: set[str] = set()
        self._skipped_order: collections.deque[str] = collections.deque()
        self._last_id = "0-0"
        self._replaying = False

        self._down_since: float | None = None
        self._last_error = ""
        self._outages = 0
        self._duplicates_skipped = 0
        self._delivered_in_outage = 0
        self._dropped_in_outage = 0
        self._resent = 0
        self._replayed = 0
        self._refusals = 0
        self._trims = 0
        self._trims_since_report = 0
        self._reported_at: float | None = None

    # -- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> BrokerState:
        return self._state

    @property
    def last_id(self) -> str:
        """The id of the last entry read from the stream ("0-0" before the first)."""
        return self._last_id

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def own_confirmed(self) -> int:
        """The sequence number of the newest own message seen in the stream."""
        return self._own_confirmed

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def publish_must_wait(self) -> bool:
        """Backpressure: too many messages, or too many bytes, on their way while Redis is up.
        The first message always goes, however large, so the bytes held are at most the budget
        plus one message."""
        # Like the count: wait once the budget is reached (no room left for any message).
        return self._state is BrokerState.UP and self._pending_full(adding=1)

    def statistics(self) -> LogStatistics:
        return LogStatistics(
            state=self._state,
            last_id=self._last_id,
            pending=len(self._pending),
            outages=self._outages,
            down_since=self._down_since,
            last_error=self._last_error,
            delivered_during_outages=self._delivered_in_outage,
            dropped_during_outages=self._dropped_in_outage,
            resent_after_outages=self._resent,
            replayed_after_outages=self._replayed,
            duplicates_skipped=self._duplicates_skipped,
            trims_after_refusals=self._trims,
            pending_bytes=self._pending_bytes,
        )

    # -- events --------------------------------------------------------------------------------

    def start(self, run_id: str, stream: StreamInfo | None) -> None:
        """Connected at startup: read what comes after the stream's newest entry ever."""
        self._run_id = run_id
        self._last_id = "0-0" if stream is None else stream.last_generated_id

    def publish(self, message: Outgoing) -> list[Broadcast]:
        """A message to send to the cluster; returns what to deliver here now (in an outage)."""
        if self._state is BrokerState.DOWN and message.kind == "periodic":
            # Each process informs its own clients during an outage; sent to the cluster
            # afterwards, these would arrive as a burst of stale counts.
            return [Broadcast(None, message)]
        self._seq += 1
        pending = Pending(self._seq, message, size=approximate_size(message))
        deliveries: list[Broadcast] = []
        if self._state is BrokerState.DOWN:
            pending.delivered = True
            self._delivered_in_outage += 1
            deliveries.append(Broadcast(None, message))
            while self._pending_full(adding=pending.size):
                # The oldest will not reach the other processes; its clients here had it.
                dropped = self._pending.popleft()
                self._pending_bytes -= dropped.size
                if dropped in self._unsent:
                    self._unsent.remove(dropped)
                self._dropped_in_outage += 1
        self._pending.append(pending)
        self._pending_bytes += pending.size
        self._unsent.append(pending)
        return deliveries

    def next_batch(self, most: int, max_bytes: int | None = None) -> list[Pending]:
        """The next messages to send to the stream, oldest first (not removed yet): at most
        ``most``, and no more than ``max_bytes`` (each counted as its text, its sender and 64
        bytes) unless the first alone is larger. Bounds what one pipeline holds in Redis."""
        batch: list[Pending] = []
        size = 0
        for pending in itertools.islice(self._unsent, most):
            size += approximate_size(pending.message)
            if batch and max_bytes is not None and size > max_bytes:
                break
            batch.append(pending)
        return batch

    def batch_sent(self, batch: Sequence[Pending]) -> None:
        """``batch`` reached Redis. Its messages stay pending until they come back."""
        self._refusals = 0  # Redis takes writes again
        for pending in batch:
            # An outage may have rebuilt the queue meanwhile: only drop what was sent.
            if self._unsent and self._unsent[0] is pending:
                self._unsent.popleft()

    def on_entry(self, entry_id: str, entry: Entry | None) -> list[Broadcast]:
        """The reader read ``entry_id`` (``entry`` None: not one of trio_ws's)."""
        self._last_id = entry_id
        if entry is None:
            return []
        if entry.origin == self.origin:
            return self._confirm_own(entry.seq, entry_id)
        if entry.seq <= self._seen.get(entry.origin, 0):
            self._skip(entry_id)
            return []
        # Least recently seen first: when the map is full, the origin evicted is long gone.
        self._seen.pop(entry.origin, None)
        if len(self._seen) >= self._origins_limit:
            self._seen.pop(next(iter(self._seen)))
        self._seen[entry.origin] = entry.seq
        if self._replaying:
            self._replayed += 1
        return [Broadcast(entry_id, entry.message)]

    def read_finished(self, *, full: bool) -> None:
        """A read returned; ``full``: as many entries as asked, so more may be waiting."""
        if not full:
            self._replaying = False  # caught up with the stream after a resync

    def on_error(self, description: str, now: float) -> list[Broadcast]:
        """Redis did not answer as it should: the broker is down. Returns the pending messages
        to deliver here now (the first error only)."""
        self._last_error = description
        if self._state is BrokerState.DOWN:
            return []
        self._state = BrokerState.DOWN
        self._down_since = now
        self._outages += 1
        flushed: list[Broadcast] = []
        for pending in self._pending:
            if not pending.delivered:
                pending.delivered = True
                flushed.append(Broadcast(None, pending.message))
        self._delivered_in_outage += len(flushed)
        # Any pending message may or may not have reached the stream: send them all again.
        # Recent ones queued again after a Redis restart (older than anything pending) stay
        # queued: a second error before they were sent must not drop them.
        self._unsent = collections.deque(
            [*(p for p in self._unsent if p.seq <= self._own_confirmed), *self._pending]
        )
        return flushed

    def on_refused(self, error_class: str, description: str, now: float) -> Trim | None:
        """Redis answered a command with the error ``error_class`` (``OOM``, ``NOPERM``...;
        see :func:`error_class`). Returns the trim to run before trying again, or None: an
        outage (the shell calls :meth:`on_error`)."""
        self._last_error = description
        if error_class != "OOM":
            return None  # not a matter of memory: trimming would not help
        if self._refusals > 0 and self.stream_cap >> self._refusals == 0:
            # Refused with the stream already emptied: Redis's memory is not ours to free.
            return None
        self._refusals += 1
        self._trims += 1
        self._trims_since_report += 1
        report = self._reported_at is None or now - self._reported_at >= REFUSAL_REPORT_EVERY_S
        since_report = self._trims_since_report
        if report:
            self._reported_at = now
            self._trims_since_report = 0
        return Trim(self.stream_cap >> self._refusals, self._refusals, report, since_report)

    def on_resync(self, run_id: str, stream: StreamInfo | None, now: float) -> Resync:
        """Redis answers again: where to read on from, and what to send again. The broker is
        up when this returns."""
        last_id_before = self._last_id
        replay_from = self._last_id
        condition: Literal["kept", "gone", "restored", "trimmed"] = "kept"
        if stream is None:
            condition, replay_from = "gone", "0-0"
        elif parse_message_id(stream.last_generated_id) < parse_message_id(self._last_id):
            # Everything in the snapshot was read here already.
            condition, replay_from = "restored", stream.last_generated_id
        elif parse_message_id(stream.max_deleted_id) > parse_message_id(self._last_id):
            condition = "trimmed"
        restarted = None
        if run_id != self._run_id:
            restarted = (self._run_id, run_id)
            self._run_id = run_id
            self._unsent = collections.deque([*self._recent, *self._pending])
        self._last_id = replay_from
        down_for = 0.0 if self._down_since is None else now - self._down_since
        self._state = BrokerState.UP
        self._down_since = None
        self._refusals = 0
        self._replaying = True
        self._resent += len(self._unsent)
        return Resync(
            replay_from=replay_from,
            last_id_before=last_id_before,
            stream=condition,
            restarted=restarted,
            resending=len(self._unsent),
            down_for=down_for,
        )

    # -- histories -----------------------------------------------------------------------------

    def plan_histories(self, requests: Sequence[HistoryRequest]) -> HistoryRead:
        """The reads that answer ``requests`` together, up to what was delivered here."""
        newest = parse_message_id(self._last_id)
        behind: list[HistoryRequest] = []
        ahead: dict[str, None] = {}  # ordered, without repeats
        for request in requests:
            since = parse_message_id(request.since)
            if not _is_stream_id(since):
                continue  # answered at once: Redis would refuse the whole read
            if since < newest:
                behind.append(request)
            else:
                ahead[request.since] = None
        anchors = tuple(ahead)
        if not behind:
            return HistoryRead(self._last_id, self._last_id, 0, anchors)
        oldest = min(behind, key=lambda r: parse_message_id(r.since)).since
        # One more than the longest answer: a request whose range holds more is cut anyway.
        count = max(r.most for r in behind) + 1
        return HistoryRead(self._last_id, oldest, count, anchors)

    def answer_histories(
        self,
        requests: Sequence[HistoryRequest],
        read: HistoryRead,
        entries: Sequence[tuple[str, Entry | None]],
        anchors_found: Collection[str],
    ) -> list[History]:
        """Each request's part of ``read``: ``entries`` are the range's, newest first;
        ``anchors_found`` the ``read.anchors`` that are in the stream."""
        index = _ReadIndex(entries, self._skipped)
        newest = parse_message_id(read.newest)
        answers: list[History] = []
        for request in requests:
            since = parse_message_id(request.since)
            if not _is_stream_id(since):
                answers.append(History([], False))  # no such entry can exist
                continue
            if since >= newest:
                # The reader has not passed ``since``: everything after it comes live.
                answers.append(History([], request.since in anchors_found))
                continue
            answers.append(index.after(since, HistoryBudget(request.limit, request.max_bytes)))
        return answers

    # -- internals -----------------------------------------------------------------------------

    def _confirm_own(self, seq: int, entry_id: str) -> list[Broadcast]:
        """One of ours came back from the stream: deliver it here (unless done) and forget it."""
        if seq <= self._own_confirmed:
            self._skip(entry_id)
            return []
        self._own_confirmed = seq
        deliveries: list[Broadcast] = []
        while self._pending and self._pending[0].seq <= seq:
            pending = self._pending.popleft()
            self._pending_bytes -= pending.size
            self._remember(pending)
            if pending.delivered:
                continue
            # An earlier message of ours that never came back cannot be: it was sent first.
            # Deliver it here all the same rather than lose it.
            deliveries.append(Broadcast(entry_id if pending.seq == seq else None, pending.message))
        return deliveries

    def _remember(self, confirmed: Pending) -> None:
        """Keep ``confirmed`` among the recent messages, within the same bounds as the pending
        ones (``recent_limit`` messages, ``pending_max_bytes`` bytes), the oldest forgotten."""
        self._recent.append(confirmed)
        self._recent_bytes += confirmed.size
        while len(self._recent) > 1 and (
            len(self._recent) > self._recent_limit or self._recent_bytes > self._pending_max_bytes
        ):
            self._recent_bytes -= self._recent.popleft().size

    def _pending_full(self, adding: int = 0) -> bool:
        """Whether the pending messages (and ``adding`` bytes more) are over either bound;
        never when none is pending."""
        if not self._pending:
            return False
        return (
            len(self._pending) >= self._pending_limit
            or self._pending_bytes + adding > self._pending_max_bytes
        )

    def _skip(self, entry_id: str) -> None:
        self._duplicates_skipped += 1
        self._skipped.add(entry_id)
        self._skipped_order.append(entry_id)
        if len(self._skipped_order) > self._skipped_limit:
            self._skipped.discard(self._skipped_order.popleft())


class _ReadIndex:
    """One history read, oldest first, indexed so that each request of the batch costs a
    binary search plus its own answer, not a walk over the whole read."""

    def __init__(self, entries: Sequence[tuple[str, Entry | None]], skipped: set[str]) -> None:
        self.keys: list[tuple[int, int]] = []
        #: None for an entry that is not served: a skipped copy, or not trio_ws's.
        self.broadcasts: list[Broadcast | None] = []
        #: Index of the previous copy of the same broadcast in the read (-1: none), so that a
        #: request keeps the oldest copy inside its own range.
        self.earlier_copy: list[int] = []
        last_copy: dict[tuple[str, int], int] = {}
        for entry_id, entry in reversed(entries):
            self.keys.append(parse_message_id(entry_id))
            if entry is None or entry_id in skipped:
                self.broadcasts.append(None)
                self.earlier_copy.append(-1)
                continue
            identity = (entry.origin, entry.seq)
            self.earlier_copy.append(last_copy.get(identity, -1))
            last_copy[identity] = len(self.broadcasts)
            self.broadcasts.append(Broadcast(entry_id, entry.message))

    def after(self, since: tuple[int, int], budget: HistoryBudget) -> History:
        """The newest broadcasts after ``since`` that fit in ``budget``, oldest first."""
        start = bisect.bisect_right(self.keys, since)
        # The ``since`` entry itself is in the read: nothing after it was trimmed, and the
        # read (contiguous, newest first) holds everything after it.
        present = start > 0 and self.keys[start - 1] == since
        kept: list[Broadcast] = []
        cut = False
        for position in range(len(self.keys) - 1, start - 1, -1):
            broadcast = self.broadcasts[position]
            if broadcast is None or self.earlier_copy[position] >= start:
                continue
            if not budget.take(broadcast.message):
                cut = True
                break
            kept.append(broadcast)
        kept.reverse()
        return History(kept, present and not cut)


#: Redis error classes whose text names none of the command's arguments: kept in descriptions.
#: Any other class (ERR, WRONGTYPE...) may quote arguments back, so only its class is kept.
_PLAIN_ERROR_CLASSES = frozenset(
    {"OOM", "NOPERM", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "MISCONF", "NOAUTH", "WRONGPASS"}
)
#: coredis turns some of Redis's error classes into exceptions of their own, and drops the
#: class from the text (also ERR's, when it has no exception of its own).
_CLASS_OF_EXCEPTION = {
    "AuthorizationError": "NOPERM",
    "ReadOnlyError": "READONLY",
    "BusyLoadingError": "LOADING",
    "AuthenticationRequiredError": "NOAUTH",
    "AuthenticationFailureError": "WRONGPASS",
    "WrongTypeError": "WRONGTYPE",
    "UnknownCommandError": "ERR",
    "NoScriptError": "NOSCRIPT",
    "ExecAbortError": "EXECABORT",
    "NoKeyError": "NOKEY",
    "NotBusyError": "NOTBUSY",
    "UnblockedError": "UNBLOCKED",
    "StreamConsumerGroupError": "NOGROUP",
    "StreamDuplicateConsumerGroupError": "BUSYGROUP",
}
#: coredis's pipeline errors: "Command # 3 (XADD <every argument>) of pipeline caused error: ".
_PIPELINE_ERROR = re.compile(r"Command # \d+ \((\S+)")
_PIPELINE_ERROR_END = " of pipeline caused error: "
_ERROR_CLASS = re.compile(r"[A-Z][A-Z_]{1,19}")
#: Most characters of an error description, in /health and in a log line (100 kept, and the
#: marker that says how long it was).
DESCRIPTION_LIMIT = 120


def describe_error(kind: str, text: str, *, redis_answered: bool) -> str:
    """An error as /health and the logs show it: the exception's ``kind``, the command's name,
    and, if Redis answered with an error (``redis_answered``), its error class, with Redis's
    text only for the classes known to quote nothing back: never the command's arguments,
    which carry messages' text. Escaped and cut to DESCRIPTION_LIMIT.

    ``describe_error("ResponseError", "Command # 3 (XADD s ... t hello) of pipeline caused
    error: OOM command not allowed...", redis_answered=True)`` -> ``"ResponseError on XADD: OOM
    command not allowed..."``.
    """
    command = ""
    if match := _PIPELINE_ERROR.match(text):
        command = f" on {match.group(1).upper()}"
        # The arguments come before the last separator; Redis's own text after it.
        text = text.rpartition(_PIPELINE_ERROR_END)[2]
    if redis_answered:
        code = error_class(kind, text)
        if code not in _PLAIN_ERROR_CLASSES:
            text = code
        elif not text.startswith(code):
            text = f"{code} {text}"
    described = f"{kind}{command}: {text}" if text else f"{kind}{command}"
    return loggable(described, DESCRIPTION_LIMIT - 20)


def error_class(kind: str, text: str) -> str:
    """Redis's error class (``OOM``, ``NOPERM``) of an error Redis answered: from the
    exception's ``kind`` or the first word of its ``text``; "" if neither says."""
    if kind in _CLASS_OF_EXCEPTION:
        return _CLASS_OF_EXCEPTION[kind]
    if _PIPELINE_ERROR.match(text):
        text = text.rpartition(_PIPELINE_ERROR_END)[2]
    first = text.split(" ", 1)[0]
    return first if _ERROR_CLASS.fullmatch(first) else ""


def _is_stream_id(key: tuple[int, int]) -> bool:
    return key[0] <= STREAM_ID_PART_MAX and key[1] <= STREAM_ID_PART_MAX


@dataclass(frozen=True, slots=True)
class Stall:
    """What :class:`StallWatch` saw: the numbers for the warning."""

    pending: int
    #: Seconds since a pending message last came back from the stream (or none was pending).
    waiting_for: float
    #: Seconds since the reader last finished a read.
    read_ago: float

    def __str__(self) -> str:
        return (
            f"no progress: {self.pending} messages waiting {self.waiting_for:.1f}s to come back "
            f"from the stream, last read finished {self.read_ago:.1f}s ago"
        )


class StallWatch:
    """Notices a broker that says it is up but has stopped moving.

    Every command has a deadline, so a read finishes (with entries or not) within a block plus
    a command timeout, and a pending message comes back soon after it was sent. Either taking
    longer than ``stall_timeout`` means something the deadlines do not cover is stuck.
    """

    def __init__(self, stall_timeout: float) -> None:
        self.stall_timeout = stall_timeout
        self._read_at = 0.0
        self._progress_at = 0.0
        self._confirmed = 0

    def restart(self, now: float, confirmed: int) -> None:
        """A new connection: both clocks start again."""
        self._read_at = self._progress_at = now
        self._confirmed = confirmed

    def read_finished(self, now: float) -> None:
        self._read_at = now

    def check(self, now: float, pending: int, confirmed: int) -> Stall | None:
        """Called regularly: ``pending`` messages wait, the newest seen back is ``confirmed``."""
        if pending == 0 or confirmed != self._confirmed:
            self._confirmed = confirmed
            self._progress_at = now
        stall = Stall(pending, now - self._progress_at, now - self._read_at)
        if max(stall.waiting_for, stall.read_ago) > self.stall_timeout:
            return stall
        return None
