"""Every run mode as a real process, sent real signals by PID.

Short intervals come through the environment, as an operator would set them. Times measured
here are printed (``-s`` shows them) but only asserted with wide bounds: these tests check
behaviour, the benchmark measures speed.
"""

from __future__ import annotations

import signal
import sys
import time

import pytest
import trio
from trio_websocket import connect_websocket_url, open_websocket_url

from tests.procutil import LAUNCHER, console_script, hypercorn, running
from tests.wsutil import close_code, frames_until_closed, http_json, next_frame

FAST = {
    "TRIO_WS_DRAIN_TIMEOUT": "30",
    "TRIO_WS_PROGRESS_INTERVAL": "0.5",
    "TRIO_WS_BROADCAST_INTERVAL": "0",
    "TRIO_WS_PRESENCE_INTERVAL": "0",
    # The tests read the run mode from /health's detail.
    "TRIO_WS_HEALTH_DETAIL": "on",
}


def report(what: str, seconds: float) -> None:
    print(f"\n[measured] {what}: {seconds * 1000:.0f} ms", file=sys.stderr)


async def test_launcher_sigterm_normal_drain() -> None:
    async with running(LAUNCHER, FAST) as server:
        url = await server.ws_url()
        base = await server.base_url()
        async with trio.open_nursery() as nursery:
            first = await connect_websocket_url(nursery, url + "/first")
            second = await connect_websocket_url(nursery, url + "/second")
            await next_frame(first)
            await next_frame(second)
            sent = server.send(signal.SIGTERM)
            for ws in (first, second):
                assert (await next_frame(ws, timeout=1))["type"] == "shutdown"
            report("launcher: SIGTERM to both warnings", time.monotonic() - sent)
            await server.wait_for_line(r"drain started \(SIGTERM\): 2 connections, deadline 30s")
            async with open_websocket_url(url + "/late") as late:
                assert (await close_code(late))[0] == 1001
            status, health = await http_json(base, "/health")
            assert (status, health["shutdown_in_progress"]) == (200, True)
            assert (await http_json(base, "/ready"))[0] == 503
            await server.wait_for_line(
                r"drain progress: 2 connections left, 0\.5s elapsed, 29\.5s left"
            )
            await second.aclose()
            await server.wait_for_line(r"drain: client second left after .*, 1 connection left")
            await first.aclose()
        left = time.monotonic()
        assert await server.wait_exit() == 0
        report("launcher: last client left to exit", time.monotonic() - left)
    assert time.monotonic() - left < 1.0
    assert server.count(r"drain finished \(drained\) in .*: 2 connections at start") == 1
    assert server.count(r"refused a new connection from .* during the drain \(1001\)") == 1
    assert server.count("Traceback") == 0


async def test_launcher_deadline_closes_the_rest_and_exits_0() -> None:
    async with running(LAUNCHER, {**FAST, "TRIO_WS_DRAIN_TIMEOUT": "1.5"}) as server:
        async with open_websocket_url(await server.ws_url() + "/stayer") as stayer:
            await next_frame(stayer)
            server.send(signal.SIGTERM)
            frames = await frames_until_closed(stayer, timeout=5)
            assert [f["type"] for f in frames] == ["shutdown"]
            assert frames[0]["seconds_left"] == 1.5
            assert stayer.closed is not None
            assert (stayer.closed.code, stayer.closed.reason) == (1001, "drain deadline reached")
        assert await server.wait_exit() == 0
    assert server.count(r"WARNING .*drain deadline of 1\.5s reached: closing 1 remaining") == 1
    assert server.count(r"drain progress: 1 connection left, 1\.0s elapsed, 0\.5s left") == 1


async def test_launcher_no_clients_exits_at_once() -> None:
    async with running(LAUNCHER, FAST) as server:
        sent = server.send(signal.SIGTERM)
        assert await server.wait_exit() == 0
        report("launcher: SIGTERM with no clients to exit", time.monotonic() - sent)
    assert time.monotonic() - sent < 1.5


async def test_launcher_second_sigint_closes_everyone_now() -> None:
    async with running(LAUNCHER, FAST) as server:
        async with open_websocket_url(await server.ws_url() + "/stayer") as stayer:
            await next_frame(stayer)
            server.send(signal.SIGINT)
            assert (await next_frame(stayer, timeout=1))["type"] == "shutdown"
            sent = server.send(signal.SIGINT)
            assert await close_code(stayer, timeout=2) == (1001, "server shutting down now")
        assert await server.wait_exit() == 0
    assert time.monotonic() - sent < 2
    assert server.count(r"received a second SIGINT: closing every connection now") == 1


