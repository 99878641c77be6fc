from __future__ import annotations

import re

import trio

from trio_ws.client import build_parser, run
from trio_ws.hosting.launcher import RunningServer


async def test_client_prints_frames_and_drains_away_after_the_warning(
    server: RunningServer,
) -> None:
    out: list[str] = []
    args = build_parser().parse_args(
        ["alice", "--url", server.ws_url, "--send", "hi <all>", "--leave-after-warning", "0.1"]
    )
    async with trio.open_nursery() as nursery:

        async def drain_soon() -> None:
            while len(out) < 2:  # noqa: ASYNC110  # the client's own output is the signal
                await trio.sleep(0.01)
            server.hub.request_drain("SIGTERM")

        nursery.start_soon(drain_soon)
        with trio.fail_after(5):
            assert await run(args, out) == 0
    instance = server.hub.instance_id
    assert out[0] == f"[alice] welcome: I am alice on instance {instance}, 1 connected"
    assert re.match(r"\[alice\] message \d+-\d+ from alice: hi <all>", out[1]), out[1]
    assert out[2].startswith("[alice] SHUTDOWN WARNING: server is shutting down (SIGTERM)")
    assert out[3:] == ["[alice] leaving after 0.1s", "[alice] closed: code 1000 (NORMAL_CLOSURE)"]


async def test_client_reports_an_unreachable_server() -> None:
    out: list[str] = []
    args = build_parser().parse_args(["--url", "ws://127.0.0.1:1/ws"])
    assert await run(args, out) == 1
    assert out[0].startswith("[client] cannot connect to ws://127.0.0.1:1/ws")
