"""Several processes sharing broadcasts through a real Redis: instances, Hypercorn workers,
a Redis crash in the middle of a stream of broadcasts, a drain beside a serving instance."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from tests.procutil import LAUNCHER, ServerProcess, hypercorn, running
from tests.redisutil import RedisServer, redis_server
from tests.wsutil import close_code, http_json, next_frame, wait_until


@pytest.fixture
async def redis(tmp_path: Any) -> AsyncIterator[RedisServer]:
    async with redis_server(str(tmp_path)) as server:
        yield server


def cluster_env(redis: RedisServer, **extra: str) -> dict[str, str]:
    return {
        "TRIO_WS_REDIS_URL": redis.url,
        "TRIO_WS_BROADCAST_INTERVAL": "0",
        "TRIO_WS_LOG_LEVEL": "INFO",
        **extra,
    }


class Client:
    """A WebSocket client that records every message frame it receives."""

    def __init__(self, name: str, ws: WebSocketConnection, welcome: dict[str, Any]) -> None:
        self.name = name
        self.ws = ws
        self.welcome = welcome
        self.messages: list[dict[str, Any]] = []

    @property
    def texts(self) -> list[str]:
        return [m["text"] for m in self.messages]

    async def collect(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                frame = await next_frame(self.ws, timeout=60)
                if frame["type"] == "message":
                    self.messages.append(frame)


@asynccontextmanager
async def clients(
    nursery: trio.Nursery, urls: list[str], names: list[str]
) -> AsyncIterator[list[Client]]:
    async with AsyncExitStack() as stack:
        out = []
        for url, name in zip(urls, names, strict=True):
            ws = await stack.enter_async_context(open_websocket_url(f"{url}/{name}"))
            client = Client(name, ws, await next_frame(ws))
            nursery.start_soon(client.collect)
            out.append(client)
        yield out


def assert_everyone_got_everything_once_in_one_order(
    everyone: list[Client], sent: list[str]
) -> None:
    reference = everyone[0].texts
    assert sorted(reference) == sorted(sent), "lost or duplicated messages"
    assert len(set(reference)) == len(reference)
    for client in everyone:
        assert client.texts == reference, f"{client.name} saw another order"
        ids = [m["id"] for m in client.messages]
        assert ids == [m["id"] for m in everyone[0].messages]
    # The broker's ids: Redis Stream ids, increasing.
    ids = [tuple(map(int, m["id"].split("-"))) for m in everyone[0].messages]
    assert ids == sorted(ids)


async def test_two_instances_share_every_broadcast_once_in_one_order(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    env = cluster_env(redis)
    async with running(LAUNCHER, env) as one, running(LAUNCHER, env) as two:
        urls = [await one.ws_url(), await two.ws_url()]
        names = [f"c{i}" for i in range(6)]
        async with clients(nursery, [urls[i % 2] for i in range(6)], names) as everyone:
            assert everyone[0].welcome["instance"] != everyone[1].welcome["instance"]
            # Both instances publish at once, interleaved: a global order has to be chosen.
            sent = []
            for i in range(60):
                text = f"m{i:03d} from {everyone[i % 6].name}"
                sent.append(text)
                await everyone[i % 6].ws.send_message(text)
            await wait_until(lambda: all(len(c.messages) >= 60 for c in everyone), timeout=15)
            await trio.sleep(0.2)  # anything extra (a duplicate) would arrive now
            assert_everyone_got_everything_once_in_one_order(everyone, sent)
            # The cluster's connection count: both processes, with each process's own.
            await wait_until_cluster(one, connections=6)
            status, health = await http_json(await one.base_url(), "/health")
            assert status == 200
            assert health["active_connections"] == 3
            assert health["cluster"]["instances"] == 2
            assert health["broker"]["kind"] == "redis"
            assert health["broker"]["state"] == "up"
        for process in (one, two):
            process.send(signal.SIGTERM)
            assert await process.wait_exit() == 0


async def wait_until_cluster(process: ServerProcess, *, connections: int, timeout: float = 10) -> None:
    base = await process.base_url()
    with trio.fail_after(timeout):
        while True:
            _, health = await http_json(base, "/health")
            if health["cluster"] is not None and health["cluster"]["connections"] == connections:
                return
            await trio.sleep(0.1)


async def test_redis_killed_and_restarted_during_a_stream_loses_and_duplicates_nothing(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    env = cluster_env(redis)
    async with running(LAUNCHER, env) as one, running(LAUNCHER, env) as two:
        urls = [await one.ws_url(), await two.ws_url()]
        names = ["pub1", "pub2", "a1", "b1"]
        async with clients(nursery, [urls[0], urls[1], urls[0], urls[1]], names) as everyone:
            publishers = everyone[:2]
            sent: list[str] = []
            per_publisher = 150

            async def publish(client: Client) -> None:
                for i in range(per_publisher):
                    text = f"{client.name}:{i:04d}"
                    sent.append(text)
                    await client.ws.send_message(text)
                    await trio.sleep(0.01)

            async def crash_redis() -> None:
                await wait_until(lambda: len(everyone[2].messages) >= 60, timeout=10)
                redis.kill()
                # Clients of each process keep talking within it; /ready shows the outage.
                await wait_until(lambda: one.count("broker: Redis at .* unreachable") >= 1)
                status, body = await http_json(await one.base_url(), "/ready")
                assert (status, body["reason"]) == (503, "broker unavailable")
                _, health = await http_json(await one.base_url(), "/health")
                assert (health["status"], health["broker"]["state"]) == ("degraded", "down")
                await trio.sleep(0.8)
                await redis.start()

            async with trio.open_nursery() as inner:
                for publisher in publishers:
                    inner.start_soon(publish, publisher)
                inner.start_soon(crash_redis)
            expected = 2 * per_publisher
            await wait_until(lambda: all(len(c.messages) >= expected for c in everyone), timeout=20)
            await trio.sleep(0.5)  # a duplicate would arrive now
            for client in everyone:
                texts = client.texts
                assert len(texts) == len(set(texts)), f"{client.name} got duplicates"
                assert sorted(texts) == sorted(sent), f"{client.name} lost messages"
                for publisher in publishers:  # each sender's messages arrive in its order
                    own = [t for t in texts if t.startswith(publisher.name + ":")]
                    assert own == sorted(own)
            # The outage is in the logs, and recovery too.
            for process in (one, two):
                await process.wait_for_line(r"broker: Redis at .* is back after")
            status, _ = await http_json(await one.base_url(), "/ready")
            assert status == 200
            _, health = await http_json(await two.base_url(), "/health")
            assert health["broker"]["outages"] == 1
            assert health["broker"]["delivered_during_outages"] > 0
        for process in (one, two):
            process.send(signal.SIGTERM)
            assert await process.wait_exit() == 0
