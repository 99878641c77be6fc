"""Which web pages may open a WebSocket here: the ``Origin`` check against cross-site
WebSocket hijacking.

Theory of operation: a browser sends ``Origin`` on every WebSocket handshake and a page cannot
change it, so it tells which site's page is asking. Without a check, any page a user visits can
open a socket to this server from the user's browser. Programs that are not browsers send no
``Origin`` and are not concerned (they can send anything they like anyway).

* With no ``TRIO_WS_ALLOWED_ORIGINS`` (the default), an ``Origin`` must be the origin the
  request was made to: the same scheme, host and port as the ``Host`` header (as
  python-socketio does). Behind a proxy, the host and scheme the proxy received come from
  ``X-Forwarded-Host`` / ``X-Forwarded-Proto``, believed only from a trusted proxy (the shell
  passes them).
* With ``TRIO_WS_ALLOWED_ORIGINS``, the origin must be one of the list (compared as origins:
  case and default ports do not matter); ``*`` allows any.
* ``null`` (a sandboxed page, a ``file://`` page) is never same-origin; allow it by listing
  ``null``.
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

DEFAULT_PORTS = {"http": 80, "https": 443}

#: ``(scheme, host, port)``; ``null`` and anything unparsable have no tuple.
Origin = tuple[str, str, int]


def parse_origin(text: str) -> Origin | None:
    """``https://Example.com`` -> ``("https", "example.com", 443)``; None for ``null``,
    ``file://``, or anything that is not an http(s) origin."""
    try:
        parts = urllib.parse.urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    return scheme, parts.hostname.lower(), port if port is not None else DEFAULT_PORTS[scheme]


def request_origin(host: str | None, scheme: str) -> Origin | None:
    """The origin a request was made to, from its ``Host`` (``example.com:8443``) and its
    scheme (``http``/``https``, or ``ws``/``wss``)."""
    if not host:
        return None
    scheme = {"ws": "http", "wss": "https"}.get(scheme.lower(), scheme.lower())
    return parse_origin(f"{scheme}://{host.strip()}")


class OriginPolicy:
    """The origins allowed to connect (see the module's docstring)."""

    def __init__(self, allowed: Sequence[str] = ()) -> None:
        self.any = "*" in allowed
        self.null = any(entry.strip().lower() == "null" for entry in allowed)
        self.listed = {origin for origin in map(parse_origin, allowed) if origin is not None}
        self.same_origin = not allowed

    def describe(self) -> str:
        """What is allowed, for the start-up line and the refusal's log line."""
        if self.any:
            return "any origin"
        if self.same_origin:
            return "the same origin"
        names = sorted(f"{s}://{h}:{p}" for s, h, p in self.listed)
        return ", ".join(names + (["null"] if self.null else []))

    def allows(self, origin: str | None, host: str | None, scheme: str) -> bool:
        """Whether a handshake with this ``Origin`` (None: no header) may proceed; ``host`` and
        ``scheme`` are what the request was made to."""
        if origin is None or self.any:
            return True
        parsed = parse_origin(origin)
        if parsed is None:
            return self.null and origin.strip().lower() == "null"
        if self.same_origin:
            return parsed == request_origin(host, scheme)
        return parsed in self.listed
