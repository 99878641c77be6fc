"""Redis as the broadcast transport between server processes: a Stream alone, or Pub/Sub + Stream.

    python bench/broker_transport.py                       # 20,000 messages, 2 readers, 3 runs
    python bench/broker_transport.py --messages 5000 --runs 1 --json /tmp/bt.json
    python bench/broker_transport.py --transports streams pubsub+stream pubsub+stream/lua

The two designs it compares, as trio_ws would run them with coredis under Trio:

* ``streams``: the publisher pipelines ``XADD ... MAXLEN ~ 10000`` (up to 500 per round trip);
  each server process runs one reader looping ``XREAD BLOCK 1000 COUNT 500`` from its last id.
  That is the design of trio_ws's Redis broker (``trio_ws/brokers/redis.py``).
* ``pubsub+stream``: the publisher pipelines the same ``XADD`` (the stream is the replay log),
  then ``PUBLISH`` of each entry as ``<stream id>\n<fields as JSON>`` in a second pipeline: a
  client learns an entry's id only from the ``XADD`` reply, and subscribers need it to resume
  from the log, so its latency includes that extra round trip. Each process runs a coredis
  PubSub subscriber the robust way, since coredis's own Pub/Sub reconnect can end silently
  (docs/design/redis.md): ``retry_policy=NoRetryPolicy()``, a loop on
  ``await ps.get_message()`` and its own reconnect loop that fills the gap with ``XRANGE`` and
  skips what it already has by stream id.
* ``pubsub+stream/lua`` (opt-in, ``--transports``): the same in one round trip, a Lua script
  (``EVALSHA``, pipelined) doing ``XADD`` and ``PUBLISH`` of the new id: the Pub/Sub design at
  its best, paying with Redis CPU.

It starts its own ``redis-server`` on a free loopback port (no persistence), then for each run
and transport starts ``--readers`` reader processes (this file in reader mode, each in its own
``trio.run``, as separate server processes would be) and publishes from this process, twice:

* **paced**: ``--messages`` at ``--rate`` a second (due messages go out together, as the
  server's publisher task sends whatever is pending): latency at a realistic load;
* **flat out**: ``--messages`` in back-to-back pipelines of 500: the most it can carry.

Every entry carries its send time (``time.time_ns()``: the wall clock is the one clock processes
share); readers record each latency, lost and duplicated messages, and their CPU time. Reported
per transport and mode: messages/s received by the slowest reader, latency p50/p99, CPU per
message of a reader, of the publisher and of Redis (``/proc/<pid>/stat``, as ``bench/run.py``
reads servers), lost, duplicated. Each figure is the median of ``--runs`` runs with min and max,
printed and saved as JSON. Transports alternate within each run so that drift in a noisy machine
hits both alike. Every wait is bounded; the default run takes about 75 s on 2 cores, where
Redis, the publisher and two readers share the cores: compare the transports within one run.
Other work on the machine moves rates and latencies far more than CPU per message, so the load
average is printed and saved with the figures. The JSON also has each run's figures and, per
phase, messages per read (entries per ``XREAD`` reply: batching spreads a round trip's cost),
the publisher's achieved rate, the worst latency, and reconnects (0 unless Redis misbehaved).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import anyio
import coredis
import coredis.exceptions
import trio
from coredis.retry import NoRetryPolicy
from coredis.tokens import PureToken

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import cpu_seconds, percentile  # noqa: E402
from bench.run import Server, aggregate, redis_server  # noqa: E402
from trio_ws.core.protocol import parse_message_id  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Mapping

    from coredis.response.types import StreamEntry

#: The driver starts this file again in reader mode.
READER_SCRIPT = str(Path(__file__).resolve())
STREAMS, PUBSUB, PUBSUB_LUA = "streams", "pubsub+stream", "pubsub+stream/lua"
TRANSPORTS = (STREAMS, PUBSUB, PUBSUB_LUA)
#: The two designs in question; the lua variant (one round trip per batch) is opt-in.
DEFAULT_TRANSPORTS = [STREAMS, PUBSUB]
#: XADD and PUBLISH of its id and the payload, in one command: ARGV is maxlen, payload, fields.
XADD_PUBLISH_LUA = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 3))
redis.call('PUBLISH', KEYS[1], id .. '\\n' .. ARGV[2])
return id
"""
MODES = ("paced", "flat")
#: As trio_ws/brokers/redis.py: most entries per XREAD and per publishing pipeline, XREAD's block.
BATCH = 500
BLOCK_MS = 1000
STREAM_MAXLEN = 10_000
#: A command taking longer means a dead connection (the reader then reconnects).
COMMAND_TIMEOUT_S = 5.0
#: A reader that saw part of a phase ends it after this long without a message of it.
QUIET_S = 3.0
#: For a reader to start, for its report after a phase is published, and for it to exit.
READY_TIMEOUT_S = 30.0
REPORT_MARGIN_S = 30.0
EXIT_TIMEOUT_S = 10.0
#: ~100 bytes, like a chat line; the other fields are those trio_ws writes (encode_entry).
TEXT = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor " * 2)[:100]
SENDER = "bench-sender-01"
ORIGIN = "bench-publisher"
#: Everything that means "the connection to Redis failed": a reader reconnects.
REDIS_ERRORS: tuple[type[BaseException], ...] = (
    coredis.exceptions.RedisError,
    OSError,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    anyio.EndOfStream,
)


