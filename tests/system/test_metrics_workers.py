"""/metrics under ``hypercorn --workers 2``: one scrape adds up both workers, before and during a
drain; and JSON logs from a real process."""

from __future__ import annotations

import json
import signal
from collections import Counter

import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import WebSocketConnection, connect_websocket_url

from tests.live import free_port
from tests.procutil import LAUNCHER, hypercorn, running
from tests.wsutil import http_get, next_frame

FAST = {
    "TRIO_WS_DRAIN_TIMEOUT": "30",
    "TRIO_WS_BROADCAST_INTERVAL": "0",
    "TRIO_WS_PRESENCE_INTERVAL": "0",
    # trio-websocket answering a ping while it closes raises in its reader task.
    "TRIO_WS_PING_INTERVAL": "0",
}


async def scrape(port: int) -> dict[str, float]:
    status, text = await http_get(f"http://127.0.0.1:{port}", "/metrics")
    assert status == 200
    return {
        sample.name + "".join(f",{k}={v}" for k, v in sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape_until(
    port: int, name: str, wanted: float, timeout: float = 10
) -> dict[str, float]:
    """Scrape until ``name`` reads ``wanted`` (snapshots travel once a second)."""
    samples: dict[str, float] = {}
    with trio.move_on_after(timeout):
        while samples.get(name) != wanted:
            samples = await scrape(port)
            await trio.sleep(0.2)
    assert samples.get(name) == wanted, (name, samples.get(name))
    return samples


async def test_one_scrape_adds_up_two_workers_and_shows_their_drain() -> None:
    port = free_port()
    env = {**FAST, "TRIO_WS_METRICS_PORT": str(port), "TRIO_WS_PUBLISH_RATE": "0"}
    async with running(hypercorn("--workers", "2"), env) as server:
        url = await server.ws_url()
        await server.wait_for_line(r"metrics on http://127\.0\.0\.1:\d+/metrics")
        # Both workers up (each sends its figures once started): until then one takes all.
        await scrape_until(port, "trio_ws_processes", 2, timeout=30)
        async with trio.open_nursery() as nursery:
            clients: list[tuple[WebSocketConnection, str]] = []
            # Connect until both workers hold clients. The kernel picks the worker, and one
            # idle worker can win every accept of sequential connects: connect in rounds of
            # several at once, so that the other worker takes some while one is busy.

            async def connect(name: str) -> None:
                ws = await connect_websocket_url(nursery, f"{url}/{name}")
                clients.append((ws, (await next_frame(ws))["instance"]))

            with trio.fail_after(60):
                while len(clients) < 6 or len({i for _, i in clients}) < 2:
                    assert len(clients) < 64, "every connection went to the same worker"
                    async with trio.open_nursery() as round_:
                        for _ in range(8):
                            round_.start_soon(connect, f"c{len(clients)}-{_}")
            per_worker = Counter(instance for _, instance in clients)
            # Without a broker each worker broadcasts to its own clients only: n messages
            # reach n clients in each worker.
            for ws, _ in clients:
                await ws.send_message("hi")
            for ws, instance in clients:
                for _ in range(per_worker[instance]):
                    assert (await next_frame(ws))["type"] == "message"
            deliveries = sum(n * n for n in per_worker.values())
            samples = await scrape_until(port, "trio_ws_deliveries_total", deliveries)
            assert samples["trio_ws_processes"] == 2
            assert samples["trio_ws_connections"] == len(clients)
            assert samples["trio_ws_messages_received_total"] == len(clients)
            assert samples["trio_ws_broadcasts_total,kind=message"] == len(clients)

            server.send(signal.SIGTERM)  # Hypercorn's parent: both workers drain
            samples = await scrape_until(port, "trio_ws_drain_state", 1)
            samples = await scrape_until(port, "trio_ws_drain_connections_at_start", len(clients))
            assert samples["trio_ws_drain_connections_left"] == len(clients)
            assert 0 < samples["trio_ws_drain_seconds_left"] <= 30
            assert (
                samples["trio_ws_drain_deadline_timestamp_seconds"]
                - samples["trio_ws_drain_started_timestamp_seconds"]
            ) == 30
            for ws, _ in clients:
                await ws.aclose()
        assert await server.wait_exit(timeout=30) == 0


async def test_json_logs_one_object_a_line() -> None:
    env = {**FAST, "TRIO_WS_LOG_FORMAT": "json"}
    async with running(LAUNCHER, env, ready=False) as server:
        match = await server.wait_for_line(r'"listening on (http://127\.0\.0\.1:\d+)"')
        url = match.group(1).replace("http", "ws", 1) + "/ws/alice"
        async with trio.open_nursery() as nursery:
            ws = await connect_websocket_url(nursery, url)
            await next_frame(ws)
            await ws.aclose()
        await server.wait_for_line(r'"event": "disconnected"')
        server.send(signal.SIGTERM)
        assert await server.wait_exit() == 0
    ours = [json.loads(line) for line in server.lines if line.startswith("{")]
    connected = [entry for entry in ours if entry.get("event") == "connected"]
    assert len(connected) == 1
    entry = connected[0]
    assert entry["client"] == "alice"
    assert entry["pid"] == server.pid
    assert entry["level"] == "INFO"
    assert entry["logger"] == "trio_ws.core.hub"
    assert entry["instance"]
    assert "client alice connected" in entry["message"]
    # Every line from trio_ws is an object (Hypercorn's own "Running on" line is its own).
    assert all(line.startswith("{") for line in server.lines if "trio_ws" in line)


async def test_a_busy_metrics_port_stops_the_launcher_with_one_line() -> None:
    with trio.socket.socket() as busy:
        await busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**FAST, "TRIO_WS_METRICS_PORT": str(port)}
        async with running(LAUNCHER, env, ready=False) as server:
            assert await server.wait_exit() == 1
        await server.wait_for_line(rf"cannot start: cannot serve /metrics on .*:{port}/metrics")
        assert not any("Traceback" in line for line in server.lines)


async def test_metrics_under_hypercorn_workers_0() -> None:
    port = free_port()
    env = {**FAST, "TRIO_WS_METRICS_PORT": str(port)}
    async with running(hypercorn("--workers", "0"), env) as server:
        url = await server.ws_url()
        async with trio.open_nursery() as nursery:
            ws = await connect_websocket_url(nursery, f"{url}/only")
            await next_frame(ws)
            samples = await scrape_until(port, "trio_ws_connections", 1)
            assert samples["trio_ws_processes"] == 1
            assert samples["trio_ws_info,mode=hypercorn-inprocess,version=0.1.0"] == 1
            await ws.aclose()
        server.send(signal.SIGTERM)
        assert await server.wait_exit() == 0
