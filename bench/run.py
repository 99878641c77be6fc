"""Benchmark driver: trio_ws and reference servers side by side, in one run, on loopback.

    python bench/run.py                      # every server, every scenario, 3 runs each
    python bench/run.py --servers trio_ws --scenarios fanout100 --runs 1
    python bench/run.py --servers trio_ws trio_ws+redis --scenarios fanout1000 cluster1000
    python bench/run.py --scenarios handshakes idle storm \
        --servers trio_ws asgi_floor fastapi websockets node --runs 3

``trio_ws+redis`` is trio_ws with its Redis broker (a redis-server this script starts on a free
port); ``cluster1000`` runs two such instances, the publisher on one and the receivers split
over both, and adds up both servers' CPU (Redis's own CPU is reported apart).

The runs are interleaved (rounds outer, scenarios, then servers inner), and each figure is the
median of ``--runs`` runs, with min and max; the table is printed in markdown. Server CPU is
read from ``/proc/<pid>/stat`` (user + system time) around the measured phase and divided by the
deliveries, which is steady on a noisy machine where wall-clock rates are not. The load
generator's own CPU is reported too, so one can see it is not the bottleneck.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import Publisher, connect, percentile  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: A closed loop that makes no progress for this long counts as stalled.
STALL_S = 10.0
LOADGEN = [sys.executable, str(ROOT / "bench" / "loadgen.py")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


#: ``ServerKind.env`` values equal to this are replaced with the shared Redis's URL.
REDIS_URL = "{redis}"
#: ``ServerKind.env`` values equal to this are replaced with a free port.
FREE_PORT = "{free_port}"


@dataclass(frozen=True)
class ServerKind:
    name: str
    argv: Callable[[int], list[str]]
    env: dict[str, str]
    #: The server's working directory (``python -m`` imports from it first); None: this tree.
    cwd: Path | None = None
    #: Whether the server sends a frame on connect (trio_ws's welcome; the peers send none).
    welcome: bool = False
    #: Changes to ``env`` for the ``idle`` scenario (None removes a variable): trio_ws is
    #: measured idle as it is deployed, with its pings on.
    idle_env: dict[str, str | None] = field(default_factory=dict)
    #: trio_ws only: the launcher flags for ``storm`` (bench/storm.py starts the instances).
    storm_args: tuple[str, ...] | None = None


#: Every server listens with the queue trio_ws's launcher asks for (hosting/launcher.py), so
#: that ``idle`` (5,000 connects at once) compares servers, not listen queues: with Hypercorn's
#: default of 100, the kernel drops SYNs and each costs its client a 1 s retransmission.
BACKLOG = "4096"


def _hypercorn(port: int, peer: str) -> list[str]:
    """A reference app from bench/peers/ under Hypercorn's trio worker, in process."""
    return [
        sys.executable,
        "-m",
        "hypercorn",
        "-k",
        "trio",
        "-w",
        "0",
        "--backlog",
        BACKLOG,
        "-b",
        f"127.0.0.1:{port}",
        f"bench.peers.{peer}:app",
    ]


NODE_PEER = ROOT / "bench" / "peers" / "node"

#: What every trio_ws of the benchmark shares: no periodic message, no pings (the receivers do
#: not answer them), quiet logs, and an exit as soon as asked.
TRIO_WS_ENV = {
    "TRIO_WS_PING_INTERVAL": "0",
    "TRIO_WS_BROADCAST_INTERVAL": "0",
    "TRIO_WS_LOG_LEVEL": "WARNING",
    "TRIO_WS_DRAIN_TIMEOUT": "0",
}
#: The publisher sends as fast as the server takes it: no per-connection publish limit
#: (docs/benchmarks.md).
LIMITS_OFF = {"TRIO_WS_PUBLISH_RATE": "0", "TRIO_WS_PUBLISH_BYTES_RATE": "0"}
#: ``trio_ws+limits``: the limits on, but far above what the publisher sends, so the limit code
#: runs for every message and never throttles (issue #10: their cost against ``trio_ws``).
LIMITS_RAISED = {
    "TRIO_WS_PUBLISH_RATE": "1000000",
    "TRIO_WS_PUBLISH_BURST": "1000000",
    "TRIO_WS_PUBLISH_BYTES_RATE": "1000000000",
}
#: idle: trio_ws with its default pings (every 20 s; docs/benchmarks.md on what the window sees).
TRIO_WS_IDLE_ENV: dict[str, str | None] = {"TRIO_WS_PING_INTERVAL": None}