def make_client(port: int) -> coredis.Redis[str]:
    # No retry policy: a failed command raises at once and the caller owns the reconnect
    # (as trio_ws does); decode_responses as in the server, so each side pays for decoding.
    return coredis.Redis(
        "127.0.0.1",
        port,
        decode_responses=True,
        retry_policy=NoRetryPolicy(),
        connect_timeout=COMMAND_TIMEOUT_S,
        stream_timeout=BLOCK_MS / 1000 + COMMAND_TIMEOUT_S,
    )


# -- reader processes ------------------------------------------------------------------------


@dataclass
class Phase:
    """What one reader saw of one publishing phase (sequence numbers first..first+count-1)."""

    name: str
    first: int
    count: int
    seen: bytearray = field(init=False)
    latencies_us: list[int] = field(default_factory=list)
    received: int = 0
    duplicates: int = 0
    last_ns: int = 0
    #: trio clock of the last message, for the quiet timeout.
    last_at: float = 0.0

    def __post_init__(self) -> None:
        self.seen = bytearray(self.count)


class Tracker:
    """Counts one reader's messages by phase and reports each phase on stdout when it ends."""

    def __init__(self, messages: int, phase_timeout: float) -> None:
        self.messages = messages
        self.phase_timeout = phase_timeout
        self.phases = [Phase(name, i * messages + 1, messages) for i, name in enumerate(MODES)]
        self.current = 0
        self.done = trio.Event()
        self.ready = trio.Event()
        # Per phase, like the rest of the report:
        #: Pub/Sub messages dropped because their stream id was not past the last one seen.
        self.skipped = 0
        self.reconnects = 0
        #: XREAD replies (or Pub/Sub messages): the round trips a reader paid for.
        self.reads = 0
        self._phase_started = trio.current_time()
        self._cpu_mark = cpu_seconds()

    def record(self, seq: int, sent_ns: int, now_ns: int) -> None:
        index = (seq - 1) // self.messages
        if not 0 <= index < len(self.phases):
            return  # not ours (a leftover of another run cannot be: each run has its own key)
        phase = self.phases[index]
        offset = seq - phase.first
        if phase.seen[offset]:
            phase.duplicates += 1
            return
        phase.seen[offset] = 1
        phase.received += 1
        phase.latencies_us.append((now_ns - sent_ns) // 1000)
        phase.last_ns = now_ns
        phase.last_at = trio.current_time()
        if index == self.current and phase.received == phase.count:
            self._end_phase()

    def _end_phase(self) -> None:
        # CPU first, so that building the report is not counted.
        cpu = cpu_seconds() - self._cpu_mark
        phase = self.phases[self.current]
        report = {
            "phase": phase.name,
            "received": phase.received,
            "lost": phase.count - phase.received,
            "duplicates": phase.duplicates,
            "skipped": self.skipped,
            "reconnects": self.reconnects,
            "reads": self.reads,
            "cpu_s": cpu,
            "last_ns": phase.last_ns,
            "latencies_us": phase.latencies_us,
        }
        print(json.dumps(report), flush=True)
        self.current += 1
        self.reads = self.skipped = self.reconnects = 0
        self._phase_started = trio.current_time()
        self._cpu_mark = cpu_seconds()
        if self.current == len(self.phases):
            self.done.set()

    async def watchdog(self) -> None:
        """End a phase whose messages stopped coming (lost), so that every reader reports."""
        while True:
            await trio.sleep(0.2)
            if self.done.is_set():
                return  # the last phase ended while we slept
            phase = self.phases[self.current]
            now = trio.current_time()
            quiet = phase.received > 0 and now - phase.last_at > QUIET_S
            if quiet or now - self._phase_started > self.phase_timeout:
                self._end_phase()

    def say_ready(self) -> None:
        if not self.ready.is_set():
            self.ready.set()
            # Connecting and subscribing are not per-message costs: count from here.
            self._phase_started = trio.current_time()
            self._cpu_mark = cpu_seconds()
            print(json.dumps({"ready": os.getpid()}), flush=True)


def _fields(entry: StreamEntry) -> Mapping[str, str]:
    # decode_responses=True: coredis's types allow bytes, the values are str.
    return cast("Mapping[str, str]", entry.field_values)


def _deliver(tracker: Tracker, fields: Mapping[str, str], now_ns: int) -> None:
    tracker.record(int(fields["q"]), int(fields["ts"]), now_ns)


async def read_stream(client: coredis.Redis[str], key: str, tracker: Tracker) -> None:
    """The streams transport's reader: XREAD BLOCK from the last id seen; that id is the whole
    recovery state, so a reconnect is just the next XREAD."""
    last_id = "0-0"  # the key is new for each run: everything in it is for us
    await client.ping()
    tracker.say_ready()
    delay = 0.05
    while True:
        try:
            response = await client.xread({key: last_id}, count=BATCH, block=BLOCK_MS)
        except REDIS_ERRORS:
            tracker.reconnects += 1
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)
            continue
        delay = 0.05
        if not response:
            continue
        tracker.reads += 1
        now = time.time_ns()  # one XREAD reply: its entries arrived together
        for entry in response.get(key, ()):
            _deliver(tracker, _fields(entry), now)
            last_id = str(entry.identifier)


