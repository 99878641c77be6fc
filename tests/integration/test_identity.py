"""Who may connect, and as whom (issue #11): origins, signed tokens, no takeover of an id
without its resume key, and secrets kept out of the logs. A real Hypercorn server on port 0
(the launcher's ``serve``) and trio-websocket clients, as an attacker would use them."""

from __future__ import annotations

import base64
import json
import logging
import os
import time

import jwt
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from tests.conftest import StartServer
from tests.procutil import console_script
from tests.wsutil import close_code, next_frame, wait_until
from trio_ws.client import build_parser, run
from trio_ws.hosting.launcher import RunningServer

SECRET = "a-test-secret-of-at-least-thirty-two-bytes"


def host_port(server: RunningServer) -> str:
    return server.binds[0].split("://", 1)[1]


def server_log(caplog: pytest.LogCaptureFixture) -> str:
    """What the server logged (trio-websocket, the test's client, logs its own URLs)."""
    return "\n".join(
        record.getMessage()
        for record in caplog.records
        if record.name.startswith(("trio_ws", "hypercorn"))
    )


def origin_header(origin: str) -> list[tuple[bytes, bytes]]:
    return [(b"Origin", origin.encode())]


def token(sub: str = "alice", *, ttl: float = 3600, secret: str = SECRET, **claims: object) -> str:
    payload: dict[str, object] = {"sub": sub, "exp": int(time.time() + ttl), **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def unsigned_token(sub: str = "alice") -> str:
    """``alg: none``: a token anyone can write, with no signature at all."""

    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part({'sub': sub, 'exp': 4102444800})}."


# -- origins -------------------------------------------------------------------------------------


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "file://", "http://127.0.0.1"])
async def test_a_foreign_origin_is_refused_with_403(server: RunningServer, origin: str) -> None:
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(server.ws_url, extra_headers=origin_header(origin)):
            pass
    assert info.value.status_code == 403
    assert len(server.hub.registry) == 0


async def test_the_same_origin_and_no_origin_are_accepted(server: RunningServer) -> None:
    same = "http://" + host_port(server)
    async with (
        open_websocket_url(server.ws_url + "/a", extra_headers=origin_header(same)) as a,
        open_websocket_url(server.ws_url + "/b") as b,
    ):
        assert (await next_frame(a))["client_id"] == "a"
        assert (await next_frame(b))["client_id"] == "b"


async def test_allowed_origins_replace_the_same_origin_rule(start_server: StartServer) -> None:
    server = await start_server(allowed_origins=("https://app.example",))
    async with open_websocket_url(
        server.ws_url, extra_headers=origin_header("https://APP.example:443")
    ) as ws:
        assert (await next_frame(ws))["type"] == "welcome"
    with pytest.raises(ConnectionRejected):
        async with open_websocket_url(
            server.ws_url, extra_headers=origin_header("http://" + host_port(server))
        ):
            pass
    anywhere = await start_server(allowed_origins=("*",))
    async with open_websocket_url(
        anywhere.ws_url, extra_headers=origin_header("https://evil.example")
    ) as ws:
        assert (await next_frame(ws))["type"] == "welcome"