def _trio_ws(port: int) -> list[str]:
    return [sys.executable, "-m", "trio_ws", "--port", str(port)]


def _flags(env: dict[str, str]) -> tuple[str, ...]:
    """``TRIO_WS_PUBLISH_RATE=0`` as ``--publish-rate 0``: bench/storm.py passes flags."""
    out: list[str] = []
    for key, value in env.items():
        out += ["--" + key.removeprefix("TRIO_WS_").lower().replace("_", "-"), value]
    return tuple(out)


SERVERS = {
    "trio_ws": ServerKind(
        "trio_ws",
        _trio_ws,
        {**TRIO_WS_ENV, **LIMITS_OFF},
        welcome=True,
        idle_env=TRIO_WS_IDLE_ENV,
        storm_args=_flags(LIMITS_OFF),
    ),
    "trio_ws+limits": ServerKind(
        "trio_ws+limits",
        _trio_ws,
        {**TRIO_WS_ENV, **LIMITS_RAISED},
        welcome=True,
        idle_env=TRIO_WS_IDLE_ENV,
        storm_args=_flags(LIMITS_RAISED),
    ),
    # The log lines per connection (TRIO_WS_LOG_CONNECTIONS): trio_ws at INFO, as deployed, with
    # a line per connect and disconnect, and with the summary instead.
    "trio_ws+info": ServerKind(
        "trio_ws+info",
        _trio_ws,
        {**TRIO_WS_ENV, **LIMITS_OFF, "TRIO_WS_LOG_LEVEL": "INFO"},
        welcome=True,
        idle_env=TRIO_WS_IDLE_ENV,
        storm_args=(*_flags(LIMITS_OFF), "--log-connections", "each"),
    ),
    "trio_ws+summary": ServerKind(
        "trio_ws+summary",
        _trio_ws,
        {
            **TRIO_WS_ENV,
            **LIMITS_OFF,
            "TRIO_WS_LOG_LEVEL": "INFO",
            "TRIO_WS_LOG_CONNECTIONS": "summary",
        },
        welcome=True,
        idle_env=TRIO_WS_IDLE_ENV,
        storm_args=(*_flags(LIMITS_OFF), "--log-connections", "summary"),
    ),
    "trio_ws+redis": ServerKind(
        "trio_ws+redis",
        _trio_ws,
        {**TRIO_WS_ENV, **LIMITS_OFF, "TRIO_WS_REDIS_URL": REDIS_URL},
        welcome=True,
        idle_env=TRIO_WS_IDLE_ENV,
    ),
    # trio_ws with /metrics served (nobody scrapes during the run): what counting costs.
    "trio_ws+metrics": ServerKind(
        "trio_ws+metrics",
        lambda port: [sys.executable, "-m", "trio_ws", "--port", str(port)],
        {
            "TRIO_WS_PING_INTERVAL": "0",
            "TRIO_WS_BROADCAST_INTERVAL": "0",
            "TRIO_WS_LOG_LEVEL": "WARNING",
            "TRIO_WS_DRAIN_TIMEOUT": "0",
            "TRIO_WS_PUBLISH_RATE": "0",
            "TRIO_WS_PUBLISH_BYTES_RATE": "0",
            "TRIO_WS_METRICS_PORT": FREE_PORT,
        },
        welcome=True,
    ),
    "fastapi": ServerKind(
        "fastapi",
        lambda port: [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.peers.fastapi_server:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--ws-ping-interval",
            "3600",
            "--backlog",
            BACKLOG,
        ],
        {},
    ),
    # Floors of the stack (idle, handshakes): what Hypercorn alone, and Quart-Trio on it, cost.
    "asgi_floor": ServerKind("asgi_floor", lambda port: _hypercorn(port, "asgi_floor"), {}),
    "quart_floor": ServerKind("quart_floor", lambda port: _hypercorn(port, "quart_floor"), {}),
    "websockets": ServerKind(
        "websockets",
        lambda port: [
            sys.executable,
            str(ROOT / "bench" / "peers" / "websockets_server.py"),
            str(port),
            BACKLOG,
        ],
        {},
    ),
    # Node's ws: ``(cd bench/peers/node && npm install)`` first (docs/benchmarks.md).
    "node": ServerKind(
        "node", lambda port: ["node", str(NODE_PEER / "server.js"), str(port), BACKLOG], {}
    ),
}
#: Earlier names of some servers, still accepted by ``--servers``.
ALIASES = {
    "asgi-floor": "asgi_floor",
    "quart-floor": "quart_floor",
    "fastapi+uvicorn": "fastapi",
}