async def read_pubsub(client: coredis.Redis[str], key: str, tracker: Tracker) -> None:
    """The pubsub+stream transport's reader, the robust way (docs/design/redis.md): a loop on
    get_message, no coredis retry, an own reconnect loop that replays the gap from the stream."""
    last: tuple[int, int] | None = None
    last_id = ""
    delay = 0.05
    while True:
        try:
            async with client.pubsub(
                channels=[key], ignore_subscribe_messages=True, retry_policy=NoRetryPolicy()
            ) as ps:
                if last is not None:
                    # Messages published while we were away are only in the stream.
                    for entry in await client.xrange(key, "(" + last_id, "+"):
                        _deliver(tracker, _fields(entry), time.time_ns())
                        last_id = str(entry.identifier)
                        last = parse_message_id(last_id)
                tracker.say_ready()
                delay = 0.05
                while True:
                    message = await ps.get_message()
                    if message is None or message["type"] != "message":
                        continue
                    now = time.time_ns()
                    tracker.reads += 1
                    # "<stream id>\n<fields as JSON>": the id is where to resume from the stream.
                    entry_id, _, body = str(message["data"]).partition("\n")
                    position = parse_message_id(entry_id)
                    if last is not None and position <= last:
                        tracker.skipped += 1  # already replayed from the stream
                        continue
                    _deliver(tracker, json.loads(body), now)
                    last_id, last = entry_id, position
        except* REDIS_ERRORS:
            tracker.reconnects += 1
        await trio.sleep(delay)
        delay = min(delay * 2, 1.0)


async def reader_main(transport: str, port: int, key: str, messages: int, phase_s: float) -> None:
    tracker = Tracker(messages, phase_s)
    reader = read_stream if transport == STREAMS else read_pubsub
    # Bounded even if the parent vanished: two phases, and exiting.
    with trio.fail_after(2 * phase_s + READY_TIMEOUT_S + EXIT_TIMEOUT_S):
        async with make_client(port) as client, trio.open_nursery() as nursery:
            nursery.start_soon(reader, client, key, tracker)
            nursery.start_soon(tracker.watchdog)
            await tracker.done.wait()
            nursery.cancel_scope.cancel()