async def test_a_refused_origin_is_one_log_line(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with pytest.raises(ConnectionRejected):
        async with open_websocket_url(
            server.ws_url + "/x?key=sekrit-key&token=sekrit-token",
            extra_headers=origin_header("https://evil.example"),
        ):
            pass
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "https://evil.example" in lines[0]
    assert "sekrit" not in server_log(caplog)


async def test_a_flood_of_refusals_costs_a_log_line_per_ten_seconds(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = await start_server(jwt_secret=SECRET)
    for _ in range(30):
        with pytest.raises(ConnectionRejected):
            async with open_websocket_url(
                server.ws_url, extra_headers=origin_header("https://evil.example")
            ):
                pass
        async with open_websocket_url(server.ws_url + "?token=forged") as ws:
            assert (await close_code(ws))[0] == 4501
    lines = [line for line in server_log(caplog).splitlines() if line.startswith("refused")]
    assert len(lines) == 2, lines
    async with open_websocket_url(f"{server.ws_url}?token={token('alice')}") as ws:
        assert (await next_frame(ws))["client_id"] == "alice"


# -- no takeover without the key -----------------------------------------------------------------


async def test_a_takeover_without_the_key_is_refused_with_4009(server: RunningServer) -> None:
    async with open_websocket_url(server.ws_url + "/alice") as alice:
        welcome = await next_frame(alice)
        assert len(welcome["resume_key"]) >= 32
        for query in ("", "?key=guess", "?key=" + "A" * len(welcome["resume_key"])):
            async with open_websocket_url(server.ws_url + "/alice" + query) as impostor:
                assert await close_code(impostor) == (4009, "client id in use; retry later")
        await alice.send_message("still me")
        assert (await next_frame(alice))["from"] == "alice"
    assert server.hub.registry.statistics().replaced == 0


async def test_a_server_assigned_id_cannot_be_taken_either(server: RunningServer) -> None:
    async with open_websocket_url(server.ws_url) as anon:
        client_id = (await next_frame(anon))["client_id"]
        async with open_websocket_url(f"{server.ws_url}/{client_id}") as impostor:
            assert (await close_code(impostor))[0] == 4009


async def test_a_reconnect_with_the_key_replaces_the_stale_connection(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with open_websocket_url(server.ws_url + "/alice") as stale:
        key = (await next_frame(stale))["resume_key"]
        async with open_websocket_url(f"{server.ws_url}/alice?key={key}") as genuine:
            welcome = await next_frame(genuine)
            assert (welcome["client_id"], welcome["resume_key"]) == ("alice", key)
            assert await close_code(stale) == (4500, "replaced by a newer connection")
            await genuine.send_message("back")
            assert (await next_frame(genuine))["text"] == "back"
    assert key not in server_log(caplog)


async def test_an_id_is_free_again_once_its_connection_is_gone(server: RunningServer) -> None:
    async with open_websocket_url(server.ws_url + "/alice") as first:
        old_key = (await next_frame(first))["resume_key"]
    await wait_until(lambda: len(server.hub.registry) == 0)
    async with open_websocket_url(server.ws_url + "/alice") as second:
        welcome = await next_frame(second)
        assert welcome["client_id"] == "alice"
        assert welcome["resume_key"] != old_key
    await wait_until(lambda: len(server.hub.registry) == 0)
    async with open_websocket_url(f"{server.ws_url}/alice?key={old_key}") as third:
        assert (await next_frame(third))["resume_key"] == old_key  # the tab keeps its key


# -- signed tokens -------------------------------------------------------------------------------


@pytest.fixture
async def token_server(start_server: StartServer) -> RunningServer:
    return await start_server(
        jwt_secret=SECRET, jwt_audience="trio-ws-tests", jwt_issuer="https://issuer.example"
    )


def good(sub: str = "alice", ttl: float = 3600) -> str:
    return token(sub, ttl=ttl, aud="trio-ws-tests", iss="https://issuer.example")


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("", "missing"),
        ("?token=not.a.token", "garbage"),
        (
            "?token=" + token(aud="trio-ws-tests", iss="https://issuer.example", secret="x" * 40),
            "forged",
        ),
        ("?token=" + good(ttl=-60), "expired"),
        ("?token=" + token(aud="someone-else", iss="https://issuer.example"), "wrong audience"),
        ("?token=" + token(aud="trio-ws-tests", iss="https://evil.example"), "wrong issuer"),
        ("?token=" + unsigned_token(), "alg none"),
        ("?token=" + good("bob"), "sub is not the path's id"),
    ],
)
async def test_a_bad_token_is_refused_with_4501(
    token_server: RunningServer, query: str, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with open_websocket_url(token_server.ws_url + "/alice" + query) as ws:
        code, reason = await close_code(ws)
    assert code == 4501, why
    assert reason
    assert len(token_server.hub.registry) == 0
    secret_part = query.partition("=")[2]
    if secret_part:
        assert secret_part not in server_log(caplog)
        signature = secret_part.rsplit(".", 1)[-1]
        assert len(signature) < 20 or signature not in server_log(caplog)


async def test_a_valid_token_names_the_client_from_query_header_or_subprotocol(
    token_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    alice = good()
    async with (
        open_websocket_url(f"{token_server.ws_url}?token={alice}") as by_query,
        open_websocket_url(
            token_server.ws_url + "/alice",
            extra_headers=[(b"Authorization", f"Bearer {alice}".encode())],
        ) as by_header,
        open_websocket_url(
            token_server.ws_url, subprotocols=["trio-ws.bearer", alice]
        ) as by_subprotocol,
    ):
        for ws in (by_query, by_header, by_subprotocol):
            assert (await next_frame(ws))["client_id"] == "alice"
        assert by_subprotocol.subprotocol == "trio-ws.bearer"
        # Three tabs of one user: none closed the others.
        await by_query.send_message("from the first tab")
        for ws in (by_query, by_header, by_subprotocol):
            frame = await next_frame(ws)
            assert (frame["from"], frame["text"]) == ("alice", "from the first tab")
        assert len(token_server.hub.registry) == 3
        assert all(c.authenticated for c in token_server.hub.registry)
    assert alice not in server_log(caplog)


async def test_without_tokens_the_bearer_subprotocol_is_still_echoed(
    server: RunningServer,
) -> None:
    # A page written for a server with tokens offers the subprotocol pair; a server without
    # them ignores the token but must accept the subprotocol (a browser fails a handshake that
    # offered one and got none), and the id stays the server's, not the token's.
    async with (
        open_websocket_url(server.ws_url, subprotocols=["trio-ws.bearer", good()]) as offered,
        open_websocket_url(server.ws_url + "?token=ignored") as plain,
    ):
        assert offered.subprotocol == "trio-ws.bearer"
        assert plain.subprotocol is None
        for ws in (offered, plain):
            assert (await next_frame(ws))["client_id"].startswith("anon-")
        assert not any(c.authenticated for c in server.hub.registry)


async def test_with_tokens_a_tab_reconnecting_with_its_key_replaces_only_itself(
    token_server: RunningServer,
) -> None:
    alice = good()
    async with (
        open_websocket_url(f"{token_server.ws_url}?token={alice}") as tab1,
        open_websocket_url(f"{token_server.ws_url}?token={alice}") as tab2,
    ):
        key1 = (await next_frame(tab1))["resume_key"]
        key2 = (await next_frame(tab2))["resume_key"]
        assert key1 != key2
        async with open_websocket_url(f"{token_server.ws_url}?token={alice}&key={key1}") as again:
            assert (await next_frame(again))["resume_key"] == key1
            assert (await close_code(tab1))[0] == 4500
            await tab2.send_message("tab 2 still here")
            assert (await next_frame(tab2))["text"] == "tab 2 still here"
            assert (await next_frame(again))["text"] == "tab 2 still here"


async def test_a_token_expiring_on_a_live_connection_closes_it_with_4502(
    token_server: RunningServer,
) -> None:
    short = good(ttl=2)
    async with open_websocket_url(f"{token_server.ws_url}?token={short}") as ws:
        assert (await next_frame(ws))["type"] == "welcome"
        with trio.fail_after(10):
            code, reason = await close_code(ws)
    assert (code, reason) == (4502, "token expired; connect with a new token")


async def test_the_token_command_mints_a_token_the_server_accepts(
    start_server: StartServer,
) -> None:
    env = {**os.environ, "TRIO_WS_JWT_SECRET": SECRET, "TRIO_WS_JWT_AUDIENCE": "trio-ws-tests"}
    minted = await trio.run_process(
        [console_script("trio-ws"), "token", "--sub", "erin", "--ttl", "1h"],
        env=env,
        capture_stdout=True,
    )
    token_text = minted.stdout.decode().strip()
    server = await start_server(jwt_secret=SECRET, jwt_audience="trio-ws-tests")
    async with open_websocket_url(f"{server.ws_url}/erin?token={token_text}") as ws:
        assert (await next_frame(ws))["client_id"] == "erin"
    off = await trio.run_process(
        [console_script("trio-ws"), "token", "--sub", "erin"],
        env={k: v for k, v in os.environ.items() if not k.startswith("TRIO_WS_")},
        capture_stderr=True,
        check=False,
    )
    assert off.returncode == 2
    assert b"tokens are off" in off.stderr


async def test_the_command_line_client_sends_its_token_as_a_bearer_header(
    token_server: RunningServer,
) -> None:
    out: list[str] = []
    args = build_parser().parse_args(
        ["--url", token_server.ws_url, "--token", good("frank"), "--leave-after", "0.2"]
    )
    with trio.fail_after(5):
        assert await run(args, out) == 0
    assert out[0].startswith("[client] welcome: I am frank on instance")
    refused: list[str] = []
    args = build_parser().parse_args(["--url", token_server.ws_url, "--token", "nonsense"])
    with trio.fail_after(5):
        assert await run(args, refused) == 0
    assert refused[-1] == "[client] closed: code 4501 (token malformed)"


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"TRIO_WS_JWT_SECRET_FILE": "/nonexistent/secret"}, "cannot use the token key"),
        ({"TRIO_WS_JWT_SECRET": "short"}, "TRIO_WS_JWT_SECRET must be at least 32 bytes"),
        ({"TRIO_WS_JWT_ALGORITHM": "none"}, "TRIO_WS_JWT_ALGORITHM must be one of"),
        ({"TRIO_WS_ALLOWED_ORIGINS": "evil.example"}, "TRIO_WS_ALLOWED_ORIGINS must be origins"),
    ],
)
async def test_a_server_with_a_bad_identity_setting_does_not_start(
    env: dict[str, str], error: str
) -> None:
    started = await trio.run_process(
        [console_script("trio-ws"), "--port", "0"],
        env={**os.environ, **env},
        capture_stderr=True,
        check=False,
    )
    assert started.returncode == 2
    assert error in started.stderr.decode()
    assert "short" not in started.stderr.decode().replace("TRIO_WS_JWT_SECRET", "")
