"""What a handshake and an idle connection cost, per layer: Hypercorn, h11, wsproto, Quart, trio,
trio_ws, logging and the rest of Python.

    python bench/profile_layers.py                                  # trio_ws and the two floors
    python bench/profile_layers.py --servers trio_ws asgi_floor --connections 2000 --seconds 6

For each server (bench/run.py's server kinds, as ``idle`` and ``handshakes`` run them):

* **Memory of an idle connection**: the server runs under ``tracemalloc`` (30 frames, this
  file's ``serve`` subcommand wraps its ``python -m ...``, tracing from the first snapshot on),
  ``--connections`` clients connect one after the other and stay; a snapshot before and after
  (taken on SIGUSR1) gives the bytes still allocated per connection. Each allocation is
  charged to the innermost frame of a layer that *asks* for memory (trio_ws, Quart, wsproto,
  h11, Hypercorn, logging): a coroutine frame or a trio task that Hypercorn starts is
  Hypercorn's. What only trio or the standard library asked for is charged to them. RSS per
  connection is printed beside it (it adds the allocator's overhead, and is what ``idle``
  reports; tracemalloc's own bookkeeping inflates it here).
* **CPU of a handshake**: the ``handshakes`` load (64 clients in a closed loop) for
  ``--seconds`` while ``py-spy`` samples the server (``--format raw``); each sample's innermost
  frame names its layer (self time), and the shares are scaled to the server's CPU per
  handshake from ``/proc``.

Prints one markdown table per figure. Needs ``py-spy`` (the ``bench`` extra) and root or
ptrace permission over the server (``kernel.yama.ptrace_scope``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import LOADGEN, SERVERS, ServerKind, running  # noqa: E402

#: Path fragments that name a layer, the first match wins.
#: (py-spy names files from their package down, tracemalloc by their full path.)
LAYERS = [
    ("trio_ws/", "trio_ws"),
    ("bench/peers/", "app (peer)"),
    ("quart_trio/", "Quart"),
    ("quart/", "Quart"),
    ("werkzeug/", "Quart"),
    ("flask/", "Quart"),
    ("wsproto/", "wsproto"),
    ("h11/", "h11"),
    ("hypercorn/", "Hypercorn"),
    ("logging/", "logging"),
    ("trio/", "trio"),
]
#: Layers that only carry out what a caller asked for: memory goes to the caller.
CARRIERS = {"trio", "Python"}
ORDER = ["Hypercorn", "h11", "wsproto", "Quart", "trio_ws", "app (peer)", "logging", "trio"]


#: Where a process calls ``trio.run``: the scheduler's own work below them is trio's.
ENTRIES = (
    "trio_ws/hosting/cli.py",
    "trio_ws/__main__.py",
    "hypercorn/__main__.py",
    "hypercorn/run.py",
    "hypercorn/trio/run.py",
    "bench/profile_layers.py",
)


def layer_of(filename: str) -> str:
    if filename.endswith(ENTRIES) or "runpy" in filename:
        return "Python"
    for fragment, name in LAYERS:
        if filename.startswith(fragment) or "/" + fragment in filename:
            return name
    return "Python"


# -- the server side: a module run under tracemalloc, snapshots on SIGUSR1 ----------------------


def serve(out_dir: str, argv: list[str]) -> None:
    """Run ``python -m <module> ...`` (``argv`` without the interpreter) in this process; each
    SIGUSR1 dumps a tracemalloc snapshot to ``out_dir/snapshot-<n>.pickle``. Tracing starts at
    the first one: what was allocated before is in neither snapshot (and imports under
    tracemalloc take half a minute)."""
    taken = 0

    def dump(signum: int, frame: object) -> None:
        nonlocal taken
        if not tracemalloc.is_tracing():
            tracemalloc.start(30)
        snapshot = tracemalloc.take_snapshot()
        path = Path(out_dir) / f"snapshot-{taken}.pickle"
        taken += 1
        with open(path.with_suffix(".tmp"), "wb") as file:
            pickle.dump(snapshot, file)
        os.replace(path.with_suffix(".tmp"), path)

    signal.signal(signal.SIGUSR1, dump)
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")


def snapshot(pid: int, out_dir: Path, index: int) -> tracemalloc.Snapshot:
    os.kill(pid, signal.SIGUSR1)
    path = out_dir / f"snapshot-{index}.pickle"
    deadline = time.monotonic() + 120
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("no snapshot from the server")
        time.sleep(0.1)
    with open(path, "rb") as file:
        taken: tracemalloc.Snapshot = pickle.load(file)
    return taken


def charge(traceback: tracemalloc.Traceback) -> str:
    """The layer that asked for an allocation (innermost frame first; carriers pass it on)."""
    fallback = None
    for frame in reversed(traceback):  # innermost first
        name = layer_of(frame.filename)
        if name not in CARRIERS:
            return name
        fallback = fallback or name
    return fallback or "Python"


def site(traceback: tracemalloc.Traceback) -> str:
    """Where the charged layer asked for an allocation."""
    for frame in reversed(traceback):
        if layer_of(frame.filename) not in CARRIERS:
            return _short(frame)
    return _short(traceback[-1])


def _short(frame: tracemalloc.Frame) -> str:
    return f"{'/'.join(frame.filename.split('/')[-3:])}:{frame.lineno}"


#: ``--detail``: how many allocation sites to print per server.
DETAIL = 0


def memory_per_layer(kind: ServerKind, connections: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="trio_ws-profile-") as tmp:
        out = Path(tmp)
        # The same server, its interpreter's arguments run by ``serve`` below.
        wrapped = ServerKind(
            kind.name,
            lambda port: [sys.executable, __file__, "serve", tmp, "--", *kind.argv(port)[1:]],
            kind.env,
            welcome=kind.welcome,
        )
        with running(wrapped, kind.idle_env) as server:
            time.sleep(1.0)
            before = snapshot(server.process.pid, out, 0)
            rss0 = server.memory_kb()
            proc = subprocess.Popen(
                [*LOADGEN, "idle", "--port", str(server.port), "--connections", str(connections)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert proc.stdout is not None
            json.loads(proc.stdout.readline())
            time.sleep(1.0)
            after = snapshot(server.process.pid, out, 1)
            rss1 = server.memory_kb()
            proc.communicate(timeout=60)
    by_layer: collections.Counter[str] = collections.Counter()
    sites: collections.Counter[str] = collections.Counter()
    for stat in after.compare_to(before, "traceback"):
        by_layer[charge(stat.traceback)] += stat.size_diff
        sites[site(stat.traceback)] += stat.size_diff
    if DETAIL:
        for where, size in sites.most_common(DETAIL):
            print(f"  {kind.name}: {size / connections:8.0f} B/connection  {where}")
    per = {name: size / connections / 1024 for name, size in by_layer.items()}
    per["total (tracemalloc)"] = sum(by_layer.values()) / connections / 1024
    per["RSS (under tracemalloc)"] = (rss1 - rss0) / connections
    return per


# -- CPU: py-spy over the handshakes load ----------------------------------------------------


def cpu_per_layer(kind: ServerKind, seconds: float, py_spy: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="trio_ws-profile-") as tmp, running(kind) as server:
        time.sleep(0.5)
        raw = Path(tmp) / "raw.txt"
        spy = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(server.process.pid),
                "--rate",
                "250",
                "--duration",
                str(int(seconds + 1)),
                "--format",
                "raw",
                "--output",
                str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        cpu0 = server.cpu_s()
        load = subprocess.run(
            [
                *LOADGEN,
                "handshake",
                "--port",
                str(server.port),
                "--connections",
                "64",
                "--seconds",
                str(seconds),
                "--welcome" if kind.welcome else "--no-welcome",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 120,
            check=True,
        )
        cpu = server.cpu_s() - cpu0
        spy.wait(timeout=60)
        samples: collections.Counter[str] = collections.Counter()
        charged: collections.Counter[str] = collections.Counter()
        functions: collections.Counter[str] = collections.Counter()
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack:
                continue
            # A frame reads "function (path/file.py:line)"; the innermost comes last.
            frames = stack.split(";")
            layers = [layer_of(frame.rpartition(" (")[2].rpartition(":")[0]) for frame in frames]
            samples[layers[-1]] += int(count)
            owner = next((name for name in reversed(layers) if name not in CARRIERS), layers[-1])
            charged[owner] += int(count)
            for frame, name in zip(reversed(frames), reversed(layers), strict=True):
                if name == owner:
                    functions[f"{owner}: {frame}"] += int(count)
                    break
    done = json.loads(load.stdout.strip().splitlines()[-1])["handshakes"]
    per_handshake_us = cpu / max(1, done) * 1e6
    total = sum(samples.values()) or 1
    if DETAIL:
        for where, hits in functions.most_common(DETAIL):
            print(f"  {kind.name}: {hits / total * per_handshake_us:8.1f} µs/handshake  {where}")
    out: dict[str, Any] = {name: hits / total * per_handshake_us for name, hits in samples.items()}
    out["total (/proc)"] = per_handshake_us
    return {
        "self": out,
        "charged": {name: hits / total * per_handshake_us for name, hits in charged.items()}
        | {"total (/proc)": per_handshake_us},
    }


def print_table(title: str, unit: str, results: dict[str, dict[str, float]]) -> None:
    names = list(results)
    layers = [layer for layer in ORDER if any(layer in r for r in results.values())]
    layers += sorted({key for r in results.values() for key in r} - set(layers) - set(ORDER))
    print(f"\n{title}\n")
    print("| layer | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for layer in layers:
        cells = [f"{results[n][layer]:,.1f} {unit}" if layer in results[n] else "" for n in names]
        print(f"| {layer} | " + " | ".join(cells) + " |")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "serve":
        separator = sys.argv.index("--")
        serve(sys.argv[2], sys.argv[separator + 1 :])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--servers", nargs="+", default=["trio_ws", "asgi_floor", "quart_floor"], choices=SERVERS
    )
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--skip", choices=["memory", "cpu"], default=None)
    parser.add_argument("--detail", type=int, default=0, help="print the N largest sites")
    args = parser.parse_args()
    global DETAIL
    DETAIL = args.detail
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    memory: dict[str, dict[str, float]] = {}
    cpu: dict[str, dict[str, float]] = {}
    charged: dict[str, dict[str, float]] = {}
    for name in args.servers:
        if args.skip != "memory":
            memory[name] = memory_per_layer(SERVERS[name], args.connections)
            print(name, "memory", json.dumps({k: round(v, 2) for k, v in memory[name].items()}))
        if args.skip != "cpu":
            both = cpu_per_layer(SERVERS[name], args.seconds, py_spy)
            cpu[name], charged[name] = both["self"], both["charged"]
            print(name, "cpu", json.dumps({k: round(v, 1) for k, v in charged[name].items()}))
    if memory:
        print_table(
            f"Idle connection, KB each ({args.connections} connections, tracemalloc)", "KB", memory
        )
    if cpu:
        print_table("Handshake, µs of server CPU each (py-spy, self time)", "µs", cpu)
        print_table(
            "Handshake, µs of server CPU each (py-spy, charged to the layer that asked: trio's "
            "and Python's work on a layer's behalf is that layer's)",
            "µs",
            charged,
        )


if __name__ == "__main__":
    main()
