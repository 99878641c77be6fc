"""Protocol errors are closed with 1002/1007, counted in /health and logged at DEBUG level,
without the client's bytes."""

from __future__ import annotations

import struct

from tests.hostile import TEXT, client_frame, read_until_close_frame, wait_closed
from tests.procutil import LAUNCHER, running
from tests.system.test_hostile_input import host_port
from tests.wsutil import http_json, raw_handshake

# The counts in /health are detail (public /health once #11 is merged); ignored before.
ENV = {
    "TRIO_WS_BROADCAST_INTERVAL": "0",
    "TRIO_WS_LOG_LEVEL": "DEBUG",
    "TRIO_WS_HEALTH_DETAIL": "on",
}


async def test_malformed_frames_are_counted_and_logged_at_debug() -> None:
    async with running(LAUNCHER, ENV) as server:
        url = await server.ws_url()
        base = await server.base_url()
        _, health = await http_json(base, "/health")
        assert health["protocol_errors"] == 0
        bad = {
            1002: client_frame(TEXT, b"rsv\x1b[31m", rsv=4),  # RSV bits with no extension
            1007: client_frame(TEXT, b"\xff\xfe bad utf-8 \x1b[31m"),
        }
        for code, frame in bad.items():
            sock = await raw_handshake(*host_port(url), "/ws")
            await sock.send(frame)
            close = await read_until_close_frame(sock)
            at = close.index(b"\x88")
            assert struct.unpack("!H", close[at + 2 : at + 4])[0] == code
            await wait_closed(sock)
            sock.close()
            await server.wait_for_line(
                rf"DEBUG .*protocol error from 127\.0\.0\.1:\d+, closed with {code}"
            )
        _, health = await http_json(base, "/health")
        assert health["protocol_errors"] == 2
        assert "\x1b" not in server.log
        assert "\\xff" not in server.log
        assert "0xff" not in server.log
