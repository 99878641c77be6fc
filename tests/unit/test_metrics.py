"""The counters behind /metrics, their names, how workers' figures merge, and the JSON log
format: no sockets."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from trio_ws.brokers.local import LocalBroker
from trio_ws.core.hub import Hub
from trio_ws.core.outbox import Outbox, Written
from trio_ws.core.protocol import CloseCode, Frame
from trio_ws.core.stats import LATENCY_SAMPLE_EVERY, Histogram, WriteStats
from trio_ws.hosting import metrics, metrics_server
from trio_ws.hosting.logs import JsonFormatter, set_instance
from trio_ws.settings import Settings
from trio_ws.shell import hypercorn_guard


def make_hub(**changes: Any) -> Hub:
    changes.setdefault("presence_interval", 0)
    changes.setdefault("broadcast_interval", 0)
    return Hub(
        Settings(**changes),
        broker=LocalBroker(lambda: 1_000.0),
        instance_id="i1",
        wall_clock=lambda: 1_000.0,
    )


def scrape(hub: Hub, **sources: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Render this hub's figures in the text format, parse them back: sample -> value."""
    text = metrics.render(metrics.collect(metrics.Sources(hub, **sources))).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_deliveries_and_bytes_are_counted_per_broadcast() -> None:
    hub = make_hub()
    clients = [hub.connect(f"c{i}", "p") for i in range(3)]
    for client in clients:
        client.take_queued()  # the welcomes
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        for text in ("one", "two"):
            await hub.publish("c0", text)
        sizes = [len(frame.wire) for frame in clients[0].take_queued()]
        clients[1].take_queued()
        clients[2].take_queued()
        nursery.cancel_scope.cancel()
    samples = scrape(hub)
    assert value(samples, "trio_ws_messages_received_total") == 2
    assert value(samples, "trio_ws_broadcasts_total", kind="message") == 2
    assert value(samples, "trio_ws_deliveries_total") == 6
    assert value(samples, "trio_ws_delivered_bytes_total") == 3 * sum(sizes)
    # No writer ran: nothing was written from a queue.
    assert value(samples, "trio_ws_backlog_frames_total") == 0
    assert value(samples, "trio_ws_connections_opened_total") == 3


async def test_writers_count_their_batches_not_each_frame() -> None:
    stats = WriteStats()
    outbox = Outbox(max_frames=10, batch_limit=1 << 16, stats=stats)
    for text in ("a", "b", "c"):
        assert outbox.offer(Frame(text))
    assert (stats.batches, stats.backlog_frames) == (0, 0)  # queueing counts nothing

    class Sink:
        kind = "test"
        written: list[Frame] = []  # noqa: RUF012

        def try_write(self, frame: Frame) -> Written:
            return Written.NOTHING

        async def write(self, frames: Any) -> bool:
            self.written.extend(frames)
            return True

        async def close(self, code: int, reason: str) -> None:
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run_writer, Sink())
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert (stats.batches, stats.backlog_frames) == (1, 3)


async def test_closes_are_counted_by_code_and_evictions_named() -> None:
    hub = make_hub(queue_size=2)
    slow = hub.connect("slow", "p")  # its welcome fills half its queue
    left = hub.connect("left", "p")
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        left.take_queued()
        await hub.publish("left", "a")
        left.take_queued()
        await hub.publish("left", "b")  # the slow one's third frame: 4008
        assert slow.close_code == CloseCode.SLOW_CONSUMER
        hub.disconnect(slow)  # the shell's cleanup finds it gone already: counted once
        hub.disconnect(left)
        hub.note_invalid("bad_request")
        hub.note_limit_hit("publish_rate")
        nursery.cancel_scope.cancel()
    samples = scrape(hub)
    assert value(samples, "trio_ws_connections_closed_total", code="4008") == 1
    assert value(samples, "trio_ws_connections_closed_total", code="none") == 1
    assert value(samples, "trio_ws_evictions_total", code="4008") == 1
    assert value(samples, "trio_ws_evictions_total", code="1009") == 0
    assert value(samples, "trio_ws_connections_refused_total", reason="bad_request") == 1
    assert value(samples, "trio_ws_limits_hit_total", limit="publish_rate") == 1
    assert value(samples, "trio_ws_connections") == 0


async def test_latency_is_sampled_one_broadcast_in_n() -> None:
    hub = make_hub()
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        for i in range(2 * LATENCY_SAMPLE_EVERY + 1):
            await hub.publish("x", str(i))
        nursery.cancel_scope.cancel()
    samples = scrape(hub)
    assert value(samples, "trio_ws_delivery_latency_seconds_count") == 2
    # The hub's wall clock stands still: no time from publish to write.
    assert value(samples, "trio_ws_delivery_latency_seconds_bucket", le="0.0005") == 2


