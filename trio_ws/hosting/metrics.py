"""``/metrics``: the server's figures, named for Prometheus and merged over workers.

Theory of operation:

* **Counting** happens in the core, in plain integers (``trio_ws/core/stats.py``, the registry,
  the drain, the admission), once per broadcast rather than once per client. Nothing here runs
  on the hot path: :func:`collect` reads those numbers when a scrape asks, and names them
  (``docs/metrics.md`` has the table).
* **Merging**: each metric says how several processes' values combine (:class:`Family.merge`):
  counters, histograms and most gauges add up; a few gauges take the minimum or the maximum
  (the earliest drain deadline, the worst loop lag). :mod:`trio_ws.hosting.metrics_server`
  serves the result, and under ``--workers N`` merges the workers' snapshots.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import trio
from prometheus_client import ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry

from trio_ws import __version__
from trio_ws.core.broker import BrokerState
from trio_ws.core.drain import DrainState
from trio_ws.core.limits import Limit
from trio_ws.core.stats import LOOP_LAG_BUCKETS, Histogram
from trio_ws.shell.hypercorn_guard import waiting_closed_total

if TYPE_CHECKING:
    from collections.abc import Iterator

    from trio_ws.core.hub import Hub
    from trio_ws.shell.hypercorn_limits import WebSocketLimits

Merge = Literal["sum", "min", "max"]
Sample = tuple[str, dict[str, str], float]

#: How often the event-loop lag is measured: a sleep of this long that wakes late is the lag.
LOOP_LAG_EVERY_S = 0.5

#: Close codes the server sends to end a connection for what the client did (or did not do).
EVICTION_CODES = frozenset({"1003", "1008", "1009", "4008"})

#: Why a connection was refused before it was registered, besides the limits and the drain
#: (``Hub.note_invalid``): every one is exported, 0 until it happens.
REFUSAL_REASONS = ("origin", "token", "id_in_use", "bad_request", "stale_attempt")

_DRAIN_STATE_NUMBER = {DrainState.SERVING: 0, DrainState.DRAINING: 1, DrainState.STOPPED: 2}


@dataclass(slots=True)
class Family:
    """One metric: its samples in this process, and how several processes' samples merge."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    merge: Merge = "sum"
    samples: list[Sample] = field(default_factory=list)

    def add(self, value: float, suffix: str = "", **labels: str) -> None:
        self.samples.append((self.name + suffix, labels, float(value)))


class LoopLag:
    """How late a periodic sleep wakes up: the event loop's lag (a blocked loop delays every
    client). Measured by :meth:`run`; read at scrape time."""

    def __init__(self) -> None:
        self.histogram = Histogram(LOOP_LAG_BUCKETS)
        self.last = 0.0

    async def run(self) -> None:
        while True:
            asked = trio.current_time() + LOOP_LAG_EVERY_S
            await trio.sleep_until(asked)
            self.last = max(0.0, trio.current_time() - asked)
            self.histogram.observe(self.last)


@dataclass(slots=True)
class Sources:
    """Everything a scrape reads in this process."""

    hub: Hub
    limits: WebSocketLimits | None = None
    loop_lag: LoopLag | None = None
    mode: str = ""
    process: ProcessCollector | None = field(
        default_factory=lambda: ProcessCollector(registry=None)
    )


