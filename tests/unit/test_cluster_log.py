"""The cluster log's rules, one table row each: a script of what happened (published here, sent,
read from the stream, an error, a resync) and what must come out of it.

No Redis, no clock: the log is fed what the broker's I/O would have seen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from trio_ws.brokers.cluster_log import (
    DESCRIPTION_LIMIT,
    ClusterLog,
    HistoryRequest,
    Pending,
    Resync,
    StallWatch,
    StreamInfo,
    Trim,
    describe_error,
    error_class,
)
from trio_ws.brokers.entries import Entry
from trio_ws.core.broker import Broadcast, BrokerState, Outgoing
from trio_ws.core.protocol import parse_message_id

ME = "me"
RUN_ID = "run-1"


# -- the script's vocabulary ------------------------------------------------------------------


def message(text: str) -> Outgoing:
    return Outgoing("message", 1.0, sender="s", text=text)


#: What a one-letter message counts against the pending byte budget: its text, its sender "s"
#: and 64 bytes.
SMALL = 66
LARGE = "x" * 200


def label(outgoing: Outgoing) -> str:
    """A message by its text, a periodic message as ``periodic:<count>``."""
    if outgoing.kind == "periodic":
        return f"periodic:{outgoing.active_connections}"
    return outgoing.text


@dataclass
class Run:
    """A log and what came out of it so far."""

    log: ClusterLog
    delivered: list[tuple[str | None, str]] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    in_flight: list[Pending] = field(default_factory=list)
    resyncs: list[Resync] = field(default_factory=list)
    now: float = 0.0

    def deliver(self, broadcasts: list[Broadcast]) -> None:
        self.delivered.extend((b.id, label(b.message)) for b in broadcasts)


Step = Callable[[Run], None]


def publish(text: str) -> Step:
    return lambda run: run.deliver(run.log.publish(message(text)))


def periodic(count: int) -> Step:
    return lambda run: run.deliver(
        run.log.publish(Outgoing("periodic", 1.0, active_connections=count))
    )


def take() -> Step:
    """The publisher takes a batch: the XADD pipeline is on its way."""

    def step(run: Run) -> None:
        run.in_flight = run.log.next_batch(100)

    return step


def landed() -> Step:
    """The batch taken last reached Redis."""

    def step(run: Run) -> None:
        run.log.batch_sent(run.in_flight)
        run.sent.extend(label(p.message) for p in run.in_flight)

    return step


def send() -> Step:
    def step(run: Run) -> None:
        take()(run)
        landed()(run)

    return step


def own(entry_id: str, seq: int, text: str) -> Step:
    """One of this process's messages comes back from the stream."""
    return lambda run: run.deliver(run.log.on_entry(entry_id, Entry(ME, seq, message(text))))


def other(entry_id: str, origin: str, seq: int, text: str) -> Step:
    return lambda run: run.deliver(run.log.on_entry(entry_id, Entry(origin, seq, message(text))))


def foreign(entry_id: str) -> Step:
    """An entry that trio_ws did not write."""
    return lambda run: run.deliver(run.log.on_entry(entry_id, None))


def read_finished(*, full: bool) -> Step:
    return lambda run: run.log.read_finished(full=full)


def error() -> Step:
    def step(run: Run) -> None:
        run.now += 1
        run.deliver(run.log.on_error("ConnectionError", run.now))

    return step


def resync(
    run_id: str = RUN_ID, end: str = "99-0", deleted: str = "0-0", *, gone: bool = False
) -> Step:
    def step(run: Run) -> None:
        run.now += 1
        stream = None if gone else StreamInfo(end, deleted)
        run.resyncs.append(run.log.on_resync(run_id, stream, run.now))

    return step


def new_run(**options: Any) -> Run:
    options = {"pending_limit": 100, "skipped_limit": 100, **options}
    log = ClusterLog(ME, **options)
    log.start(RUN_ID, StreamInfo("0-0"))
    return Run(log)


# -- delivering, sending, outages ---------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    steps: list[Step]
    delivered: list[tuple[str | None, str]]
    sent: list[str] | None = None
    #: Expected values of some :class:`LogStatistics` fields.
    stats: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