# -- the publisher -----------------------------------------------------------------------------


@dataclass
class Publisher:
    """Publishes batches of messages the way one transport does."""

    client: coredis.Redis[str]
    transport: str
    key: str
    #: SHA1 of XADD_PUBLISH_LUA, loaded for the lua variant.
    script: str = ""

    async def send_batch(self, first: int, count: int) -> None:
        """One publishing round: ``count`` messages from sequence number ``first``."""
        sent = str(time.time_ns())  # stamped as the batch leaves: latency is the transport's
        batch = [
            {"o": ORIGIN, "q": str(seq), "k": "message", "ts": sent, "f": SENDER, "t": TEXT}
            for seq in range(first, first + count)
        ]
        if self.transport == PUBSUB_LUA:
            async with self.client.pipeline(transaction=False) as pipe:
                for fields in batch:
                    flat = [item for pair in fields.items() for item in pair]
                    pipe.evalsha(
                        self.script,
                        [self.key],
                        [str(STREAM_MAXLEN), json.dumps(fields), *flat],
                    )
            return
        async with self.client.pipeline(transaction=False) as pipe:
            ids = [
                pipe.xadd(
                    self.key,
                    fields,
                    trim_strategy=PureToken.MAXLEN,
                    trim_operator=PureToken.APPROXIMATELY,
                    threshold=STREAM_MAXLEN,
                )
                for fields in batch
            ]
        if self.transport == PUBSUB:
            # The ids exist only once the XADD pipeline has run: a second round trip.
            payloads = [
                f"{await entry_id}\n{json.dumps(fields)}"
                for entry_id, fields in zip(ids, batch, strict=True)
            ]
            async with self.client.pipeline(transaction=False) as pipe:
                for payload in payloads:
                    pipe.publish(self.key, payload)


async def publish(publisher: Publisher, mode: str, first: int, args: argparse.Namespace) -> None:
    messages: int = args.messages
    if mode == "flat":
        for offset in range(0, messages, BATCH):
            await publisher.send_batch(first + offset, min(BATCH, messages - offset))
        return
    # Paced: message i is due at start + i / rate; each round sends all that are due (at most
    # BATCH), so a publisher that falls behind catches up in bigger batches, as the server's does.
    start = trio.current_time()
    sent = 0
    while sent < messages:
        due = min(messages, int((trio.current_time() - start) * args.rate) + 1)
        if due <= sent:
            await trio.sleep_until(start + sent / args.rate)
            continue
        count = min(BATCH, due - sent)
        await publisher.send_batch(first + sent, count)
        sent += count


# -- the driver --------------------------------------------------------------------------------


class Lines:
    """JSON lines from a reader process's stdout, each awaited with a timeout."""

    def __init__(self, process: trio.Process) -> None:
        assert process.stdout is not None
        self.stream = process.stdout
        self.buffer = bytearray()

    async def next(self, within_s: float) -> dict[str, Any]:
        with trio.fail_after(within_s):
            while b"\n" not in self.buffer:
                chunk = await self.stream.receive_some(1 << 16)
                if not chunk:
                    raise RuntimeError("a reader exited early (its error is above)")
                self.buffer += chunk
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        result: dict[str, Any] = json.loads(line)
        return result


async def wait_subscribers(client: coredis.Redis[str], channel: str, count: int) -> None:
    """Pub/Sub delivers only to subscribers already there: publish once all have subscribed."""
    with trio.fail_after(READY_TIMEOUT_S):
        # Polling: Redis has no event to wait on for another client's SUBSCRIBE.
        while (await client.pubsub_numsub(channel)).get(channel, 0) < count:  # noqa: ASYNC110
            await trio.sleep(0.02)


