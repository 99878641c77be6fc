"""trio_ws behind Debian's nginx, configured by the shipped ``deploy/nginx.conf``.

Each test runs a real trio_ws (the launcher) and a real nginx in front of it, on loopback ports,
with the shipped site config; only the ports (and, for the idle tests, ``proxy_read_timeout``)
are changed, see :func:`tests.live.nginx_site`. Everything is checked through nginx.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from tests.live import free_port, nginx_command
from tests.procutil import LAUNCHER, ServerProcess, running
from tests.wsutil import (
    close_code,
    frames_until_closed,
    http_get,
    http_json,
    next_frame,
    wait_until,
)


@asynccontextmanager
async def nginx_in_front(
    workdir: Path, upstream_ports: Sequence[int], read_timeout: str | None = None
) -> AsyncIterator[str]:
    """Run nginx on a free port in front of ``upstream_ports``; yield its base URL."""
    port = free_port()
    argv = nginx_command(workdir, port, upstream_ports, read_timeout)
    async with running(argv, ready=False) as nginx:
        base_url = f"http://127.0.0.1:{port}"

        async def accepts() -> bool:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                return False
            await stream.aclose()
            return True

        with trio.fail_after(10):
            while not await accepts():
                assert nginx.process.returncode is None, f"nginx exited:\n{nginx.log}"
                await trio.sleep(0.02)
        yield base_url
        nginx.send(signal.SIGQUIT)  # graceful stop, as `nginx -s quit` does
        await nginx.wait_exit(10)


def port_of(base_url: str) -> int:
    return int(base_url.rsplit(":", 1)[1])


async def test_page_health_and_ready_through_nginx(tmp_path: Path) -> None:
    async with (
        running(LAUNCHER, {"TRIO_WS_HEALTH_DETAIL": "on"}) as server,
        nginx_in_front(tmp_path, [port_of(await server.base_url())]) as proxy,
    ):
        status, body = await http_get(proxy, "/")
        assert status == 200
        assert "<title>trio_ws test client</title>" in body
        status, health = await http_json(proxy, "/health")
        assert (status, health["status"], health["pid"]) == (200, "ok", server.pid)
        assert await http_json(proxy, "/ready") == (200, {"ready": True})


async def test_messages_flow_both_ways_through_nginx(tmp_path: Path) -> None:
    async with (
        running(LAUNCHER) as server,
        nginx_in_front(tmp_path, [port_of(await server.base_url())]) as proxy,
    ):
        ws_url = proxy.replace("http", "ws", 1) + "/ws"
        async with (
            open_websocket_url(ws_url + "/alice") as alice,
            open_websocket_url(ws_url + "/bob") as bob,
        ):
            assert (await next_frame(alice))["type"] == "welcome"
            welcome = await next_frame(bob)
            assert (welcome["client_id"], welcome["active_connections"]) == ("bob", 2)
            # One at a time: two senders on two connections have no order between them.
            for name, sender in (("alice", alice), ("bob", bob)):
                text = f"from {name} <b>through</b> nginx"
                await sender.send_message(text)
                for ws in (alice, bob):
                    frame = await next_frame(ws)
                    assert (frame["type"], frame["from"], frame["text"]) == ("message", name, text)


async def test_origins_through_nginx(tmp_path: Path) -> None:
    """Through the shipped config, a page of the proxy's own origin connects (nginx forwards
    the Host with its port) and a foreign one gets 403; with TLS ending at nginx the scheme
    comes from X-Forwarded-Proto, believed from the trusted proxy only. The access log has the
    path but no query string: neither the resume key nor a token."""
    env = {"TRIO_WS_BROADCAST_INTERVAL": "0", "TRIO_WS_TRUSTED_PROXIES": "127.0.0.1"}
    async with (
        running(LAUNCHER, env) as server,
        nginx_in_front(tmp_path, [port_of(await server.base_url())]) as proxy,
    ):
        ws_url = proxy.replace("http", "ws", 1) + "/ws"
        own = [(b"Origin", proxy.encode())]
        async with open_websocket_url(ws_url + "/alice", extra_headers=own) as alice:
            key = (await next_frame(alice))["resume_key"]
            async with open_websocket_url(
                f"{ws_url}/alice?key={key}&token=not-a-real-token", extra_headers=own
            ) as again:
                assert (await next_frame(again))["client_id"] == "alice"
        for foreign in ("https://evil.example", proxy.replace("http://", "https://")):
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(
                    ws_url, extra_headers=[(b"Origin", foreign.encode())]
                ):
                    pass
            assert info.value.status_code == 403
        await wait_until(lambda: "origin https://evil.example is not allowed" in server.log)
        assert key not in server.log
    log = (tmp_path / "access.log").read_text()
    assert 'GET /ws/alice HTTP/1.1" 101' in log
    assert key not in log
    assert "not-a-real-token" not in log


async def test_drain_reaches_clients_through_nginx(tmp_path: Path) -> None:
    """SIGTERM: the warning and, at the deadline, 1001 pass through nginx; during the drain a new
    connection through nginx gets 1001 and ``/ready`` answers 503."""
    env = {
        "TRIO_WS_DRAIN_TIMEOUT": "2",
        "TRIO_WS_BROADCAST_INTERVAL": "0",
        "TRIO_WS_PRESENCE_INTERVAL": "0",
    }
    async with (
        running(LAUNCHER, env) as server,
        nginx_in_front(tmp_path, [port_of(await server.base_url())]) as proxy,
    ):
        ws_url = proxy.replace("http", "ws", 1) + "/ws"
        async with open_websocket_url(ws_url + "/a") as a, open_websocket_url(ws_url + "/b") as b:
            for ws in (a, b):
                assert (await next_frame(ws))["type"] == "welcome"
            server.send(signal.SIGTERM)
            for ws in (a, b):
                warning = await next_frame(ws)
                assert warning["type"] == "shutdown"
                assert 0 < warning["seconds_left"] <= 2
            assert await http_json(proxy, "/ready") == (503, {"ready": False, "reason": "draining"})
            status, health = await http_json(proxy, "/health")
            assert (status, health["shutdown_in_progress"]) == (200, True)
            async with open_websocket_url(ws_url + "/late") as late:
                code, reason = await close_code(late)
                assert code == 1001
                assert reason is not None
                assert "reconnect" in reason
            # Both stayed: the deadline closes them with 1001, through the proxy.
            for ws in (a, b):
                assert await frames_until_closed(ws, timeout=5) == []
                assert ws.closed is not None
                assert (ws.closed.code, ws.closed.reason) == (1001, "drain deadline reached")
        assert await server.wait_exit(10) == 0


async def idle_through_nginx(
    server: ServerProcess, tmp_path: Path, read_timeout_s: float, idle_s: float
) -> float | None:
    """Hold an idle client through nginx for ``idle_s``; return when it was cut, or None."""
    async with nginx_in_front(
        tmp_path, [port_of(await server.base_url())], f"{read_timeout_s:g}s"
    ) as proxy:
        ws_url = proxy.replace("http", "ws", 1) + "/ws/idle"
        async with open_websocket_url(ws_url) as ws:
            assert (await next_frame(ws))["type"] == "welcome"
            start = trio.current_time()
            try:
                # The client reads (and answers pings) but nothing else arrives while idle.
                with trio.move_on_after(idle_s):
                    message = await ws.get_message()
                    raise AssertionError(f"an idle client got a frame: {message!r}")
            except ConnectionClosed:
                cut_after = trio.current_time() - start
                # nginx drops both TCP connections without a close frame.
                assert ws.closed is not None
                assert ws.closed.code == 1006
                return cut_after
            # Still connected: prove it end to end.
            await ws.send_message("still here")
            frame = await next_frame(ws)
            assert (frame["from"], frame["text"]) == ("idle", "still here")
            return None


READ_TIMEOUT_S = 2.0


async def test_pings_keep_an_idle_client_through_nginx_read_timeout(tmp_path: Path) -> None:
    """With ``proxy_read_timeout 2s`` and pings every second, an idle client outlives 2 x 2 s."""
    env = {
        "TRIO_WS_PING_INTERVAL": "1",
        "TRIO_WS_BROADCAST_INTERVAL": "0",
        "TRIO_WS_PRESENCE_INTERVAL": "0",
    }
    async with running(LAUNCHER, env) as server:
        assert (
            await idle_through_nginx(server, tmp_path, READ_TIMEOUT_S, 2 * READ_TIMEOUT_S) is None
        )


async def test_without_pings_nginx_cuts_the_idle_client(tmp_path: Path) -> None:
    """The control: the same client, pings off, is cut by nginx after ``proxy_read_timeout``
    (so the test above measures the pings, not a lenient proxy)."""
    env = {
        "TRIO_WS_PING_INTERVAL": "0",
        "TRIO_WS_BROADCAST_INTERVAL": "0",
        "TRIO_WS_PRESENCE_INTERVAL": "0",
    }
    async with running(LAUNCHER, env) as server:
        cut_after = await idle_through_nginx(server, tmp_path, READ_TIMEOUT_S, 2 * READ_TIMEOUT_S)
        assert cut_after is not None
        assert cut_after == pytest.approx(READ_TIMEOUT_S, abs=0.8)
        # The server sees the client go.
        await wait_until(lambda: server.count(r"client idle disconnected") > 0, timeout=5)