DELIVERY_RULES = [
    pytest.param(
        Case([publish("a"), send()], delivered=[], sent=["a"]),
        id="own message: not delivered before it comes back from the stream",
    ),
    pytest.param(
        Case([publish("a"), send(), own("1-0", 1, "a")], delivered=[("1-0", "a")], sent=["a"]),
        id="own message: delivered when it comes back, with its stream id",
    ),
    pytest.param(
        Case([other("1-0", "x", 1, "b")], delivered=[("1-0", "b")]),
        id="another origin's entry: delivered with its stream id",
    ),
    pytest.param(
        Case(
            [other("1-0", "x", 1, "b"), other("2-0", "x", 1, "b")],
            delivered=[("1-0", "b")],
            stats={"duplicates_skipped": 1},
        ),
        id="another origin's copy (seq not above the last seen): skipped",
    ),
    pytest.param(
        Case(
            [publish("a"), send(), own("1-0", 1, "a"), own("2-0", 1, "a")],
            delivered=[("1-0", "a")],
            stats={"duplicates_skipped": 1},
        ),
        id="own copy: skipped",
    ),
    pytest.param(
        Case(
            [publish("a"), publish("b"), send(), own("2-0", 2, "b")],
            delivered=[(None, "a"), ("2-0", "b")],
        ),
        id="own message that never came back: delivered (no id) when a later one does",
    ),
    pytest.param(
        Case([foreign("5-0"), other("6-0", "x", 1, "b")], delivered=[("6-0", "b")]),
        id="an entry trio_ws did not write: delivers nothing",
    ),
    pytest.param(
        Case(
            [publish("a"), send(), error()],
            delivered=[(None, "a")],
            stats={"state": BrokerState.DOWN, "delivered_during_outages": 1, "outages": 1},
        ),
        id="outage: pending messages are delivered here at once, without id",
    ),
    pytest.param(
        Case([publish("a"), send(), error(), error()], delivered=[(None, "a")]),
        id="outage: a second error flushes nothing twice",
    ),
    pytest.param(
        Case([error(), publish("a")], delivered=[(None, "a")]),
        id="outage: a message published meanwhile is delivered here at once",
    ),
    pytest.param(
        Case(
            [publish("a"), send(), error(), resync(), send(), own("1-0", 1, "a")],
            delivered=[(None, "a")],
            sent=["a", "a"],
            stats={"resent_after_outages": 1, "pending": 0},
        ),
        id="outage: a flushed message is sent again, and not delivered twice here",
    ),
    pytest.param(
        Case(
            [error(), publish("a"), resync(), send(), own("1-0", 1, "a")],
            delivered=[(None, "a")],
            sent=["a"],
        ),
        id="outage: a message published meanwhile is sent once Redis is back",
    ),
    pytest.param(
        Case([periodic(3), send()], delivered=[], sent=["periodic:3"]),
        id="periodic message while up: sent to the cluster",
    ),
    pytest.param(
        Case(
            [error(), periodic(3), resync(), send()],
            delivered=[(None, "periodic:3")],
            sent=[],
            stats={"pending": 0},
        ),
        id="review: a periodic message during an outage stays local",
    ),
    pytest.param(
        Case(
            [error(), publish("a"), publish("b"), publish("c"), resync(), send()],
            delivered=[(None, "a"), (None, "b"), (None, "c")],
            sent=["b", "c"],
            stats={"dropped_during_outages": 1},
            options={"pending_limit": 2},
        ),
        id="outage: past the pending limit the oldest is not sent to the cluster",
    ),
    pytest.param(
        Case(
            [error(), publish("a"), publish("b"), publish("c"), resync(), send()],
            delivered=[(None, "a"), (None, "b"), (None, "c")],
            sent=["b", "c"],
            stats={"dropped_during_outages": 1, "pending_bytes": 2 * SMALL},
            options={"pending_max_bytes": 3 * SMALL - 1},
        ),
        id="outage: past the pending byte budget the oldest is not sent to the cluster",
    ),
    pytest.param(
        Case(
            [error(), publish("a"), publish("b"), publish(LARGE), resync(), send()],
            delivered=[(None, "a"), (None, "b"), (None, LARGE)],
            sent=[LARGE],
            stats={"dropped_during_outages": 2, "pending": 1},
            options={"pending_max_bytes": 2 * SMALL + 10},
        ),
        id="outage: one large message makes room by dropping as many old ones as it takes",
    ),
    pytest.param(
        Case(
            [error(), publish(LARGE), publish(LARGE), resync(), send()],
            delivered=[(None, LARGE), (None, LARGE)],
            sent=[LARGE],
            stats={"dropped_during_outages": 1},
            options={"pending_max_bytes": 10},
        ),
        id="outage: a message larger than the whole budget is still kept, alone",
    ),
    pytest.param(
        Case(
            [publish("a"), publish("b"), send(), own("1-0", 1, "a"), own("2-0", 2, "b")],
            delivered=[("1-0", "a"), ("2-0", "b")],
            stats={"pending": 0, "pending_bytes": 0},
        ),
        id="confirmed messages leave the byte count",
    ),
    pytest.param(
        Case(
            [publish("a"), send(), own("1-0", 1, "a"), error(), resync("run-2"), send()],
            delivered=[("1-0", "a")],
            sent=["a", "a"],
        ),
        id="Redis restarted (new run_id): recent confirmed messages are sent again",
    ),
    pytest.param(
        Case(
            [
                *(publish("a"), send(), own("1-0", 1, "a")),
                *(publish("b"), send(), own("2-0", 2, "b")),
                *(publish("c"), send(), own("3-0", 3, "c")),
                *(error(), resync("run-2"), send()),
            ],
            delivered=[("1-0", "a"), ("2-0", "b"), ("3-0", "c")],
            sent=["a", "b", "c", "b", "c"],
            options={"pending_max_bytes": 2 * SMALL},
        ),
        id="the recent messages kept to send again are bounded by the same bytes",
    ),
    pytest.param(
        Case(
            [
                *(publish("a"), send(), own("1-0", 1, "a")),
                *(publish("b"), send(), own("2-0", 2, "b")),
                *(error(), resync("run-2"), send()),
            ],
            delivered=[("1-0", "a"), ("2-0", "b")],
            sent=["a", "b", "b"],
            options={"recent_limit": 1},
        ),
        id="and by their count",
    ),
    pytest.param(
        Case(
            [
                *(publish("a"), send(), own("1-0", 1, "a")),
                *(publish("b"), send(), error(), resync(), send()),
            ],
            delivered=[("1-0", "a"), (None, "b")],
            sent=["a", "b", "b"],
        ),
        id="same Redis (same run_id): only pending messages are sent again",
    ),
    pytest.param(
        Case(
            [
                *(publish("a"), send(), own("1-0", 1, "a")),
                *(error(), resync("run-2"), error(), resync("run-2"), send()),
            ],
            delivered=[("1-0", "a")],
            sent=["a", "a"],
        ),
        id="review: a second error before the re-sends went out keeps them queued",
    ),
    pytest.param(
        Case(
            [
                *(publish("a"), send(), own("1-0", 1, "a"), publish("b"), take()),
                *(error(), resync("run-2"), landed(), send()),
            ],
            delivered=[("1-0", "a"), (None, "b")],
            sent=["a", "b", "a", "b"],
        ),
        id="a batch landing after the queue was rebuilt drops only itself",
    ),
    pytest.param(
        Case(
            [
                *(other("1-0", "x", 1, "m"), other("2-0", "y", 1, "m")),
                *(other("3-0", "x", 2, "m"), other("4-0", "z", 1, "m")),
                other("5-0", "x", 2, "copy"),
            ],
            delivered=[("1-0", "m"), ("2-0", "m"), ("3-0", "m"), ("4-0", "m")],
            options={"origins_limit": 2},
        ),
        id="review: origins are forgotten least recently seen first",
    ),
    pytest.param(
        Case(
            [
                *(error(), resync(), other("1-0", "x", 1, "m")),
                *(read_finished(full=True), other("2-0", "x", 2, "m")),
                *(read_finished(full=False), other("3-0", "x", 3, "m")),
            ],
            delivered=[("1-0", "m"), ("2-0", "m"), ("3-0", "m")],
            stats={"replayed_after_outages": 2},
        ),
        id="replayed: counted after a resync until a read returns less than a batch",
    ),
]


