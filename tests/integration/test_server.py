"""End to end: a real Hypercorn server on port 0 (the launcher's ``serve``), trio-websocket
clients, and raw sockets for the clients that misbehave."""

from __future__ import annotations

import base64
import gc
import json
import logging
import os
import socket
import types
from collections.abc import Callable

import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    connect_websocket_url,
    open_websocket_url,
)

from tests.conftest import StartServer
from tests.wsutil import (
    close_code,
    frames_until_closed,
    http_get,
    http_json,
    http_request,
    next_frame,
    raw_handshake,
    read_server_frames,
    reset,
    wait_until,
)
from trio_ws.core.protocol import parse_message_id
from trio_ws.hosting.launcher import RunningServer
from trio_ws.shell import websocket as websocket_module


def host_port(server: RunningServer) -> tuple[str, int]:
    host, port = server.binds[0].split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


async def test_welcome_then_every_message_to_everyone(server: RunningServer) -> None:
    async with (
        open_websocket_url(server.ws_url + "/alice") as alice,
        open_websocket_url(server.ws_url) as anon,
    ):
        welcome = await next_frame(alice)
        assert (welcome["type"], welcome["client_id"], welcome["active_connections"]) == (
            "welcome",
            "alice",
            1,
        )
        # Served by the direct socket writer, not the slower fallback through Quart.
        assert {c.writer for c in server.hub.registry} == {"direct"}
        anon_welcome = await next_frame(anon)
        assert anon_welcome["client_id"].startswith("anon-")
        assert anon_welcome["active_connections"] == 2
        text = '<img src=x onerror=alert(1)> "quotes" \\ ünï 🎉\nline'
        await alice.send_message(text)
        await anon.send_message("second")
        for ws in (alice, anon):
            first, second = await next_frame(ws), await next_frame(ws)
            assert (first["type"], first["from"], first["text"]) == ("message", "alice", text)
            assert (second["from"], second["text"]) == (anon_welcome["client_id"], "second")
            assert parse_message_id(second["id"]) > parse_message_id(first["id"])
    await wait_until(lambda: len(server.hub.registry) == 0)


async def test_periodic_message(start_server: StartServer) -> None:
    server = await start_server(broadcast_interval=0.2)
    async with open_websocket_url(server.ws_url) as ws:
        await next_frame(ws)
        periodic = await next_frame(ws)
        assert periodic["type"] == "periodic"
        assert periodic["active_connections"] == 1
        following = await next_frame(ws)
        assert parse_message_id(following["id"]) > parse_message_id(periodic["id"])


@pytest.mark.parametrize(
    "path", ["/" + "x" * 65, "/a%20b", "/%C3%A9t%C3%A9", "/a;b", "/", "/a/b", "/%2F", "/a/"]
)
async def test_bad_client_id_is_closed_with_1008(server: RunningServer, path: str) -> None:
    async with open_websocket_url(server.ws_url + path) as ws:
        code, reason = await close_code(ws)
    assert code == 1008
    assert reason == "client id must be 1-64 characters of A-Z a-z 0-9 _ . -"
    assert len(server.hub.registry) == 0


async def test_binary_frame_is_closed_with_1003_and_others_carry_on(server: RunningServer) -> None:
    async with (
        open_websocket_url(server.ws_url + "/good") as good,
        open_websocket_url(server.ws_url + "/bad") as bad,
    ):
        await next_frame(good)
        await bad.send_message(b"\x00\x01")
        assert await close_code(bad) == (1003, "binary frames are not supported; send text")
        await good.send_message("still here")
        assert (await next_frame(good))["text"] == "still here"


async def test_oversized_frame_is_closed_with_1009(start_server: StartServer) -> None:
    server = await start_server(max_message_size=2048)
    async with (
        open_websocket_url(server.ws_url + "/good") as good,
        open_websocket_url(server.ws_url + "/big") as big,
    ):
        await next_frame(good)
        await big.send_message("é" * 1024)  # 2048 bytes: exactly the limit, accepted
        await big.send_message("é" * 1025)  # 2050 bytes: one character too many
        code, _ = await close_code(big)
        assert code == 1009
        assert (await next_frame(good))["text"] == "é" * 1024


