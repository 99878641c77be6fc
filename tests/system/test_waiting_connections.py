"""Connections that never become WebSockets, against real processes: sockets that trickle
their request's headers (slowloris), sockets that send nothing, and headers that grow without
end. Each is closed within the header deadline (Hypercorn's keep-alive timeout, 5 s from the
accept), and the connections waiting for their request are capped per process, the oldest
closed first, so that they cannot take the file descriptors that WebSockets and ``/health``
need (docs/design/hypercorn.md, "Connections that never become WebSockets").

Every load here is bounded in count and time; the figures are printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import pytest
import trio
from trio_websocket import open_websocket_url

from tests.hostile import assert_still_served, bystander
from tests.integration.test_tls import certificate as make_certificate
from tests.procutil import LAUNCHER, ServerProcess, running
from tests.system.test_connection_limits import ENV, MODES, host_port
from tests.wsutil import http_json, next_frame

#: Hypercorn's keep-alive timeout, which trio_ws sets: a request's headers must be complete
#: this long after the accept.
HEADER_DEADLINE_S = 5.0
#: What a shared, loaded machine may add to it.
MARGIN_S = 3.0
#: A client's HTTP/2 connection preface (prior knowledge, cleartext) and an empty SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def closed_by_server(sock: trio.socket.SocketType) -> bytes:
    """Read until the server ends the connection; return what it sent."""
    received = b""
    while True:
        try:
            chunk = await sock.recv(65536)
        except OSError:
            return received
        if not chunk:
            return received
        received += chunk


async def served(server: ServerProcess, url: str, base: str) -> None:
    """/health answers and a new WebSocket gets its welcome, each within a few seconds."""
    with trio.fail_after(5):
        status, health = await http_json(base, "/health")
    assert status == 200, health
    with trio.fail_after(5):
        async with open_websocket_url(f"{url}/newcomer") as ws:
            assert (await next_frame(ws))["type"] == "welcome"


async def test_slowloris_sockets_are_closed_at_the_header_deadline_and_others_are_served() -> None:
    """200 sockets send a request line, then one header byte a second, never ending the
    headers, for at most 10 s: each is closed by the server within the deadline, while a
    bystander, a newcomer and /health are served."""
    count = 200
    async with running(LAUNCHER, ENV) as server:
        url = await server.ws_url()
        base = await server.base_url()
        host, port = host_port(url)
        rss_before = rss_mb(server.pid)
        lifetimes: list[float] = []
        async with bystander(url) as ws:
            opened: list[trio.socket.SocketType] = []
            try:
                started = trio.current_time()
                held_peak = 0
                async with trio.open_nursery() as nursery:

                    async def slowloris(sock: trio.socket.SocketType) -> None:
                        connected = trio.current_time()

                        async def trickle() -> None:
                            await sock.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                            while True:
                                await trio.sleep(1)
                                await sock.send(b"a")

                        async with trio.open_nursery() as inner:
                            inner.start_soon(trickle)
                            await closed_by_server(sock)
                            lifetimes.append(trio.current_time() - connected)
                            inner.cancel_scope.cancel()

                    with trio.move_on_after(10):
                        for _ in range(count):
                            sock = trio.socket.socket()
                            opened.append(sock)
                            await sock.connect((host, port))
                            nursery.start_soon(slowloris, sock)
                        await trio.sleep(2)
                        held_peak = open_files(server.pid)
                        rss_during = rss_mb(server.pid)
                        await served(server, url, base)
                        await assert_still_served(server, url, ws)
                        # Every socket is closed by now, or must be soon.
                        await trio.sleep(HEADER_DEADLINE_S + MARGIN_S)
                    nursery.cancel_scope.cancel()
                elapsed = trio.current_time() - started
            finally:
                for sock in opened:
                    sock.close()
        print(
            f"\nslowloris x{count}: open files in the server at the peak {held_peak}, RSS "
            f"{rss_before:.1f} -> {rss_during:.1f} MB; closed by the server after "
            f"{min(lifetimes, default=math.nan):.1f}-{max(lifetimes, default=math.nan):.1f} s; "
            f"{elapsed:.1f} s in all"
        )
        assert len(lifetimes) == count, f"{count - len(lifetimes)} slowloris sockets still open"
        assert max(lifetimes) <= HEADER_DEADLINE_S + MARGIN_S
        assert rss_during - rss_before < 50
        assert server.count(r"Traceback") == 0, server.log[-3000:]


async def test_growing_headers_get_431_and_are_closed() -> None:
    """A handshake whose headers grow (1 KiB every 50 ms) and never end: Hypercorn's bound on
    an incomplete request (16 KiB) answers 431 and closes, long before the deadline."""
    async with running(LAUNCHER, ENV) as server:
        url = await server.ws_url()
        host, port = host_port(url)
        sock = trio.socket.socket()
        with sock:
            await sock.connect((host, port))
            await sock.send(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
            sent = 0

            async def grow() -> None:
                nonlocal sent
                with contextlib.suppress(OSError):
                    while True:
                        await sock.send(b"X-Grow: " + b"a" * 1014 + b"\r\n")
                        sent += 1024
                        await trio.sleep(0.05)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(grow)
                with trio.fail_after(HEADER_DEADLINE_S + MARGIN_S):
                    answer = await closed_by_server(sock)
                nursery.cancel_scope.cancel()
        print(f"\ngrowing headers: {sent} bytes sent, answered {answer[:12]!r}, closed")
        assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
        assert sent <= 64 * 1024
        assert server.process.returncode is None


@pytest.mark.parametrize("argv", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize("greeting", [b"", H2_PREFACE], ids=["nothing", "http2-preface"])
async def test_silent_sockets_cannot_starve_health_or_websockets_under_a_low_file_limit(
    argv: list[str], greeting: bytes
) -> None:
    """File limit 256: 400 sockets that connect and send nothing, each opened again as soon as
    the server closes it, for 12 s. The server keeps a bounded number of them (closing the
    oldest first), so /health and a new WebSocket are still served during the attack, a
    bystander keeps its messages, and no accept fails for lack of descriptors. Under
    Hypercorn's command line the worker inherits the limit and the cap holds there too. The
    same with sockets that send an HTTP/2 preface and open no stream."""
    slots = 400
    async with running(["prlimit", "--nofile=256:256", "--", *argv], ENV) as server:
        url = await server.ws_url()
        base = await server.base_url()
        host, port = host_port(url)
        reopened = 0
        held: list[int] = []
        async with bystander(url) as ws:

            async def slot() -> None:
                nonlocal reopened
                while True:
                    sock = trio.socket.socket()
                    with sock:
                        with trio.move_on_after(2):
                            await sock.connect((host, port))
                            if greeting:
                                await sock.send(greeting)
                            await closed_by_server(sock)
                            reopened += 1
                    await trio.sleep(0.05)

            async with trio.open_nursery() as nursery:
                for _ in range(slots):
                    nursery.start_soon(slot)
                with trio.move_on_after(12):
                    await trio.sleep(3)
                    for _ in range(3):
                        if argv is LAUNCHER:  # the serving process (not a CLI's parent)
                            held.append(open_files(server.pid))
                        await served(server, url, base)
                        await trio.sleep(1)
                    await assert_still_served(server, url, ws)
                nursery.cancel_scope.cancel()
        print(
            f"\nsilent x{slots} ({greeting[:3]!r}) at nofile 256: the server's open files {held}, "
            f"{reopened} sockets closed by the server and opened again"
        )
        assert server.count(r"Too many open files|EMFILE") == 0, server.log[-3000:]
        assert server.count(r"Traceback") == 0, server.log[-3000:]
        assert max(held, default=0) < 256


#: How long a TLS handshake may take from the accept (trio_ws sets it; Hypercorn's is 60 s).
TLS_HANDSHAKE_DEADLINE_S = 10.0


async def test_over_tls_a_silent_socket_is_closed_at_the_handshake_deadline(
    tmp_path: Path,
) -> None:
    """Over TLS, a socket that connects and sends nothing was held for Hypercorn's TLS
    handshake timeout (60 s) before its keep-alive timeout even started."""
    cert, key = make_certificate.__wrapped__(tmp_path)  # type: ignore[attr-defined]
    env = {**ENV, "TRIO_WS_CERTFILE": cert, "TRIO_WS_KEYFILE": key}
    async with running(LAUNCHER, env, ready=False) as server:
        match = await server.wait_for_line(r"Running on https://127\.0\.0\.1:(\d+)", timeout=20)
        sock = trio.socket.socket()
        with sock:
            await sock.connect(("127.0.0.1", int(match.group(1))))
            connected = trio.current_time()
            with trio.fail_after(TLS_HANDSHAKE_DEADLINE_S + MARGIN_S):
                await closed_by_server(sock)
            held = trio.current_time() - connected
        print(f"\nsilent TLS socket: closed by the server after {held:.1f} s")
        assert server.process.returncode is None


async def test_an_http2_connection_that_opens_no_stream_is_closed_at_the_header_deadline() -> None:
    """Cleartext HTTP/2 by prior knowledge: Hypercorn stops the keep-alive timer for the
    preface (it reads it as a request) and never starts it again while no stream has opened
    and closed, so 20 such connections were held for good, uncounted."""
    count = 20
    async with running(LAUNCHER, ENV) as server:
        url = await server.ws_url()
        base = await server.base_url()
        host, port = host_port(url)
        lifetimes: list[float] = []
        opened: list[trio.socket.SocketType] = []
        try:
            async with trio.open_nursery() as nursery:

                async def preface_only(sock: trio.socket.SocketType) -> None:
                    connected = trio.current_time()
                    await sock.connect((host, port))
                    await sock.send(H2_PREFACE)
                    await closed_by_server(sock)
                    lifetimes.append(trio.current_time() - connected)

                with trio.move_on_after(HEADER_DEADLINE_S + MARGIN_S):
                    for _ in range(count):
                        sock = trio.socket.socket()
                        opened.append(sock)
                        nursery.start_soon(preface_only, sock)
                    await trio.sleep(1)
                    await served(server, url, base)
                    await trio.sleep(HEADER_DEADLINE_S + MARGIN_S)
                nursery.cancel_scope.cancel()
        finally:
            for sock in opened:
                sock.close()
        print(
            f"\nHTTP/2 prefaces x{count}: {len(lifetimes)} closed by the server, after "
            f"{max(lifetimes, default=math.nan):.1f} s at most"
        )
        assert len(lifetimes) == count, f"{count - len(lifetimes)} still open"
        assert max(lifetimes) <= HEADER_DEADLINE_S + MARGIN_S


async def test_a_request_whose_body_never_ends_is_closed_after_its_response() -> None:
    """Requests that announce a body and never send it all (slow POST): the application
    answers (404, 405) at once, and Hypercorn then closes the connection, since the body is
    unfinished. That close ran in the application's task and was cancelled with it, so the
    socket stayed open, uncounted, for as long as the client liked."""
    async with running(LAUNCHER, ENV) as server:
        url = await server.ws_url()
        host, port = host_port(url)
        lifetimes: dict[str, float] = {}
        answers: dict[str, bytes] = {}

        async def slow_post(path: str) -> None:
            sock = trio.socket.socket()
            with sock:
                await sock.connect((host, port))
                connected = trio.current_time()
                await sock.send(
                    f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".encode()
                    + b"a"
                )
                answers[path] = await closed_by_server(sock)
                lifetimes[path] = trio.current_time() - connected

        paths = ["/", "/health", "/publish", "/ws", "/nothing"]
        with trio.move_on_after(HEADER_DEADLINE_S + MARGIN_S):
            async with trio.open_nursery() as nursery:
                for path in paths:
                    nursery.start_soon(slow_post, path)
        print(f"\nslow POSTs: closed after {lifetimes}")
        assert sorted(lifetimes) == sorted(paths), f"still open: {set(paths) - set(lifetimes)}"
        for path in paths:
            assert answers[path].startswith((b"HTTP/1.1 404", b"HTTP/1.1 405")), answers[path][:40]
        assert server.count(r"Traceback") == 0, server.log[-3000:]
