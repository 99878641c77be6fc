"""The wire protocol: client ids, close codes and the JSON frames the server sends.

Pure functions only. Each frame is encoded to text once and the same string object is queued for
every client, so a broadcast costs one ``json.dumps`` whatever the number of receivers.
"""

from __future__ import annotations

import enum
import json
import re
import secrets
from datetime import UTC, datetime

#: A broadcast id, as the broker gives it (a Redis Stream id): milliseconds, then a sequence.
MESSAGE_ID_PATTERN = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")

#: A client id chosen by the client: 1 to 64 characters of ``[A-Za-z0-9_.-]``.
CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class CloseCode(enum.IntEnum):
    """Close codes the server sends, and what a client should do on each.

    4000-4499 mean "reconnect, with backoff"; 4500-4999 mean "do not reconnect by yourself"
    (the convention Centrifugo uses, so existing client libraries read them right).
    """

    #: The server is draining or shutting down: reconnect (another instance will answer).
    GOING_AWAY = 1001
    #: The client sent a binary frame; the protocol is text only.
    UNSUPPORTED_DATA = 1003
    #: The client id or ``since`` in the URL is not valid, or the client stayed over its
    #: publish limit (after an ``error`` frame).
    POLICY_VIOLATION = 1008
    #: The client sent a frame larger than ``max_message_size``.
    MESSAGE_TOO_BIG = 1009
    #: Over a connection limit (the process's, or its address's): reconnect with backoff.
    TRY_AGAIN_LATER = 1013
    #: The client did not read fast enough and its queue overflowed: reconnect with backoff.
    SLOW_CONSUMER = 4008
    #: Another connection holds this client id and the attempt did not present its resume
    #: key: reconnect with backoff (the id frees itself when that connection ends).
    ID_IN_USE = 4009
    #: The client sent nothing (no pong, no frame) within the pong timeout after a ping: the
    #: connection is probably dead. Reconnect with backoff.
    NO_PONG = 4010
    #: A newer connection with the same client id took over: do not reconnect.
    REPLACED = 4500
    #: Tokens are required and this one is missing or not valid (or names another id): do not
    #: reconnect with the same token; fix the client.
    UNAUTHORIZED = 4501
    #: The connection's token expired: reconnect only with a new token.
    TOKEN_EXPIRED = 4502
    #: An operator closed this client through the API (``DELETE /clients/<id>``): do not
    #: reconnect by yourself.
    CLOSED_BY_OPERATOR = 4503


class ClientIdError(ValueError):
    """The client id in the URL is not 1 to 64 characters of ``[A-Za-z0-9_.-]``."""


def validate_client_id(client_id: str) -> str:
    """Return ``client_id`` if it is valid.

    Errors: :class:`ClientIdError` with a reason short enough for a close frame (123 bytes).
    """
    if CLIENT_ID_PATTERN.fullmatch(client_id) is None:
        raise ClientIdError("client id must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return client_id


class StaleAttemptError(ValueError):
    """A connection attempt that started before the connection already registered for its id:
    its client retried, and the retry got through first."""


class IdInUseError(ValueError):
    """Another connection holds the client id, and the attempt did not present its resume key."""


class ResumeError(ValueError):
    """The ``since`` of a resuming client is not a message id."""


def validate_since(since: str) -> str:
    """Return ``since`` if it looks like a message id (``"1795829403120-0"``).

    Errors: :class:`ResumeError` with a reason short enough for a close frame.
    """
    if MESSAGE_ID_PATTERN.fullmatch(since) is None:
        raise ResumeError("since must be a message id such as 1795829403120-0")
    return since


def parse_message_id(message_id: str) -> tuple[int, int]:
    """``"1795829403120-3"`` -> ``(1795829403120, 3)``: ids compare in broadcast order.

    Errors: :class:`ValueError` for anything else.
    """
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq or 0)


#: A resume key as the server issues them (``secrets.token_urlsafe(24)``: 32 characters).
RESUME_KEY_PATTERN = re.compile(r"[A-Za-z0-9_\-]{32}")


def new_resume_key() -> str:
    """The secret a connection's welcome carries: a reconnect that presents it may replace
    that connection (docs/protocol.md, "Resume keys")."""
    return secrets.token_urlsafe(24)


