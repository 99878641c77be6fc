"""A flood cannot fill Redis or leave the cluster unready (docs/security.md, docs/scaling.md,
"What Redis needs").

Real processes: a redis-server with a small ``maxmemory`` (noeviction, as a managed Redis is
often set up), ``python -m trio_ws`` against it, and a flooder publishing maximum-size messages
as fast as it can (publish limits off for it) for a bounded time and count:

* with the stream's byte budget under ``maxmemory``, Redis's memory stays under the budget plus
  the in-flight batches, and the server stays ready;
* with the budget over ``maxmemory`` (Redis refuses writes: OOM), the broker trims the stream
  harder and sends again, and ``/ready`` is 200 again soon after the flood ends.

Either way a fresh message is then delivered through Redis, and no log line and no ``/health``
field carries the flood's text; every log line is short.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import coredis
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from tests.procutil import LAUNCHER, ServerProcess, running
from tests.redisutil import RedisServer, redis_server
from tests.wsutil import http_get, http_json, next_frame

#: In every flood message, and nowhere else: it must never reach a log line or /health.
MARKER = "floodmarker7f3a"
MESSAGE_SIZE = 64 * 1024
FLOOD_S = 6.0
FLOOD_MOST = 1000
#: Flood messages waiting for their echo at most.
WINDOW = 16
#: Longest log line allowed (but the startup line, which lists every setting).
LOG_LINE_MOST = 400
MIB = 1 << 20


def server_env(redis: RedisServer, **extra: str) -> dict[str, str]:
    return {
        "TRIO_WS_REDIS_URL": redis.url,
        "TRIO_WS_BROADCAST_INTERVAL": "0",
        "TRIO_WS_PRESENCE_INTERVAL": "0",
        "TRIO_WS_PING_INTERVAL": "0",
        "TRIO_WS_LOG_LEVEL": "INFO",
        # The broker's counters and last error are in /health's detail.
        "TRIO_WS_HEALTH_DETAIL": "on",
        # The flooder publishes as fast as it can: no per-connection publish limit.
        "TRIO_WS_PUBLISH_RATE": "0",
        "TRIO_WS_PUBLISH_BYTES_RATE": "0",
        **extra,
    }


@asynccontextmanager
async def limited_redis(tmp_path: Any, maxmemory: str) -> AsyncIterator[RedisServer]:
    async with redis_server(
        str(tmp_path), "--maxmemory", maxmemory, "--maxmemory-policy", "noeviction"
    ) as redis:
        yield redis


async def used_memory(client: coredis.Redis[str]) -> int:
    return int(str((await client.info("memory"))["used_memory"]))


class MemoryWatch:
    """Samples Redis's ``used_memory`` every 20 ms; keeps the peak."""

    def __init__(self, redis: RedisServer) -> None:
        self.redis = redis
        self.baseline = 0
        self.peak = 0

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        client = coredis.Redis.from_url(self.redis.url, decode_responses=True)
        async with client:
            self.baseline = self.peak = await used_memory(client)
            task_status.started()
            while True:
                self.peak = max(self.peak, await used_memory(client))
                await trio.sleep(0.02)


async def flood(url: str) -> int:
    """Maximum-size messages as fast as the server takes them, for FLOOD_S or FLOOD_MOST.

    At most WINDOW of them wait for their echo at a time, and the echoes are read, so that the
    flooder is never cut as a slow consumer: it publishes as fast as the server delivers.
    """
    sent = 0
    window = trio.Semaphore(WINDOW)
    async with open_websocket_url(f"{url}/flooder", max_message_size=4 * MIB) as ws:
        await next_frame(ws)  # welcome

        async def drain(ws: WebSocketConnection) -> None:
            try:
                while True:
                    if MARKER in await ws.get_message():
                        window.release()
            except ConnectionClosed:
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, ws)
            deadline = trio.current_time() + FLOOD_S
            filler = "x" * (MESSAGE_SIZE - 100)
            while sent < FLOOD_MOST:
                with trio.move_on_at(deadline):
                    await window.acquire()
                if trio.current_time() >= deadline:
                    break
                try:
                    await ws.send_message(f"{MARKER} {sent} {filler}")
                except ConnectionClosed as closed:
                    raise AssertionError(f"flooder closed after {sent}: {closed.reason}") from None
                sent += 1
            nursery.cancel_scope.cancel()
    return sent


def health_outages(answer: tuple[int, dict[str, Any]]) -> int:
    outages: int = answer[1]["broker"]["outages"]
    return outages


async def seconds_until_ready(base: str, bound: float) -> float:
    started = time.monotonic()
    with trio.fail_after(bound):
        while (await http_get(base, "/ready"))[0] != 200:  # noqa: ASYNC110 (polling a process)
            await trio.sleep(0.1)
    return time.monotonic() - started


async def fresh_message_is_delivered(url: str) -> None:
    async with (
        open_websocket_url(f"{url}/listener") as listener,
        open_websocket_url(f"{url}/speaker") as speaker,
    ):
        await next_frame(listener)
        await next_frame(speaker)
        await speaker.send_message("fresh after the flood")
        with trio.fail_after(15):  # what was still on its way from the flood comes first
            while True:
                frame = await next_frame(listener)
                if frame["type"] == "message" and frame["text"] == "fresh after the flood":
                    break
        assert frame["id"] is not None, "delivered in-process only: Redis did not take it"


