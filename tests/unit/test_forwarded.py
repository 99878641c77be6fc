"""Which address is the client's (trio_ws/core/forwarded.py): the peer, unless it is a trusted
proxy, then the rightmost address in X-Forwarded-For (or Forwarded) that is no trusted proxy."""

from __future__ import annotations

import pytest

from trio_ws.core.forwarded import TrustedProxies, forwarded_for, parse_address

TRUSTED = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "2001:db8::/32"])

XFF = b"x-forwarded-for"
FWD = b"forwarded"

CASES = [
    # (peer, headers, client address or None: the peer itself)
    ("203.0.113.5", [(XFF, b"198.51.100.1")], None),  # untrusted peer: header ignored
    ("127.0.0.1", [], None),  # trusted peer without a header
    ("127.0.0.1", [(XFF, b"198.51.100.1")], "198.51.100.1"),
    # nginx appends; what the client wrote stays on the left and is never reached:
    ("127.0.0.1", [(XFF, b"6.6.6.6, 198.51.100.1")], "198.51.100.1"),
    # two proxies: the one on the right is trusted, so one more step left
    ("127.0.0.1", [(XFF, b"6.6.6.6, 198.51.100.1, 10.1.2.3")], "198.51.100.1"),
    # two headers are one list, in order
    ("127.0.0.1", [(XFF, b"6.6.6.6"), (b"X-Forwarded-For", b"198.51.100.1")], "198.51.100.1"),
    # every hop trusted: the leftmost
    ("127.0.0.1", [(XFF, b"10.0.0.9, 10.0.0.8")], "10.0.0.9"),
    # garbage stops the walk at the last trusted hop
    ("127.0.0.1", [(XFF, b"198.51.100.1, nonsense")], None),
    ("127.0.0.1", [(XFF, b"198.51.100.1, nonsense, 10.0.0.8")], "10.0.0.8"),
    # ports and IPv6
    ("127.0.0.1", [(XFF, b"198.51.100.1:4711")], "198.51.100.1"),
    ("2001:db8::1", [(XFF, b"[2001:db9::7]:80")], "2001:db9::7"),
    ("::ffff:127.0.0.1", [(XFF, b"198.51.100.1")], "198.51.100.1"),
    # Forwarded, when there is no X-Forwarded-For
    ("127.0.0.1", [(FWD, b'for=6.6.6.6, for="198.51.100.1:80";proto=http')], "198.51.100.1"),
    ("127.0.0.1", [(FWD, b'For="[2001:db9::7]:4711"')], "2001:db9::7"),
    ("127.0.0.1", [(FWD, b"for=unknown")], None),
    # X-Forwarded-For wins over Forwarded (nginx sets it, and passes a client's Forwarded on)
    ("127.0.0.1", [(FWD, b"for=6.6.6.6"), (XFF, b"198.51.100.1")], "198.51.100.1"),
    ("not-an-address", [(XFF, b"198.51.100.1")], None),
]


@pytest.mark.parametrize(("peer", "headers", "client"), CASES)
def test_client_address(peer: str, headers: list[tuple[bytes, bytes]], client: str | None) -> None:
    assert TRUSTED.client_address(peer, headers) == client


def test_nobody_is_trusted_by_default() -> None:
    nobody = TrustedProxies()
    assert not nobody
    assert nobody.client_address("127.0.0.1", [(XFF, b"198.51.100.1")]) is None


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("1.2.3.4", "1.2.3.4"),
        (" 1.2.3.4:80 ", "1.2.3.4"),
        ('"[::1]:80"', "::1"),
        ("::1", "::1"),
        ("_hidden", None),
        ("", None),
    ],
)
def test_parse_address(text: str, address: str | None) -> None:
    parsed = parse_address(text)
    assert (None if parsed is None else str(parsed)) == address


def test_forwarded_for() -> None:
    assert forwarded_for('for=a;by=b, proto=http, FOR = "c"') == ["a", "", '"c"']