def new_client_id() -> str:
    """A server-assigned id; the prefix keeps it apart from ids clients tend to pick."""
    return "anon-" + secrets.token_hex(6)


class Frame:
    """One server frame, shared by every client it is queued for.

    ``text`` is the JSON; ``wire`` is the complete WebSocket frame (server frames are not
    masked, so the bytes are the same for every client) built on first use, once per broadcast
    rather than once per client.
    """

    __slots__ = ("_wire", "message_id", "text")

    def __init__(
        self, text: str, message_id: str | None = None, *, wire: bytes | None = None
    ) -> None:
        self.text = text
        #: The broadcast's id, for frames that carry one (message, periodic).
        self.message_id = message_id
        self._wire = wire

    def __repr__(self) -> str:
        return f"Frame({self.text!r})"

    @property
    def wire(self) -> bytes:
        if self._wire is None:
            self._wire = ws_text_frame(self.text.encode())
        return self._wire


#: The server's WebSocket ping (RFC 6455 section 5.5.2): a final ping frame with no payload,
#: unmasked. Built once; every connection gets this same object (sinks recognise it by identity:
#: a sink that cannot write raw bytes sends a ping its own way).
PING = Frame("", wire=b"\x89\x00")


def utf8_size(text: str) -> int:
    """The bytes ``text`` takes in UTF-8 (``str.isascii`` is O(1): ASCII text is not encoded)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def ws_text_frame(payload: bytes) -> bytes:
    """An unmasked, final WebSocket text frame (RFC 6455 section 5.2) carrying ``payload``."""
    length = len(payload)
    if length < 126:
        return bytes((0x81, length)) + payload
    if length < 1 << 16:
        return bytes((0x81, 126)) + length.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + length.to_bytes(8, "big") + payload


def iso_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Compact separators: frames go to every client. Non-ASCII text as itself, in UTF-8: \u
# escapes would triple Cyrillic text and turn a 4-byte emoji into 12. A frame's size in bytes is
# therefore not its length in characters: use len(Frame.wire). One encoder for every frame:
# json.dumps with options builds a new one per call (a fifth of a welcome's encoding).
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def new_instance_id() -> str:
    """Names one server process in frames, /health and the cluster."""
    return secrets.token_hex(4)


def welcome_frame(
    *,
    client_id: str,
    active_connections: int,
    instance: str,
    last_id: str | None,
    ts: float,
    resumed: dict[str, object] | None = None,
    resume_key: str | None = None,
) -> str:
    frame: dict[str, object] = {
        "type": "welcome",
        "client_id": client_id,
        "instance": instance,
        "active_connections": active_connections,
        "last_id": last_id,
        "server_time": iso_time(ts),
        "ts": ts,
    }
    if resumed is not None:
        frame["resumed"] = resumed
    if resume_key is not None:
        frame["resume_key"] = resume_key
    return _encode(frame)


def message_frame(*, message_id: str | None, sender: str, text: str, ts: float) -> str:
    return _encode({"type": "message", "id": message_id, "from": sender, "text": text, "ts": ts})


def periodic_frame(*, message_id: str | None, active_connections: int, ts: float) -> str:
    return _encode(
        {"type": "periodic", "id": message_id, "active_connections": active_connections, "ts": ts}
    )


def presence_frame(*, active_connections: int, ts: float) -> str:
    """The connection count changed: sent to this process's clients only, without an id (it is
    not a broadcast: no history, no broker), at most once per presence interval."""
    return _encode({"type": "presence", "active_connections": active_connections, "ts": ts})


def error_frame(*, error: str, reason: str, ts: float) -> str:
    """Sent to one client just before the server closes it for what it did: ``error`` is a
    fixed word for programs (``rate_limited``), ``reason`` a sentence for people."""
    return _encode({"type": "error", "error": error, "reason": reason, "ts": ts})


def shutdown_frame(*, reason: str, seconds_left: float, ts: float) -> str:
    return _encode(
        {"type": "shutdown", "reason": reason, "seconds_left": round(seconds_left, 3), "ts": ts}
    )