async def run_transport(
    transport: str, redis: Server, run: int, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """One run of one transport: start the readers, publish both phases, collect the figures."""
    key = f"bench:{transport}:{os.getpid()}:{run}"
    timeout = args.messages / args.rate + REPORT_MARGIN_S
    argv = [
        sys.executable,
        READER_SCRIPT,
        "--reader",
        transport,
        "--port",
        str(redis.port),
        "--key",
        key,
        "--messages",
        str(args.messages),
        "--phase-timeout",
        str(timeout),
    ]
    processes: list[trio.Process] = []
    results: dict[str, dict[str, Any]] = {}
    try:
        for _ in range(args.readers):
            # One at a time into the list, so that the finally kills those started before a failure.
            process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE)
            processes.append(process)
        lines = [Lines(process) for process in processes]
        for reader in lines:
            await reader.next(READY_TIMEOUT_S)
        async with make_client(redis.port) as client:
            publisher = Publisher(client, transport, key)
            if transport == PUBSUB_LUA:
                publisher.script = await client.script_load(XADD_PUBLISH_LUA)
            if transport != STREAMS:
                await wait_subscribers(client, key, args.readers)
            for index, mode in enumerate(MODES):
                redis_cpu = redis.cpu_s()
                publisher_cpu = cpu_seconds()
                started_ns = time.time_ns()
                started = trio.current_time()
                await publish(publisher, mode, index * args.messages + 1, args)
                publish_s = trio.current_time() - started
                publisher_cpu = cpu_seconds() - publisher_cpu
                reports = [await reader.next(timeout) for reader in lines]
                redis_cpu = redis.cpu_s() - redis_cpu
                assert all(report["phase"] == mode for report in reports), reports
                results[mode] = summarize(
                    reports, args.messages, started_ns, publish_s, publisher_cpu, redis_cpu
                )
            await client.delete([key])
        with trio.fail_after(EXIT_TIMEOUT_S):
            for process in processes:
                if await process.wait() != 0:
                    raise RuntimeError(f"a reader exited with {process.returncode}")
    finally:
        with trio.CancelScope(shield=True):
            for process in processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    return results


def summarize(
    reports: list[dict[str, Any]],
    messages: int,
    started_ns: int,
    publish_s: float,
    publisher_cpu: float,
    redis_cpu: float,
) -> dict[str, Any]:
    latencies = sorted(x for report in reports for x in report["latencies_us"])
    # A reader's rate: what it received over the time from the first send to its last receipt.
    rates = [
        report["received"] / max(1e-9, (report["last_ns"] - started_ns) / 1e9) for report in reports
    ]
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    return {
        "recv_msg_per_s": round(min(rates)),
        "publish_msg_per_s": round(messages / publish_s),
        "latency_p50_ms": None if p50 is None else round(p50 / 1000, 3),
        "latency_p99_ms": None if p99 is None else round(p99 / 1000, 3),
        "latency_max_ms": round(latencies[-1] / 1000, 3) if latencies else None,
        "reader_cpu_us_per_msg": round(
            sum(r["cpu_s"] / max(1, r["received"]) for r in reports) / len(reports) * 1e6, 2
        ),
        "publisher_cpu_us_per_msg": round(publisher_cpu / messages * 1e6, 2),
        "redis_cpu_us_per_msg": round(redis_cpu / messages * 1e6, 2),
        "lost": sum(r["lost"] for r in reports),
        "duplicates": sum(r["duplicates"] for r in reports),
        "skipped_by_id": sum(r["skipped"] for r in reports),
        "reconnects": sum(r["reconnects"] for r in reports),
        # Batching spreads a round trip's fixed client cost (~200 us of CPU with coredis here).
        "messages_per_read": round(
            sum(r["received"] for r in reports) / max(1, sum(r["reads"] for r in reports)), 2
        ),
    }


async def redis_version(port: int) -> str:
    async with make_client(port) as client:
        return str((await client.info("server")).get("redis_version", "?"))


#: Table columns: (JSON key, heading).
COLUMNS = [
    ("recv_msg_per_s", "recv msg/s"),
    ("latency_p50_ms", "p50 ms"),
    ("latency_p99_ms", "p99 ms"),
    ("reader_cpu_us_per_msg", "reader us/msg"),
    ("publisher_cpu_us_per_msg", "publisher us/msg"),
    ("redis_cpu_us_per_msg", "redis us/msg"),
    ("lost", "lost"),
    ("duplicates", "dup"),
]


def _number(value: float) -> str:
    # Three significant digits, never an exponent: 18707, 164, 43.5, 1.67, 0.918.
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _cell(value: Any) -> str:
    if not isinstance(value, dict):
        return str(value)
    if value["min"] == value["max"]:
        return _number(value["median"])
    return f"{_number(value['median'])} ({_number(value['min'])}-{_number(value['max'])})"


