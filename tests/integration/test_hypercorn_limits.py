"""The message-size limit inside Hypercorn and the capped permessage-deflate: installed in every
app, failing closed on releases it was not checked against (trio_ws/shell/hypercorn_limits.py).
Their effect on real connections is in tests/system/test_message_limits.py."""

from __future__ import annotations

import sys
import zlib

import pytest
from hypercorn.protocol.ws_stream import WSStream
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, TextMessage
from wsproto.handshake import server_extensions_handshake

from tests.procutil import running
from trio_ws.hosting.compose import build_app
from trio_ws.settings import Settings
from trio_ws.shell import hypercorn_limits
from trio_ws.shell.hypercorn_limits import CappedDeflate


def test_build_app_installs_the_limits_once() -> None:
    app = build_app(Settings(port=0, max_message_size=2048, compression=True))
    limits = app.websocket_limits
    assert (limits.max_message_size, limits.compression) == (2048, True)
    assert limits.own_pings  # the hub's pinger, not Hypercorn's task per connection
    assert limits.on_protocol_error == app.hub.note_protocol_error
    patched = WSStream._handle_events
    assert getattr(patched, "_trio_ws_limited", False)
    build_app(Settings(port=0))
    assert WSStream._handle_events is patched


def test_the_installed_releases_are_verified() -> None:
    assert hypercorn_limits.check() is None


def test_an_unverified_wsproto_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hypercorn_limits, "VERIFIED_WSPROTO", ("0.0.1",))
    assert hypercorn_limits.check() == "wsproto 1.3.2 is not a verified release"


def test_a_changed_handshake_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from hypercorn.protocol.ws_stream import Handshake

    def accept(self: Handshake, subprotocol: str | None, headers: object) -> None:
        return None  # no longer negotiates from self.extensions

    monkeypatch.setattr(Handshake, "accept", accept)
    problem = hypercorn_limits.check()
    assert problem is not None
    assert problem.startswith("Handshake.accept no longer uses extensions")


def _compressed(text: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return (compressor.compress(text) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


def _pair(limit: int) -> Connection:
    """A server connection whose permessage-deflate is the capped one, negotiated."""
    deflate = CappedDeflate(limit)
    accepted = server_extensions_handshake(["permessage-deflate"], [deflate])
    assert accepted is not None
    assert b"client_no_context_takeover" in accepted
    server = Connection(ConnectionType.SERVER, [deflate])
    return server


def _masked_compressed_frame(body: bytes) -> bytes:
    length = len(body)
    head = bytes([0x80 | 0x40 | 0x1])
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 1 << 16:
        head += bytes([0x80 | 126]) + length.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + length.to_bytes(8, "big")
    return head + b"\0\0\0\0" + body


def test_messages_up_to_the_limit_inflate() -> None:
    server = _pair(4096)
    for n in range(3):  # each starts afresh: no context kept between messages
        text = (str(n) * 4096).encode()
        server.receive_data(_masked_compressed_frame(_compressed(text)))
        events = list(server.events())
        assert len(events) == 1
        assert isinstance(events[0], TextMessage)
        assert events[0].data == text.decode()


def test_a_bomb_stops_at_the_limit() -> None:
    server = _pair(4096)
    bomb = _compressed(b" " * (50 * 1024 * 1024))
    server.receive_data(_masked_compressed_frame(bomb))
    events = list(server.events())
    assert [type(e) for e in events] == [CloseConnection]
    assert events[0].code == 1009  # type: ignore[attr-defined]


def test_a_message_one_byte_over_is_refused() -> None:
    server = _pair(4096)
    server.receive_data(_masked_compressed_frame(_compressed(b"a" * 4097)))
    events = list(server.events())
    assert [type(e) for e in events] == [CloseConnection]


async def test_the_launcher_refuses_to_start_without_the_limits() -> None:
    code = (
        "import trio_ws.shell.hypercorn_limits as limits; limits.VERIFIED_WSPROTO = ('0.0.1',); "
        "from trio_ws.hosting.cli import main; main()"
    )
    argv = [sys.executable, "-c", code, "--host", "127.0.0.1", "--port", "0"]
    async with running(argv, ready=False) as server:
        assert await server.wait_exit(timeout=20) == 1
    assert server.count(r"cannot start: wsproto 1\.3\.2 is not a verified release") == 1
    assert server.count("Running on") == 0