@pytest.mark.parametrize("case", DELIVERY_RULES)
def test_delivery_rules(case: Case) -> None:
    run = new_run(**case.options)
    for step in case.steps:
        step(run)
    assert run.delivered == case.delivered
    if case.sent is not None:
        assert run.sent == case.sent
    statistics = run.log.statistics()
    for name, expected in case.stats.items():
        assert getattr(statistics, name) == expected, name


BACKPRESSURE_RULES = [
    pytest.param([publish("a")], False, id="under the limit: no wait"),
    pytest.param([publish("a"), publish("b")], True, id="at the limit while up: wait"),
    pytest.param([publish("a"), publish("b"), error()], False, id="down: never wait"),
    pytest.param(
        [publish("a"), publish("b"), send(), own("1-0", 1, "a")], False, id="one came back"
    ),
]


@pytest.mark.parametrize(("steps", "must_wait"), BACKPRESSURE_RULES)
def test_backpressure_rules(steps: list[Step], must_wait: bool) -> None:
    run = new_run(pending_limit=2)
    for step in steps:
        step(run)
    assert run.log.publish_must_wait is must_wait


BYTE_BACKPRESSURE_RULES = [
    pytest.param([publish("a")], 2 * SMALL, False, id="under the byte budget: no wait"),
    pytest.param([publish("a"), publish("b")], 2 * SMALL, True, id="at the byte budget: wait"),
    pytest.param([publish(LARGE)], 10, True, id="one message over the whole budget: wait"),
    pytest.param([], 10, False, id="nothing pending: the first message always goes"),
    pytest.param([publish("a"), publish("b"), error()], 2 * SMALL, False, id="down: never wait"),
    pytest.param(
        [publish("a"), publish("b"), send(), own("1-0", 1, "a")],
        2 * SMALL,
        False,
        id="one came back: its bytes are free again",
    ),
]