async def test_console_script_and_invalid_configuration() -> None:
    async with running(
        [console_script("trio-ws"), "--port", "0"], {"TRIO_WS_DRAIN_TIMEOUT": "soon"}, ready=False
    ) as server:
        assert await server.wait_exit() == 2
    assert "trio-ws: error: TRIO_WS_DRAIN_TIMEOUT must be a number, got 'soon'" in server.log
    async with running([*LAUNCHER, "--queue-size", "0"], ready=False) as server:
        assert await server.wait_exit() == 2
    assert "TRIO_WS_QUEUE_SIZE must be an integer >= 1, got 0" in server.log


async def test_hypercorn_cli_sigterm_to_parent_drains() -> None:
    """``hypercorn --worker-class trio trio_ws.app:app`` as typed: a parent and one worker."""
    env = {**FAST, "TRIO_WS_DRAIN_TIMEOUT": "4"}
    async with running(hypercorn(), env) as server:
        await server.wait_for_line(r"mode=hypercorn-worker .*workers=1 drain_timeout=4s")
        await server.wait_for_line(r"WARNING .*new connections .* go unanswered")
        url = await server.ws_url()
        async with trio.open_nursery() as nursery:
            leaver = await connect_websocket_url(nursery, url + "/leaver")
            stayer = await connect_websocket_url(nursery, url + "/stayer")
            await next_frame(leaver)
            await next_frame(stayer)
            sent = server.send(signal.SIGTERM)  # the parent's PID, as `kill PID` does
            for ws in (leaver, stayer):
                assert (await next_frame(ws, timeout=1))["type"] == "shutdown"
            report("hypercorn CLI: SIGTERM to both warnings", time.monotonic() - sent)
            await leaver.aclose()
            # Past Hypercorn's own 3 s graceful_timeout, the stayer is still served ...
            await server.wait_for_line(r"drain progress: 1 connection left, 3\.5s elapsed")
            # ... and is closed with 1001 at our deadline, not cut with 1006 at Hypercorn's.
            assert await close_code(stayer, timeout=5) == (1001, "drain deadline reached")
        assert await server.wait_exit() == 0
    assert server.count(r"raising this worker's graceful_timeout from 3s to") == 1
    assert server.count("Traceback") == 0


async def test_hypercorn_cli_group_sigterm_reaches_the_worker_too() -> None:
    """systemd's default KillMode signals every process of the unit; the worker must not die."""
    async with running(hypercorn(), FAST) as server:
        async with open_websocket_url(await server.ws_url() + "/c") as client:
            await next_frame(client)
            server.send_group(signal.SIGTERM)
            assert (await next_frame(client, timeout=1))["type"] == "shutdown"
            await trio.sleep(0.5)
            await client.send_message("still served")
            assert (await next_frame(client))["text"] == "still served"
        left = time.monotonic()
        assert await server.wait_exit() == 0
        exit_s = time.monotonic() - left
        report("hypercorn CLI (group SIGTERM): last client left to exit", exit_s)
    assert exit_s < 1.0
    assert server.count(r"received SIGTERM: starting the drain") == 1


async def test_hypercorn_workers_0_answers_new_connections_with_1001() -> None:
    async with running(hypercorn("--workers", "0"), FAST) as server:
        await server.wait_for_line(r"mode=hypercorn-inprocess")
        url = await server.ws_url()
        async with open_websocket_url(url + "/c") as client:
            await next_frame(client)
            sent = server.send(signal.SIGTERM)
            assert (await next_frame(client, timeout=1))["type"] == "shutdown"
            report("hypercorn --workers 0: SIGTERM to warning", time.monotonic() - sent)
            async with open_websocket_url(url + "/late") as late:
                assert (await close_code(late))[0] == 1001
            _, health = await http_json(await server.base_url(), "/health")
            assert health["mode"] == "hypercorn-inprocess"
            assert health["shutdown_in_progress"] is True
        left = time.monotonic()
        assert await server.wait_exit() == 0
        exit_s = time.monotonic() - left
        report("hypercorn --workers 0: last client left to exit", exit_s)
    assert exit_s < 1.0
    assert server.count("drain over: handing shutdown back to Hypercorn") == 1


