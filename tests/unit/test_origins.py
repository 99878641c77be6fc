"""The Origin check (core/origins.py): a table of origins, what the request was made to, and
the verdict; and the forwarded host and scheme, believed from trusted proxies only."""

from __future__ import annotations

import pytest

from trio_ws.core.forwarded import TrustedProxies
from trio_ws.core.origins import OriginPolicy, parse_origin
from trio_ws.core.words import redact_query

SAME = OriginPolicy()
LISTED = OriginPolicy(["https://app.example", "http://localhost:3000", "null"])
ANY = OriginPolicy(["*"])


@pytest.mark.parametrize(
    ("policy", "origin", "host", "scheme", "allowed"),
    [
        (SAME, None, "example.com", "ws", True),  # not a browser
        (SAME, "http://example.com", "example.com", "ws", True),
        (SAME, "http://EXAMPLE.com:80", "example.com", "ws", True),
        (SAME, "http://example.com:8000", "example.com:8000", "ws", True),
        (SAME, "https://example.com", "example.com", "wss", True),
        (SAME, "https://example.com", "example.com:443", "https", True),
        (SAME, "https://evil.example", "example.com", "ws", False),
        (SAME, "http://example.com", "example.com:8000", "ws", False),  # another port
        (SAME, "https://example.com", "example.com", "ws", False),  # TLS ended unseen
        (SAME, "http://example.com.evil.example", "example.com", "ws", False),
        (SAME, "null", "example.com", "ws", False),
        (SAME, "file://", "example.com", "ws", False),
        (SAME, "http://example.com", None, "ws", False),
        (SAME, "http://example.com/path", "example.com", "ws", False),
        (SAME, "garbage", "example.com", "ws", False),
        (SAME, "http://[::1", "example.com", "ws", False),
        (LISTED, "https://app.example", "example.com", "ws", True),
        (LISTED, "https://APP.example:443", "example.com", "ws", True),
        (LISTED, "http://localhost:3000", "example.com", "ws", True),
        (LISTED, "null", "example.com", "ws", True),
        (LISTED, "http://example.com", "example.com", "ws", False),  # the list replaces it
        (LISTED, "http://app.example", "example.com", "ws", False),
        (ANY, "https://evil.example", "example.com", "ws", True),
        (ANY, "null", "example.com", "ws", True),
    ],
)
def test_which_origins_may_connect(
    policy: OriginPolicy, origin: str | None, host: str | None, scheme: str, allowed: bool
) -> None:
    assert policy.allows(origin, host, scheme) is allowed


def test_parse_origin() -> None:
    assert parse_origin("https://Example.com") == ("https", "example.com", 443)
    assert parse_origin("http://[::1]:8000") == ("http", "::1", 8000)
    assert parse_origin("ftp://example.com") is None


def test_the_forwarded_host_and_scheme_come_from_trusted_proxies_only() -> None:
    proxies = TrustedProxies(["127.0.0.1"])
    headers = [(b"X-Forwarded-Host", b"evil, example.com"), (b"x-forwarded-proto", b"https")]
    assert proxies.forwarded_origin("127.0.0.1", headers) == ("example.com", "https")
    assert proxies.forwarded_origin("10.0.0.1", headers) == (None, None)
    assert TrustedProxies().forwarded_origin("127.0.0.1", headers) == (None, None)
    assert proxies.forwarded_origin("127.0.0.1", []) == (None, None)


@pytest.mark.parametrize(
    ("query", "logged"),
    [
        ("", ""),
        ("since=1-0", "since=1-0"),
        ("token=abc.def&since=1-0", "token=***&since=1-0"),
        ("key=k&tok%65n=t", "key=***&token=***"),
        ("a=%0A", "a=%0A"),
    ],
)
def test_secrets_are_redacted_from_a_logged_query(query: str, logged: str) -> None:
    assert redact_query(query) == logged