@pytest.mark.parametrize(("steps", "max_bytes", "must_wait"), BYTE_BACKPRESSURE_RULES)
def test_backpressure_in_bytes(steps: list[Step], max_bytes: int, must_wait: bool) -> None:
    """The same backpressure as the count limit, from the bytes pending (each message counted
    as its text, its sender and 64 bytes)."""
    run = new_run(pending_limit=100, pending_max_bytes=max_bytes)
    for step in steps:
        step(run)
    assert run.log.publish_must_wait is must_wait


# -- a batch holds a bounded number of bytes ----------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "max_bytes", "taken"),
    [
        pytest.param([10, 10, 10], None, 3, id="no byte bound: up to the count"),
        pytest.param([10, 10, 10], 2 * 75, 2, id="as many as fit (text + sender + 64 each)"),
        pytest.param([1000, 10], 100, 1, id="one larger than the bound goes alone"),
        pytest.param([10] * 5, 10_000, 4, id="the count holds too"),
    ],
)
def test_a_batch_is_bounded_in_bytes(sizes: list[int], max_bytes: int | None, taken: int) -> None:
    run = new_run()
    for index, size in enumerate(sizes):
        publish(str(index) * size)(run)
    assert len(run.log.next_batch(4, max_bytes)) == taken


# -- Redis refuses a write ----------------------------------------------------------------------


@dataclass
class Refused:
    """Redis refuses a write with ``error_class``; the step keeps what the log decided."""

    error_class: str = "OOM"
    now: float | None = None

    def __call__(self, run: Run) -> Trim | None:
        if self.now is not None:
            run.now = self.now
        description = f"ResponseError on XADD: {self.error_class}"
        return run.log.on_refused(self.error_class, description, run.now)


def refused(error_class: str = "OOM", now: float | None = None) -> Refused:
    return Refused(error_class, now)


@pytest.mark.parametrize(
    ("steps", "keeps"),
    [
        pytest.param(
            [refused()] * 6,
            [8, 4, 2, 1, 0, None],
            id="OOM: halve the stream at each refusal in a row; emptied and refused: down",
        ),
        pytest.param(
            [refused(), refused(), publish("a"), send(), refused()],
            [8, 4, 8],
            id="a write that lands starts again from half the cap",
        ),
        pytest.param(
            [refused(), refused(), error(), resync(), refused()],
            [8, 4, 8],
            id="after an outage: from half the cap again",
        ),
        pytest.param([refused("NOPERM")], [None], id="NOPERM: trimming cannot help: an outage"),
        pytest.param([refused("READONLY")], [None], id="READONLY (a replica): an outage"),
        pytest.param([refused("ERR")], [None], id="any other error: an outage"),
    ],
)
def test_refusal_rules(steps: list[Step], keeps: list[int | None]) -> None:
    run = new_run(stream_cap=16)
    trims: list[Trim | None] = []
    for step in steps:
        answer = step(run)
        if isinstance(step, Refused):
            trims.append(answer)
    assert [None if trim is None else trim.keep for trim in trims] == keeps
    assert run.log.statistics().last_error.startswith("ResponseError on XADD: ")
    assert run.log.state is BrokerState.UP  # the shell decides the outage, with on_error