async def test_hypercorn_two_workers_warn_and_both_drain() -> None:
    """With ``--workers 2`` each worker drains its own clients, and a worker still draining is
    not killed when the other, idle one exits first."""
    env = {**FAST, "TRIO_WS_DRAIN_TIMEOUT": "20"}
    async with running(hypercorn("--workers", "2"), env) as server:
        await server.wait_for_line(r"2 Hypercorn workers without a broker")
        url = await server.ws_url()
        # Connect until some worker holds a client; remember which.
        async with trio.open_nursery() as nursery:
            client = await connect_websocket_url(nursery, url + "/c")
            await next_frame(client)
            match = await server.wait_for_line(r"\[(\d+)\] trio_ws\.core\.hub: client c connected")
            busy_pid = match.group(1)
            server.send(signal.SIGTERM)
            assert (await next_frame(client, timeout=1))["type"] == "shutdown"
            # The idle worker finishes at once; the parent then terminates the other...
            idle_done = await server.wait_for_line(
                r"drain finished \(drained\) in .*: 0 connections"
            )
            assert busy_pid not in idle_done.string
            await trio.sleep(1)
            # ... which keeps draining and serving its client.
            await client.send_message("still served")
            assert (await next_frame(client))["text"] == "still served"
            await client.aclose()
        assert await server.wait_exit(timeout=10) == 0
    assert (
        server.count(rf"\[{busy_pid}\] .*drain finished \(drained\) in .*: 1 connection at start")
        == 1
    )


async def test_hypercorn_invalid_configuration_is_a_clear_error() -> None:
    message = "trio_ws: invalid configuration: TRIO_WS_PROGRESS_INTERVAL must be seconds >= 0.1"
    env = {"TRIO_WS_PROGRESS_INTERVAL": "-1"}
    async with running(hypercorn("--workers", "0"), env, ready=False) as server:
        assert await server.wait_exit(timeout=20) == 1
    assert message in server.log
    # With workers, the worker exits 1 and Hypercorn's parent stops, but reports 0: its
    # run() overwrites the worker's exit code (hypercorn/run.py, second _join_exited call).
    async with running(hypercorn(), env, ready=False) as server:
        await server.wait_exit(timeout=20)
    assert message in server.log
    assert server.count("Running on") == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_launcher_both_signals_start_the_drain(signum: int) -> None:
    async with running(LAUNCHER, FAST) as server:
        async with open_websocket_url(await server.ws_url()) as client:
            await next_frame(client)
            server.send(signum)
            assert (await next_frame(client, timeout=1))["type"] == "shutdown"
        assert await server.wait_exit() == 0
    name = signal.Signals(signum).name
    assert server.count(rf"received {name}: starting the drain") == 1


@pytest.mark.parametrize("sigint_ignored", [False, True])
async def test_hypercorn_workers_0_second_sigint_and_hand_over(sigint_ignored: bool) -> None:
    """Ctrl+C twice under ``--workers 0``; also when started as a background job (SIGINT
    inherited as ignored), where the hand-over to Hypercorn needs SIGINT restored."""
    async with running(hypercorn("--workers", "0"), FAST, sigint_ignored=sigint_ignored) as server:
        async with open_websocket_url(await server.ws_url() + "/stayer") as stayer:
            await next_frame(stayer)
            server.send(signal.SIGINT)
            assert (await next_frame(stayer, timeout=1))["type"] == "shutdown"
            server.send(signal.SIGINT)
            assert await close_code(stayer, timeout=2) == (1001, "server shutting down now")
        assert await server.wait_exit(timeout=5) == 0
    assert server.count("Traceback") == 0


async def test_launcher_port_in_use_is_a_clear_error() -> None:
    async with running(LAUNCHER, FAST) as first:
        port = (await first.base_url()).rsplit(":", 1)[1]
        argv = [sys.executable, "-m", "trio_ws", "--port", port]
        async with running(argv, ready=False) as second:
            assert await second.wait_exit() == 1
        assert f"trio-ws: error: cannot serve on 127.0.0.1:{port}: [Errno 98]" in second.log
        assert second.count("Traceback") == 0
        first.send(signal.SIGTERM)
        assert await first.wait_exit() == 0
