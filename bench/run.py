"""Benchmark driver: trio_ws and reference servers side by side, in one run, on loopback.

    python bench/run.py                      # every server, every scenario, 3 runs each
    python bench/run.py --servers trio_ws --scenarios fanout100 --runs 1
    python bench/run.py --servers trio_ws trio_ws+redis --scenarios fanout1000 cluster1000

``trio_ws+redis`` is trio_ws with its Redis broker (a redis-server this script starts on a free
port); ``cluster1000`` runs two such instances, the publisher on one and the receivers split
over both, and adds up both servers' CPU (Redis's own CPU is reported apart).

Each figure is the median of ``--runs`` runs, with min and max. Server CPU is read from
``/proc/<pid>/stat`` (user + system time) around the measured phase and divided by the
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
from dataclasses import dataclass
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
        "-b",
        f"127.0.0.1:{port}",
        f"bench.peers.{peer}:app",
    ]


SERVERS = {
    "trio_ws": ServerKind(
        "trio_ws",
        lambda port: [sys.executable, "-m", "trio_ws", "--port", str(port)],
        {
            "TRIO_WS_PING_INTERVAL": "0",
            "TRIO_WS_BROADCAST_INTERVAL": "0",
            "TRIO_WS_LOG_LEVEL": "WARNING",
            "TRIO_WS_DRAIN_TIMEOUT": "0",
            # The publisher sends as fast as the server takes it: no per-connection publish
            # limit (docs/benchmarks.md).
            "TRIO_WS_PUBLISH_RATE": "0",
            "TRIO_WS_PUBLISH_BYTES_RATE": "0",
        },
        welcome=True,
    ),
    "trio_ws+redis": ServerKind(
        "trio_ws+redis",
        lambda port: [sys.executable, "-m", "trio_ws", "--port", str(port)],
        {
            "TRIO_WS_PING_INTERVAL": "0",
            "TRIO_WS_BROADCAST_INTERVAL": "0",
            "TRIO_WS_LOG_LEVEL": "WARNING",
            "TRIO_WS_DRAIN_TIMEOUT": "0",
            # The publisher sends as fast as the server takes it: no per-connection publish
            # limit (docs/benchmarks.md).
            "TRIO_WS_PUBLISH_RATE": "0",
            "TRIO_WS_PUBLISH_BYTES_RATE": "0",
            "TRIO_WS_REDIS_URL": REDIS_URL,
        },
        welcome=True,
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
    "fastapi+uvicorn": ServerKind(
        "fastapi+uvicorn",
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
        ],
        {},
    ),
    # Floors of the stack (idle5000, handshakes): what Hypercorn alone, and Quart-Trio on it, cost.
    "asgi-floor": ServerKind("asgi-floor", lambda port: _hypercorn(port, "asgi_floor"), {}),
    "quart-floor": ServerKind("quart-floor", lambda port: _hypercorn(port, "quart_floor"), {}),
    "websockets": ServerKind(
        "websockets",
        lambda port: [
            sys.executable,
            str(ROOT / "bench" / "peers" / "websockets_server.py"),
            str(port),
        ],
        {},
    ),
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
def running(kind: ServerKind) -> Iterator[Server]:
    port = free_port()
    env = {
        key: f"redis://127.0.0.1:{shared_redis()}/0" if value == REDIS_URL else value
        for key, value in kind.env.items()
    }
    env = {key: str(free_port()) if value == FREE_PORT else value for key, value in env.items()}
    process = subprocess.Popen(
        kind.argv(port),
        cwd=kind.cwd or ROOT,
        env={**os.environ, **env},
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


def handshakes(
    kind: ServerKind, clients: int = 64, seconds: float = 8, processes: int = 2
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


#: The servers a plain run compares (the floors only make sense with idle5000 and handshakes).
BROADCASTERS = ["trio_ws", "trio_ws+redis", "fastapi+uvicorn", "websockets"]

SCENARIOS: dict[str, Callable[[ServerKind], dict[str, Any]]] = {
    "fanout100": lambda kind: fanout(kind, 100, 3000),
    "fanout1000": lambda kind: fanout(kind, 1000, 500),
    "rate1000x20": lambda kind: fixed_rate(kind),
    "idle5000": lambda kind: idle_connections(kind),
    "handshakes": lambda kind: handshakes(kind),
    "slow_client": lambda kind: slow_client(kind),
    "cluster1000": lambda kind: fanout_cluster(kind, 1000, 500),
}

#: Scenarios that need a broker: run only with the servers that have one.
CLUSTER_SCENARIOS = {"cluster1000"}
WITH_BROKER = {"trio_ws+redis"}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        if all(isinstance(v, (int, float)) for v in values):
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        else:
            out[key] = values
    return out


#: The figures the table shows for each scenario (the JSON has them all).
HEADLINES = {
    "fanout100": ["server_cpu_us_per_delivery", "deliveries_per_s", "latency_p99_ms", "lost"],
    "fanout1000": ["server_cpu_us_per_delivery", "deliveries_per_s", "latency_p99_ms", "lost"],
    "rate1000x20": ["latency_p50_ms", "latency_p99_ms", "server_cpu_us_per_delivery", "lost"],
    "idle5000": ["rss_kb_per_connection", "connect_p99_ms"],
    "handshakes": ["handshakes_per_s", "server_cpu_us_per_handshake", "handshake_p99_ms", "failed"],
    "slow_client": ["healthy_rate_ratio", "peak_rss_mb", "lost", "healthy_closed_by_server"],
    "cluster1000": ["server_cpu_us_per_delivery", "latency_p99_ms", "lost", "duplicates"],
}


def print_table(results: dict[str, dict[str, Any]]) -> None:
    """Median (min-max) of each headline figure, one row per scenario and server."""
    print()
    for scenario, servers in results.items():
        keys = HEADLINES.get(scenario, [])
        print(f"{scenario:12} {'server':16} " + " ".join(f"{key:>28}" for key in keys))
        for name, figures in servers.items():
            cells = []
            for key in keys:
                value = figures.get(key)
                if isinstance(value, dict):
                    cells.append(f"{value['median']:g} ({value['min']:g}-{value['max']:g})")
                else:
                    cells.append(str(value))
            print(f"{'':12} {name:16} " + " ".join(f"{cell:>28}" for cell in cells))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", nargs="+", default=BROADCASTERS, choices=list(SERVERS))
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "latest.json"))
    args = parser.parse_args()
    if WITH_BROKER & set(args.servers) and shutil.which("redis-server") is None:
        parser.error(
            "redis-server is not installed: trio_ws+redis needs it (Debian: apt-get install "
            "redis-server), or leave that server out with --servers"
        )
    results: dict[str, dict[str, Any]] = {}
    for scenario in args.scenarios:
        for name in args.servers:
            if scenario in CLUSTER_SCENARIOS and name not in WITH_BROKER:
                continue
            runs = [SCENARIOS[scenario](SERVERS[name]) for _ in range(args.runs)]
            results.setdefault(scenario, {})[name] = aggregate(runs)
            print(
                f"{scenario:12} {name:16} "
                + "  ".join(
                    f"{key}={value['median'] if isinstance(value, dict) else value}"
                    for key, value in results[scenario][name].items()
                ),
                flush=True,
            )
    print_table(results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {"date": time.strftime("%Y-%m-%d"), "runs": args.runs, "results": results}, indent=2
        )
    )
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
