"""Client text through a real server: non-ASCII text travels as UTF-8 (not ``\\u`` escapes),
client-supplied strings reach the log escaped and cut, and the publish limits pace a client."""

from __future__ import annotations

import json
import logging

import pytest
import trio
from trio_websocket import open_websocket_url

from tests.conftest import StartServer
from tests.hostile import TEXT, client_frame
from tests.wsutil import next_frame, raw_handshake, read_server_frames
from trio_ws.hosting.launcher import RunningServer

UKRAINIAN = "Привіт, світе! Ґанок, їжак, єнот: Слава Україні"
EMOJI = "🎉👩‍👩‍👧"  # one emoji, and one of five code points joined


def host_port(server: RunningServer) -> tuple[str, int]:
    host, port = server.binds[0].split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


@pytest.mark.parametrize("text", [UKRAINIAN, EMOJI, f"{UKRAINIAN} {EMOJI}"])
async def test_non_ascii_text_round_trips_as_utf8(server: RunningServer, text: str) -> None:
    sock = await raw_handshake(*host_port(server), "/ws/raw")
    async with open_websocket_url(server.ws_url + "/sender") as sender:
        await next_frame(sender)
        await sender.send_message(text)
        frame = await next_frame(sender)
        assert (frame["type"], frame["text"]) == ("message", text)
        await sender.send_message("end")
        assert (await next_frame(sender))["text"] == "end"
    server.hub.force_close("test over")
    frames = [payload for opcode, payload in await read_server_frames(sock) if opcode == 0x1]
    sock.close()
    wire = next(payload for payload in frames if b'"type":"message"' in payload)
    # On the wire the text is its UTF-8 bytes: Cyrillic 2 bytes a letter, an emoji 4, and no
    # \u escape (which would be 6 bytes a letter, 12 an emoji).
    assert text.encode() in wire
    assert b"\\u" not in wire
    assert json.loads(wire.decode())["text"] == text


async def test_a_long_url_with_control_characters_is_logged_short_and_escaped(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    """15 KB of path (Hypercorn refuses request heads over 16 KiB), with ESC and NUL (percent-
    encoded in the URL; the path the app sees holds the bytes themselves) and a newline."""
    caplog.set_level(logging.INFO)
    path = "/ws/%1b[31mred%00" + "%0aFAKE%20LOG%20LINE%20" + "a" * 15_000
    sock = await raw_handshake(*host_port(server), path)
    frames = await read_server_frames(sock)
    sock.close()
    assert frames[-1][1][:2] == (1008).to_bytes(2, "big")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
    assert len(lines) == 1
    line = lines[0]
    assert len(line) < 300, line
    assert line.isprintable()  # no ESC, NUL or newline reached the log
    assert "\\x1b[31mred\\x00\\nFAKE LOG LINE" in line
    assert "...[15028 chars]" in line


async def test_a_burst_over_the_limit_is_paced(start_server: StartServer) -> None:
    """A publish rate of 20 a second with bursts of 5: 15 messages sent at once take 0.5 s."""
    server = await start_server(publish_rate=20, publish_burst=5)
    sock = await raw_handshake(*host_port(server), "/ws/burst")
    async with open_websocket_url(server.ws_url + "/watcher") as watcher:
        await next_frame(watcher)
        started = trio.current_time()
        await sock.send(b"".join(client_frame(TEXT, f"m{i}".encode()) for i in range(15)))
        arrivals = []
        for i in range(15):
            frame = await next_frame(watcher)
            assert frame["text"] == f"m{i}"
            arrivals.append(trio.current_time() - started)
    sock.close()
    assert max(arrivals[:5]) < 0.2  # the burst
    assert 0.45 <= arrivals[-1] < 2.0  # then 20 a second
