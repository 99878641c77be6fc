"""Who may publish, and the HTTP API for backends, in real processes: ``POST /publish`` and
``DELETE /clients/<id>`` behind ``TRIO_WS_API_KEY`` (absent without it), listen-only clients,
the security headers, and the public ``/health``; on one process and on a Redis cluster,
including Redis stopped under it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import trio
from trio_websocket import open_websocket_url

from tests.procutil import LAUNCHER, running
from tests.redisutil import RedisServer, redis_server
from tests.wsutil import close_code, http_json, http_request, next_frame
from trio_ws.core.protocol import parse_message_id

KEY = "test-api-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUIET = {
    "TRIO_WS_BROADCAST_INTERVAL": "0",
    "TRIO_WS_PRESENCE_INTERVAL": "0",
    "TRIO_WS_LOG_LEVEL": "INFO",
}
JWT_SECRET = "a-test-secret-of-at-least-thirty-two-bytes"
WITH_KEY = {**QUIET, "TRIO_WS_API_KEY": KEY, "TRIO_WS_MAX_MESSAGE_SIZE": "2048"}


def signed(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, JWT_SECRET, "HS256")


@pytest.fixture
async def redis(tmp_path: Any) -> AsyncIterator[RedisServer]:
    async with redis_server(str(tmp_path)) as server:
        yield server


async def post_json(
    base: str, payload: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], dict[str, Any]]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, received, answer = await http_request(
        base,
        "POST",
        "/publish",
        headers={"Content-Type": "application/json", **(headers or {})},
        body=body,
    )
    return status, received, json.loads(answer) if answer.startswith(b"{") else {}


async def wait_for_status(base: str, wanted: str, timeout: float = 20) -> None:
    with trio.fail_after(timeout):
        while (await http_json(base, "/health"))[1]["status"] != wanted:  # noqa: ASYNC110
            await trio.sleep(0.1)


async def test_publish_reaches_every_client_as_a_server_broadcast() -> None:
    async with running(LAUNCHER, WITH_KEY) as server:
        base, ws_url = await server.base_url(), await server.ws_url()
        async with (
            open_websocket_url(ws_url + "/alice") as alice,
            open_websocket_url(ws_url + "/bob") as bob,
        ):
            for ws in (alice, bob):
                assert (await next_frame(ws))["type"] == "welcome"
            status, headers, answer = await post_json(base, {"text": "deploy at 5 <b>pm</b>"}, AUTH)
            assert (status, answer) == (202, {"accepted": True, "from": "@server"})
            assert headers["cache-control"] == "no-store"
            got = [await next_frame(ws) for ws in (alice, bob)]
            assert got[0] == got[1]
            assert (got[0]["type"], got[0]["from"], got[0]["text"]) == (
                "message",
                "@server",
                "deploy at 5 <b>pm</b>",
            )
            assert got[0]["id"] is not None
            # A client's message after it gets the next id: one sequence for both.
            await alice.send_message("after")
            after = await next_frame(bob)
            assert (after["from"], after["text"]) == ("alice", "after")
            assert parse_message_id(after["id"]) > parse_message_id(got[0]["id"])
        # In the history: a client resuming from before it is replayed it.
        async with open_websocket_url(f"{ws_url}/carol?since=0-0") as carol:
            welcome = await next_frame(carol)
            assert welcome["resumed"]["replayed"] == 2
            assert (await next_frame(carol))["text"] == "deploy at 5 <b>pm</b>"
        assert server.count(r"api: message of 21 bytes published as @server") == 1


async def test_publish_refusals() -> None:
    async with running(LAUNCHER, WITH_KEY) as server:
        base, ws_url = await server.base_url(), await server.ws_url()
        async with open_websocket_url(ws_url + "/alice") as alice:
            await next_frame(alice)
            # No key, a wrong key, another scheme: 401, and nothing broadcast.
            for headers in (
                {},
                {"Authorization": "Bearer wrong-key-0123456789abcdef"},
                {"Authorization": f"Basic {KEY}"},
            ):
                status, received, answer = await post_json(base, {"text": "x"}, headers)
                assert (status, answer["error"]) == (401, "unauthorized")
                assert received["www-authenticate"].startswith("Bearer")
            # Bad JSON, or JSON without a text: 400.
            for body in (
                b"{not json",
                b'"just a string"',
                b'{"text": 5}',
                b"\xff\xfe",
                b'{"text": "x", "from": "alice"}',  # the key's name is fixed by the server
                b"[" * 10_000,  # nesting deeper than the JSON parser recurses
                b'{"text": "\\ud800"}',  # a lone surrogate: not text UTF-8 can carry
            ):
                status, _, answer = await post_json(base, body, AUTH)
                assert (status, answer["error"]) == (400, "bad_json"), body
            # Over TRIO_WS_MAX_MESSAGE_SIZE (2048 bytes of UTF-8): 413.
            status, _, answer = await post_json(base, {"text": "é" * 1025}, AUTH)
            assert (status, answer["error"]) == (413, "too_large")
            # A body announced larger than the bound is refused before it is read.
            status, _, _ = await http_request(
                base, "POST", "/publish", headers={**AUTH, "Content-Length": "100000000"}
            )
            assert status == 413
            # A chunked body (no length announced) over the bound: 413, read no further. The
            # server closes the connection once it has answered, so a client still sending
            # the rest of its 1 MB may see the connection reset before it reads the 413.
            chunk = b'{"text": "' + b"x" * 50_000
            chunked = b"%x\r\n%s\r\n" % (len(chunk), chunk) * 20 + b"0\r\n\r\n"
            try:
                status, _, _ = await http_request(
                    base,
                    "POST",
                    "/publish",
                    headers={**AUTH, "Transfer-Encoding": "chunked", "Content-Length": ""},
                    body=chunked,
                )
            except (trio.BrokenResourceError, ConnectionResetError):
                status = 413  # refused before the body was read whole
            assert status == 413
            # Exactly at the limit: accepted.
            status, _, _ = await post_json(base, {"text": "é" * 1024}, AUTH)
            assert status == 202
            frame = await next_frame(alice)
            assert frame["text"] == "é" * 1024  # the only broadcast: nothing refused got out
        # One line for the three refusals (at most one every 10 s, with a count).
        assert server.count(r"api: POST /publish refused \(401\)") == 1
        assert server.count(r"refused \(401\) from 127.0.0.1 \(1 refused since") == 1
        assert KEY not in server.log


async def test_without_a_key_the_api_does_not_exist_and_health_is_public() -> None:
    async with running(LAUNCHER, QUIET) as server:
        base, ws_url = await server.base_url(), await server.ws_url()
        async with open_websocket_url(ws_url + "/alice") as alice:
            await next_frame(alice)
            status, _, _ = await post_json(base, {"text": "x"}, AUTH)
            assert status == 404
            status, _, _ = await http_request(base, "DELETE", "/clients/alice", headers=AUTH)
            assert status == 404
            status, health = await http_json(base, "/health")
            assert status == 200
            assert set(health) == {
                "status",
                "instance",
                "active_connections",
                "cluster",
                "shutdown_in_progress",
                "drain",
            }
            assert (health["status"], health["active_connections"]) == ("ok", 1)


async def test_health_detail_with_the_key_or_the_setting() -> None:
    async with running(LAUNCHER, WITH_KEY) as server:
        base = await server.base_url()
        _, public = await http_json(base, "/health")
        assert not {"pid", "version", "broker", "mode"} & public.keys()
        status, _, body = await http_request(
            base, "GET", "/health", headers={"Authorization": "Bearer not-the-key-at-all"}
        )
        assert "pid" not in json.loads(body)
        status, _, body = await http_request(base, "GET", "/health", headers=AUTH)
        detail = json.loads(body)
        assert (status, detail["pid"], detail["broker"]["kind"]) == (200, server.pid, "local")
    async with running(LAUNCHER, {**QUIET, "TRIO_WS_HEALTH_DETAIL": "on"}) as server:
        _, detail = await http_json(await server.base_url(), "/health")
        assert detail["pid"] == server.pid


async def test_kick_closes_the_client_with_4503() -> None:
    async with running(LAUNCHER, WITH_KEY) as server:
        base, ws_url = await server.base_url(), await server.ws_url()
        async with (
            open_websocket_url(ws_url + "/alice") as alice,
            open_websocket_url(ws_url + "/bob") as bob,
        ):
            for ws in (alice, bob):
                await next_frame(ws)
            status, _, _ = await http_request(base, "DELETE", "/clients/alice")
            assert status == 401
            status, _, body = await http_request(base, "DELETE", "/clients/alice", headers=AUTH)
            assert (status, json.loads(body)["closed"]) == (200, True)
            assert await close_code(alice) == (4503, "closed by the operator")
            status, _, body = await http_request(base, "DELETE", "/clients/alice", headers=AUTH)
            assert (status, json.loads(body)["closed"]) == (404, False)
            status, _, _ = await http_request(base, "DELETE", "/clients/a%20b", headers=AUTH)
            assert status == 400
            # Bob is still served.
            await bob.send_message("still here")
            assert (await next_frame(bob))["text"] == "still here"
        await server.wait_for_line(r"client alice \(.*\) closed with 4503 by the operator")


async def test_listen_only_refuses_client_messages_and_backends_still_publish() -> None:
    env = {**WITH_KEY, "TRIO_WS_CLIENT_PUBLISH": "none"}
    async with running(LAUNCHER, env) as server:
        base, ws_url = await server.base_url(), await server.ws_url()
        async with (
            open_websocket_url(ws_url + "/alice") as alice,
            open_websocket_url(ws_url + "/bob") as bob,
        ):
            for ws in (alice, bob):
                await next_frame(ws)
            await alice.send_message("let me speak")
            refused = await next_frame(alice)
            assert (refused["type"], refused["error"]) == ("error", "publish_refused")
            assert "listen-only" in refused["reason"]
            # Not broadcast, and the connection stays open: the next frame either gets is the
            # backend's message.
            status, _, _ = await post_json(base, {"text": "from the backend"}, AUTH)
            assert status == 202
            for ws in (alice, bob):
                frame = await next_frame(ws)
                assert (frame["from"], frame["text"]) == ("@server", "from the backend")
        assert server.count("message refused by TRIO_WS_CLIENT_PUBLISH=none") == 1


async def test_token_policy_lets_a_client_with_a_valid_token_publish() -> None:
    env = {**QUIET, "TRIO_WS_CLIENT_PUBLISH": "token", "TRIO_WS_JWT_SECRET": JWT_SECRET}
    async with running(LAUNCHER, env) as server:
        ws_url = await server.ws_url()
        async with (
            open_websocket_url(f"{ws_url}?token={signed('alice')}") as alice,
            open_websocket_url(ws_url, subprotocols=["trio-ws.bearer", signed("bob")]) as bob,
            open_websocket_url(ws_url + "/mallory") as mallory,
        ):
            assert [(await next_frame(ws))["client_id"] for ws in (alice, bob)] == ["alice", "bob"]
            assert await close_code(mallory) == (4501, "a token is required")
            await alice.send_message("hi from alice")
            for ws in (alice, bob):
                frame = await next_frame(ws)
                assert (frame["type"], frame["from"], frame["text"]) == (
                    "message",
                    "alice",
                    "hi from alice",
                )
        assert server.count("refused by TRIO_WS_CLIENT_PUBLISH") == 0


async def test_token_policy_without_tokens_does_not_start() -> None:
    with trio.fail_after(60):  # a server that starts would run until killed
        started = await trio.run_process(
            LAUNCHER,
            env={**os.environ, **QUIET, "TRIO_WS_CLIENT_PUBLISH": "token"},
            capture_stderr=True,
            check=False,
        )
    assert started.returncode == 2
    assert "TRIO_WS_CLIENT_PUBLISH=token needs tokens" in started.stderr.decode()


async def test_security_headers_on_every_http_response() -> None:
    async with running(LAUNCHER, WITH_KEY) as server:
        base = await server.base_url()
        for method, path, expected in (
            ("GET", "/", 200),
            ("GET", "/health", 200),
            ("GET", "/ready", 200),
            ("GET", "/nowhere", 404),
            ("POST", "/publish", 401),
        ):
            status, headers, _ = await http_request(base, method, path)
            assert status == expected, path
            assert headers["x-content-type-options"] == "nosniff", path
            assert headers["x-frame-options"] == "DENY", path
            assert headers["referrer-policy"] == "no-referrer", path
            policy = headers["content-security-policy"]
            assert "frame-ancestors 'none'" in policy, path
            assert "unsafe-inline" not in policy, path
            if path == "/":
                assert "connect-src 'self'" in policy
                assert "script-src 'sha256-" in policy
            else:
                assert policy.startswith("default-src 'none'"), path


async def test_publish_reaches_both_instances_of_a_cluster_and_503_while_redis_is_down(
    redis: RedisServer,
) -> None:
    env = {**WITH_KEY, "TRIO_WS_REDIS_URL": redis.url}
    async with running(LAUNCHER, env) as one, running(LAUNCHER, env) as two:
        base = await one.base_url()
        async with (
            open_websocket_url(await one.ws_url() + "/c1") as c1,
            open_websocket_url(await two.ws_url() + "/c2") as c2,
        ):
            for ws in (c1, c2):
                await next_frame(ws)
            status, _, answer = await post_json(base, {"text": "to everyone"}, AUTH)
            assert (status, answer["accepted"]) == (202, True)
            got = [await next_frame(ws) for ws in (c1, c2)]
            assert got[0] == got[1]
            assert (got[0]["from"], got[0]["text"]) == ("@server", "to everyone")
            assert got[0]["id"] is not None  # a Redis Stream id, the same on both instances

            # Redis stops (this test's own redis-server, by PID): 503, nothing delivered.
            await redis.kill()

            await wait_for_status(base, "degraded")
            status, received, answer = await post_json(base, {"text": "lost?"}, AUTH)
            assert (status, answer["accepted"]) == (503, False)
            assert received["retry-after"] == "1"
            with trio.move_on_after(0.5):
                frame = await next_frame(c1)
                raise AssertionError(f"delivered during the outage: {frame}")

            # Redis back: accepted again, and on both instances.
            await redis.start()
            with trio.fail_after(30):
                while True:
                    status, _, _ = await post_json(base, {"text": "back"}, AUTH)
                    if status == 202:
                        break
                    await trio.sleep(0.2)
            for ws in (c1, c2):
                frame = await next_frame(ws, timeout=15)
                assert frame["text"] == "back"


async def test_kick_sent_to_either_instance_closes_the_client_wherever_it_is(
    redis: RedisServer,
) -> None:
    env = {**WITH_KEY, "TRIO_WS_REDIS_URL": redis.url}
    async with running(LAUNCHER, env) as one, running(LAUNCHER, env) as two:
        bases = {"one": await one.base_url(), "two": await two.base_url()}
        async with (
            open_websocket_url(await one.ws_url() + "/alice") as alice,
            open_websocket_url(await two.ws_url() + "/bob") as bob,
            open_websocket_url(await one.ws_url() + "/carol") as carol,
        ):
            for ws in (alice, bob, carol):
                await next_frame(ws)
            # Bob is on instance two; the kick is sent to instance one.
            status, _, body = await http_request(
                bases["one"], "DELETE", "/clients/bob", headers=AUTH
            )
            assert (status, json.loads(body)["closed"]) == (200, True)
            with trio.fail_after(10):
                assert await close_code(bob) == (4503, "closed by the operator")
            await two.wait_for_line(r"client bob \(.*\) closed with 4503 by the operator")
            # Alice is on instance one; the kick is sent to instance two.
            status, _, _ = await http_request(
                bases["two"], "DELETE", "/clients/alice", headers=AUTH
            )
            assert status == 200
            with trio.fail_after(10):
                assert await close_code(alice) == (4503, "closed by the operator")
            # Nobody holds these ids any more, or ever did: 404 from either instance.
            for base, client_id in ((bases["one"], "bob"), (bases["two"], "nobody")):
                with trio.fail_after(10):
                    while True:
                        status, _, body = await http_request(
                            base, "DELETE", f"/clients/{client_id}", headers=AUTH
                        )
                        if status == 404:
                            break
                        await trio.sleep(0.2)  # bob's id is released once his close is done
            # Carol, on the instance that took the kicks, is still served.
            await carol.send_message("still here")
            assert (await next_frame(carol))["text"] == "still here"
