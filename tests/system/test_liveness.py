"""Liveness against real processes: a client that answers no ping is closed with 4010 and
dropped, one that answers stays however quiet it is, and Hypercorn's own pings are off in every
run mode (the hub's one pinger sends them)."""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Sequence

import pytest
import trio
from trio_websocket import open_websocket_url

from tests.hostile import TEXT, assert_still_served, bystander, client_frame, wait_closed
from tests.procutil import LAUNCHER, hypercorn, running
from tests.system.test_hostile_input import host_port
from tests.wsutil import http_json, next_frame, raw_handshake, read_server_frames
from trio_ws.shell.websocket import CLOSE_TIMEOUT_S

PING, CLOSE = 0x9, 0x8

FAST_PINGS = {
    "TRIO_WS_BROADCAST_INTERVAL": "0",
    "TRIO_WS_PRESENCE_INTERVAL": "0",
    "TRIO_WS_DRAIN_TIMEOUT": "5",
    "TRIO_WS_PING_INTERVAL": "0.5",
    "TRIO_WS_PONG_TIMEOUT": "1",
    # The counts in /health are detail (public /health once #11 is merged); ignored before.
    "TRIO_WS_HEALTH_DETAIL": "on",
}

MODES = {
    "launcher": LAUNCHER,
    "hypercorn-workers-0": hypercorn("--workers", "0"),
    "hypercorn-workers-1": hypercorn("--workers", "1"),
}


@pytest.mark.parametrize("argv", MODES.values(), ids=MODES.keys())
async def test_a_client_that_never_answers_is_closed_with_4010_and_dropped(
    argv: Sequence[str],
) -> None:
    """Handshake, then never a byte: pinged, closed with 4010 within ping interval + pong
    timeout (+ margin), and the TCP connection ends although the client never answers the
    close frame. A bystander that answers pings (trio-websocket does) stays, quiet as it is."""
    async with running(argv, FAST_PINGS) as server:
        url = await server.ws_url()
        base = await server.base_url()
        async with bystander(url) as ws:
            sock = await raw_handshake(*host_port(url), "/ws/silent")
            started = time.monotonic()
            frames = await read_server_frames(sock, timeout=10)
            closed_after = time.monotonic() - started
            opcodes = [opcode for opcode, _ in frames]
            assert PING in opcodes, frames
            close = frames[-1]
            assert close[0] == CLOSE
            assert struct.unpack("!H", close[1][:2])[0] == 4010, close
            # 0.5 s to the first ping at most, 1 s to answer, a tick late at most: 1.6 s.
            assert closed_after < 5, closed_after
            # It never answers the close frame: the server drops it within its close timeout.
            with trio.fail_after(6):
                await wait_closed(sock)
            sock.close()
            # The bystander was quiet for many pong timeouts, answering pings only: still here.
            await trio.sleep(3)
            await assert_still_served(server, url, ws)
        status, health = await http_json(base, "/health")
        assert status == 200
        assert health["no_pong_disconnects"] == 1
        await server.wait_for_line(r"closed 1 silent connection with 4010")


async def test_a_client_that_sends_anything_stays_even_without_pongs() -> None:
    """Liveness is any byte after a ping: a client that sends a message now and then but no
    pong (a raw socket) is never closed, and pongs are not required as such."""
    env = {**FAST_PINGS, "TRIO_WS_PONG_TIMEOUT": "1.5"}
    async with running(LAUNCHER, env) as server:
        url = await server.ws_url()
        sock = await raw_handshake(*host_port(url), "/ws/chatty")
        with trio.move_on_after(4):
            while True:
                await sock.send(client_frame(TEXT, b"still here"))
                await trio.sleep(0.3)
        _, health = await http_json(await server.base_url(), "/health")
        assert health["active_connections"] == 1
        assert health["no_pong_disconnects"] == 0
        sock.close()


async def test_pong_timeout_zero_keeps_silent_clients() -> None:
    env = {**FAST_PINGS, "TRIO_WS_PONG_TIMEOUT": "0"}
    async with running(LAUNCHER, env) as server:
        url = await server.ws_url()
        sock = await raw_handshake(*host_port(url), "/ws/silent")
        await trio.sleep(3)
        _, health = await http_json(await server.base_url(), "/health")
        assert health["active_connections"] == 1
        assert health["no_pong_disconnects"] == 0
        sock.close()


async def test_hypercorn_pings_are_off_even_when_its_command_line_asks() -> None:
    """``--websocket-ping-interval 1`` under ``--workers 0`` (whose config trio_ws cannot
    reach) with TRIO_WS_PING_INTERVAL=0: no ping at all, so no ping task per connection."""
    env = {**FAST_PINGS, "TRIO_WS_PING_INTERVAL": "0"}
    argv = hypercorn("--workers", "0", "--websocket-ping-interval", "1")
    async with running(argv, env) as server:
        url = await server.ws_url()
        sock = await raw_handshake(*host_port(url), "/ws/quiet")
        received = b""
        with trio.move_on_after(3):
            while chunk := await sock.recv(65536):
                received += chunk
        # Only the welcome (a text frame), no ping.
        assert received.startswith(b"\x81")
        assert b"\x89\x00" not in received[received.index(b"}") :], received
        sock.close()


def _log_time(line: str) -> float:
    stamp = re.search(r"\d\d:\d\d:\d\d,\d\d\d", line)
    assert stamp is not None, line
    h, m, rest = stamp.group(0).split(":")
    return int(h) * 3600 + int(m) * 60 + float(rest.replace(",", "."))


async def test_a_client_that_reads_nothing_is_dropped_within_the_close_timeout() -> None:
    """A client that neither reads nor answers, its socket full of broadcasts: the writer's
    write to it cannot finish and neither can a close frame. Without a bound it stayed until
    TCP_USER_TIMEOUT (30 s); now the connection is reset CLOSE_TIMEOUT_S (5 s) after the close
    request."""
    env = {
        **FAST_PINGS,
        "TRIO_WS_PONG_TIMEOUT": "2",
        "TRIO_WS_PUBLISH_RATE": "0",
        "TRIO_WS_PUBLISH_BYTES_RATE": "0",
        "TRIO_WS_OUTBOX_BYTES": str(64 << 20),  # the 4010, not a 4008, closes it
        "TRIO_WS_QUEUE_SIZE": "100000",
    }
    async with running(LAUNCHER, env) as server:
        url = await server.ws_url()
        sock = await raw_handshake(*host_port(url), "/ws/stuck", rcvbuf=4096)
        async with (
            open_websocket_url(f"{url}/publisher") as publisher,
            trio.open_nursery() as nursery,
        ):
            await next_frame(publisher)

            async def keep_reading() -> None:  # so that the publisher answers its pings
                while True:
                    await publisher.get_message()

            nursery.start_soon(keep_reading)
            with trio.move_on_after(1.5):  # bounded: 60 KB messages, for 1.5 s
                while True:
                    await publisher.send_message("x" * 60_000)
                    await trio.sleep(0.005)
            closed = await server.wait_for_line(r".*with 4010.*client stuck from", timeout=10)
            gone = await server.wait_for_line(r".*client stuck disconnected after", timeout=15)
            nursery.cancel_scope.cancel()
        assert server.count("with 4010") == 1  # the publisher, reading, was never closed
        took = _log_time(gone.group(0)) - _log_time(closed.group(0))
        assert took < CLOSE_TIMEOUT_S + 1.5, took
        sock.close()