async def test_the_app_itself_enforces_the_size_in_bytes() -> None:
    """Under the hypercorn CLI Hypercorn's own limit is 16 MiB; the app closes with 1009."""
    from quart.testing.connections import WebsocketDisconnectError

    from trio_ws.app import create_app
    from trio_ws.hosting.modes import RunMode
    from trio_ws.settings import Settings

    app = create_app(
        Settings(max_message_size=1024, presence_interval=0), run_mode=RunMode.EMBEDDED
    )
    async with app.test_app() as test_app:
        client = test_app.test_client()
        async with client.websocket("/ws/multibyte") as ws:
            welcome = json.loads(await ws.receive())
            assert welcome["type"] == "welcome"
            # Quart's test client has no Hypercorn socket: the fallback writer serves it.
            assert app.hub.registry.get("multibyte").writer == "asgi"  # type: ignore[union-attr]
            await ws.send("€" * 342)  # 342 characters, 1026 bytes
            with pytest.raises(WebsocketDisconnectError) as info:
                await ws.receive()
            assert info.value.args[0] == 1009


async def test_same_id_with_its_key_replaces_the_older_connection_with_4500(
    server: RunningServer,
) -> None:
    async with open_websocket_url(server.ws_url + "/alice") as old:
        key = (await next_frame(old))["resume_key"]
        async with open_websocket_url(f"{server.ws_url}/alice?key={key}") as new:
            assert (await next_frame(new))["type"] == "welcome"
            assert await close_code(old) == (4500, "replaced by a newer connection")
            await new.send_message("I am the one")
            assert (await next_frame(new))["text"] == "I am the one"
            assert len(server.hub.registry) == 1


async def test_drain_warns_refuses_new_and_reports(start_server: StartServer) -> None:
    server = await start_server(health_detail=True)  # /health with every detail, for anyone
    async with open_websocket_url(server.ws_url + "/stayer") as stayer:
        await next_frame(stayer)
        assert await http_json(server.binds[0], "/ready") == (200, {"ready": True})
        server.hub.request_drain("SIGTERM")
        warning = await next_frame(stayer, timeout=1)
        assert warning["type"] == "shutdown"
        assert warning["seconds_left"] == 1800
        assert "shutting down" in warning["reason"]
        # A new connection is accepted and closed with 1001, not refused at the HTTP level.
        async with open_websocket_url(server.ws_url + "/late") as late:
            assert await close_code(late) == (
                1001,
                "server is shutting down; reconnect to another instance",
            )
        status, health = await http_json(server.binds[0], "/health")
        assert status == 200
        assert health["shutdown_in_progress"] is True
        assert health["status"] == "draining"
        assert health["active_connections"] == 1
        assert health["refused_during_drain"] == 1
        assert health["drain"]["connections_at_start"] == 1
        assert health["mode"] == "launcher"
        assert await http_json(server.binds[0], "/ready") == (
            503,
            {"ready": False, "reason": "draining"},
        )
        # Messages still flow during the drain.
        await stayer.send_message("still talking")
        assert (await next_frame(stayer))["text"] == "still talking"
    with trio.fail_after(1):
        await server.hub.wait_stopped()
    assert server.hub.drain.outcome is not None
    assert server.hub.drain.outcome.end.value == "drained"


async def test_deadline_closes_remaining_clients_with_1001(
    autojump_clock: trio.testing.MockClock, server: RunningServer
) -> None:
    async with (
        open_websocket_url(server.ws_url + "/a") as a,
        open_websocket_url(server.ws_url + "/b") as b,
    ):
        await next_frame(a)
        await next_frame(b)
        started = trio.current_time()
        server.hub.request_drain("SIGTERM")
        for ws in (a, b):
            frames = await frames_until_closed(ws, timeout=2000)
            assert [f["type"] for f in frames] == ["shutdown"]
            assert ws.closed is not None
            assert (ws.closed.code, ws.closed.reason) == (1001, "drain deadline reached")
        assert trio.current_time() - started == pytest.approx(1800, abs=1)
    await server.hub.wait_stopped()
    assert server.hub.drain.outcome is not None
    assert server.hub.drain.outcome.closed_by_server == 2


