from __future__ import annotations

import json

import pytest

from trio_ws.core import protocol
from trio_ws.core.protocol import ClientIdError, CloseCode


@pytest.mark.parametrize("client_id", ["a", "alice", "A-1_b.c", "x" * 64])
def test_valid_client_ids(client_id: str) -> None:
    assert protocol.validate_client_id(client_id) == client_id


@pytest.mark.parametrize("client_id", ["", "x" * 65, "a b", "é", "a/b", "<script>", "a\n"])
def test_invalid_client_ids(client_id: str) -> None:
    with pytest.raises(ClientIdError):
        protocol.validate_client_id(client_id)


def test_close_reason_fits_a_close_frame() -> None:
    # A close frame's reason may be at most 123 bytes of UTF-8.
    with pytest.raises(ClientIdError) as info:
        protocol.validate_client_id("")
    assert len(str(info.value).encode()) <= 123


def test_server_assigned_ids_are_valid_and_distinct() -> None:
    ids = {protocol.new_client_id() for _ in range(100)}
    assert len(ids) == 100
    for client_id in ids:
        protocol.validate_client_id(client_id)


def test_frames() -> None:
    ts = 1_800_000_000.25
    welcome = protocol.welcome_frame(
        client_id="a", active_connections=3, instance="i1", last_id="5-0", ts=ts
    )
    assert json.loads(welcome) == {
        "type": "welcome",
        "client_id": "a",
        "instance": "i1",
        "active_connections": 3,
        "last_id": "5-0",
        "server_time": "2027-01-15T08:00:00.250Z",
        "ts": ts,
    }
    text = 'quote " backslash \\ newline \n <b>html</b> ünï 🎉'
    assert json.loads(protocol.message_frame(message_id="7-0", sender="a", text=text, ts=ts)) == {
        "type": "message",
        "id": "7-0",
        "from": "a",
        "text": text,
        "ts": ts,
    }
    assert json.loads(protocol.periodic_frame(message_id=None, active_connections=0, ts=ts)) == {
        "type": "periodic",
        "id": None,
        "active_connections": 0,
        "ts": ts,
    }
    assert json.loads(protocol.shutdown_frame(reason="bye", seconds_left=1799.99951, ts=ts)) == {
        "type": "shutdown",
        "reason": "bye",
        "seconds_left": 1800.0,
        "ts": ts,
    }


@pytest.mark.parametrize(
    ("text", "text_bytes"),
    [
        ("Привіт, світе! Слава Україні", 51),  # Cyrillic: 2 bytes a letter, not 6 (\u0432)
        ("🎉", 4),  # an emoji: 4 bytes, not 12 (a surrogate pair of \u escapes)
        ("ascii only", 10),
    ],
)
def test_frames_carry_non_ascii_text_unescaped(text: str, text_bytes: int) -> None:
    frame = protocol.message_frame(message_id="1-0", sender="a", text=text, ts=0.0)
    assert text in frame  # as itself, not as \u escapes
    assert json.loads(frame)["text"] == text
    assert protocol.utf8_size(text) == len(text.encode()) == text_bytes
    empty = protocol.message_frame(message_id="1-0", sender="a", text="", ts=0.0)
    wire = protocol.Frame(frame).wire
    # The WebSocket length is in bytes: the frame grows by the text's UTF-8 size.
    assert len(wire) - len(protocol.Frame(empty).wire) in {text_bytes, text_bytes + 2}
    assert wire.endswith(frame.encode())


def test_control_characters_are_still_escaped() -> None:
    frame = protocol.message_frame(message_id="1-0", sender="a", text='a\n\x00"\\', ts=0.0)
    assert "\n" not in frame
    assert "\x00" not in frame
    assert json.loads(frame)["text"] == 'a\n\x00"\\'


def test_error_frame() -> None:
    assert json.loads(protocol.error_frame(error="rate_limited", reason="slow down", ts=1.5)) == {
        "type": "error",
        "error": "rate_limited",
        "reason": "slow down",
        "ts": 1.5,
    }


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_wire_frames_follow_rfc_6455(size: int) -> None:
    frame = protocol.Frame("x" * size)
    wire = frame.wire
    assert wire is frame.wire  # built once, shared by every client
    assert wire[0] == 0x81  # FIN + text
    if size < 126:
        assert (wire[1], wire[2:]) == (size, b"x" * size)
    elif size < 65536:
        assert (wire[1], int.from_bytes(wire[2:4], "big"), len(wire)) == (126, size, 4 + size)
    else:
        assert (wire[1], int.from_bytes(wire[2:10], "big"), len(wire)) == (127, size, 10 + size)


def test_close_codes_are_documented_values() -> None:
    assert [int(code) for code in CloseCode] == [
        1001,
        1003,
        1008,
        1009,
        1013,
        4008,
        4009,
        4010,
        4500,
        4501,
        4502,
        4503,
    ]


def test_the_ping_frame_is_a_final_empty_unmasked_ping() -> None:
    import wsproto.frame_protocol as fp

    assert protocol.PING.wire == bytes((0x80 | fp.Opcode.PING, 0))
    assert protocol.PING.text == ""  # never sent as a text message by an ASGI sink