async def assert_nothing_leaked(server: ServerProcess, base: str) -> dict[str, Any]:
    status, body = await http_get(base, "/health")
    assert status == 200
    assert MARKER not in body, "the flood's text is in /health"
    health: dict[str, Any] = json.loads(body)
    last_error = health["broker"]["last_error"]
    assert last_error is None or len(last_error) <= 200, last_error
    leaked = [line[:200] for line in server.lines if MARKER in line]
    assert not leaked, f"the flood's text is in {len(leaked)} log lines: {leaked[:2]}"
    # The startup line lists every setting: it grows with them, and carries nothing of a client.
    lines = [line for line in server.lines if " starting: " not in line]
    longest = max(lines, key=len)
    assert len(longest) <= LOG_LINE_MOST, f"a log line of {len(longest)} bytes: {longest[:300]}"
    return health


async def test_the_stream_stays_within_its_byte_budget_during_a_flood(tmp_path: Any) -> None:
    budget = 16 * MIB
    async with (
        # Room for the whole flood: only the budget can bound the stream.
        limited_redis(tmp_path, "400mb") as redis,
        running(LAUNCHER, server_env(redis, TRIO_WS_REDIS_STREAM_MAX_BYTES=str(budget))) as server,
        trio.open_nursery() as nursery,
    ):
        base, url = await server.base_url(), await server.ws_url()
        watch = MemoryWatch(redis)
        await nursery.start(watch.run)
        sent = await flood(url)
        flood_ended = time.monotonic()
        ready_after = await seconds_until_ready(base, bound=20)
        assert health_outages(await http_json(base, "/health")) == 0
        await fresh_message_is_delivered(url)
        await trio.sleep(0.1)  # one more memory sample after the last writes
        health = await assert_nothing_leaked(server, base)
        nursery.cancel_scope.cancel()
    grown = watch.peak - watch.baseline
    print(
        f"budget {budget / MIB:.0f} MiB: sent {sent} messages of {MESSAGE_SIZE} B; Redis grew "
        f"{grown / MIB:.1f} MiB at most; /ready 200 {ready_after:.2f}s after the flood "
        f"({time.monotonic() - flood_ended:.1f}s); outages {health['broker']['outages']}"
    )
    assert sent * MESSAGE_SIZE > 2 * budget, "the flood was too small to test the budget"
    # The budget, plus what one process has in flight (one batch sent, one read).
    assert grown <= budget + 8 * MIB


@pytest.mark.parametrize("maxmemory", ["24mb"])
async def test_a_redis_out_of_memory_does_not_leave_the_cluster_unready(
    tmp_path: Any, maxmemory: str
) -> None:
    # The default byte budget (64 MiB) is over maxmemory: Redis refuses the writes.
    async with (
        limited_redis(tmp_path, maxmemory) as redis,
        running(LAUNCHER, server_env(redis)) as server,
        trio.open_nursery() as nursery,
    ):
        base, url = await server.base_url(), await server.ws_url()
        watch = MemoryWatch(redis)
        await nursery.start(watch.run)
        sent = await flood(url)
        ready_after = await seconds_until_ready(base, bound=15)
        await fresh_message_is_delivered(url)
        status, _ = await http_json(base, "/ready")
        assert status == 200
        health = await assert_nothing_leaked(server, base)
        nursery.cancel_scope.cancel()
    print(
        f"maxmemory {maxmemory}: sent {sent} messages of {MESSAGE_SIZE} B; Redis peak "
        f"{watch.peak / MIB:.1f} MiB; /ready 200 {ready_after:.2f}s after the flood; "
        f"broker {json.dumps(health['broker'])[:400]}"
    )
    assert sent * MESSAGE_SIZE > 2 * 24 * MIB, "the flood was too small to fill Redis"


async def test_a_redis_refusing_writes_by_acl_is_an_outage_that_ends_when_it_accepts_them(
    tmp_path: Any,
) -> None:
    """NOPERM cannot be trimmed away: /ready 503 while Redis refuses, 200 soon after it
    accepts writes again, and the refused message's text is never shown."""
    async with (
        redis_server(str(tmp_path)) as redis,
        running(LAUNCHER, server_env(redis)) as server,
        coredis.Redis.from_url(redis.url, decode_responses=True) as admin,
    ):
        base, url = await server.base_url(), await server.ws_url()
        assert await admin.acl_setuser("default", "-xadd")
        async with open_websocket_url(f"{url}/speaker") as speaker:
            await next_frame(speaker)
            await speaker.send_message(f"{MARKER} refused")
            with trio.fail_after(10):
                while (await http_get(base, "/ready"))[0] != 503:  # noqa: ASYNC110
                    await trio.sleep(0.05)
        _, health = await http_json(base, "/health")
        assert "NOPERM" in health["broker"]["last_error"]
        assert await admin.acl_setuser("default", "+xadd")
        ready_after = await seconds_until_ready(base, bound=10)
        await fresh_message_is_delivered(url)
        await assert_nothing_leaked(server, base)
    print(f"NOPERM lifted: /ready 200 {ready_after:.2f}s later")
