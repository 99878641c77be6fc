"""/metrics on a real in-process server: what clients did shows up, it agrees with /health, and
Prometheus's own promtool accepts the exposition."""

from __future__ import annotations

import contextlib
import subprocess
import time
from typing import Any

import jwt
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionRejected, open_websocket_url

from tests.conftest import StartServer
from tests.hostile import CLOSE, TEXT, client_frame
from tests.live import free_port, require_tool
from tests.redisutil import redis_server
from tests.wsutil import (
    close_code,
    http_get,
    http_request,
    next_frame,
    raw_handshake,
    read_server_frames,
    wait_until,
)
from trio_ws.brokers.redis import RedisBroker
from trio_ws.core.broker import BrokerState
from trio_ws.core.health import health_report
from trio_ws.core.hub import Hub
from trio_ws.hosting import metrics
from trio_ws.hosting.launcher import RunningServer
from trio_ws.settings import Settings
from trio_ws.shell import hypercorn_guard

SECRET = "a-test-secret-of-at-least-thirty-two-bytes"


def host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
    return host, int(port)


def metrics_url(server: RunningServer) -> str:
    assert server.app.metrics is not None
    assert server.app.metrics.address is not None
    host, port = server.app.metrics.address
    return f"http://{host}:{port}"


async def scrape(server: RunningServer) -> tuple[str, dict[str, float]]:
    status, text = await http_get(metrics_url(server), "/metrics")
    assert status == 200
    samples = {
        sample.name + str(sorted(sample.labels.items()) or ""): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return text, samples


async def test_metrics_follow_the_clients_and_agree_with_health(
    start_server: StartServer,
) -> None:
    server = await start_server(metrics_port=free_port(), max_message_size=1024)
    async with (
        open_websocket_url(server.ws_url + "/a") as a,
        open_websocket_url(server.ws_url + "/b") as b,
    ):
        await next_frame(a)
        await next_frame(b)
        for i in range(3):
            await a.send_message(f"hello {i}")
        for ws in (a, b):
            for _ in range(3):
                assert (await next_frame(ws))["type"] == "message"
        async with open_websocket_url(server.ws_url + "/big") as big:
            await next_frame(big)
            await big.send_message("x" * 2000)
            assert (await close_code(big))[0] == 1009
        text, samples = await scrape(server)
        health = health_report(server.hub)  # what /health reports, from the same figures
    assert samples["trio_ws_connections"] == health["active_connections"] == 2
    assert samples["trio_ws_messages_received_total"] == 3
    assert samples["trio_ws_broadcasts_total[('kind', 'message')]"] == 3
    assert samples["trio_ws_deliveries_total"] == 6 == 3 * 2
    assert samples["trio_ws_connections_opened_total"] == health["connections_total"] == 3
    assert samples["trio_ws_evictions_total[('code', '1009')]"] == 1
    assert samples["trio_ws_limits_hit_total[('limit', 'message_size')]"] == 1
    assert samples["trio_ws_broker_up"] == 1
    assert samples["trio_ws_drain_state"] == 0
    assert samples["trio_ws_processes"] == 1

    promtool = require_tool("promtool", "prometheus", "/usr/bin/promtool")
    checked = await trio.to_thread.run_sync(
        lambda: subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_refusals_publishes_kicks_and_expiries_move_their_counters(
    start_server: StartServer,
) -> None:
    key = "metrics-key-0123456789"
    server = await start_server(metrics_port=free_port(), api_key=key, client_publish="none")
    foreign = [(b"Origin", b"https://evil.example")]
    with pytest.raises(ConnectionRejected):
        async with open_websocket_url(server.ws_url + "/x", extra_headers=foreign):
            pass
    async with open_websocket_url(server.ws_url + "/alice") as alice:
        await next_frame(alice)
        async with open_websocket_url(server.ws_url + "/alice") as impostor:
            assert (await close_code(impostor))[0] == 4009
        await alice.send_message("refused by TRIO_WS_CLIENT_PUBLISH=none")
        assert (await next_frame(alice))["type"] == "error"
        bearer = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        status, _, _ = await http_request(
            server.binds[0], "POST", "/publish", headers=bearer, body=b'{"text": "hi"}'
        )
        assert status == 202
        assert (await next_frame(alice))["text"] == "hi"
        status, _, _ = await http_request(
            server.binds[0], "DELETE", "/clients/alice", headers=bearer
        )
        assert status == 200
        assert (await close_code(alice))[0] == 4503
    await wait_until(lambda: server.hub.registry.statistics().connections == 0)
    _, samples = await scrape(server)
    refused = "trio_ws_connections_refused_total"
    assert samples[f"{refused}[('reason', 'origin')]"] == 1
    assert samples[f"{refused}[('reason', 'id_in_use')]"] == 1
    assert samples["trio_ws_publishes_refused_total"] == 1
    assert samples["trio_ws_api_publishes_total[('result', 'accepted')]"] == 1
    assert samples["trio_ws_kicks_total"] == 1
    assert samples["trio_ws_connections_closed_total[('code', '4503')]"] == 1

    tokens = await start_server(metrics_port=free_port(), jwt_secret=SECRET)
    async with open_websocket_url(tokens.ws_url + "?token=forged") as ws:
        assert (await close_code(ws))[0] == 4501
    short = jwt.encode({"sub": "bob", "exp": int(time.time()) + 2}, SECRET, algorithm="HS256")
    async with open_websocket_url(f"{tokens.ws_url}?token={short}") as bob:
        await next_frame(bob)
        assert (await close_code(bob))[0] == 4502
    await wait_until(lambda: tokens.hub.registry.statistics().connections == 0)
    _, samples = await scrape(tokens)
    assert samples[f"{refused}[('reason', 'token')]"] == 1
    assert samples["trio_ws_token_expiries_total"] == 1
    assert samples["trio_ws_connections_closed_total[('code', '4502')]"] == 1


async def test_an_id_held_on_another_instance_is_refused_and_counted(
    start_server: StartServer, tmp_path: Any
) -> None:
    """Across a Redis cluster the attempt is registered before the claim fails: it counts as
    refused (id_in_use) and as closed with 4009, never as a client that left by itself."""
    async with redis_server(str(tmp_path)) as redis:
        one = await start_server(redis_url=redis.url)
        two = await start_server(redis_url=redis.url, metrics_port=free_port())
        async with open_websocket_url(one.ws_url + "/alice") as alice:
            await next_frame(alice)
            async with open_websocket_url(two.ws_url + "/alice") as impostor:
                assert (await close_code(impostor))[0] == 4009
        await wait_until(lambda: two.hub.registry.statistics().connections == 0)
        _, samples = await scrape(two)
        for hub in (one.hub, two.hub):
            hub.force_close("test over")  # before Redis goes
    assert samples["trio_ws_connections_refused_total[('reason', 'id_in_use')]"] == 1
    assert samples["trio_ws_connections_closed_total[('code', '4009')]"] == 1
    assert "trio_ws_connections_closed_total[('code', 'none')]" not in samples


async def test_a_publish_the_broker_cannot_take_is_counted_as_refused(
    start_server: StartServer, tmp_path: Any
) -> None:
    key = "metrics-key-0123456789"
    bearer = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with redis_server(str(tmp_path)) as redis:
        server = await start_server(redis_url=redis.url, metrics_port=free_port(), api_key=key)
        await wait_until(lambda: server.hub.broker.state is BrokerState.UP, timeout=10)
        await redis.kill()
        await wait_until(lambda: server.hub.broker.state is not BrokerState.UP, timeout=20)
        status, _, _ = await http_request(
            server.binds[0], "POST", "/publish", headers=bearer, body=b'{"text": "hi"}'
        )
        assert status == 503
        _, samples = await scrape(server)
        server.hub.force_close("test over")
    assert samples["trio_ws_api_publishes_total[('result', 'refused')]"] == 1
    assert samples["trio_ws_api_publishes_total[('result', 'accepted')]"] == 0


async def test_silent_clients_and_broken_frames_move_their_counters(
    start_server: StartServer,
) -> None:
    server = await start_server(metrics_port=free_port(), ping_interval=0.5, pong_timeout=1)
    host, port = host_port(server.ws_url)
    silent = await raw_handshake(host, port, "/ws/silent")
    broken = await raw_handshake(host, port, "/ws/broken")
    with silent, broken:
        await broken.send(client_frame(TEXT, b"\xff\xfe not UTF-8"))
        for sock, code in ((broken, 1007), (silent, 4010)):
            frames = await read_server_frames(sock, timeout=10)
            assert frames[-1][0] == CLOSE
            assert int.from_bytes(frames[-1][1][:2], "big") == code
    await wait_until(lambda: server.hub.registry.statistics().connections == 0)
    _, samples = await scrape(server)
    assert samples["trio_ws_no_pong_disconnects_total"] == 1
    assert samples["trio_ws_connections_closed_total[('code', '4010')]"] == 1
    assert samples["trio_ws_protocol_errors_total"] == 1
    assert samples["trio_ws_evictions_total[('code', '1007')]"] == 1


async def test_waiting_connections_closed_by_the_cap_are_counted(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cap 1: a second socket that sends nothing closes the first, and the scrape says so
    (the count is the process's: compared with the count before)."""
    server = await start_server(metrics_port=free_port())
    _, samples = await scrape(server)
    before = samples["trio_ws_waiting_connections_closed_total"]
    host, port = host_port(server.binds[0])
    with monkeypatch.context() as patch:
        patch.setattr(hypercorn_guard, "_waiting_limit", 1)
        first = await trio.open_tcp_stream(host, port)
        second = await trio.open_tcp_stream(host, port)
        async with first, second:
            with trio.fail_after(5), contextlib.suppress(trio.BrokenResourceError):
                assert await first.receive_some() == b""  # closed (or reset)
    _, samples = await scrape(server)
    assert samples["trio_ws_waiting_connections_closed_total"] == before + 1
    assert samples["trio_ws_limits_hit_total[('limit', 'waiting_connections')]"] == before + 1


async def test_only_get_metrics_is_answered(start_server: StartServer) -> None:
    server = await start_server(metrics_port=free_port())
    url = metrics_url(server)
    assert (await http_get(url, "/"))[0] == 404
    assert (await http_get(url, "/metrics?x=1"))[0] == 200
    host, port = url.split("://")[1].rsplit(":", 1)
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(b"POST /metrics HTTP/1.1\r\n\r\n")
            answer = await stream.receive_some()
    assert answer.startswith(b"HTTP/1.1 405")


async def test_metrics_stay_off_by_default(server: RunningServer) -> None:
    assert server.app.metrics is None


async def test_a_redis_cluster_and_its_outage_are_described(tmp_path: Any) -> None:
    def scrape_hub(hub: Hub) -> dict[str, float]:
        text = metrics.render(metrics.collect(metrics.Sources(hub))).decode()
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if not sample.labels
        }

    async with redis_server(str(tmp_path)) as redis, trio.open_nursery() as nursery:
        settings = Settings(broadcast_interval=0, presence_interval=0, redis_url=redis.url)
        hubs = [
            Hub(settings, broker=RedisBroker(redis.url, pending_limit=2), instance_id=n)
            for n in "ab"
        ]
        for hub in hubs:
            await nursery.start(hub.run)
        hubs[0].connect("x", "p")
        await hubs[1].publish("y", "hello")
        await wait_until(lambda: all(h.stats.message_broadcasts == 1 for h in hubs), timeout=10)
        await wait_until(lambda: scrape_hub(hubs[0]).get("trio_ws_cluster_instances") == 2, 10)
        samples = scrape_hub(hubs[0])
        assert samples["trio_ws_broker_up"] == 1
        assert samples["trio_ws_cluster_connections"] == 1
        assert samples["trio_ws_deliveries_total"] == 1
        await redis.kill()
        await wait_until(lambda: hubs[0].broker.state is not BrokerState.UP, timeout=20)
        await trio.sleep(0.2)
        samples = scrape_hub(hubs[0])
        assert samples["trio_ws_broker_up"] == 0
        assert samples["trio_ws_broker_outage_seconds"] > 0
        assert samples["trio_ws_broker_outages_total"] == 1
        # Three messages while Redis is away, room for two: the oldest will not reach "b".
        for text in ("one", "two", "three"):
            await hubs[0].publish("x", text)
        samples = scrape_hub(hubs[0])
        health = hubs[0].broker.health()
        assert samples["trio_ws_broker_pending"] == health["pending"] == 2
        assert samples["trio_ws_broker_pending_bytes"] == health["pending_bytes"] > 0
        assert samples["trio_ws_broker_dropped_during_outages_total"] == 1
        assert samples["trio_ws_broker_trims_after_refusals_total"] == 0
        await redis.start()
        await wait_until(lambda: hubs[0].broker.state is BrokerState.UP, timeout=20)
        samples = scrape_hub(hubs[0])
        assert samples["trio_ws_broker_up"] == 1
        assert samples["trio_ws_broker_outage_seconds"] == 0
        await wait_until(lambda: scrape_hub(hubs[0])["trio_ws_broker_pending_bytes"] == 0, 10)
        nursery.cancel_scope.cancel()