async def test_the_drain_is_described_while_it_runs(autojump_clock: trio.abc.Clock) -> None:
    hub = make_hub(drain_timeout=60)
    hub.connect("stays", "p")
    assert value(scrape(hub), "trio_ws_drain_state") == 0
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        hub.request_drain("SIGTERM")
        await trio.sleep(10)
        samples = scrape(hub)
        assert value(samples, "trio_ws_drain_state") == 1
        assert value(samples, "trio_ws_drain_connections_left") == 1
        assert value(samples, "trio_ws_drain_connections_at_start") == 1
        assert value(samples, "trio_ws_drain_seconds_left") == pytest.approx(50)
        started = value(samples, "trio_ws_drain_started_timestamp_seconds")
        assert value(samples, "trio_ws_drain_deadline_timestamp_seconds") == started + 60
        hub.force_close("test")
    samples = scrape(hub)
    assert value(samples, "trio_ws_drain_state") == 2
    assert value(samples, "trio_ws_drain_seconds_left") == 0


async def test_the_later_features_are_counted(autojump_clock: trio.abc.Clock) -> None:
    """Liveness, protocol errors, refusals before registration, the publish policy and API,
    kicks and token expiries: each has its counter, labelled by a small fixed set."""
    hub = make_hub()
    kicked = hub.connect("kicked", "p")
    expiring = hub.connect("expiring", "p")
    for reason in ("origin", "token", "id_in_use", "id_in_use"):
        hub.note_invalid(reason)
    hub.note_protocol_error(1007, "invalid UTF-8", "p")
    hub.note_publish_refused(kicked, "authenticated")
    hub.note_api_publish(accepted=True)
    hub.note_api_publish(accepted=False)
    hub.no_pong_disconnects += 2  # as the pinger counts them (tested in test_liveness)
    assert hub.kick("kicked", "test")
    assert not hub.kick("nobody", "test")
    await hub.close_when_expired(expiring, 1_000.0)
    hub.disconnect(kicked)
    hub.disconnect(expiring)
    samples = scrape(hub)
    refused = "trio_ws_connections_refused_total"
    assert value(samples, refused, reason="origin") == 1
    assert value(samples, refused, reason="token") == 1
    assert value(samples, refused, reason="id_in_use") == 2
    assert value(samples, refused, reason="stale_attempt") == 0  # every reason, even at 0
    assert value(samples, "trio_ws_protocol_errors_total") == 1
    assert value(samples, "trio_ws_no_pong_disconnects_total") == 2
    assert value(samples, "trio_ws_publishes_refused_total") == 1
    assert value(samples, "trio_ws_api_publishes_total", result="accepted") == 1
    assert value(samples, "trio_ws_api_publishes_total", result="refused") == 1
    assert value(samples, "trio_ws_kicks_total") == 1
    assert value(samples, "trio_ws_token_expiries_total") == 1
    assert value(samples, "trio_ws_connections_closed_total", code="4503") == 1
    assert value(samples, "trio_ws_connections_closed_total", code="4502") == 1
    assert value(samples, "trio_ws_waiting_connections_closed_total") >= 0
    assert value(samples, "trio_ws_limits_hit_total", limit="waiting_connections") >= 0


def test_the_waiting_connections_closed_by_the_cap_are_counted() -> None:
    before = hypercorn_guard.waiting_closed_total()
    old = hypercorn_guard.waiting_limit()
    hypercorn_guard.limit_waiting(1)
    try:
        waiting = hypercorn_guard._Waiting()
        servers: list[Any] = [object(), object(), object()]
        for server in servers:
            waiting.add(server)
    finally:
        hypercorn_guard.limit_waiting(old)
    assert hypercorn_guard.waiting_closed_total() == before + 2
    samples = scrape(make_hub())
    assert value(samples, "trio_ws_waiting_connections_closed_total") == before + 2
    assert value(samples, "trio_ws_limits_hit_total", limit="waiting_connections") == before + 2


def test_the_redis_brokers_budget_and_losses_are_exported() -> None:
    hub = make_hub()
    report = {
        "pending": 3,
        "pending_bytes": 4096,
        "trims_after_refusals": 2,
        "dropped_during_outages": 5,
    }
    hub.broker.health = lambda: report  # type: ignore[method-assign]
    samples = scrape(hub)
    assert value(samples, "trio_ws_broker_pending") == 3
    assert value(samples, "trio_ws_broker_pending_bytes") == 4096
    assert value(samples, "trio_ws_broker_trims_after_refusals_total") == 2
    assert value(samples, "trio_ws_broker_dropped_during_outages_total") == 5
    merged = metrics.merge([metrics.collect(metrics.Sources(hub, process=None))] * 2)
    pending_bytes = next(f for f in merged if f.name == "trio_ws_broker_pending_bytes")
    assert pending_bytes.samples[0][2] == 8192  # summed over workers


