"""The Redis Stream entry of one broadcast: its fields, written and read.

Field names are short because every entry is read by every process. Each entry names its origin
(the instance that published it) and that origin's sequence number: together they identify a
broadcast across the copies that re-sending after an outage may add to the stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from trio_ws.core.broker import Outgoing

if TYPE_CHECKING:
    from collections.abc import Mapping


class Entry(NamedTuple):
    """A decoded entry: who published it, its number there, and the broadcast."""

    origin: str
    seq: int
    message: Outgoing


def encode_entry(origin: str, seq: int, message: Outgoing) -> dict[str, str]:
    """The stream entry's fields."""
    fields = {"o": origin, "q": str(seq), "k": message.kind, "ts": repr(message.ts)}
    if message.kind == "message":
        fields["f"] = message.sender
        fields["t"] = message.text
    else:
        fields["n"] = str(message.active_connections)
    return fields


def decode_entry(fields: Mapping[str, str]) -> Entry:
    """The entry that ``fields`` hold.

    Errors: :class:`ValueError` or :class:`KeyError` for an entry trio_ws did not write.
    """
    kind = fields["k"]
    ts = float(fields["ts"])
    if kind == "message":
        message = Outgoing("message", ts, sender=fields["f"], text=fields["t"])
    elif kind == "periodic":
        message = Outgoing("periodic", ts, active_connections=int(fields["n"]))
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return Entry(fields["o"], int(fields["q"]), message)