def print_table(results: dict[str, dict[str, dict[str, Any]]], runs: int) -> None:
    """Median (min-max) of each figure, one row per transport and mode."""
    rows = [
        [transport, mode, *(_cell(figures[key]) for key, _ in COLUMNS)]
        for transport, modes in results.items()
        for mode, figures in modes.items()
    ]
    heads = ["transport", "mode", *(head for _, head in COLUMNS)]
    widths = [max(len(row[i]) for row in [heads, *rows]) for i in range(len(heads))]
    print(f"\nmedian (min-max) of {runs} runs; latency: paced p50/p99 matter, flat is queueing")
    for row in [heads, *rows]:
        print(
            "  ".join(
                f"{cell:<{width}}" if i < 2 else f"{cell:>{width}}"
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
        )
    print()


async def driver(args: argparse.Namespace) -> dict[str, Any]:
    # Other work on the machine shows in rates and latencies (much less in CPU per message):
    # the load average goes with the figures.
    load_before = os.getloadavg()[0]
    with redis_server() as redis:
        version = await redis_version(redis.port)
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            t: {m: [] for m in MODES} for t in args.transports
        }
        for run in range(args.runs):
            # Alternate the order too: whichever goes first in a run gets a slightly idler box.
            order = args.transports if run % 2 == 0 else list(reversed(args.transports))
            for transport in order:
                started = time.monotonic()
                figures = await run_transport(transport, redis, run, args)
                for mode in MODES:
                    runs[transport][mode].append(figures[mode])
                print(
                    f"run {run + 1}/{args.runs} {transport:14} ({time.monotonic() - started:.1f}s, "
                    f"load {os.getloadavg()[0]:.1f}) "
                    + "  ".join(
                        f"{mode}: {figures[mode]['recv_msg_per_s']} msg/s "
                        f"p99 {figures[mode]['latency_p99_ms']} ms "
                        f"lost {figures[mode]['lost']} dup {figures[mode]['duplicates']}"
                        for mode in MODES
                    ),
                    flush=True,
                )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "settings": {
            "messages": args.messages,
            "readers": args.readers,
            "runs": args.runs,
            "rate": args.rate,
            "batch": BATCH,
            "block_ms": BLOCK_MS,
            "stream_maxlen": STREAM_MAXLEN,
            "text_bytes": len(TEXT),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "redis": version,
            "coredis": coredis.__version__,
            "trio": trio.__version__,
            "loadavg_1m_before": load_before,
            "loadavg_1m_after": os.getloadavg()[0],
        },
        "results": {t: {m: aggregate(runs[t][m]) for m in MODES} for t in args.transports},
        "runs_raw": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000, help="per mode (default 20000)")
    parser.add_argument("--readers", type=int, default=2, help="reader processes (default 2)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=2000, help="paced mode, messages a second")
    parser.add_argument("--transports", nargs="+", default=DEFAULT_TRANSPORTS, choices=TRANSPORTS)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "broker_transport.json"))
    # Reader mode: this file started by the driver as one "server process".
    parser.add_argument("--reader", choices=TRANSPORTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--phase-timeout", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.messages < 1 or args.readers < 1 or args.runs < 1 or args.rate <= 0:
        parser.error("--messages, --readers, --runs and --rate must be positive")
    if args.reader:
        trio.run(reader_main, args.reader, args.port, args.key, args.messages, args.phase_timeout)
        return
    report = trio.run(driver, args)
    print_table(report["results"], args.runs)
    machine = report["machine"]
    print(
        f"{machine['cpus']} CPUs, load average {machine['loadavg_1m_before']:.1f} before and "
        f"{machine['loadavg_1m_after']:.1f} after; redis {machine['redis']}, "
        f"coredis {machine['coredis']}, trio {machine['trio']}"
    )
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {path}")
    failed = [
        f"{transport} {mode}: lost {run['lost']}, duplicated {run['duplicates']}"
        for transport, modes in report["runs_raw"].items()
        for mode, runs in modes.items()
        for run in runs
        if run["lost"] or run["duplicates"]
    ]
    if failed:
        # Without a reconnect nothing may go missing or twice: the figures are not to be trusted.
        raise SystemExit("lost or duplicated messages:\n" + "\n".join(failed))


if __name__ == "__main__":
    main()