async def test_no_clients_stops_at_once_and_closes_the_listener(server: RunningServer) -> None:
    server.hub.request_drain("SIGTERM")
    with trio.fail_after(1):
        await server.hub.wait_stopped()
    host, port = host_port(server)

    async def refused() -> bool:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            return True
        await stream.aclose()
        return False

    with trio.fail_after(2):
        while not await refused():  # noqa: ASYNC110  # polls the kernel's listener state
            await trio.sleep(0.01)


async def test_slow_client_is_cut_with_4008_and_others_get_everything(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A publisher in a hurry: no publish limit (the test is about the slow reader).
    server = await start_server(queue_size=8, publish_rate=0, publish_bytes_rate=0)
    host, port = host_port(server)
    slow = await raw_handshake(host, port, "/ws/slow", rcvbuf=4096)
    count, size = 200, 16 * 1024
    async with (
        open_websocket_url(server.ws_url + "/publisher") as publisher,
        open_websocket_url(server.ws_url + "/reader") as reader,
    ):
        await next_frame(publisher)
        await next_frame(reader)

        async def publish() -> None:
            # Closed loop (the next message after the echo of the last): healthy clients keep up.
            for i in range(count):
                await publisher.send_message(f"{i:05d}" + "x" * size)
                while (await next_frame(publisher))["text"][:5] != f"{i:05d}":
                    pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish)
            got: list[int] = []
            while len(got) < count:
                frame = await next_frame(reader, timeout=20)
                if frame["type"] == "message":
                    got.append(int(frame["text"][:5]))
        assert got == list(range(count))  # every message, in order, none lost
    assert server.hub.registry.get("slow") is None
    assert server.hub.registry.statistics().slow_disconnects == 1
    assert "client slow" in caplog.text
    assert "(slow consumer)" in caplog.text
    # When the slow client finally reads, its stream ends with the documented close frame.
    frames = await read_server_frames(slow)
    opcode, payload = frames[-1]
    assert opcode == 0x8
    assert int.from_bytes(payload[:2], "big") == 4008
    slow.close()


async def test_abrupt_tcp_reset_removes_the_entry(server: RunningServer) -> None:
    host, port = host_port(server)
    async with open_websocket_url(server.ws_url + "/witness") as witness:
        await next_frame(witness)
        sock = await raw_handshake(host, port, "/ws/victim")
        await wait_until(lambda: server.hub.registry.get("victim") is not None)
        reset(sock)
        await wait_until(lambda: server.hub.registry.get("victim") is None)
        await witness.send_message("after reset")
        assert (await next_frame(witness))["text"] == "after reset"
    await wait_until(lambda: len(server.hub.registry) == 0)


async def test_clients_leaving_during_broadcasts(server: RunningServer) -> None:
    """Clients that vanish mid-stream do not disturb the stream to the others."""
    async with open_websocket_url(server.ws_url + "/steady") as steady:
        await next_frame(steady)
        async with trio.open_nursery() as nursery:

            async def leaver(i: int) -> None:
                async with open_websocket_url(server.ws_url + f"/leaver{i}") as ws:
                    await next_frame(ws)
                    for _ in range(i % 5):
                        await ws.get_message()
                if i % 2:
                    sock = await raw_handshake(*host_port(server), f"/ws/resetter{i}")
                    reset(sock)

            for i in range(30):
                nursery.start_soon(leaver, i)
            for n in range(100):
                await steady.send_message(f"m{n}")
                await trio.lowlevel.checkpoint()
        texts: list[str] = []
        while len(texts) < 100:
            frame = await next_frame(steady)
            if frame["type"] == "message":
                texts.append(frame["text"])
        assert texts == [f"m{n}" for n in range(100)]
    await wait_until(lambda: len(server.hub.registry) == 0)


