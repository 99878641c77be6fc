"""The real thing: Debian's Prometheus scrapes ``python -m trio_ws`` during traffic and a drain,
and what it stored agrees with /health and with what the clients did. Also: promtool on the
alert rules (and their own tests), on the scrape configuration and on a scrape; the dashboard,
the rules and docs/metrics.md name the same metrics as the server exports."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import trio
import yaml
from trio_websocket import WebSocketConnection, connect_websocket_url

from tests import live
from tests.procutil import LAUNCHER, running
from tests.wsutil import close_code, http_get, http_json, next_frame
from trio_ws.brokers.local import LocalBroker
from trio_ws.core.broker import ClusterView
from trio_ws.core.hub import Hub
from trio_ws.hosting import metrics
from trio_ws.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "trio-ws-dashboard.json"
DOCS = ROOT / "docs" / "metrics.md"

DRAIN_S = 8


def promtool() -> str:
    return live.require_tool("promtool", "prometheus", "/usr/bin/promtool")


def run(*argv: str, stdin: str | None = None, cwd: Path | None = None) -> tuple[int, str]:
    done = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )
    return done.returncode, done.stdout + done.stderr


class PrometheusApi:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    async def get(self, path: str) -> Any:
        status, body = await http_get(self.base, path, timeout=10)
        assert status == 200, body
        answer = json.loads(body)
        assert answer["status"] == "success", answer
        return answer["data"]

    async def value(self, expr: str) -> float | None:
        """The single value of an instant query (None when it has no result)."""
        data = await self.get("/api/v1/query?query=" + urllib.parse.quote(expr))
        results = data["result"]
        assert len(results) <= 1, results
        return float(results[0]["value"][1]) if results else None

    async def until(self, expr: str, wanted: float, timeout: float = 20) -> None:
        """Wait until Prometheus has scraped (and stored) ``expr == wanted``."""
        seen = None
        with trio.move_on_after(timeout):
            # Polling: Prometheus is another process, it has no event to wait on.
            while (seen := await self.value(expr)) != wanted:  # noqa: ASYNC110
                await trio.sleep(0.25)
        assert seen == wanted, f"{expr}: {seen}, wanted {wanted}"


async def test_prometheus_stores_the_traffic_and_the_drain(tmp_path: Path) -> None:
    binary = live.require_tool("prometheus", "prometheus", "/usr/bin/prometheus")
    metrics_port, prometheus_port = live.free_port(), live.free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS / "alerts.yaml")],
        "scrape_configs": [
            {
                "job_name": "trio-ws",
                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prometheus = live.Process(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ]
    )
    api = PrometheusApi(prometheus_port)
    env = {
        "TRIO_WS_DRAIN_TIMEOUT": str(DRAIN_S),
        "TRIO_WS_PROGRESS_INTERVAL": "1",
        "TRIO_WS_BROADCAST_INTERVAL": "0",
        "TRIO_WS_PRESENCE_INTERVAL": "0",
        "TRIO_WS_METRICS_PORT": str(metrics_port),
        # /health's counters, compared below (main's public /health hides them without it).
        "TRIO_WS_HEALTH_DETAIL": "on",
    }
    try:
        await trio.to_thread.run_sync(
            prometheus.wait_for_line, "Server is ready to receive web requests", 30
        )
        async with running(LAUNCHER, env) as server, trio.open_nursery() as nursery:
            url, base = await server.ws_url(), await server.base_url()
            clients: list[WebSocketConnection] = []
            for i in range(5):
                clients.append(await connect_websocket_url(nursery, f"{url}/c{i}"))
                await next_frame(clients[-1])
            for ws in clients:
                await ws.send_message("one")
                await ws.send_message("two")
            for ws in clients:
                for _ in range(10):
                    assert (await next_frame(ws))["type"] == "message"
            # Prometheus scraped it: 10 messages from 5 clients, each to all 5.
            await api.until('up{job="trio-ws"}', 1)
            await api.until("trio_ws_messages_received_total", 10)
            await api.until("trio_ws_deliveries_total", 50)
            await clients[0].aclose()
            await clients[1].aclose()
            await api.until("trio_ws_connections", 3)

            server.send(signal.SIGTERM)
            for ws in clients[2:]:
                assert (await next_frame(ws))["type"] == "shutdown"
            await clients[2].aclose()  # leaves by itself during the drain
            late = await connect_websocket_url(nursery, f"{url}/late")
            assert (await close_code(late))[0] == 1001  # refused: the instance is draining
            await api.until('trio_ws_connections_refused_total{reason="draining"}', 1)
            await server.wait_for_line(r"drain: client c2 left")
            await api.until("trio_ws_drain_connections_left", 2)
            await api.until('trio_ws_drain_connections_ended{how="left"}', 1)
            _, health = await http_json(base, "/health")
            status, text = await http_get(f"http://127.0.0.1:{metrics_port}", "/metrics")
            assert status == 200
            # The stored values agree with /health, taken during the drain.
            drain = health["drain"]
            assert await api.value("trio_ws_drain_state") == 1
            assert await api.value("trio_ws_drain_connections_at_start") == 3
            assert drain["connections_at_start"] == 3
            assert drain["left"] == 1
            assert await api.value("trio_ws_connections_opened_total") == 5
            assert health["connections_total"] == 5
            assert await api.value('trio_ws_broadcasts_total{kind="message"}') == 10
            assert health["messages_broadcast"] == 10
            assert health["refused_during_drain"] == 1
            deadline = await api.value("trio_ws_drain_deadline_timestamp_seconds")
            started = await api.value("trio_ws_drain_started_timestamp_seconds")
            assert deadline is not None
            assert started is not None
            assert deadline - started == drain["deadline_s"] == DRAIN_S
            # The alert rules are loaded, and the drain-near-deadline one fires now.
            await api.until('ALERTS{alertname="TrioWsDrainNearDeadline",alertstate="firing"}', 1)
            for ws in clients[3:]:  # the two that stayed: closed at the deadline
                assert (await close_code(ws, timeout=DRAIN_S + 10))[0] == 1001
            assert await server.wait_exit(timeout=20) == 0
        # The closing note's evidence: the lines of a scrape during the drain that matter.
        print("\n[scrape during the drain]", file=sys.stderr)
        for line in text.splitlines():
            if re.match(
                r"trio_ws_(drain|connections |deliveries|messages_rec|broker_up)", line
            ) or ("draining" in line):
                print(line, file=sys.stderr)
        code, output = await trio.to_thread.run_sync(
            lambda: run(promtool(), "check", "metrics", stdin=text)
        )
        assert code == 0, output
        # After the exit, the history is still there.
        assert await api.value('max_over_time(trio_ws_drain_state{job="trio-ws"}[5m])') == 1
        assert await api.value("max_over_time(trio_ws_messages_received_total[5m])") == 10
    finally:
        prometheus.stop()


def test_promtool_checks_the_alert_rules_and_their_tests() -> None:
    code, output = run(promtool(), "check", "rules", str(PROMETHEUS / "alerts.yaml"))
    assert code == 0, output
    code, output = run(promtool(), "test", "rules", "alerts_test.yaml", cwd=Path(__file__).parent)
    assert code == 0, output


def test_promtool_checks_the_scrape_configuration(tmp_path: Path) -> None:
    """Debian's Prometheus is built without Kubernetes discovery: the Kubernetes job is checked
    (its relabelling included) with a static target in place of ``kubernetes_sd_configs``."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["static_configs"] = [{"targets": ["10.0.0.1:8000"]}]
    config["rule_files"] = [str(PROMETHEUS / "alerts.yaml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    code, output = run(promtool(), "check", "config", str(tmp_path / "prometheus.yml"))
    assert code == 0, output


def test_the_kubernetes_example_is_scraped_on_its_metrics_port() -> None:
    documents = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()))
    objects = {document["kind"]: document for document in documents}
    template = objects["Deployment"]["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    [container] = template["spec"]["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    settings = Settings.from_env(env)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert settings.metrics_port == ports["metrics"] == int(annotations["prometheus.io/port"])
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert settings.metrics_host == "0.0.0.0"  # the pod IP, for Prometheus inside the cluster
    # Not published through the Service: /metrics has no authentication.
    assert all(p["targetPort"] != "metrics" for p in objects["Service"]["spec"]["ports"])
    # The scrape job keeps pods with that label and annotation.
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    [job] = [j for j in config["scrape_configs"] if "kubernetes_sd_configs" in j]
    keeps = {
        tuple(r["source_labels"]): r["regex"]
        for r in job["relabel_configs"]
        if r.get("action") == "keep"
    }
    label = template["metadata"]["labels"]["app.kubernetes.io/name"]
    assert keeps[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)] == label


def exported_names() -> set[str]:
    """Every metric family a process can export (a draining one with a cluster view)."""
    hub = Hub(Settings(), broker=LocalBroker(lambda: 0.0))
    hub.drain.request("test")
    hub.drain._started_at, hub.drain._started_wall = 0.0, 0.0  # as Drain.watch sets them
    hub.broker.cluster = lambda: ClusterView(1, 0, 0, 0.0)  # type: ignore[method-assign]
    families = metrics.collect(metrics.Sources(hub, loop_lag=metrics.LoopLag()))
    return {f.name + ("_total" if f.kind == "counter" else "") for f in families}


async def test_docs_dashboard_and_rules_name_the_exported_metrics() -> None:
    exported = exported_names()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", DOCS.read_text(), re.MULTILINE))
    assert documented == exported
    used = set()
    for text in (DASHBOARD.read_text(), (PROMETHEUS / "alerts.yaml").read_text()):
        used |= set(re.findall(r"\b((?:trio_ws|process)_[a-z_]+)", text))
    histogram_parts = {
        name + suffix for name in exported for suffix in ("_bucket", "_count", "_sum")
    }
    assert used - histogram_parts <= exported, used - histogram_parts - exported