def test_refusals_are_reported_once_every_ten_seconds_with_a_count() -> None:
    run = new_run(stream_cap=1 << 20)
    answers = [refused(now=t)(run) for t in (0.0, 1.0, 2.0, 10.5, 11.0)]
    reports = [(a.report, a.since_report) for a in answers if a is not None]
    assert reports == [(True, 1), (False, 1), (False, 2), (True, 3), (False, 1)]
    assert run.log.statistics().trims_after_refusals == 5


# -- errors as /health and the logs show them ---------------------------------------------------

SECRET = "the flood's text"
PIPELINE = f"Command # 3 (XADD trio_ws:broadcasts MAXLEN ~ 812 * o a q 7 t {SECRET})"
OOM_TEXT = "OOM command not allowed when used memory > 'maxmemory'."


@pytest.mark.parametrize(
    ("kind", "text", "answered", "described", "code"),
    [
        pytest.param(
            "ResponseError",
            f"{PIPELINE} of pipeline caused error: {OOM_TEXT}",
            True,
            f"ResponseError on XADD: {OOM_TEXT}",
            "OOM",
            id="a pipeline's OOM: the command's name and Redis's text, no argument",
        ),
        pytest.param(
            "AuthorizationError",
            f"Command # 1 (XADD s * t {SECRET} of pipeline caused error: x) of pipeline caused "
            "error: this user has no permissions to run the 'xadd' command",
            True,
            "AuthorizationError on XADD: NOPERM this user has no permissions to run the 'xadd' "
            "command",
            "NOPERM",
            id="NOPERM (coredis drops the class); an argument like the separator fools nothing",
        ),
        pytest.param(
            "UnknownCommandError",
            f"unknown command 'XADDX', with args beginning with: '{SECRET}'",
            True,
            "UnknownCommandError: ERR",
            "ERR",
            id="a class whose text may quote arguments: the class only",
        ),
        pytest.param(
            "ResponseError",
            f"value '{SECRET}' is not an integer",
            True,
            "ResponseError",
            "",
            id="ERR without an exception of its own (coredis drops the class): no text",
        ),
        pytest.param(
            "TimeoutError",
            f"{PIPELINE} of pipeline caused error: ",
            False,
            "TimeoutError on XADD",
            "",
            id="a timeout in a pipeline",
        ),
        pytest.param(
            "ConnectionError",
            "Error 111 connecting to 127.0.0.1:6390. Connection refused.",
            False,
            "ConnectionError: Error 111 connecting to 127.0.0.1:6390. Connection refused.",
            "",
            id="not an answer of Redis's: kept",
        ),
        pytest.param(
            "ConnectionError",
            "\x1b[31m" + "x" * 500,
            False,
            "ConnectionError: \\x1b[31m" + "x" * 75 + "...[522 chars]",
            "",
            id="escaped and cut",
        ),
    ],
)
def test_errors_are_described_without_arguments(
    kind: str, text: str, answered: bool, described: str, code: str
) -> None:
    description = describe_error(kind, text, redis_answered=answered)
    assert SECRET not in description
    assert len(description) <= DESCRIPTION_LIMIT
    assert description == described
    assert error_class(kind, text) == code


# -- resync: where to read on from --------------------------------------------------------------


RESYNC_RULES = [
    pytest.param(resync(end="9-0"), "5-0", "kept", id="stream kept: read on from the last id"),
    pytest.param(resync(gone=True), "0-0", "gone", id="stream gone: read the new one from 0"),
    pytest.param(
        resync(end="3-0"),
        "3-0",
        "restored",
        id="review: restored from an older snapshot: read on from its end",
    ),
    pytest.param(
        resync(end="9-0", deleted="7-0"),
        "5-0",
        "trimmed",
        id="entries after the last id trimmed: read on, and say so",
    ),
]


@pytest.mark.parametrize(("step", "replay_from", "condition"), RESYNC_RULES)
def test_resync_rules(step: Step, replay_from: str, condition: str) -> None:
    run = new_run()
    other("5-0", "x", 1, "m")(run)
    error()(run)
    step(run)
    [decision] = run.resyncs
    assert (decision.replay_from, decision.stream) == (replay_from, condition)
    assert run.log.last_id == replay_from
    assert run.log.state is BrokerState.UP


