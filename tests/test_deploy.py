"""The deploy recipes agree with the server's defaults (their live tests need systemd, Docker
and nginx; these checks catch a recipe that drifts from the code)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from trio_ws.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


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
    assert float(unit["TimeoutStopSec"]) >= drain + 30
    assert unit["KillSignal"] == "SIGTERM"
    assert unit["KillMode"] == "mixed"
    assert unit["ExecStart"].endswith("/bin/trio-ws")


def test_dockerfile_runs_the_launcher_as_pid_1_and_not_as_root() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", text, re.MULTILINE)
    assert entrypoint is not None
    assert json.loads(entrypoint.group(1)) == ["trio-ws"]  # exec form: SIGTERM reaches it
    user = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert user
    assert user[-1] not in ("root", "0")
    assert "STOPSIGNAL SIGTERM" in text
    assert "TRIO_WS_HOST=0.0.0.0" in text


def test_nginx_upgrades_websockets_and_outlives_the_ping() -> None:
    text = (DEPLOY / "nginx.conf").read_text()
    assert "proxy_http_version 1.1;" in text
    assert "proxy_set_header Upgrade $http_upgrade;" in text
    assert "proxy_set_header Connection $connection_upgrade;" in text
    timeout = re.search(r"proxy_read_timeout (\d+)s;", text)
    assert timeout is not None
    assert float(timeout.group(1)) > 2 * Settings().ping_interval
