from __future__ import annotations

import pytest

from trio_ws.core.words import LOGGABLE_LIMIT, loggable, plural


def test_plural() -> None:
    assert (plural(1, "client"), plural(2, "client"), plural(0, "client")) == (
        "1 client",
        "2 clients",
        "0 clients",
    )


@pytest.mark.parametrize(
    ("text", "logged"),
    [
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("", ""),
        ("/ws/\x1b[2J\x00", "/ws/\\x1b[2J\\x00"),
        ("a\r\nINFO fake line", "a\\r\\nINFO fake line"),
        ("back\\slash 'quotes' \"too\"", "back\\\\slash 'quotes' \"too\""),
        ("\u202egnp.exe", "\\u202egnp.exe"),  # a bidi override is escaped
        ("Привіт 🎉", "Привіт 🎉"),  # printable non-ASCII stays as it is
        ("x" * 80, "x" * 80),
        ("x" * 81, "x" * 80 + "...[81 chars]"),
        ("\x00" * 30, "\\x00" * 20 + "...[30 chars]"),  # the escaped form is what is cut
    ],
)
def test_loggable(text: str, logged: str) -> None:
    assert loggable(text) == logged


def test_a_20_kb_url_with_escapes_becomes_one_short_line() -> None:
    url = "/ws/\x1b]0;owned\x07" + "\x00\x1b[31m" * 2000 + "a" * 10_000
    assert len(url) > 20_000
    line = loggable(url)
    assert line.isprintable()
    assert len(line) <= LOGGABLE_LIMIT + len(f"...[{len(url)} chars]")
    assert line.startswith("/ws/\\x1b]0;owned\\x07\\x00\\x1b[31m")
    assert line.endswith(f"...[{len(url)} chars]")
    assert len(loggable(url, limit=20)) <= 20 + len(f"...[{len(url)} chars]")


def test_a_clean_string_is_returned_itself_not_copied() -> None:
    # A connection keeps its loggable peer for its whole life: no second copy of it.
    peer = "".join(["127.0.0.1:", "5000"])
    assert loggable(peer) is peer
    assert loggable("Привіт 🎉 " * 2) == "Привіт 🎉 " * 2