def test_a_resync_says_whether_redis_restarted_and_how_long_it_was_down() -> None:
    run = new_run()
    for step in (error(), resync("run-2"), error(), resync("run-2")):
        step(run)
    first, second = run.resyncs
    assert first.restarted == (RUN_ID, "run-2")
    assert second.restarted is None
    assert second.down_for == 1.0


# -- histories ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """An entry in the stream: ``origin`` None for one that trio_ws did not write."""

    entry_id: str
    origin: str | None
    seq: int
    text: str

    @property
    def entry(self) -> Entry | None:
        return None if self.origin is None else Entry(self.origin, self.seq, message(self.text))


def stream(*specs: str) -> list[Stored]:
    """Entries from ``"<id> <origin>:<seq> <text>"`` (``-`` as origin: not trio_ws's)."""
    out = []
    for spec in specs:
        entry_id, identity, text = spec.split()
        origin, seq = identity.split(":")
        out.append(Stored(entry_id, None if origin == "-" else origin, int(seq), text))
    return out


@dataclass(frozen=True)
class HistoryCase:
    stored: list[Stored]
    #: The entries the reader has read, in order ("" = the whole stream); the rest of the
    #: process's past is before it started (``start``).
    read: list[str] | None
    requests: list[HistoryRequest]
    #: Per request: the texts replayed and whether the history is complete.
    answers: list[tuple[list[str], bool]]
    started_at: str = "0-0"


def ask(since: str, limit: int = 10, max_bytes: int = 10_000) -> HistoryRequest:
    return HistoryRequest(since, limit, max_bytes)


#: Each of these counts 66 bytes in a budget: a 1-character text and sender, plus 64.
ABC = stream("1-0 x:1 a", "2-0 x:2 b", "3-0 x:3 c", "4-0 x:4 d")

HISTORY_RULES = [
    pytest.param(
        HistoryCase(ABC, None, [ask("1-0", 10)], [(["b", "c", "d"], True)]),
        id="everything after since, oldest first",
    ),
    pytest.param(
        HistoryCase(ABC, None, [ask("2-0", 2)], [(["c", "d"], True)]),
        id="exactly the limit: complete",
    ),
    pytest.param(
        HistoryCase(ABC, None, [ask("1-0", 2)], [(["c", "d"], False)]),
        id="more than the limit: the newest, incomplete",
    ),
    pytest.param(
        HistoryCase(ABC[1:], None, [ask("1-0", 10)], [(["b", "c", "d"], False)]),
        id="review: the since entry is gone (trimmed, lost): incomplete",
    ),
    pytest.param(
        HistoryCase(
            stream("1-0 x:1 a", "2-0 x:2 b", "3-0 x:2 b", "4-0 x:3 c"),
            None,
            [ask("2-0", 10)],
            [(["c"], True)],
        ),
        id="review: a re-sent copy that the reader skipped is left out",
    ),
    pytest.param(
        HistoryCase(
            stream("1-0 x:1 a", "2-0 x:2 b", "3-0 x:2 b", "4-0 x:3 c"),
            [],
            [ask("1-0", 10)],
            [(["b", "c"], True)],
            started_at="4-0",
        ),
        id="a copy from before this process started: the oldest copy is kept",
    ),
    pytest.param(
        HistoryCase(
            stream("1-0 x:1 a", "2-0 -:0 junk", "3-0 x:2 b"),
            None,
            [ask("1-0", 10)],
            [(["b"], True)],
        ),
        id="an entry trio_ws did not write is left out",
    ),
    pytest.param(
        HistoryCase(
            ABC,
            ["1-0", "2-0"],
            [ask("1-0", 10), ask("3-0", 10), ask("9-0", 10)],
            [(["b"], True), ([], True), ([], False)],
        ),
        id="only up to what the reader delivered here; past it, whether since exists",
    ),
    pytest.param(
        HistoryCase(
            ABC,
            None,
            [ask("1-0", 1), ask("3-0", 10), ask("2-0", 10)],
            [(["d"], False), (["d"], True), (["c", "d"], True)],
        ),
        id="a batch: one read, long enough for each, each request its own part",
    ),
    pytest.param(
        HistoryCase(ABC, None, [ask("1-0", max_bytes=3 * 66)], [(["b", "c", "d"], True)]),
        id="bytes: exactly the budget is complete",
    ),
    pytest.param(
        HistoryCase(ABC, None, [ask("1-0", max_bytes=3 * 66 - 1)], [(["c", "d"], False)]),
        id="bytes: over the budget, the newest that fit, incomplete",
    ),
    pytest.param(
        HistoryCase(
            stream("1-0 x:1 a", "2-0 x:2 b", f"3-0 x:3 {'c' * 1000}", "4-0 x:4 d"),
            None,
            [ask("1-0", max_bytes=500)],
            [(["d"], False)],
        ),
        id="bytes: one that does not fit ends the history (no gaps)",
    ),
    pytest.param(
        HistoryCase(
            ABC,
            None,
            [ask("18446744073709551616-0"), ask("1-0")],
            [([], False), (["b", "c", "d"], True)],
        ),
        id="a since beyond what Redis accepts: incomplete, and the others still answered",
    ),
]


