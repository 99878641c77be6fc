"""The test page (templates/index.html) in Debian's headless Chromium, driven by Playwright.

Real servers (``python -m trio_ws`` in subprocesses, on loopback), a real browser; waits are
Playwright's ``expect`` polls, never fixed sleeps. Screenshots go to ``tests/artifacts/``.

Every page counts its own WebSockets (an init script wraps the constructor), so each test can
check that the page never had two sockets at once.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests import live

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

COUNT_SOCKETS = """
(() => {
  const Native = window.WebSocket;
  const stats = { created: 0, live: 0, maxLive: 0, urls: [], all: [] };
  window.__sockets = stats;
  window.WebSocket = class extends Native {
    constructor(...args) {
      super(...args);
      stats.created += 1;
      stats.live += 1;
      stats.maxLive = Math.max(stats.maxLive, stats.live);
      stats.urls.push(String(args[0]));
      stats.all.push(this);
      this.addEventListener("close", () => { stats.live -= 1; });
    }
  };
})();
"""

#: Frames the tests wait for come within a second or two; reconnects within the backoff.
FAST_MS = 5_000
RECONNECT_MS = 25_000
#: The page's largest backoff delay (README, "The test page").
BACKOFF_MAX_MS = 20_000

#: Short intervals for the tests (README, "Configuration").
FAST_ENV = {"TRIO_WS_BROADCAST_INTERVAL": "0.5", "TRIO_WS_PING_INTERVAL": "1"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = live.require_tool("chromium", "chromium", "/usr/bin/chromium")
    with sync_playwright() as playwright:
        # launch() gives every browser a fresh temporary profile (user-data dir).
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


OpenPage = Callable[..., Page]


@pytest.fixture
def open_page(browser: Browser) -> Iterator[OpenPage]:
    """Open a URL in a new browser context (a separate user), optionally recording the URL of
    every HTTP request the page makes."""
    contexts: list[BrowserContext] = []

    def open_(url: str, requests: list[str] | None = None, *, clock: bool = False) -> Page:
        context = browser.new_context(viewport={"width": 1000, "height": 800})
        contexts.append(context)
        context.add_init_script(COUNT_SOCKETS)
        page = context.new_page()
        if clock:
            page.clock.install()  # the page's timers: real time, unless a test skips ahead
        if requests is not None:
            page.on("request", lambda request: requests.append(request.url))
        page.goto(url)
        return page

    yield open_
    for context in contexts:
        context.close()


def sockets(page: Page) -> dict[str, Any]:
    stats: dict[str, Any] = page.evaluate("window.__sockets")
    return stats


def expect_state(page: Page, state: str, timeout: float = FAST_MS) -> None:
    expect(page.locator("#status")).to_have_attribute("data-state", state, timeout=timeout)


def skip_backoff_until_open(page: Page, timeout_s: float = 15) -> None:
    """Let a waiting page's pending retry fire now, on its fake clock, until it is connected.

    The backoff's delays are tested on their own; skipping them keeps reconnect tests from
    waiting up to 20 s for a random draw. The retry, the socket and the welcome stay real.
    """
    deadline = time.monotonic() + timeout_s
    while (state := page.locator("#status").get_attribute("data-state")) != "open":
        assert state in ("waiting", "connecting"), f"the page stopped trying: {state}"
        assert time.monotonic() < deadline, "the page did not reconnect"
        if state == "waiting":
            page.clock.fast_forward(BACKOFF_MAX_MS)
        page.wait_for_timeout(20)  # a poll step: the attempt is a real network round trip


def screenshot(page: Page, name: str) -> Path:
    live.ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = live.ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def test_two_pages_chat_html_stays_text_and_periodic_arrives(open_page: OpenPage) -> None:
    with live.server(env=FAST_ENV) as server:
        requests: dict[str, list[str]] = {"alice": [], "bob": []}
        alice = open_page(server.base_url + "/?id=alice&connect", requests["alice"])
        bob = open_page(server.base_url + "/?id=bob&connect", requests["bob"])
        for page in (alice, bob):
            expect_state(page, "open")
        expect(alice.locator("#me")).to_have_text("alice")

        html = '<b>bold</b> <img src=x onerror="window.pwned=1"> & <script>window.pwned=2</script>'
        alice.fill("#text", html)
        alice.click("#send")
        bob.fill("#text", "hello alice")
        bob.press("#text", "Enter")
        for page in (alice, bob):
            log = page.locator("#log")
            expect(log).to_contain_text("alice: " + html)
            expect(log).to_contain_text("bob: hello alice")
            # Shown as text: no element came from the message, no script ran.
            assert log.locator("b, img, script").count() == 0
            assert page.evaluate("window.pwned") is None

        # The periodic frame (every 0.5 s here) shows, and sets the connection count.
        for page in (alice, bob):
            expect(page.locator("#log .t-periodic").last).to_contain_text("2 connected")
            expect(page.locator("#count")).to_have_text("2")
        screenshot(alice, "page-chat.png")

        # Nothing but the server itself was asked for anything (no CDN, no favicon).
        for name, page in (("alice", alice), ("bob", bob)):
            assert requests[name] == [page.url]
            stats = sockets(page)
            assert stats["created"] == 1
            assert stats["urls"][0].startswith(server.base_url.replace("http", "ws", 1))


def test_drain_warning_then_reconnect_to_a_new_server_and_after_a_drop(
    open_page: OpenPage,
) -> None:
    """The drain: both pages show the warning with the seconds left, leave by themselves,
    count down to their next attempt and reconnect to a new server on the same port; then the
    server dies without a drain (SIGKILL) and they come back again."""
    env = {**FAST_ENV, "TRIO_WS_DRAIN_TIMEOUT": "4"}
    first = live.Server(env=env)
    try:
        port = first.port
        pages = [open_page(f"{first.base_url}/?id=p{n}&connect", clock=True) for n in (1, 2)]
        for page in pages:
            expect_state(page, "open")

        first.signal(signal.SIGTERM)
        for page in pages:
            expect(page.locator("#banner")).to_be_visible()
            expect(page.locator("#banner")).to_contain_text("Server shutting down")
            left = page.locator("#drain-left").text_content()
            assert left is not None
            assert 0 <= int(left) <= 4
        screenshot(pages[0], "page-drain.png")
        # The pages leave within half the time left (2 s), so the server ends its drain early.
        assert first.wait_exit(timeout=4) == 0
        assert "left by themselves" in first.log
        assert "2 connections at start: 2 left by themselves, 0 closed as slow" in first.log
        for page in pages:
            expect_state(page, "waiting", RECONNECT_MS)
            expect(page.locator("#retry")).to_have_text(
                re.compile(r"next attempt in \d+\.\d s, attempt \d+")
            )
    finally:
        first.stop()

    with live.server(port, env) as second:
        for page in pages:
            skip_backoff_until_open(page)
            expect(page.locator("#banner")).to_be_hidden()
            expect(page.locator("#log .t-welcome")).to_have_count(2)
        second.signal(signal.SIGKILL)  # a drop: no warning, no close frame
        for page in pages:
            expect_state(page, "waiting", RECONNECT_MS)
            expect(page.locator("#log .t-close").last).to_contain_text("code 1006")
        second.wait_exit()

    with live.server(port, env):
        for page in pages:
            skip_backoff_until_open(page)
            expect(page.locator("#log .t-welcome")).to_have_count(3)
            assert sockets(page)["maxLive"] == 1, "two sockets were open at once"


def test_page_resumes_after_a_drop_and_misses_nothing(open_page: OpenPage) -> None:
    """A connection drops; what was said meanwhile reaches the page when it comes back, because
    its retry asks for everything after the last id it saw (README, "Resuming")."""
    env = {"TRIO_WS_BROADCAST_INTERVAL": "0", "TRIO_WS_PING_INTERVAL": "1"}
    with live.server(env=env) as server:
        mover = open_page(server.base_url + "/?id=mover&connect", clock=True)
        talker = open_page(server.base_url + "/?id=talker&connect")
        for page in (mover, talker):
            expect_state(page, "open")

        def say(text: str) -> None:
            talker.fill("#text", text)
            talker.press("#text", "Enter")
            expect(talker.locator("#log .t-message").last).to_contain_text(text)

        say("m0")
        expect(mover.locator("#log .t-message").last).to_contain_text("talker: m0")
        # The network drops the mover's connection (4000: "reconnect").
        mover.clock.pause_at(int(time.time() * 1000) + 60_000)  # its retry waits for us
        mover.evaluate("window.__sockets.all.at(-1).close(4000, 'dropped')")
        expect_state(mover, "waiting")
        for text in ("m1", "m2", "m3"):
            say(text)
        mover.clock.resume()
        skip_backoff_until_open(mover)
        expect(mover.locator("#log")).to_contain_text("3 missed broadcasts replayed")
        assert "?since=" in sockets(mover)["urls"][-1]
        expect(mover.locator("#log .t-message")).to_have_count(4)
        texts = mover.locator("#log .t-message").all_text_contents()
        assert [text.rsplit(": ", 1)[1] for text in texts] == ["m0", "m1", "m2", "m3"]


def test_page_stops_retrying_on_disconnect_4500_and_1008(open_page: OpenPage) -> None:
    with live.server(env=FAST_ENV) as server:
        user = open_page(server.base_url + "/?id=quitter&connect")
        replaced = open_page(server.base_url + "/?id=twin&connect")
        expect_state(user, "open")
        expect_state(replaced, "open")
        # A copy of the tab (a duplicated tab copies sessionStorage) presents its key: it is
        # the same client, and the older connection is replaced with 4500.
        key = replaced.evaluate("sessionStorage.getItem('trio_ws.resume_key.twin')")
        assert isinstance(key, str)
        twin = open_page(server.base_url + "/?id=twin")
        twin.evaluate(f"sessionStorage.setItem('trio_ws.resume_key.twin', {key!r})")
        twin.click("#connect")
        bad = open_page(server.base_url + "/?id=no%20spaces&connect")

        user.click("#disconnect")
        expect_state(user, "closed")
        expect_state(replaced, "stopped")
        expect(replaced.locator("#stopped")).to_contain_text("4500")
        expect_state(twin, "open")
        expect_state(bad, "stopped")
        expect(bad.locator("#stopped")).to_contain_text("1008")

        # No attempt is pending, and none is made while 3 more periodic frames (1.5 s) come: a
        # retry would come within 0.5 s (the first cap).
        pending = {page: sockets(page)["created"] for page in (user, replaced, bad)}
        ticks = twin.locator("#log .t-periodic")
        expect(ticks.nth(ticks.count() + 2)).to_be_attached()
        for page, created in pending.items():
            assert page.locator("#retry").text_content() == ""
            assert sockets(page)["created"] == created == 1

        # Connect again after a stop is the user's choice, and works; however often it is asked
        # for, there is one socket.
        user.click("#connect")
        user.evaluate("connect(); connect(); connect()")
        expect_state(user, "open")
        expect(user.locator("#log .t-welcome")).to_have_count(2)
        assert (sockets(user)["created"], sockets(user)["maxLive"]) == (2, 1)


def test_a_page_cannot_take_an_id_in_use_and_retries_until_it_is_free(
    open_page: OpenPage,
) -> None:
    """A link /?id=alice&connect opened by someone else: refused with 4009 while alice is
    here, retried with backoff; the id is theirs once alice has left."""
    with live.server(env=FAST_ENV) as server:
        alice = open_page(server.base_url + "/?id=alice&connect")
        expect_state(alice, "open")
        other = open_page(server.base_url + "/?id=alice&connect", clock=True)
        expect(other.locator("#log .t-close").first).to_contain_text("code 4009")
        expect_state(other, "waiting")
        expect(other.locator("#status")).to_have_text(
            "client id in use by another connection, retrying"
        )
        alice.evaluate("window.__sockets.all.at(-1).send('still alice')")
        expect(alice.locator("#log .t-message").last).to_contain_text("alice: still alice")
        alice.click("#disconnect")
        expect_state(alice, "closed")
        skip_backoff_until_open(other)
        expect(other.locator("#me")).to_have_text("alice")


def test_page_reconnects_with_its_key_and_replaces_its_stale_connection(
    open_page: OpenPage,
) -> None:
    """The network drops under the page, but the server still holds its old connection (no
    close reached it): the page's retry presents its key and takes its id back at once."""
    with live.server(env=FAST_ENV) as server:
        page = open_page(server.base_url + "/?id=roamer&connect", clock=True)
        expect_state(page, "open")
        key = page.evaluate("sessionStorage.getItem('trio_ws.resume_key.roamer')")
        assert isinstance(key, str)
        assert len(key) == 32
        # The page sees its socket fail; the server's side of it stays open (the stale
        # connection): take the old socket out of the page's hands without closing it.
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
        expect(page.locator("#log .t-welcome")).to_have_count(2)
        expect(page.locator("#me")).to_have_text("roamer")
        # The old connection was replaced (4500), and the page's key did not change.
        old_close = page.evaluate(
            """() => new Promise((done) => {
              const ws = window.__sockets.all.at(-2);
              if (ws.readyState === WebSocket.CLOSED) done("closed");
              ws.addEventListener("close", (event) => done(event.code));
            })"""
        )
        assert old_close in (4500, "closed")
        assert page.evaluate("sessionStorage.getItem('trio_ws.resume_key.roamer')") == key
        # Reload (the URL connects by itself): the tab keeps its key, and takes its id back
        # again from the connection the reload left behind.
        page.reload()
        expect_state(page, "open")
        assert f"key={key}" in sockets(page)["urls"][-1]
        expect(page.locator("#me")).to_have_text("roamer")


