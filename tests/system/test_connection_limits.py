"""Connection limits in real processes: the per-process cap (1013, while /health and /ready
answer), the per-IP cap and handshake rate, the client address behind a trusted nginx, and a
process whose file limit is low.

Several "clients" on loopback: a raw socket bound to 127.0.0.2, 127.0.0.3, ... (Linux routes
all of 127.0.0.0/8 to lo), so that per-IP limits see different addresses.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from tests.procutil import LAUNCHER, hypercorn, running
from tests.system.test_nginx import nginx_in_front, port_of
from tests.wsutil import http_json, next_server_frame, raw_handshake, wait_until

ENV = {
    "TRIO_WS_BROADCAST_INTERVAL": "0",
    "TRIO_WS_PRESENCE_INTERVAL": "0",
    "TRIO_WS_DRAIN_TIMEOUT": "5",
    # The tests read the limits and refusal counts from /health's detail.
    "TRIO_WS_HEALTH_DETAIL": "on",
}
MODES = {"launcher": LAUNCHER, "hypercorn-workers-1": hypercorn("--workers", "1")}
TRY_AGAIN_LATER = 1013


def host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
    return host, int(port)


async def first_frame(sock: trio.socket.SocketType, timeout: float = 10) -> str | int:
    """What the server said first after the handshake: the type of its first text frame
    (``welcome``), or the code of its close frame."""
    buffer = b""
    with trio.fail_after(timeout):
        while True:
            opcode, payload, buffer = await next_server_frame(sock, buffer)
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big")
            if opcode == 0x1:
                kind: str = json.loads(payload)["type"]
                return kind


@asynccontextmanager
async def sockets() -> AsyncIterator[list[trio.socket.SocketType]]:
    """A list the test fills with sockets; every one is closed at the end."""
    opened: list[trio.socket.SocketType] = []
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()


async def attempt(
    opened: list[trio.socket.SocketType],
    url: str,
    path: str = "/ws",
    *,
    source: str | None = None,
    headers: str = "",
) -> str | int:
    """Connect (kept open in ``opened``), and return what the server said first."""
    host, port = host_port(url)
    sock = await raw_handshake(host, port, path, source=source, headers=headers)
    opened.append(sock)
    return await first_frame(sock)


@pytest.mark.parametrize("argv", MODES.values(), ids=MODES.keys())
async def test_at_the_cap_a_new_websocket_gets_1013_and_health_and_ready_answer(
    argv: Sequence[str],
) -> None:
    async with running(argv, {**ENV, "TRIO_WS_MAX_CONNECTIONS": "3"}) as server:
        url = await server.ws_url()
        base = await server.base_url()
        async with sockets() as opened:
            assert [await attempt(opened, url) for _ in range(3)] == ["welcome"] * 3
            assert await attempt(opened, url) == TRY_AGAIN_LATER
            assert await attempt(opened, url) == TRY_AGAIN_LATER
            status, health = await http_json(base, "/health")
            assert status == 200
            assert health["active_connections"] == 3
            assert health["max_connections"] == 3
            assert health["refused_over_limits"] == {
                "max_connections": 2,
                "max_connections_per_ip": 0,
                "handshake_rate_per_ip": 0,
            }
            assert await http_json(base, "/ready") == (
                503,
                {"ready": False, "reason": "at the connection limit"},
            )
            # One leaves: its place is free again.
            opened.pop(0).close()
            await wait_until(lambda: server.count(r"disconnected after") >= 1, timeout=5)
            assert await attempt(opened, url) == "welcome"
        # One line for the first refusal, not one per refusal.
        assert server.count(r"refused .*over the connection limits") == 1


async def test_per_ip_cap_refuses_only_that_address() -> None:
    env = {**ENV, "TRIO_WS_MAX_CONNECTIONS_PER_IP": "2"}
    async with running(LAUNCHER, env) as server:
        url = await server.ws_url()
        async with sockets() as opened:
            a = [await attempt(opened, url, source="127.0.0.2") for _ in range(3)]
            assert a == ["welcome", "welcome", TRY_AGAIN_LATER]
            assert await attempt(opened, url, source="127.0.0.3") == "welcome"
            _, health = await http_json(await server.base_url(), "/health")
            assert health["refused_over_limits"]["max_connections_per_ip"] == 1
            # 127.0.0.2 closes one: it may connect once more.
            opened.pop(0).close()
            await wait_until(lambda: server.count(r"disconnected after") >= 1, timeout=5)
            assert await attempt(opened, url, source="127.0.0.2") == "welcome"


async def test_handshake_rate_per_ip() -> None:
    """0.5 handshakes per second: a bucket of 1, refilled in 2 s."""
    env = {**ENV, "TRIO_WS_HANDSHAKE_RATE_PER_IP": "0.5"}
    async with running(LAUNCHER, env) as server:
        url = await server.ws_url()
        async with sockets() as opened:
            a = [await attempt(opened, url, source="127.0.0.2") for _ in range(3)]
            assert a == ["welcome", TRY_AGAIN_LATER, TRY_AGAIN_LATER]
            assert await attempt(opened, url, source="127.0.0.3") == "welcome"
            await trio.sleep(2.2)
            assert await attempt(opened, url, source="127.0.0.2") == "welcome"
            _, health = await http_json(await server.base_url(), "/health")
            assert health["refused_over_limits"]["handshake_rate_per_ip"] == 2


async def test_behind_a_trusted_nginx_the_real_client_address_is_used(tmp_path: Path) -> None:
    """nginx (127.0.0.1) appends the client's address to X-Forwarded-For; trio_ws trusts it, so
    the per-IP cap counts 127.0.0.2 and 127.0.0.3 apart, and the log names them. A direct client
    (not a trusted proxy) that sends X-Forwarded-For is known by its own address."""
    env = {
        **ENV,
        "TRIO_WS_MAX_CONNECTIONS_PER_IP": "1",
        "TRIO_WS_TRUSTED_PROXIES": "127.0.0.1/32, ::1",
    }
    async with (
        running(LAUNCHER, env) as server,
        nginx_in_front(tmp_path, [port_of(await server.base_url())]) as proxy,
        sockets() as opened,
    ):
        ws = proxy.replace("http", "ws", 1) + "/ws"
        # A client-supplied X-Forwarded-For is kept by nginx, on the left: not believed.
        spoof = "X-Forwarded-For: 198.51.100.9\r\n"
        assert await attempt(opened, ws, "/ws/two-a", source="127.0.0.2", headers=spoof) == (
            "welcome"
        )
        assert await attempt(opened, ws, "/ws/two-b", source="127.0.0.2") == TRY_AGAIN_LATER
        assert await attempt(opened, ws, "/ws/three", source="127.0.0.3") == "welcome"
        await server.wait_for_line(r"client two-a connected from 127\.0\.0\.2 \(via 127\.0\.0\.1:")
        await server.wait_for_line(r"client three connected from 127\.0\.0\.3 \(via 127\.0\.0\.1:")
        # Straight to trio_ws from an address that is no trusted proxy: the header is ignored.
        direct = await server.ws_url()
        assert await attempt(opened, direct, "/ws/four", source="127.0.0.4", headers=spoof) == (
            "welcome"
        )
        await server.wait_for_line(r"client four connected from 127\.0\.0\.4:\d+,")
        assert "198.51.100.9" not in server.log


async def test_a_low_file_limit_keeps_health_answering() -> None:
    """Soft and hard RLIMIT_NOFILE 256: the cap is lowered below it (one WARNING), clients over
    it get 1013, /health answers; then raw TCP sockets that never send a request do not
    exhaust the descriptors either: the connections waiting for their request are capped
    beside the WebSockets (the oldest closed first), so /health still answers and no accept
    fails (test_waiting_connections.py has the attacks)."""
    argv = ["prlimit", "--nofile=256:256", "--", *LAUNCHER]
    async with running(argv, ENV) as server:
        url = await server.ws_url()
        base = await server.base_url()
        async with sockets() as opened:
            outcomes: list[str | int] = []
            with trio.fail_after(60):
                for _ in range(300):
                    outcomes.append(await attempt(opened, url))  # noqa: PERF401  # one by one
            cap_line = await server.wait_for_line(r"WARNING .*max_connections lowered to (\d+)")
            cap = int(cap_line.group(1))
            assert 100 <= cap < 256
            assert outcomes.count("welcome") == cap
            assert outcomes.count(TRY_AGAIN_LATER) == 300 - cap
            status, health = await http_json(base, "/health")
            assert (status, health["active_connections"]) == (200, cap)
            waiting_line = await server.wait_for_line(r"at most (\d+) connections waiting")
            assert cap + int(waiting_line.group(1)) < 256
            # Plain TCP connections that never send a request: before the cap on them, 300
            # took the last descriptors, and the accept loop failed with EMFILE.
            host, port = host_port(url)
            raw = []
            try:
                for _ in range(300):
                    sock = trio.socket.socket()
                    raw.append(sock)
                    with trio.fail_after(5):
                        await sock.connect((host, port))
                with trio.fail_after(5):
                    status, health = await http_json(base, "/health")
                assert (status, health["active_connections"]) == (200, cap)
            finally:
                for sock in raw:
                    sock.close()
        await server.wait_for_line(r"connections waiting for their request's headers: the oldest")
        assert server.count(r"Too many open files|EMFILE") == 0, server.log[-3000:]
        assert server.count(r"Traceback") == 0