@pytest.mark.parametrize("case", HISTORY_RULES)
def test_history_rules(case: HistoryCase) -> None:
    log = ClusterLog("reader", pending_limit=100, skipped_limit=100)
    log.start(RUN_ID, StreamInfo(case.started_at))
    read_ids = [s.entry_id for s in case.stored] if case.read is None else case.read
    by_id = {s.entry_id: s for s in case.stored}
    for entry_id in read_ids:
        log.on_entry(entry_id, by_id[entry_id].entry)

    plan = log.plan_histories(case.requests)
    for asked in (plan.newest, plan.oldest, *plan.anchors):
        assert max(parse_message_id(asked)) < 2**64, "Redis would refuse the whole read"
    # What Redis would answer: XREVRANGE newest oldest COUNT count, and one XRANGE per anchor.
    newest, oldest = parse_message_id(plan.newest), parse_message_id(plan.oldest)
    in_range = [s for s in case.stored if oldest <= parse_message_id(s.entry_id) <= newest]
    entries = [(s.entry_id, s.entry) for s in reversed(in_range)][: plan.count]
    found = {anchor for anchor in plan.anchors if anchor in by_id}
    answers = log.answer_histories(case.requests, plan, entries, found)

    got = [([label(b.message) for b in h.broadcasts], h.complete) for h in answers]
    assert got == case.answers
    for history in answers:
        assert [b.id for b in history.broadcasts] == sorted(
            (b.id for b in history.broadcasts), key=lambda i: parse_message_id(str(i))
        )


# -- the stall watch ----------------------------------------------------------------------------

#: Steps: "read <t>" a read finished; "restart <t>" a new connection; "check <t> <pending>
#: <confirmed>" the watchdog looks. The row says whether the last check finds a stall (the
#: stall timeout is 10).
STALL_RULES = [
    pytest.param("read 9, check 12 0 0", False, id="reads finishing, nothing waiting: fine"),
    pytest.param(
        "check 5 0 0, check 10.5 0 0",
        True,
        id="no read finished for longer than the timeout: stalled",
    ),
    pytest.param(
        "check 4 0 0, read 9, check 9 1 0, read 14.5, check 14.5 1 0",
        True,
        id="a message waiting to come back for longer than the timeout: stalled",
    ),
    pytest.param(
        "check 4 0 0, read 9, check 9 1 0, read 14, check 14 1 1, read 20, check 20 1 1",
        False,
        id="messages coming back: fine, however many still wait",
    ),
    pytest.param(
        "read 9, check 9 1 0, read 12, check 12 0 0, read 21, check 21 1 0",
        False,
        id="nothing waiting for a moment: the wait starts again",
    ),
    pytest.param("restart 20, check 25 3 0", False, id="a new connection: the clocks start again"),
]


@pytest.mark.parametrize(("steps", "stalled"), STALL_RULES)
def test_stall_rules(steps: str, stalled: bool) -> None:
    watch = StallWatch(stall_timeout=10)
    watch.restart(0, confirmed=0)
    found = None
    for step in steps.split(", "):
        kind, now, *counts = step.split()
        if kind == "read":
            watch.read_finished(float(now))
        elif kind == "restart":
            watch.restart(float(now), confirmed=0)
        else:
            pending, confirmed = map(int, counts)
            found = watch.check(float(now), pending, confirmed)
    assert (found is not None) is stalled
    if found is not None:
        assert "no progress" in str(found)
