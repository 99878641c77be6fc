"""The page under its Content-Security-Policy, in Debian's headless Chromium (Playwright).

The page must still work with the policy it is served with (its inline script and style are
allowed by hash only, the WebSocket by ``connect-src 'self'``), and code that reaches the page
any other way must not run: a message carrying ``<img onerror>`` or ``<script>`` stays text, and
even a script element or an inline handler inserted into the page is blocked.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import jwt
from playwright.sync_api import Page, expect

from tests import live
from tests.system.test_browser import (  # noqa: F401  (browser, open_page: fixtures)
    FAST_ENV,
    OpenPage,
    browser,
    expect_state,
    open_page,
    screenshot,
    skip_backoff_until_open,
    sockets,
)

KEY = "browser-api-key-0123456789abcdef"
SECRET = "browser-test-secret-of-32-bytes-at-least"

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


def test_a_page_with_a_token_reconnects_with_its_key_under_the_csp(
    open_page: OpenPage,  # noqa: F811  (the fixture imported above)
) -> None:
    """Everything together: the policy's headers, a token typed in the page and sent as the
    subprotocol pair, and a reconnect (the network dropped, the server still holds the old
    connection) that presents the tab's resume key and replaces only that connection."""
    env = {**FAST_ENV, "TRIO_WS_JWT_SECRET": SECRET, "TRIO_WS_CLIENT_PUBLISH": "token"}
    with live.server(env=env) as server:
        token = jwt.encode({"sub": "erin", "exp": int(time.time()) + 3600}, SECRET)
        tabs = []
        for _ in range(2):
            page = open_page("about:blank", clock=True)
            page.context.add_init_script(RECORD_VIOLATIONS)
            response = page.goto(server.base_url + "/")
            assert response is not None
            assert "connect-src 'self'" in response.headers["content-security-policy"]
            page.fill("#token", token)
            page.click("#connect")
            expect_state(page, "open")
            expect(page.locator("#me")).to_have_text("erin")
            assert page.evaluate("window.__sockets.all.at(-1).protocol") == "trio-ws.bearer"
            assert token not in sockets(page)["urls"][-1]
            tabs.append(page)
        page, other_tab = tabs
        key = page.evaluate("sessionStorage.getItem('trio_ws.resume_key.erin')")
        assert isinstance(key, str)

        # The network drops under the first tab; the server's side stays open.
        page.evaluate(
            """() => {
              const ws = window.__sockets.all.at(-1);
              ws.onclose = null; ws.onmessage = null;
              socket = null;
              scheduleRetry();
            }"""
        )
        skip_backoff_until_open(page)
        assert f"key={key}" in sockets(page)["urls"][-1]
        assert token not in sockets(page)["urls"][-1]
        assert page.evaluate("window.__sockets.all.at(-1).protocol") == "trio-ws.bearer"
        expect(page.locator("#log .t-welcome")).to_have_count(2)
        # Its stale connection was replaced (4500); the other tab of the same user was not.
        old_close = page.evaluate(
            """() => new Promise((done) => {
              const ws = window.__sockets.all.at(-2);
              if (ws.readyState === WebSocket.CLOSED) done("closed");
              ws.addEventListener("close", (event) => done(event.code));
            })"""
        )
        assert old_close in (4500, "closed")
        expect_state(other_tab, "open")
        assert sockets(other_tab)["created"] == 1

        # The token lets it publish (TRIO_WS_CLIENT_PUBLISH=token), and both tabs receive.
        page.fill("#text", "back again")
        page.click("#send")
        for tab in tabs:
            expect(tab.locator("#log .t-message").last).to_contain_text("erin: back again")
            assert violations(tab) == []
        assert token not in server.log
        assert key not in server.log
