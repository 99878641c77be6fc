"""The security headers of every HTTP response, and the page's Content-Security-Policy.

The page's script and style are inline (one file a reader can open); the policy allows exactly
them by their SHA-256 hashes, computed from the page as rendered, so it needs no
``'unsafe-inline'``: a ``<script>`` that reached the page any other way (an injected message,
were the page ever to insert HTML) would not run. ``connect-src 'self'`` allows the WebSocket
to the page's own origin (``ws:`` / ``wss:`` to the same host and port, CSP Level 3).
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache

#: Sent with every HTTP response.
COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

#: Every response that is not the page: it runs nothing, loads nothing, is framed by nobody.
DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"

_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


def _sha256(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


@lru_cache(maxsize=4)
def page_csp(html: str) -> str:
    """The policy for ``html`` (the rendered page): its inline scripts and styles by hash, the
    WebSocket to its own origin, and nothing else."""
    scripts: list[str] = []
    styles: list[str] = []
    for kind, body in _INLINE.findall(html):
        (scripts if kind == "script" else styles).append(_sha256(body))
    return "; ".join(
        [
            "default-src 'none'",
            "script-src " + (" ".join(scripts) or "'none'"),
            "style-src " + (" ".join(styles) or "'none'"),
            "connect-src 'self'",
            # The page's favicon is an empty data: URL (no request for /favicon.ico).
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