def collect(sources: Sources) -> list[Family]:
    """This process's figures, named as in docs/metrics.md. Cheap: a few dozen numbers."""
    hub = sources.hub
    stats = hub.stats
    registry = hub.registry.statistics()
    families: list[Family] = []

    def family(name: str, kind: Any, help: str, merge: Merge = "sum") -> Family:
        new = Family(name, kind, help, merge)
        families.append(new)
        return new

    family("trio_ws_processes", "gauge", "Processes whose figures this scrape adds up.").add(1)
    family("trio_ws_info", "gauge", "Always 1; the labels name the release.", "max").add(
        1, version=__version__, mode=sources.mode
    )
    family("trio_ws_connections", "gauge", "WebSockets connected now.").add(registry.connections)
    family("trio_ws_connections_opened", "counter", "Connections registered.").add(
        registry.total_connected, "_total"
    )
    closed = family(
        "trio_ws_connections_closed",
        "counter",
        "Registered connections that ended, by the close code the server sent (none: the "
        "client left first).",
    )
    for code, count in sorted(stats.closed.items()):
        closed.add(count, "_total", code=code)
    refused = family(
        "trio_ws_connections_refused",
        "counter",
        "Connections refused before they were registered, by reason.",
    )
    for limit in Limit:
        refused.add(hub.admission.refused[limit], "_total", reason=limit.value)
    refused.add(hub.drain.refused, "_total", reason="draining")
    for reason in REFUSAL_REASONS:
        refused.add(stats.refused[reason], "_total", reason=reason)

    evictions = family(
        "trio_ws_evictions",
        "counter",
        "Connections the server closed for what the client did: 4008 slow consumer, 1008 "
        "publish limit or policy, 1009 too big, 1003 binary, 1002/1007 invalid frames.",
    )
    by_code: dict[str, int] = {
        code: count for code, count in stats.closed.items() if code in EVICTION_CODES
    }
    hypercorn_closed = sources.limits.closed if sources.limits is not None else {}
    for number, count in hypercorn_closed.items():
        by_code[str(number)] = by_code.get(str(number), 0) + count
    for code in sorted(EVICTION_CODES | set(by_code)):
        evictions.add(by_code.get(code, 0), "_total", code=code)
    limits = family(
        "trio_ws_limits_hit",
        "counter",
        "A limit refused a connection or closed one, by limit.",
    )
    for limit in Limit:
        limits.add(hub.admission.refused[limit], "_total", limit=limit.value)
    too_big = stats.limits_hit["message_size"] + hypercorn_closed.get(1009, 0)
    limits.add(stats.limits_hit["publish_rate"], "_total", limit="publish_rate")
    limits.add(too_big, "_total", limit="message_size")
    waiting_closed = waiting_closed_total()
    limits.add(waiting_closed, "_total", limit="waiting_connections")
    family(
        "trio_ws_waiting_connections_closed",
        "counter",
        "Connections not yet past their request's headers (or idle between requests) closed, "
        "the oldest first, to stay under the cap of waiting connections.",
    ).add(waiting_closed, "_total")
    family(
        "trio_ws_no_pong_disconnects",
        "counter",
        "Connections closed with 4010: nothing received within the pong timeout of a ping.",
    ).add(hub.no_pong_disconnects, "_total")
    family(
        "trio_ws_protocol_errors",
        "counter",
        "Connections closed for frames that broke the WebSocket protocol (1002, 1007).",
    ).add(hub.protocol_errors, "_total")

    family(
        "trio_ws_messages_received",
        "counter",
        "Messages handed to the broker: clients' and those of POST /publish.",
    ).add(stats.messages_received, "_total")
    family(
        "trio_ws_publishes_refused",
        "counter",
        "Client messages refused by the publish policy (TRIO_WS_CLIENT_PUBLISH).",
    ).add(hub.publishes_refused, "_total")
    api = family(
        "trio_ws_api_publishes",
        "counter",
        "Messages sent to POST /publish: accepted (202) or refused (503, the broker could not "
        "take them).",
    )
    for result in ("accepted", "refused"):
        api.add(stats.api_publishes[result], "_total", result=result)
    family("trio_ws_kicks", "counter", "Connections closed by the operator (4503).").add(
        stats.kicks, "_total"
    )
    family(
        "trio_ws_token_expiries", "counter", "Connections closed as their token expired (4502)."
    ).add(stats.token_expiries, "_total")
    broadcasts = family(
        "trio_ws_broadcasts", "counter", "Broadcasts delivered to this process, by kind."
    )
    broadcasts.add(stats.message_broadcasts, "_total", kind="message")
    broadcasts.add(stats.periodic_broadcasts, "_total", kind="periodic")
    family(
        "trio_ws_deliveries", "counter", "Broadcast frames handed to a client (one per client)."
    ).add(stats.deliveries, "_total")
    family("trio_ws_delivered_bytes", "counter", "Bytes of those frames, as sent.").add(
        stats.bytes_delivered, "_total"
    )
    writes = hub.write_stats
    family(
        "trio_ws_backlog_frames",
        "counter",
        "Frames written by a writer task from a client's queue (the other deliveries went "
        "straight through).",
    ).add(writes.backlog_frames, "_total")
    family(
        "trio_ws_backlog_writes", "counter", "Writes of a queue's backlog by a writer task."
    ).add(writes.batches, "_total")
    family("trio_ws_partial_writes", "counter", "Frames a socket took only in part at first.").add(
        writes.partial, "_total"
    )

    family("trio_ws_resumes", "counter", "Connections that resumed with ?since=.").add(
        stats.resumes, "_total"
    )
    family(
        "trio_ws_resumes_incomplete",
        "counter",
        "Resumes that could not replay everything the client missed.",
    ).add(stats.resumes_incomplete, "_total")
    family("trio_ws_replayed_messages", "counter", "Broadcasts replayed to resuming clients.").add(
        stats.replayed, "_total"
    )
    _latency(family, stats.latency)

    drain = hub.drain
    family(
        "trio_ws_drain_state",
        "gauge",
        "0 serving, 1 draining, 2 drain over (the highest of the processes).",
        "max",
    ).add(_DRAIN_STATE_NUMBER[drain.state])
    report = drain.report()
    if report is not None:
        started = hub.wall_time() - report["elapsed_s"]
        family(
            "trio_ws_drain_started_timestamp_seconds",
            "gauge",
            "When the drain started (Unix time; the earliest of the processes).",
            "min",
        ).add(started)
        family(
            "trio_ws_drain_deadline_timestamp_seconds",
            "gauge",
            "When the drain closes the remaining clients with 1001 (Unix time; the earliest).",
            "min",
        ).add(started + report["deadline_s"])
        family(
            "trio_ws_drain_seconds_left",
            "gauge",
            "Seconds until that deadline (the least of the processes).",
            "min",
        ).add(report["time_left_s"] if drain.state is DrainState.DRAINING else 0)
        family(
            "trio_ws_drain_connections_at_start", "gauge", "Connections when the drain started."
        ).add(report["connections_at_start"])
        family(
            "trio_ws_drain_connections_left", "gauge", "Connections still here during the drain."
        ).add(registry.connections)
        ended = family(
            "trio_ws_drain_connections_ended",
            "gauge",
            "Connections that ended during the drain, by how: left by themselves, slow (4008), "
            "deadline (1001), other.",
        )
        ended.add(report["left"], how="left")
        ended.add(report["closed_slow"], how="slow")
        ended.add(report["closed_at_deadline"], how="deadline")
        ended.add(report["closed_other"], how="other")

    _broker(family, hub)
    if sources.loop_lag is not None:
        lag = sources.loop_lag
        family(
            "trio_ws_event_loop_last_lag_seconds",
            "gauge",
            "How late the latest periodic checkpoint ran (the worst of the processes).",
            "max",
        ).add(lag.last)
        _histogram(
            family,
            "trio_ws_event_loop_lag_seconds",
            "How late each periodic checkpoint ran (every 0.5 s).",
            lag.histogram,
        )
    if sources.process is not None:
        families.extend(_process_families(sources.process))
    return families