_redis: Server | None = None


def shared_redis() -> int:
    """The port of the one redis-server this run uses (started on first use, nothing on disk)."""
    global _redis
    if _redis is None:
        stack = contextlib.ExitStack()
        atexit.register(stack.close)
        _redis = stack.enter_context(redis_server())
    return _redis.port


def redis_cpu_s() -> float:
    return _redis.cpu_s() if _redis is not None else 0.0


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_for_port(port: int, process: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"{name} did not start") from None
            time.sleep(0.05)


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int

    def cpu_s(self) -> float:
        return process_cpu_s(self.process.pid)

    def memory_kb(self, field: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise LookupError(field)


@contextmanager
def redis_server() -> Iterator[Server]:
    """A private redis-server on a free loopback port, without persistence; stopped by PID."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH")
    with tempfile.TemporaryDirectory(prefix="trio_ws-bench-") as tmp:
        port = free_port()
        log = Path(tmp) / "redis.log"
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                tmp,
                "--logfile",
                str(log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30.0
            while not _answers_ping(port):
                if time.monotonic() > deadline or process.poll() is not None:
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    raise RuntimeError(f"redis-server did not start:\n{tail}")
                time.sleep(0.05)
            yield Server(process, port)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10.0)


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def running(kind: ServerKind, changes: dict[str, str | None] | None = None) -> Iterator[Server]:
    """``kind`` on a free loopback port; ``changes`` to its environment (None: unset)."""
    port = free_port()
    env = {
        key: f"redis://127.0.0.1:{shared_redis()}/0" if value == REDIS_URL else value
        for key, value in kind.env.items()
    }
    env = {key: str(free_port()) if value == FREE_PORT else value for key, value in env.items()}
    full = {**os.environ, **env}
    for key, value in (changes or {}).items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    process = subprocess.Popen(
        kind.argv(port),
        cwd=kind.cwd or ROOT,
        env=full,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process, kind.name)
        yield Server(process, port)
    finally:
        process.kill()
        process.wait(timeout=10)


def start_receivers(
    server: Server, total: int, expect: int, processes: int, prefix: str = ""
) -> list[subprocess.Popen[str]]:
    procs = []
    per = [total // processes + (1 if i < total % processes else 0) for i in range(processes)]
    for i, count in enumerate(per):
        procs.append(
            subprocess.Popen(
                [
                    *LOADGEN,
                    "receive",
                    "--port",
                    str(server.port),
                    "--connections",
                    str(count),
                    "--expect",
                    str(expect),
                    "--prefix",
                    f"{prefix}p{i}-",
                    "--timeout",
                    "120",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"receiver failed to start: {line!r}")
    return procs


def collect(procs: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=180)
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def summarize(
    results: list[dict[str, Any]], published: int, started_ns: int, server_cpu: float
) -> dict[str, Any]:
    received = sum(r["received"] for r in results)
    deliveries = received + published  # the publisher gets its own messages too
    latencies = sorted(x for r in results for x in r["latency_sample_ns"])
    last = max(r["last_ns"] for r in results)
    elapsed = (last - started_ns) / 1e9
    return {
        "deliveries_per_s": round(deliveries / elapsed),
        "lost": sum(r["lost"] for r in results),
        "duplicates": sum(r["duplicates"] for r in results),
        "closed_by_server": sum(r["closed_by_server"] for r in results),
        "latency_p50_ms": round(percentile(latencies, 0.5) / 1e6, 2),
        "latency_p99_ms": round(percentile(latencies, 0.99) / 1e6, 2),
        "server_cpu_us_per_delivery": round(server_cpu / deliveries * 1e6, 2),
        "loadgen_cpu_us_per_delivery": round(
            sum(r["cpu_s"] for r in results) / deliveries * 1e6, 2
        ),
    }


def closed_loop(publisher: Publisher, messages: int, window: int, size: int) -> None:
    """Send ``messages``, keeping ``window`` in flight (counted by the publisher's echoes)."""
    for seq in range(1, messages + 1):
        if seq > window:
            publisher.wait_echo(seq - window)
        publisher.send(seq, size)
    publisher.wait_echo(messages)


def fanout(
    kind: ServerKind, receivers: int, messages: int, window: int = 16, size: int = 64
) -> dict[str, Any]:
    """Closed loop: one publisher keeps ``window`` messages in flight (by its own echoes)."""
    with running(kind) as server:
        procs = start_receivers(server, receivers, messages, processes=2 if receivers > 200 else 1)
        publisher = Publisher("127.0.0.1", server.port, "/ws/publisher")
        cpu0 = server.cpu_s()
        started = time.monotonic_ns()
        closed_loop(publisher, messages, window, size)
        results = collect(procs)
        cpu = server.cpu_s() - cpu0
        publisher.close()
    return summarize(results, messages, started, cpu)


def fanout_cluster(
    kind: ServerKind, receivers: int, messages: int, window: int = 16, size: int = 64
) -> dict[str, Any]:
    """``fanout`` across two instances: the publisher on the first, receivers split over both.

    Server CPU is both instances' together; Redis's CPU is reported apart.
    """
    with running(kind) as first, running(kind) as second:
        procs = start_receivers(first, receivers // 2, messages, processes=1, prefix="a")
        procs += start_receivers(second, receivers - receivers // 2, messages, 1, prefix="b")
        publisher = Publisher("127.0.0.1", first.port, "/ws/publisher")
        cpu0 = first.cpu_s() + second.cpu_s()
        redis0 = redis_cpu_s()
        started = time.monotonic_ns()
        closed_loop(publisher, messages, window, size)
        results = collect(procs)
        cpu = first.cpu_s() + second.cpu_s() - cpu0
        redis_cpu = redis_cpu_s() - redis0
        publisher.close()
    summary = summarize(results, messages, started, cpu)
    deliveries = sum(r["received"] for r in results) + messages
    summary["redis_cpu_us_per_message"] = round(redis_cpu / messages * 1e6, 2)
    summary["redis_cpu_us_per_delivery"] = round(redis_cpu / deliveries * 1e6, 3)
    return summary


def fixed_rate(
    kind: ServerKind, receivers: int = 1000, rate: float = 20, seconds: float = 10
) -> dict[str, Any]:
    """An open loop: ``rate`` messages a second to ``receivers`` clients; latency is the point."""
    messages = int(rate * seconds)
    with running(kind) as server:
        procs = start_receivers(server, receivers, messages, processes=2)
        publisher = Publisher("127.0.0.1", server.port, "/ws/publisher")
        cpu0 = server.cpu_s()
        started = time.monotonic_ns()
        for seq in range(1, messages + 1):
            due = started / 1e9 + seq / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            publisher.send(seq, 64)
        publisher.wait_echo(messages)
        results = collect(procs)
        cpu = server.cpu_s() - cpu0
        publisher.close()
    return summarize(results, messages, started, cpu)


def idle_connections(kind: ServerKind, count: int = 5000) -> dict[str, Any]:
    with running(kind) as server:
        time.sleep(0.5)
        before = server.memory_kb()
        procs = [
            subprocess.Popen(
                [
                    *LOADGEN,
                    "idle",
                    "--port",
                    str(server.port),
                    "--connections",
                    str(count // 2),
                    "--prefix",
                    f"i{i}-",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        times: list[float] = []
        for proc in procs:
            assert proc.stdout is not None
            times += json.loads(proc.stdout.readline())["connect_ms"]
        time.sleep(1)
        after = server.memory_kb()
        for proc in procs:
            proc.communicate(timeout=30)
    times.sort()
    return {
        "rss_kb_per_connection": round((after - before) / count, 2),
        "connect_p50_ms": round(percentile(times, 0.5), 2),
        "connect_p99_ms": round(percentile(times, 0.99), 2),
    }


#: ``idle``: how long the server's CPU is read once every client is connected (and settled).
IDLE_WINDOW_S = 5.0
IDLE_SETTLE_S = 1.0


def idle_at_once(kind: ServerKind, count: int = 5000, processes: int = 2) -> dict[str, Any]:
    """``count`` clients start connecting at the same moment (``processes`` load generators,
    every connect of each started at once), then sit idle: RSS per connection, connect p50/p99
    (TCP connect to 101), and the server's CPU over ``IDLE_WINDOW_S`` while they are idle.

    trio_ws runs as deployed here, with its pings on (``ServerKind.idle_env``).
    """
    with running(kind, kind.idle_env) as server:
        time.sleep(0.5)
        before = server.memory_kb()
        per = [count // processes + (1 if i < count % processes else 0) for i in range(processes)]
        procs = [
            subprocess.Popen(
                [
                    *LOADGEN,
                    "idle",
                    "--at-once",
                    "--port",
                    str(server.port),
                    "--connections",
                    str(n),
                    "--prefix",
                    f"i{i}-",
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i, n in enumerate(per)
        ]
        times: list[float] = []
        failed = 0
        try:
            for proc in procs:
                assert proc.stdout is not None
                report = json.loads(proc.stdout.readline())
                times += report["connect_ms"]
                failed += report["failed"]
            time.sleep(IDLE_SETTLE_S)
            after = server.memory_kb()
            cpu0 = server.cpu_s()
            time.sleep(IDLE_WINDOW_S)
            idle_cpu = server.cpu_s() - cpu0
        finally:
            for proc in procs:
                proc.communicate(timeout=30)
    times.sort()
    connected = len(times)
    return {
        "rss_kb_per_connection": round((after - before) / max(1, connected), 2),
        "connect_p50_ms": round(percentile(times, 0.5), 1) if times else None,
        "connect_p99_ms": round(percentile(times, 0.99), 1) if times else None,
        "idle_cpu_pct": round(idle_cpu / IDLE_WINDOW_S * 100, 2),
        "connected": connected,
        "failed": failed,
    }


def reconnect_storm(kind: ServerKind, clients: int = 1000) -> dict[str, Any]:
    """bench/storm.py, kept short: ``clients`` on instance A (a launcher, Redis shared with B),
    SIGTERM to A with a 6 s drain, every client back on B with the page's policy (leave within
    half the time left, then full-jitter backoff). trio_ws only."""
    import trio

    from bench import storm

    assert kind.storm_args is not None
    config = storm.StormConfig(
        clients=clients,
        rate=2.0,
        policy="page",
        warmup_s=1.0,
        bound_s=30.0,
        post_s=1.0,
        drain_timeout_s=6.0,
        instance_args=kind.storm_args,
    )
    result = trio.run(storm.run_storm, config)
    cpu = result.b_cpu
    return {
        "all_back_s": result.back_s.get("max"),
        "back_p50_s": result.back_s.get("p50"),
        "connect_p99_ms": _ms(result.connect_latency_s.get("p99")),
        "b_cpu_s": cpu.get("total_s"),
        "b_cpu_ms_per_reconnect": cpu.get("per_reconnect_ms_gross"),
        "b_cpu_pct_of_core": round(cpu["total_s"] / cpu["window_s"] * 100, 1)
        if cpu.get("total_s") is not None and cpu.get("window_s")
        else None,
        "never_back": result.never_back,
        "lost": result.lost["total"],
        "duplicated": result.duplicated["total"],
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def handshakes(
    kind: ServerKind, clients: int = 64, seconds: float = 4, processes: int = 2
) -> dict[str, Any]:
    """``clients`` raw-socket clients, each in a closed loop for ``seconds``: upgrade, 101, the
    welcome frame (if the server sends one), close frame, the server's close frame, again.

    Server CPU is over the whole window, from before the clients start to after they stop.
    """
    with running(kind) as server:
        time.sleep(0.5)
        per = [
            clients // processes + (1 if i < clients % processes else 0) for i in range(processes)
        ]
        cpu0 = server.cpu_s()
        procs = [
            subprocess.Popen(
                [
                    *LOADGEN,
                    "handshake",
                    "--port",
                    str(server.port),
                    "--connections",
                    str(count),
                    "--seconds",
                    str(seconds),
                    "--welcome" if kind.welcome else "--no-welcome",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            for count in per
        ]
        results = collect(procs)
        cpu = server.cpu_s() - cpu0
    done = sum(r["handshakes"] for r in results)
    latencies = sorted(x for r in results for x in r["latency_sample_ns"])
    elapsed = max(r["elapsed_s"] for r in results)
    errors: dict[str, int] = {}
    for result in results:
        for name, count in result["errors"].items():
            errors[name] = errors.get(name, 0) + count
    return {
        "handshakes_per_s": round(done / elapsed),
        "server_cpu_us_per_handshake": round(cpu / max(1, done) * 1e6, 1),
        "loadgen_cpu_us_per_handshake": round(
            sum(r["cpu_s"] for r in results) / max(1, done) * 1e6, 1
        ),
        "handshake_p50_ms": round(percentile(latencies, 0.5) / 1e6, 2) if latencies else None,
        "handshake_p99_ms": round(percentile(latencies, 0.99) / 1e6, 2) if latencies else None,
        "handshakes": done,
        "failed": sum(r["failed"] for r in results),
        "errors": ", ".join(f"{name} {count}" for name, count in sorted(errors.items())) or "none",
    }


def slow_client(
    kind: ServerKind, healthy: int = 100, messages: int = 2000, size: int = 4096
) -> dict[str, Any]:
    """``healthy`` receivers and one client that never reads; compare with a run without it."""

    def run(with_slow: bool) -> tuple[dict[str, Any] | None, int]:
        with running(kind) as server:
            procs = start_receivers(server, healthy, messages, processes=2)
            stuck = None
            if with_slow:
                stuck, _ = connect("127.0.0.1", server.port, "/ws/never-reads")
                stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            publisher = Publisher("127.0.0.1", server.port, "/ws/publisher")
            cpu0 = server.cpu_s()
            started = time.monotonic_ns()
            try:
                for seq in range(1, messages + 1):
                    if seq > 16:
                        publisher.wait_echo(seq - 16, timeout=STALL_S)
                    publisher.send(seq, size)
                publisher.wait_echo(messages, timeout=STALL_S)
            except (TimeoutError, ConnectionError):
                # The server stopped serving everyone (a sequential broadcast waiting on the
                # client that never reads): that is the result.
                for proc in procs:
                    proc.kill()
                    proc.wait()
                return None, server.memory_kb("VmHWM")
            results = collect(procs)
            cpu = server.cpu_s() - cpu0
            peak = server.memory_kb("VmHWM")
            publisher.close()
            if stuck is not None:
                stuck.close()
        return summarize(results, messages, started, cpu), peak

    base, base_peak = run(False)
    slow, slow_peak = run(True)
    assert base is not None
    if slow is None:
        return {
            "healthy_rate_ratio": 0.0,
            "lost": None,
            "peak_rss_mb": round(slow_peak / 1024, 1),
            "peak_rss_mb_without_slow": round(base_peak / 1024, 1),
            "stalled": f"everyone stalled for {STALL_S}s",
        }
    return {
        "healthy_rate_ratio": round(slow["deliveries_per_s"] / base["deliveries_per_s"], 3),
        "lost": slow["lost"],
        "healthy_closed_by_server": slow["closed_by_server"],
        "lost_without_slow": base["lost"],
        "peak_rss_mb": round(slow_peak / 1024, 1),
        "peak_rss_mb_without_slow": round(base_peak / 1024, 1),
    }


#: The servers a plain run compares (the floors only make sense with idle and handshakes).
BROADCASTERS = ["trio_ws", "trio_ws+redis", "fastapi", "websockets"]

SCENARIOS: dict[str, Callable[[ServerKind], dict[str, Any]]] = {
    "fanout100": lambda kind: fanout(kind, 100, 3000),
    "fanout1000": lambda kind: fanout(kind, 1000, 500),
    "rate1000x20": lambda kind: fixed_rate(kind),
    "idle5000": lambda kind: idle_connections(kind),
    "idle": lambda kind: idle_at_once(kind),
    "handshakes": lambda kind: handshakes(kind),
    "storm": lambda kind: reconnect_storm(kind),
    "slow_client": lambda kind: slow_client(kind),
    "cluster1000": lambda kind: fanout_cluster(kind, 1000, 500),
}
#: What a plain run does (``idle`` and ``storm`` are asked for by name: issue #13's table).
DEFAULT_SCENARIOS = [
    "fanout100",
    "fanout1000",
    "rate1000x20",
    "idle5000",
    "handshakes",
    "slow_client",
    "cluster1000",
]

#: Scenarios that need a broker: run only with the servers that have one.
CLUSTER_SCENARIOS = {"cluster1000"}
WITH_BROKER = {"trio_ws+redis"}


def applies(scenario: str, name: str) -> bool:
    """Whether ``scenario`` runs with server ``name`` (``storm`` needs trio_ws's drain)."""
    if scenario in CLUSTER_SCENARIOS:
        return name in WITH_BROKER
    if scenario == "storm":
        return SERVERS[name].storm_args is not None
    return True


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [run.get(key) for run in runs]
        numbers = [v for v in values if isinstance(v, (int, float))]
        if len(numbers) == len(values):
            out[key] = {
                "median": statistics.median(numbers),
                "min": min(numbers),
                "max": max(numbers),
            }
        else:
            out[key] = values
    return out


#: The figures the table shows for each scenario (the JSON has them all).
HEADLINES = {
    "fanout100": ["server_cpu_us_per_delivery", "deliveries_per_s", "latency_p99_ms", "lost"],
    "fanout1000": ["server_cpu_us_per_delivery", "deliveries_per_s", "latency_p99_ms", "lost"],
    "rate1000x20": ["latency_p50_ms", "latency_p99_ms", "server_cpu_us_per_delivery", "lost"],
    "idle5000": ["rss_kb_per_connection", "connect_p99_ms"],
    "idle": [
        "rss_kb_per_connection",
        "connect_p50_ms",
        "connect_p99_ms",
        "idle_cpu_pct",
        "failed",
    ],
    "handshakes": [
        "handshakes_per_s",
        "server_cpu_us_per_handshake",
        "cpu_vs_asgi_floor",
        "handshake_p99_ms",
        "failed",
    ],
    "storm": [
        "all_back_s",
        "connect_p99_ms",
        "b_cpu_ms_per_reconnect",
        "b_cpu_pct_of_core",
        "never_back",
        "lost",
    ],
    "slow_client": ["healthy_rate_ratio", "peak_rss_mb", "lost", "healthy_closed_by_server"],
    "cluster1000": ["server_cpu_us_per_delivery", "latency_p99_ms", "lost", "duplicates"],
}

#: Figures divided by the floor's in the same run (paired, then the median of the ratios).
FLOOR = "asgi_floor"
RATIOS = {
    ("handshakes", "cpu_vs_asgi_floor"): "server_cpu_us_per_handshake",
    ("idle", "connect_p99_vs_asgi_floor"): "connect_p99_ms",
}


def add_floor_ratios(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    """Each run's figure over the floor's of the same run, where both ran."""
    for (scenario, ratio), key in RATIOS.items():
        servers = runs.get(scenario, {})
        floor = servers.get(FLOOR, [])
        for figures_list in servers.values():
            for figures, floor_figures in zip(figures_list, floor, strict=False):
                mine, theirs = figures.get(key), floor_figures.get(key)
                if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) and theirs:
                    figures[ratio] = round(mine / theirs, 3)


def _number(value: float) -> str:
    """Four significant digits, and thousands as 12,345 rather than 1.234e+04."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _cell(value: Any) -> str:
    if isinstance(value, dict):
        median, low, high = value["median"], value["min"], value["max"]
        if low == high:
            return _number(median)
        return f"{_number(median)} ({_number(low)}-{_number(high)})"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return "-" if value is None else str(value)


def print_table(results: dict[str, dict[str, Any]], runs: int) -> None:
    """A markdown table: one row per scenario and figure, one column per server; each cell the
    median (min-max) of the runs."""
    servers = list(dict.fromkeys(name for by in results.values() for name in by))
    print()
    print(f"median (min-max) of {runs} runs")
    print()
    print("| scenario | figure | " + " | ".join(servers) + " |")
    print("|---|---|" + "---|" * len(servers))
    for scenario, by_server in results.items():
        keys = list(HEADLINES.get(scenario, []))
        for key in keys:
            if not any(key in figures for figures in by_server.values()):
                continue
            cells = [
                _cell(by_server[name].get(key)) if name in by_server else "" for name in servers
            ]
            print(f"| {scenario} | {key} | " + " | ".join(cells) + " |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", nargs="+", default=BROADCASTERS, choices=[*SERVERS, *ALIASES])
    parser.add_argument(
        "--scenarios", nargs="+", default=DEFAULT_SCENARIOS, choices=list(SCENARIOS)
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=60,
        help="start no new round of runs after this long (the rounds done are reported)",
    )
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "latest.json"))
    args = parser.parse_args()
    names = list(dict.fromkeys(ALIASES.get(name, name) for name in args.servers))
    needs_redis = WITH_BROKER & set(names) or "storm" in args.scenarios
    if needs_redis and shutil.which("redis-server") is None:
        parser.error(
            "redis-server is not installed: trio_ws+redis and storm need it (Debian: "
            "apt-get install redis-server), or leave them out"
        )
    if "node" in names and not (NODE_PEER / "node_modules" / "ws").is_dir():
        parser.error("node's ws is not installed: (cd bench/peers/node && npm install)")
    # Interleaved: each round runs every scenario on every server, so that a noisy minute on a
    # shared machine falls on all of them alike rather than on one server's runs.
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    started = time.monotonic()
    done = 0
    for round_ in range(1, args.runs + 1):
        if round_ > 1 and time.monotonic() - started > args.max_minutes * 60:
            print(f"stopped after {done} rounds: --max-minutes {args.max_minutes:g}", flush=True)
            break
        for scenario in args.scenarios:
            for name in names:
                if not applies(scenario, name):
                    continue
                figures = SCENARIOS[scenario](SERVERS[name])
                runs.setdefault(scenario, {}).setdefault(name, []).append(figures)
                print(
                    f"run {round_} {scenario:12} {name:16} "
                    + "  ".join(f"{key}={value}" for key, value in figures.items()),
                    flush=True,
                )
        done = round_
    add_floor_ratios(runs)
    results = {
        scenario: {name: aggregate(figures) for name, figures in by.items()}
        for scenario, by in runs.items()
    }
    print_table(results, done)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "runs": done,
                "servers": names,
                "results": results,
                "each_run": runs,
            },
            indent=2,
        )
    )
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