async def test_connect_disconnect_storm(start_server: StartServer) -> None:
    server = await start_server(health_detail=True)
    refusals: list[int] = []

    async def client(i: int) -> None:
        try:
            async with open_websocket_url(server.ws_url + f"/storm{i % 40}") as ws:
                await next_frame(ws)
                await ws.send_message(f"hi {i}")
        except ConnectionClosed as closed:
            # A namesake holds the id (4009): expected in a storm.
            refusals.append(closed.reason.code if closed.reason else 0)

    async with trio.open_nursery() as nursery:
        for i in range(150):
            nursery.start_soon(client, i)
    await wait_until(lambda: len(server.hub.registry) == 0)
    _, health = await http_json(server.binds[0], "/health")
    assert health["active_connections"] == 0
    assert set(refusals) <= {4009}
    assert health["connections_total"] == 150 - len(refusals)


async def test_page_and_health(start_server: StartServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    key = "integration-key-0123456789"
    server = await start_server(api_key=key)
    status, page = await http_get(server.binds[0], "/")
    assert status == 200
    for needle in (
        'id="client-id"',
        'id="connect"',
        'id="disconnect"',
        'id="status"',
        'id="send-form"',
        'id="log"',
        'id="banner"',
        "textContent",
    ):
        assert needle in page
    assert "innerHTML" not in page  # user text is never interpreted as HTML
    assert "http://" not in page  # no external resource
    assert "https://" not in page
    # For the public: what a probe needs, nothing about the process or the broker.
    status, public = await http_json(server.binds[0], "/health")
    assert status == 200
    assert public.keys() == {
        "status",
        "instance",
        "active_connections",
        "cluster",
        "shutdown_in_progress",
        "drain",
    }
    # With the API key: the detail.
    status, _, body = await http_request(
        server.binds[0], "GET", "/health", headers={"Authorization": f"Bearer {key}"}
    )
    health = json.loads(body)
    assert status == 200
    assert {
        "status",
        "active_connections",
        "shutdown_in_progress",
        "timestamp",
        "uptime_s",
        "drain",
        "pid",
        "version",
        "mode",
        "broker",
    } <= health.keys()
    assert (health["status"], health["shutdown_in_progress"]) == ("ok", False)


async def test_a_client_that_never_reads_cannot_hold_the_server(
    start_server: StartServer,
) -> None:
    """Hypercorn's socket send cannot be cancelled; TCP_USER_TIMEOUT is what ends it."""
    server = await start_server(queue_size=4, stall_timeout=1)
    host, port = host_port(server)
    stuck = await raw_handshake(host, port, "/ws/stuck", rcvbuf=4096)
    try:
        async with open_websocket_url(server.ws_url + "/publisher") as publisher:
            await next_frame(publisher)
            for i in range(40):
                await publisher.send_message(f"{i}" + "x" * 16384)
                await next_frame(publisher)
            await wait_until(lambda: server.hub.registry.get("stuck") is None)
        server.hub.request_drain("test")
        # Without the stall timeout the stuck send would hold the exit for the kernel's full
        # retransmission time (15 minutes and more).
        with trio.fail_after(10):
            await server.finished.wait()
    finally:
        stuck.close()  # on failure, frees the stuck send so the test fails instead of hanging


async def test_a_burst_from_one_client_cuts_nobody(start_server: StartServer) -> None:
    """A client firing messages without waiting must not make healthy readers "slow": their
    writers catch up by writing the backlog in one go."""
    server = await start_server(publish_rate=0, publish_bytes_rate=0)  # a burst, unlimited
    count = 2000
    async with trio.open_nursery() as nursery:
        readers = [
            await connect_websocket_url(nursery, server.ws_url + f"/reader{i}") for i in range(5)
        ]
        for reader in readers:
            await next_frame(reader)
        async with open_websocket_url(server.ws_url + "/burst") as burst:
            await next_frame(burst)

            async def read_all(ws: WebSocketConnection) -> None:
                got: list[str] = []
                while len(got) < count:
                    frame = await next_frame(ws, timeout=20)
                    if frame["type"] == "message" and frame["from"] == "burst":
                        got.append(frame["text"])
                assert got == [str(i) for i in range(count)]

            async with trio.open_nursery() as readers_nursery:
                for reader in [*readers, burst]:
                    readers_nursery.start_soon(read_all, reader)
                for i in range(count):
                    await burst.send_message(str(i))
        assert server.hub.registry.statistics().slow_disconnects == 0
        for reader in readers:
            await reader.aclose()


async def test_every_frame_holds_one_object_even_in_a_burst(start_server: StartServer) -> None:
    server = await start_server(publish_rate=0, publish_bytes_rate=0)  # a burst, unlimited
    async with open_websocket_url(server.ws_url + "/single") as single:
        await single.get_message()
        for i in range(300):
            await single.send_message(str(i))
        for i in range(300):
            frame = json.loads(await single.get_message())
            assert frame["text"] == str(i)


async def test_oversized_frame_from_a_client_that_never_answers_the_close(
    start_server: StartServer,
) -> None:
    """The entry goes as soon as the server closes, even if the client never replies."""
    server = await start_server(max_message_size=2048)
    host, port = host_port(server)
    sock = await raw_handshake(host, port, "/ws/mute")
    await wait_until(lambda: server.hub.registry.get("mute") is not None)
    payload = b"x" * 3000  # over 2048, under Hypercorn's own (larger) limit
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    await sock.send(b"\x81\xfe" + len(payload).to_bytes(2, "big") + mask + masked)
    frames = await read_server_frames(sock)
    assert int.from_bytes(frames[-1][1][:2], "big") == 1009
    await wait_until(lambda: server.hub.registry.get("mute") is None, timeout=2)
    sock.close()


async def test_an_error_closing_one_client_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """``web._close`` is where a close can fail for real (the socket is already gone)."""
    from trio_ws.shell.websocket import _close

    class GoneSocket:
        async def close(self, code: int, reason: str) -> None:
            raise RuntimeError("Cannot close websocket: already closed")

    await _close(GoneSocket(), 1001, "drain deadline reached", "alice")  # type: ignore[arg-type]
    assert "error closing client alice with 1001: RuntimeError(" in caplog.text


async def test_partial_writes_never_interleave_with_hypercorn_frames(
    start_server: StartServer,
) -> None:
    """A slow reader makes broadcasts write only part of a frame; the pongs Hypercorn sends
    meanwhile must land between frames, never inside one."""
    # 150 frames of 8 KiB wait for the slow reader: room for them, so it is never cut as slow.
    # The 1.2 MB are sent at once: no publish limit.
    server = await start_server(outbox_bytes=4 << 20, publish_rate=0, publish_bytes_rate=0)
    host, port = host_port(server)
    victim = await raw_handshake(host, port, "/ws/victim", rcvbuf=4096)
    count, pings = 150, 0
    texts: list[str] = []
    pongs: list[bytes] = []

    async def read_slowly() -> None:
        nonlocal pings
        buffer = b""
        while len(texts) < count + 1:  # the welcome, then every message
            ping = f"p{pings}".encode()
            pings += 1
            await victim.send(b"\x89" + bytes([0x80 | len(ping)]) + b"\0\0\0\0" + ping)
            buffer += await victim.recv(2048)
            await trio.sleep(0.001)
            while len(buffer) >= 2:
                opcode, length, header = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
                if length == 126:
                    if len(buffer) < 4:
                        break
                    length, header = int.from_bytes(buffer[2:4], "big"), 4
                if len(buffer) < header + length:
                    break
                payload, buffer = buffer[header : header + length], buffer[header + length :]
                assert opcode in (0x1, 0xA), f"corrupt stream: opcode {opcode}"
                if opcode == 0x1:
                    texts.append(json.loads(payload)["type"])
                else:
                    pongs.append(payload)

    async with open_websocket_url(server.ws_url + "/publisher") as publisher:
        await next_frame(publisher)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_slowly)
            for i in range(count):
                await publisher.send_message(f"{i:04d}" + "y" * 8192)
                while (await next_frame(publisher))["text"][:4] != f"{i:04d}":
                    pass
    assert texts == ["welcome"] + ["message"] * count
    assert pongs == [f"p{i}".encode() for i in range(len(pongs))]
    assert len(pongs) > 10
    victim.close()


