"""The page's Content-Security-Policy and the API key's comparison, pure."""

from __future__ import annotations

import base64
import hashlib

from trio_ws.shell.api import bearer_matches, body_limit
from trio_ws.shell.headers import page_csp


def sha(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_the_page_policy_allows_its_own_inline_code_by_hash_only() -> None:
    html = "<style>\nb{}\n</style><p>x</p><script>\nrun();\n</script>"
    policy = dict(part.split(" ", 1) for part in page_csp(html).split("; "))
    assert policy["script-src"] == sha("\nrun();\n")
    assert policy["style-src"] == sha("\nb{}\n")
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert policy["default-src"] == "'none'"
    assert "unsafe" not in page_csp(html)


def test_a_page_without_inline_code_allows_none() -> None:
    assert "script-src 'none'" in page_csp("<p>hi</p>")


def test_the_bearer_key() -> None:
    key = "0123456789abcdef"
    assert bearer_matches("Bearer 0123456789abcdef", key)
    assert bearer_matches("bearer  0123456789abcdef ", key)
    assert not bearer_matches(None, key)
    assert not bearer_matches("Bearer 0123456789abcdeg", key)
    assert not bearer_matches("Basic 0123456789abcdef", key)
    assert not bearer_matches("Bearer ", key)
    assert not bearer_matches("Bearer 0123456789abcdef0", key)
    assert not bearer_matches("Bearer é", key)


def test_the_body_bound_fits_a_fully_escaped_message() -> None:
    assert body_limit(1024) >= len('{"text": ""}') + 6 * 1024
