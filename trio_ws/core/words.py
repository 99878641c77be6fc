"""Words for log lines: operators read "1 connection", not "1 connections", and a client's
bytes never reach a log line unescaped or uncut, and its secrets never reach one at all."""

import urllib.parse

#: Most characters of a client-supplied string that a log line carries (see :func:`loggable`).
LOGGABLE_LIMIT = 80


def plural(count: int, noun: str) -> str:
    """``plural(1, "client")`` -> ``"1 client"``; ``plural(2, "client")`` -> ``"2 clients"``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def loggable(text: str, limit: int = LOGGABLE_LIMIT) -> str:
    """A client-supplied string (a path, a query string, a peer, a close reason) made safe for
    one log line: control and other unprintable characters (ESC, NUL, CR, LF, bidi overrides)
    and backslashes escaped as ``repr`` escapes them, and at most ``limit`` characters kept,
    with a marker that says how long it was: ``"/ws/aaaa...[20480 chars]"``.

    Printable non-ASCII text (Ukrainian, emoji) is kept as it is. Costs O(limit), however long
    ``text`` is.
    """
    if len(text) <= limit and text.isprintable() and "\\" not in text:
        return text  # the common case (an address, a plain path): nothing to escape or cut
    out: list[str] = []
    used = 0
    consumed = 0
    for char in text[:limit]:
        piece = char if char.isprintable() and char != "\\" else repr(char)[1:-1]
        if used + len(piece) > limit:
            break
        out.append(piece)
        used += len(piece)
        consumed += 1
    if consumed < len(text):
        out.append(f"...[{len(text)} chars]")
    return "".join(out)


#: Query parameters that carry secrets (a token, a resume key): never logged.
SECRET_PARAMETERS = frozenset({"token", "key"})


def redact_query(query: str) -> str:
    """A query string with the values of :data:`SECRET_PARAMETERS` replaced by ``***``,
    whichever way their names were encoded (``tok%65n`` is ``token`` to the server too)."""
    if not query:
        return query
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    return urllib.parse.urlencode(
        [(name, "***" if name in SECRET_PARAMETERS else value) for name, value in pairs],
        safe="*/:",
    )
