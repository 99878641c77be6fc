"""The page under its Content-Security-Policy, in Debian's headless Chromium (Playwright).

The page must still work with the policy it is served with (its inline script and style are
allowed by hash only, the WebSocket by ``connect-src 'self'``), and code that reaches the page
any other way must not run: a message carrying ``<img onerror>`` or ``<script>`` stays text, and
even a script element or an inline handler inserted into the page is blocked.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from playwright.sync_api import Page, expect

from tests import live
from tests.system.test_browser import (  # noqa: F401  (browser, open_page: fixtures)
    FAST_ENV,
    OpenPage,
    browser,
    expect_state,
    open_page,
    screenshot,
    sockets,
)

KEY = "browser-api-key-0123456789abcdef"

#: Every CSP violation the page reports, kept where the test can read it.
RECORD_VIOLATIONS = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__violations.push({ directive: event.effectiveDirective, blocked: event.blockedURI,
                             sample: event.sample });
});
"""

PAYLOAD = '<img src=x onerror="window.pwned=1"> <script>window.pwned=2</script> & <b>bold</b>'


def violations(page: Page) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = page.evaluate("window.__violations")
    return found


def api_publish(base_url: str, text: str) -> int:
    request = urllib.request.Request(
        base_url + "/publish",
        data=json.dumps({"text": text}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        status: int = answer.status
    return status


def test_the_page_works_under_its_csp_and_injected_code_does_not_run(
    open_page: OpenPage,  # noqa: F811  (the fixture imported above)
) -> None:
    with live.server(env={**FAST_ENV, "TRIO_WS_API_KEY": KEY}) as server:
        pages = []
        for name in ("alice", "bob"):
            page = open_page("about:blank")
            page.context.add_init_script(RECORD_VIOLATIONS)
            response = page.goto(f"{server.base_url}/?id={name}&connect")
            assert response is not None
            headers = response.headers
            assert "connect-src 'self'" in headers["content-security-policy"]
            assert "unsafe-inline" not in headers["content-security-policy"]
            assert headers["x-frame-options"] == "DENY"
            pages.append(page)
        alice, bob = pages
        for page in pages:
            # The inline script ran (it connected, over ws:// to its own origin) and the
            # inline style applies (the "open" colour): both allowed by their hashes.
            expect_state(page, "open")
            assert sockets(page)["urls"][0].startswith(server.base_url.replace("http", "ws", 1))
            color = page.eval_on_selector("#status", "e => getComputedStyle(e).color")
            assert color == "rgb(23, 112, 43)"

        # A client's message and a backend's, both carrying markup: shown as text.
        alice.fill("#text", PAYLOAD)
        alice.click("#send")
        assert api_publish(server.base_url, PAYLOAD) == 202
        for page in pages:
            log = page.locator("#log")
            expect(log).to_contain_text("alice: " + PAYLOAD)
            expect(log).to_contain_text("@server: " + PAYLOAD)
            assert log.locator("b, img, script").count() == 0
            assert page.evaluate("window.pwned") is None
        screenshot(alice, "page-csp.png")
        # The page itself broke no rule of its policy.
        assert violations(alice) == []

        # Were markup ever to reach the DOM, the policy stops it: an inline handler and an
        # inline script element inserted now do not run, and the browser reports both.
        bob.evaluate(
            """() => {
                document.body.insertAdjacentHTML(
                    "beforeend", '<img src="x" onerror="window.pwned = 3">');
                const script = document.createElement("script");
                script.textContent = "window.pwned = 4";
                document.body.appendChild(script);
            }"""
        )
        bob.wait_for_function("window.__violations.length >= 2")
        assert bob.evaluate("window.pwned") is None
        directives = {v["directive"] for v in violations(bob)}
        assert {"script-src-elem", "script-src-attr"} <= directives
        # And the page still works after all that.
        bob.fill("#text", "still fine")
        bob.click("#send")
        expect(alice.locator("#log")).to_contain_text("bob: still fine")