def _latency(family: Any, histogram: Histogram) -> None:
    _histogram(
        family,
        "trio_ws_delivery_latency_seconds",
        "From a broadcast's publish to the end of its fan-out here (one broadcast in 8).",
        histogram,
    )


def _histogram(family: Any, name: str, help: str, histogram: Histogram) -> None:
    new: Family = family(name, "histogram", help)
    for bound, count in histogram.cumulative():
        new.add(count, "_bucket", le="+Inf" if bound == float("inf") else f"{bound:g}")
    new.add(histogram.count, "_count")
    new.add(histogram.sum, "_sum")


def _broker(family: Any, hub: Hub) -> None:
    health = hub.broker.health()
    family(
        "trio_ws_broker_up", "gauge", "1 if the broker is up (the worst of the processes).", "min"
    ).add(1 if hub.broker.state is BrokerState.UP else 0)
    family(
        "trio_ws_broker_outage_seconds",
        "gauge",
        "How long the current broker outage has lasted (0 when up; the longest).",
        "max",
    ).add(health.get("down_for_s") or 0)
    for key, name, help in (
        ("outages", "trio_ws_broker_outages", "Broker outages."),
        (
            "dropped_during_outages",
            "trio_ws_broker_dropped_during_outages",
            "Messages published here during an outage that will not reach other processes.",
        ),
        (
            "trims_after_refusals",
            "trio_ws_broker_trims_after_refusals",
            "Times the stream was trimmed harder after Redis refused a write for memory.",
        ),
        ("resent_after_outages", "trio_ws_broker_resent", "Broadcasts sent again after one."),
        (
            "duplicates_skipped",
            "trio_ws_broker_duplicates_skipped",
            "Copies of a broadcast read again and not delivered twice.",
        ),
    ):
        family(name, "counter", help).add(health.get(key) or 0, "_total")
    family(
        "trio_ws_broker_pending", "gauge", "Broadcasts published here and not yet in the stream."
    ).add(health.get("pending") or 0)
    family(
        "trio_ws_broker_pending_bytes",
        "gauge",
        "Bytes of those broadcasts (bounded by TRIO_WS_REDIS_PENDING_MAX_BYTES).",
    ).add(health.get("pending_bytes") or 0)
    family(
        "trio_ws_broker_reader_lag_seconds",
        "gauge",
        "Age of the latest sampled broadcast when it was delivered here: how far the reader "
        "runs behind the publishers (the worst of the processes).",
        "max",
    ).add(hub.stats.last_lag)
    cluster = hub.broker.cluster()
    if cluster is not None:
        family("trio_ws_cluster_instances", "gauge", "Live processes in the cluster.", "max").add(
            cluster.instances
        )
        family("trio_ws_cluster_draining_instances", "gauge", "Of them, draining.", "max").add(
            cluster.draining_instances
        )
        family(
            "trio_ws_cluster_connections", "gauge", "Connections in the whole cluster.", "max"
        ).add(hub.cluster_connections())


