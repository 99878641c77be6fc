"""/metrics on a real in-process server: what clients did shows up, it agrees with /health, and
Prometheus's own promtool accepts the exposition."""

from __future__ import annotations

import subprocess

import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from tests.conftest import StartServer
from tests.live import free_port, require_tool
from tests.wsutil import close_code, http_get, next_frame
from trio_ws.core.health import health_report
from trio_ws.hosting.launcher import RunningServer


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
