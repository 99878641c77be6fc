"""Two commits of trio_ws, side by side in one run: bench/run.py's scenarios, interleaved.

    python bench/compare_commits.py --old-tree ../bench-old            # fanout100 fanout1000, 5x
    python bench/compare_commits.py --old-tree ../bench-old --reps 7 --scenarios fanout100
    python bench/compare_commits.py --old-tree ../bench-old --scenarios handshakes idle5000

Each side is a checkout with its own virtualenv (``<tree>/.venv``, the package installed in it
editable): its server runs as ``<tree>/.venv/bin/python -m trio_ws`` with ``<tree>`` as its working
directory, so it imports that tree's code. The load generator, the publisher, the scenarios and
the figures are bench/run.py's from *this* tree, the same for both sides: the old tree's bench/
is never run, so a scenario added since the old commit (``handshakes``) measures it all the same.

The runs alternate old, new, old, new... (repetition outermost, then scenario, then side) so that
both sides share the machine's noise. Before each run the machine's CPU use by others is sampled
for a second (``background_busy_cores``); above ``--max-background`` the driver waits, up to
``--quiet-wait`` seconds, for it to settle. During each run the driver counts the CPU the whole
machine used (``/proc/stat``) less what this driver and its children (the server, the receivers)
used: ``others_busy_cores``, the other work that shared the machine with the run. A pair (old and
new of one repetition and scenario) with a run above ``--max-others``, or that lost messages, is
kept in the log as rejected and run again, up to ``--retries`` times; after that the last pair is
accepted and marked ``noisy`` (a failed handshake counts as a loss). ``/proc/loadavg`` before
and after each run is logged too.

Each figure is the median of the accepted repetitions, with min and max, and ``new_vs_old``
gives new/old of the medians and the median of the paired ratios (each new run against the old
run just before it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import SCENARIOS, SERVERS, ServerKind, aggregate  # noqa: E402

#: The figures compared old against new (the snapshot keeps every figure of every run).
DELIVERY_FIGURES = [
    "server_cpu_us_per_delivery",
    "latency_p50_ms",
    "latency_p99_ms",
    "deliveries_per_s",
]

#: bench/run.py's scenarios of one server that this driver compares, and their figures.
COMPARED = {
    "fanout100": DELIVERY_FIGURES,
    "fanout1000": DELIVERY_FIGURES,
    "rate1000x20": DELIVERY_FIGURES,
    "idle5000": ["rss_kb_per_connection", "connect_p50_ms", "connect_p99_ms"],
    "idle": ["rss_kb_per_connection", "connect_p50_ms", "connect_p99_ms", "idle_cpu_pct"],
    "handshakes": [
        "handshakes_per_s",
        "server_cpu_us_per_handshake",
        "handshake_p50_ms",
        "handshake_p99_ms",
    ],
}


def failures(figures: dict[str, Any]) -> int:
    """Messages lost (delivery scenarios) plus handshakes failed (``handshakes``)."""
    return int(figures.get("lost") or 0) + int(figures.get("failed") or 0)


@dataclass(frozen=True)
class Side:
    label: str
    tree: Path
    python: Path

    def kind(self) -> ServerKind:
        base = SERVERS["trio_ws"]
        return ServerKind(
            f"trio_ws@{self.label}",
            lambda port: [str(self.python), "-m", "trio_ws", "--port", str(port)],
            base.env,
            cwd=self.tree,
            welcome=base.welcome,
            idle_env=base.idle_env,
        )

    def describe(self) -> dict[str, str]:
        """The commit, and the files this side's server imports (checked, not assumed)."""
        commit = subprocess.run(
            ["git", "-C", str(self.tree), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(self.tree), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()
        probe = subprocess.run(
            [
                str(self.python),
                "-c",
                "import sys, trio, trio_ws; print(trio_ws.__file__); print(trio.__version__); "
                "print(sys.version.split()[0])",
            ],
            cwd=self.tree,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.split()
        package = Path(probe[0]).resolve()
        if not package.is_relative_to(self.tree.resolve()):
            raise SystemExit(f"{self.label}: {self.python} imports trio_ws from {package}")
        return {
            "commit": commit,
            "tracked_changes": dirty,
            "tree": str(self.tree),
            "python": str(self.python),
            "python_version": probe[2],
            "trio_version": probe[1],
            "trio_ws_imported_from": str(package),
        }


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def background_busy_cores(seconds: float = 1.0) -> float:
    """How many cores others keep busy while this driver sleeps (nothing of ours runs then)."""
    busy0, total0 = cpu_times()
    time.sleep(seconds)
    busy1, total1 = cpu_times()
    cores = os.cpu_count() or 1
    return round((busy1 - busy0) / max(1, total1 - total0) * cores, 2)


def own_cpu_s() -> float:
    """CPU of this process and of its children that have been waited for (servers, receivers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def measured_run(scenario: str, side: Side) -> tuple[dict[str, Any], float, float]:
    """The scenario's figures, its wall time, and the cores others kept busy meanwhile."""
    busy0, _ = cpu_times()
    own0 = own_cpu_s()
    t0 = time.monotonic()
    figures = SCENARIOS[scenario](side.kind())
    wall = time.monotonic() - t0
    busy1, _ = cpu_times()
    machine_s = (busy1 - busy0) / os.sysconf("SC_CLK_TCK")
    others = (machine_s - (own_cpu_s() - own0)) / wall
    return figures, wall, round(max(0.0, others), 2)


def wait_for_quiet(limit: float, wait_s: float) -> float:
    deadline = time.monotonic() + wait_s
    while True:
        busy = background_busy_cores()
        if busy <= limit or time.monotonic() >= deadline:
            return busy


def compare(
    runs: dict[str, dict[str, list[dict[str, Any]]]], old: str, new: str
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for scenario, sides in runs.items():
        out[scenario] = {}
        for key in COMPARED[scenario]:
            olds = [run[key] for run in sides[old]]
            news = [run[key] for run in sides[new]]
            pairs = [n / o for o, n in zip(olds, news, strict=True) if o]
            median_old = statistics.median(olds)
            # A figure that can be 0 (idle CPU) has no ratio where the old side's is 0.
            out[scenario][key] = {
                "ratio_of_medians": round(statistics.median(news) / median_old, 3)
                if median_old
                else None,
                "median_paired_ratio": round(statistics.median(pairs), 3) if pairs else None,
            }
    return out


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_table(summary: dict[str, dict[str, dict[str, Any]]], ratios: dict[str, Any]) -> None:
    print()
    for scenario, sides in summary.items():
        keys = COMPARED[scenario]
        print(f"{scenario:11} {'side':5} " + " ".join(f"{key:>28}" for key in keys))
        for label, figures in sides.items():
            cells = [
                f"{figures[key]['median']:g} ({figures[key]['min']:g}-{figures[key]['max']:g})"
                for key in keys
            ]
            print(f"{'':11} {label:5} " + " ".join(f"{cell:>28}" for cell in cells))
        cells = [
            f"{_ratio(ratios[scenario][key]['ratio_of_medians'])} "
            f"(paired {_ratio(ratios[scenario][key]['median_paired_ratio'])})"
            for key in keys
        ]
        print(f"{'':11} {'n/o':5} " + " ".join(f"{cell:>28}" for cell in cells))
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-tree", type=Path, required=True, help="checkout of the old commit")
    parser.add_argument("--new-tree", type=Path, default=ROOT, help="default: this checkout")
    parser.add_argument("--old-python", type=Path, help="default: <old-tree>/.venv/bin/python")
    parser.add_argument("--new-python", type=Path, help="default: <new-tree>/.venv/bin/python")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=["fanout100", "fanout1000"],
        choices=list(COMPARED),
    )
    parser.add_argument("--reps", type=int, default=5, help="runs of each side (at least 3)")
    parser.add_argument(
        "--max-background",
        type=float,
        default=0.3,
        help="cores others may keep busy before a run without the driver waiting",
    )
    parser.add_argument("--quiet-wait", type=float, default=30.0, help="longest wait, seconds")
    parser.add_argument(
        "--max-others",
        type=float,
        default=0.25,
        help="cores others may keep busy during a run before its pair is run again",
    )
    parser.add_argument("--retries", type=int, default=3, help="new tries of a noisy pair")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "compare.json")
    args = parser.parse_args()
    if args.reps < 3:
        parser.error("--reps must be at least 3")
    sides = [
        Side("old", args.old_tree.resolve(), args.old_python or args.old_tree / ".venv/bin/python"),
        Side("new", args.new_tree.resolve(), args.new_python or args.new_tree / ".venv/bin/python"),
    ]
    described = {side.label: side.describe() for side in sides}
    for label, info in described.items():
        print(f"{label}: {info['commit'][:12]} from {info['trio_ws_imported_from']}", flush=True)

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_at_start = loadavg()
    log: list[dict[str, Any]] = []
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for rep in range(1, args.reps + 1):
        for scenario in args.scenarios:
            for attempt in range(args.retries + 1):
                pair: list[tuple[dict[str, Any], dict[str, Any]]] = []
                for side in sides:
                    background = wait_for_quiet(args.max_background, args.quiet_wait)
                    load_before = loadavg()
                    figures, wall, others = measured_run(scenario, side)
                    pair.append(
                        (
                            figures,
                            {
                                "rep": rep,
                                "attempt": attempt,
                                "scenario": scenario,
                                "side": side.label,
                                "background_busy_cores": background,
                                "others_busy_cores": others,
                                "loadavg_before": load_before,
                                "loadavg_after": loadavg(),
                                "wall_s": round(wall, 2),
                                **figures,
                            },
                        )
                    )
                clean = all(
                    e["others_busy_cores"] <= args.max_others and failures(e) == 0 for _, e in pair
                )
                last = attempt == args.retries
                for _, entry in pair:
                    entry["accepted"] = clean or last
                    entry["noisy"] = not clean
                    log.append(entry)
                    print(
                        f"rep {rep} {scenario:10} {entry['side']} try {attempt}  "
                        + "  ".join(
                            f"{key}={entry[key]}"
                            for key in [
                                "background_busy_cores",
                                "others_busy_cores",
                                *COMPARED[scenario],
                                "accepted",
                            ]
                        ),
                        flush=True,
                    )
                if clean or last:
                    for figures, entry in pair:
                        runs.setdefault(scenario, {}).setdefault(entry["side"], []).append(figures)
                    break

    summary = {
        scenario: {label: aggregate(side_runs) for label, side_runs in by_side.items()}
        for scenario, by_side in runs.items()
    }
    ratios = compare(runs, "old", "new")
    print_table(summary, ratios)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "started": started,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "cores": os.cpu_count(),
                "loadavg_at_start": load_at_start,
                "loadavg_at_end": loadavg(),
                "order": "rep, then scenario, then side: old, new, old, new...",
                "reps": args.reps,
                "max_others_busy_cores": args.max_others,
                "noisy_pairs_accepted": sum(1 for e in log if e["noisy"] and e["accepted"]) // 2,
                "pairs_rejected": sum(1 for e in log if not e["accepted"]) // 2,
                "sides": described,
                "summary": summary,
                "new_vs_old": ratios,
                "runs": log,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