def test_a_page_told_its_token_is_invalid_stops_and_says_why(open_page: OpenPage) -> None:
    env = {**FAST_ENV, "TRIO_WS_JWT_SECRET": "browser-test-secret-of-32-bytes-at-least"}
    with live.server(env=env) as server:
        page = open_page(server.base_url + "/")
        page.fill("#token", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.forged")
        page.click("#connect")
        expect_state(page, "stopped")
        expect(page.locator("#stopped")).to_contain_text("the server refused the token")
        expect(page.locator("#stopped")).to_contain_text("4501")
        no_token = open_page(server.base_url + "/?connect")
        expect_state(no_token, "stopped")
        expect(no_token.locator("#stopped")).to_contain_text("a token is required")
        for refused in (page, no_token):
            assert sockets(refused)["created"] == 1


def test_a_page_with_a_valid_token_is_its_sub(open_page: OpenPage) -> None:
    secret = "browser-test-secret-of-32-bytes-at-least"
    env = {**FAST_ENV, "TRIO_WS_JWT_SECRET": secret}
    with live.server(env=env) as server:
        token = jwt.encode({"sub": "carol", "exp": int(time.time()) + 3600}, secret)
        pages = []
        for _ in range(2):  # two tabs of one user: neither closes the other
            page = open_page(server.base_url + "/")
            page.fill("#token", token)
            page.click("#connect")
            expect_state(page, "open")
            expect(page.locator("#me")).to_have_text("carol")
            assert token not in sockets(page)["urls"][-1]
            pages.append(page)
        pages[1].fill("#text", "two tabs")
        pages[1].click("#send")
        for page in pages:
            expect(page.locator("#log .t-message").last).to_contain_text("carol: two tabs")
            expect_state(page, "open")
        assert token not in server.log


def test_a_page_whose_token_expires_stops_and_says_so(open_page: OpenPage) -> None:
    secret = "browser-test-secret-of-32-bytes-at-least"
    env = {**FAST_ENV, "TRIO_WS_JWT_SECRET": secret}
    with live.server(env=env) as server:
        page = open_page(server.base_url + "/")
        token = jwt.encode({"sub": "dave", "exp": int(time.time()) + 6}, secret)
        page.fill("#token", token)
        page.click("#connect")
        expect(page.locator("#log .t-welcome")).to_have_count(1)
        expect_state(page, "stopped", 15_000)
        expect(page.locator("#stopped")).to_contain_text("the token expired")
        expect(page.locator("#stopped")).to_contain_text("4502")


def test_backoff_is_full_jitter_with_a_cap_doubling_from_half_a_second_to_20(
    open_page: OpenPage,
) -> None:
    with live.server(env=FAST_ENV) as server:
        page = open_page(server.base_url + "/")
        caps = page.evaluate("[...Array(9).keys()].map(backoffCap)")
        assert caps == [0.5, 1, 2, 4, 8, 16, 20, 20, 20]
        delays = page.evaluate("[...Array(2000)].map(() => backoffDelay(3))")
        assert all(0 <= delay < 4 for delay in delays)
        assert min(delays) < 0.2
        assert max(delays) > 3.8
        assert 1.8 < sum(delays) / len(delays) < 2.2  # uniform on [0, 4): mean 2


def test_the_count_follows_joins_and_leaves_without_the_periodic_frame(
    open_page: OpenPage,
) -> None:
    """With the periodic frame off, the count still changes within about a second of a join or
    a leave (``presence`` frames), and a page that has not connected says how to."""
    with live.server(env={"TRIO_WS_BROADCAST_INTERVAL": "0"}) as server:
        idle = open_page(server.base_url + "/")
        expect(idle.locator("#status")).to_have_text("disconnected (press Connect)")
        alice = open_page(server.base_url + "/?id=alice&connect")
        expect(alice.locator("#count")).to_have_text("1", timeout=FAST_MS)
        bob = open_page(server.base_url + "/?id=bob&connect")
        expect(alice.locator("#count")).to_have_text("2", timeout=3000)
        bob.click("#disconnect")
        expect(alice.locator("#count")).to_have_text("1", timeout=3000)
        assert alice.locator("#log .t-periodic").count() == 0


def test_page_shows_string_ids_and_the_instance_as_given(open_page: OpenPage) -> None:
    """Message ids are opaque (a broker may make them strings); the welcome may name the
    server instance. Frames handed to the page's own frame handler."""
    with live.server(env={"TRIO_WS_BROADCAST_INTERVAL": "0"}) as server:
        page = open_page(server.base_url + "/")
        page.evaluate(
            """() => {
              handle({type: "welcome", client_id: "a", active_connections: 3,
                      server_time: "t", instance: "web-1 <i>x</i>"});
              handle({type: "message", id: "1795829403120-0", from: "b", text: "hi", ts: 1});
              handle({type: "periodic", id: "1795829403121-0", active_connections: 4, ts: 2});
            }"""
        )
        expect(page.locator("#instance")).to_have_text("web-1 <i>x</i>")
        expect(page.locator("#log .t-message")).to_contain_text("#1795829403120-0 b: hi")
        expect(page.locator("#log .t-periodic")).to_contain_text("#1795829403121-0 server tick")
        expect(page.locator("#count")).to_have_text("4")


def test_backoff_resets_after_a_stable_connection(open_page: OpenPage) -> None:
    """After 10 s connected (on the page's fake clock) the next retry is drawn from [0, 0.5 s)."""
    with live.server(env={"TRIO_WS_BROADCAST_INTERVAL": "0"}) as server:
        context_page = open_page(server.base_url + "/")
        context_page.clock.install()
        context_page.reload()
        context_page.click("#connect")
        expect_state(context_page, "open")
        context_page.evaluate("failures = 6")  # as if many attempts had failed before
        context_page.clock.run_for(9_000)
        assert context_page.evaluate("failures") == 6
        context_page.clock.run_for(1_500)
        assert context_page.evaluate("failures") == 0


def test_log_keeps_the_last_500_lines(open_page: OpenPage) -> None:
    # 600 lines sent at once, far over the default publish limit: turn it off.
    env = {"TRIO_WS_BROADCAST_INTERVAL": "0", "TRIO_WS_PUBLISH_RATE": "0"}
    with live.server(env=env) as server:
        page = open_page(server.base_url + "/?id=chatty&connect")
        expect_state(page, "open")
        page.evaluate(
            """() => {
              const form = document.getElementById("send-form");
              for (let i = 0; i < 600; i += 1) {
                document.getElementById("text").value = "line " + i;
                form.requestSubmit();
              }
            }"""
        )
        lines = page.locator("#log .line")
        expect(lines.last).to_contain_text("chatty: line 599", timeout=10_000)
        assert lines.count() == 500
        expect(lines.first).to_contain_text("chatty: line 100")


def test_page_through_nginx(open_page: OpenPage, tmp_path: Path) -> None:
    """The page served by nginx (shipped config): loads, talks both ways, shows a drain."""
    env = {**FAST_ENV, "TRIO_WS_DRAIN_TIMEOUT": "30"}
    with live.server(env=env) as server, live.nginx(tmp_path, [server.port]) as proxy:
        page = open_page(proxy.base_url + "/?id=proxied&connect")
        expect_state(page, "open")
        assert sockets(page)["urls"] == [f"ws://127.0.0.1:{proxy.port}/ws/proxied"]
        page.fill("#text", "through nginx")
        page.click("#send")
        expect(page.locator("#log")).to_contain_text("proxied: through nginx")
        expect(page.locator("#log .t-periodic").first).to_be_attached()

        server.signal(signal.SIGTERM)
        expect(page.locator("#banner")).to_be_visible()
        expect(page.locator("#drain-left")).to_have_text(re.compile(r"^(2\d|30)$"))
        screenshot(page, "page-nginx-drain.png")


def test_deploy_recipe_through_nginx_moves_every_page_to_the_new_instance(
    open_page: OpenPage, tmp_path: Path
) -> None:
    """README, "Deployment", nginx: with the old and the new instance in the upstream, mark the
    old one down, reload nginx, stop the old one: its pages get the warning, leave by themselves
    and come back through nginx to the new one; the old one's drain ends with nobody cut."""
    env = {**FAST_ENV, "TRIO_WS_DRAIN_TIMEOUT": "4"}
    with (
        live.server(env=env) as old,
        live.server(env=env) as new,
        live.nginx(tmp_path, [old.port, new.port], down=[new.port]) as proxy,
    ):
        # Until the deploy, every page is on the old instance (the new one is not in service).
        pages = [open_page(f"{proxy.base_url}/?id=user{n}&connect") for n in range(3)]
        for page in pages:
            expect_state(page, "open")
        old.wait_for_line(r"client user2 connected .* 3 active connections")

        proxy.reload([old.port, new.port], down=[old.port])
        old.signal(signal.SIGTERM)
        for page in pages:
            expect(page.locator("#banner")).to_be_visible()
        assert old.wait_exit(timeout=4) == 0
        assert (
            "3 connections at start: 3 left by themselves, 0 closed as slow (4008), 0 closed at"
            in old.log
        )
        for page in pages:
            expect_state(page, "open", RECONNECT_MS)
            expect(page.locator("#banner")).to_be_hidden()
            expect(page.locator("#log .t-welcome")).to_have_count(2)
        new.wait_for_line(r"client user\d connected .* 3 active connections")
        # After the reload nginx sent no reconnecting page to the draining instance.
        assert "refused a new connection" not in old.log