async def _deflate_handshake(
    host: str, port: int, path: str
) -> tuple[trio.socket.SocketType, bytes]:
    sock = trio.socket.socket()
    await sock.connect((host, port))
    await sock.send(
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n".encode()
    )
    response = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in response:
            response += await sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock, response


async def test_no_extension_is_negotiated_by_default(server: RunningServer) -> None:
    """TRIO_WS_COMPRESSION is off by default: an offer of permessage-deflate is declined."""
    sock, response = await _deflate_handshake(*host_port(server), "/ws/plain")
    sock.close()
    assert b"sec-websocket-extensions" not in response.lower()


async def test_uncompressed_frames_on_a_permessage_deflate_connection(
    start_server: StartServer,
) -> None:
    """With compression on, Hypercorn accepts permessage-deflate (with no context takeover);
    the direct writer's frames are uncompressed (RSV1 clear), which RFC 7692 allows, and read
    as plain JSON."""
    server = await start_server(compression=True)
    host, port = host_port(server)
    sock, response = await _deflate_handshake(host, port, "/ws/deflate")
    assert b"permessage-deflate" in response.lower()
    assert b"client_no_context_takeover" in response.lower()
    with trio.fail_after(5):
        header = await sock.recv(2)
        length = header[1] & 0x7F
        if length == 126:
            length = int.from_bytes(await sock.recv(2), "big")
        payload = b""
        while len(payload) < length:
            payload += await sock.recv(length - len(payload))
    assert header[0] == 0x81  # FIN, RSV1 clear (not compressed), text
    assert json.loads(payload)["client_id"] == "deflate"
    sock.close()