def test_the_in_process_broker_is_up_and_has_no_cluster() -> None:
    samples = scrape(make_hub())
    assert value(samples, "trio_ws_broker_up") == 1
    assert value(samples, "trio_ws_broker_outage_seconds") == 0
    assert not any(name.startswith("trio_ws_cluster_") for name, _ in samples)


def test_process_collectors_and_loop_lag_are_included() -> None:
    lag = metrics.LoopLag()
    lag.last = 0.2
    lag.histogram.observe(0.2)
    samples = scrape(make_hub(), loop_lag=lag)
    assert value(samples, "process_resident_memory_bytes") > 0
    assert value(samples, "process_open_fds") > 0
    assert value(samples, "trio_ws_event_loop_last_lag_seconds") == 0.2
    assert value(samples, "trio_ws_event_loop_lag_seconds_bucket", le="0.25") == 1
    assert value(samples, "trio_ws_event_loop_lag_seconds_bucket", le="0.1") == 0


def test_histogram_buckets_are_cumulative() -> None:
    histogram = Histogram((1.0, 2.0))
    for observation in (0.5, 1.0, 1.5, 3.0):
        histogram.observe(observation)
    assert histogram.cumulative() == [(1.0, 2), (2.0, 3), (float("inf"), 4)]
    assert (histogram.count, histogram.sum) == (4, 6.0)


def family(name: str, merge: metrics.Merge, value: float, kind: Any = "gauge") -> metrics.Family:
    new = metrics.Family(name, kind, "help", merge)
    new.add(value, "_total" if kind == "counter" else "", code="1")
    return new


def test_workers_merge_by_each_metrics_rule_through_json() -> None:
    first = [family("a", "sum", 2, "counter"), family("b", "min", 5), family("c", "max", 5)]
    second = [family("a", "sum", 3, "counter"), family("b", "min", 4), family("c", "max", 7)]
    second.append(family("d", "sum", 1))  # present in one worker only
    merged = metrics.merge([first, metrics.from_json(metrics.to_json(second))])
    result = {f.name: f.samples for f in merged}
    assert result == {
        "a": [("a_total", {"code": "1"}, 5.0)],
        "b": [("b", {"code": "1"}, 4.0)],
        "c": [("c", {"code": "1"}, 7.0)],
        "d": [("d", {"code": "1"}, 1.0)],
    }


def test_siblings_snapshots_are_read_and_the_dead_ones_removed(tmp_path: Path) -> None:
    assert metrics_server.prepare_folder(tmp_path / "group")
    folder = tmp_path / "group"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(dead.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        snapshot = metrics.to_json([family("trio_ws_connections", "sum", 3)])
        (folder / f"{dead_pid}.json").write_text(snapshot)
        (folder / f"{alive.pid}.json").write_text(snapshot)
        (folder / f"{os.getpid()}.json").write_text(snapshot)  # our own: we have it live
        groups = metrics_server.read_siblings(folder)
        assert [[f.samples for f in group] for group in groups] == [
            [[("trio_ws_connections", {"code": "1"}, 3.0)]]
        ]
        assert not (folder / f"{dead_pid}.json").exists()
        # A snapshot that stopped changing is left out (its worker is stuck).
        later = time.time() + metrics_server.SNAPSHOT_STALE_S + 1
        assert metrics_server.read_siblings(folder, now=later) == []
    finally:
        alive.kill()
        alive.wait()


def test_a_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o777)
    folder.chmod(0o777)
    assert not metrics_server.prepare_folder(folder)


def test_json_log_lines_carry_the_client_and_the_event() -> None:
    set_instance("inst-1")
    record = logging.LogRecord(
        "trio_ws.core.hub", logging.INFO, __file__, 1, "client %s connected\nsecond", ("a",), None
    )
    record.client = "a"
    record.event = "connected"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry == {
        "time": entry["time"],
        "level": "INFO",
        "logger": "trio_ws.core.hub",
        "message": "client a connected\nsecond",
        "pid": os.getpid(),
        "instance": "inst-1",
        "client": "a",
        "event": "connected",
    }
    assert entry["time"].endswith("Z")
    plain = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", (), None)
    try:
        raise ValueError("bad")
    except ValueError:
        plain.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(plain))
    assert "client" not in entry
    assert "ValueError: bad" in entry["exc_info"]