#: How each process collector metric merges over a process group.
_PROCESS_MERGE: dict[str, Merge] = {"process_start_time_seconds": "min", "process_max_fds": "min"}


def _process_families(collector: ProcessCollector) -> Iterator[Family]:
    for metric in collector.collect():
        kind: Any = metric.type
        family = Family(metric.name, kind, metric.documentation)
        family.merge = _PROCESS_MERGE.get(metric.name, "sum")
        family.samples = [(s.name, dict(s.labels), float(s.value)) for s in metric.samples]
        yield family


# -- merging and rendering ------------------------------------------------------------------


def merge(groups: list[list[Family]]) -> list[Family]:
    """Several processes' families as one: each sample merged by its family's rule."""
    merged: dict[str, Family] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for families in groups:
        for family in families:
            target = merged.setdefault(
                family.name, Family(family.name, family.kind, family.help, family.merge)
            )
            table = values.setdefault(family.name, {})
            for name, labels, value in family.samples:
                key = (name, tuple(sorted(labels.items())))
                if key not in table:
                    table[key] = value
                elif target.merge == "sum":
                    table[key] += value
                elif target.merge == "min":
                    table[key] = min(table[key], value)
                else:
                    table[key] = max(table[key], value)
    for name, target in merged.items():
        target.samples = [(n, dict(labels), v) for (n, labels), v in values[name].items()]
    return list(merged.values())


class _Families:
    """A prometheus-client collector over ready-made families."""

    def __init__(self, families: list[Family]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            metric = Metric(family.name, family.help, family.kind)
            for name, labels, value in family.samples:
                metric.add_sample(name, labels, value)
            yield metric


def render(families: list[Family]) -> bytes:
    """The text exposition format (version 0.0.4) of ``families``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


def to_json(families: list[Family]) -> str:
    return json.dumps(
        [[f.name, f.kind, f.help, f.merge, f.samples] for f in families], separators=(",", ":")
    )


def from_json(text: str) -> list[Family]:
    return [
        Family(name, kind, help, merge, [(s[0], dict(s[1]), float(s[2])) for s in samples])
        for name, kind, help, merge, samples in json.loads(text)
    ]