async def _h2_websocket_until(
    host: str, port: int, path: str, marker: bytes, timeout: float
) -> tuple[trio.socket.SocketType, bytes]:
    """Open a WebSocket over cleartext HTTP/2 (RFC 8441, extended CONNECT) on ``path`` and read
    its DATA (acknowledged as it comes) until ``marker`` shows: the socket and the bytes."""
    import h2.config
    import h2.connection
    import h2.events

    sock = trio.socket.socket()
    await sock.connect((host, port))
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    conn.send_headers(
        1,
        [
            (b":method", b"CONNECT"),
            (b":protocol", b"websocket"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", f"{host}:{port}".encode()),
            (b"sec-websocket-version", b"13"),
        ],
    )
    await sock.send(conn.data_to_send())
    data = b""
    with trio.fail_after(timeout):
        while marker not in data:
            chunk = await sock.recv(65536)
            assert chunk, "connection closed"
            for event in conn.receive_data(chunk):  # raises on an HTTP/2 protocol error
                if isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
            if out := conn.data_to_send():
                await sock.send(out)
    return sock, data


async def test_websocket_over_http2_stays_inside_http2_frames(server: RunningServer) -> None:
    """RFC 8441: over HTTP/2 the WebSocket is one stream of a multiplexed connection; its bytes
    must travel in DATA frames, so the direct socket writer must stand aside."""
    host, port = host_port(server)
    sock, data = await _h2_websocket_until(host, port, "/ws/h2client", b'"welcome"', 5)
    assert data.startswith(b"\x81")  # a WebSocket text frame, inside HTTP/2 DATA
    assert server.hub.registry.get("h2client").writer == "asgi"  # type: ignore[union-attr]
    sock.close()


async def test_a_websocket_over_http2_is_pinged_and_closed_with_4010_when_silent(
    start_server: StartServer,
) -> None:
    """The ASGI sink has no ping of its own: it pings through Hypercorn's stream, inside HTTP/2
    DATA frames, and a client that never answers is closed with 4010 there too."""
    server = await start_server(ping_interval=0.5, pong_timeout=1)
    host, port = host_port(server)
    # Until the close frame (the welcome is ASCII JSON, so 0x88 first appears there).
    sock, data = await _h2_websocket_until(host, port, "/ws/h2silent", b"\x88", 8)
    assert b"\x89\x00" in data  # the ping, inside DATA
    close = data[data.index(b"\x88") :]
    assert int.from_bytes(close[2:4], "big") == 4010
    assert server.hub.no_pong_disconnects == 1
    sock.close()


async def test_a_client_resumes_with_since_and_misses_nothing(server: RunningServer) -> None:
    async with open_websocket_url(server.ws_url + "/stays") as stays:
        await next_frame(stays)
        async with open_websocket_url(server.ws_url + "/leaves") as leaves:
            await next_frame(leaves)
            await stays.send_message("before")
            last_seen = (await next_frame(leaves))["id"]
            await next_frame(stays)
        for text in ("while away 1", "while away 2"):
            await stays.send_message(text)
            await next_frame(stays)
        async with open_websocket_url(f"{server.ws_url}/leaves?since={last_seen}") as back:
            welcome = await next_frame(back)
            assert welcome["resumed"] == {"since": last_seen, "replayed": 2, "complete": True}
            await stays.send_message("live")
            texts = [(await next_frame(back))["text"] for _ in range(3)]
            assert texts == ["while away 1", "while away 2", "live"]


@pytest.mark.parametrize("since", ["yesterday", "1-2-3", "-1", "1" * 30 + "-0"])
async def test_a_bad_since_is_closed_with_1008(server: RunningServer, since: str) -> None:
    async with open_websocket_url(f"{server.ws_url}/a?since={since}") as ws:
        code, reason = await close_code(ws)
        assert code == 1008
        assert reason is not None
        assert "since must be a message id" in reason
    await wait_until(lambda: len(server.hub.registry) == 0)


async def test_an_attempt_its_client_gave_up_on_never_takes_over_the_id(
    server: RunningServer,
) -> None:
    """A client's connect timed out and it retried; the retry is connected. The abandoned
    attempt reaching the server afterwards must not close the retry with 4500 (the page never
    reconnects after 4500: the client would be locked out)."""
    host, port = host_port(server)
    async with open_websocket_url(server.ws_url + "/alice") as retry:
        await next_frame(retry)
        for _ in range(20):
            sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            await sock.connect((host, port))
            key = base64.b64encode(os.urandom(16)).decode()
            await sock.send(
                f"GET /ws/alice HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            sock.shutdown(socket.SHUT_WR)  # gave up: the FIN follows the request
            sock.close()
        await trio.sleep(0.5)
        assert server.hub.registry.get("alice") is not None
        assert not server.hub.registry.get("alice").closing  # type: ignore[union-attr]
        await retry.send_message("still here")
        assert (await next_frame(retry))["text"] == "still here"
    assert server.hub.registry.statistics().replaced == 0


def endpoint_locals_holding(held: Callable[[object], bool]) -> list[str]:
    """The locals of the /ws endpoint's suspended coroutines for which ``held`` is true (or,
    for a dict, true of one of its values), as ``function: name``."""
    found = []
    for obj in gc.get_objects():
        if not isinstance(obj, types.CoroutineType) or obj.cr_frame is None:
            continue
        if obj.cr_code.co_filename != websocket_module.__file__:
            continue
        for name, value in obj.cr_frame.f_locals.items():
            values = value.values() if isinstance(value, dict) else (value,)
            if held(value) or any(held(v) for v in values):
                found.append(f"{obj.cr_code.co_qualname}: {name}")
    return found


async def test_an_idle_client_does_not_keep_its_last_message_in_memory(
    server: RunningServer,
) -> None:
    # The reader waits for the next message for as long as the client stays idle: its frame
    # must not hold the last one (up to max_message_size per connection) meanwhile.
    marker = "last-message-" + "m" * 40_000
    async with open_websocket_url(server.ws_url) as ws:
        await next_frame(ws)
        await ws.send_message(marker)
        assert (await next_frame(ws))["text"] == marker
        await trio.sleep(0.1)  # the reader is back in receive(), waiting
        assert endpoint_locals_holding(lambda value: value == marker) == []


async def test_an_idle_connection_keeps_no_asgi_event(server: RunningServer) -> None:
    # The handshake's events (websocket.connect, the accept sent) are done with once the
    # client is served: an idle connection's frames must not keep them (184 B or more each).
    def asgi_event(value: object) -> bool:
        return isinstance(value, dict) and str(value.get("type", "")).startswith("websocket.")

    async with open_websocket_url(server.ws_url) as ws:
        await next_frame(ws)
        await trio.sleep(0.1)  # the reader is in receive(), waiting
        assert endpoint_locals_holding(asgi_event) == []
