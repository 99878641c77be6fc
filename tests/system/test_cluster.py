"""Several processes sharing broadcasts through a real Redis: instances, Hypercorn workers,
a Redis crash in the middle of a stream of broadcasts, a drain beside a serving instance."""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    connect_websocket_url,
    open_websocket_url,
)

from tests.procutil import LAUNCHER, ServerProcess, hypercorn, running
from tests.redisutil import RedisServer, redis_server
from tests.wsutil import close_code, http_json, next_frame, wait_until
from trio_ws.core.protocol import parse_message_id


@pytest.fixture
async def redis(tmp_path: Any) -> AsyncIterator[RedisServer]:
    async with redis_server(str(tmp_path)) as server:
        yield server


def cluster_env(redis: RedisServer, **extra: str) -> dict[str, str]:
    return {
        "TRIO_WS_REDIS_URL": redis.url,
        "TRIO_WS_BROADCAST_INTERVAL": "0",
        "TRIO_WS_PRESENCE_INTERVAL": "0",
        "TRIO_WS_LOG_LEVEL": "INFO",
        # The publishers here send 100 to 200 messages a second, to stress the broker: no
        # per-connection publish limit (tests/system/test_flood.py tests it).
        "TRIO_WS_PUBLISH_RATE": "0",
        "TRIO_WS_PUBLISH_BYTES_RATE": "0",
        # The tests read the broker's state and counts from /health.
        "TRIO_WS_HEALTH_DETAIL": "on",
        **extra,
    }


@asynccontextmanager
async def two_instances(
    redis: RedisServer,
) -> AsyncIterator[tuple[ServerProcess, ServerProcess, list[str]]]:
    """Two launchers sharing ``redis``, and their WebSocket URLs."""
    env = cluster_env(redis)
    async with running(LAUNCHER, env) as one, running(LAUNCHER, env) as two:
        yield one, two, [await one.ws_url(), await two.ws_url()]


async def stop(*processes: ServerProcess) -> None:
    """SIGTERM each (a drain with nobody left), and expect a clean exit."""
    for process in processes:
        process.send(signal.SIGTERM)
        assert await process.wait_exit() == 0


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
    ids = [parse_message_id(m["id"]) for m in everyone[0].messages]
    assert ids == sorted(ids)


async def test_two_instances_share_every_broadcast_once_in_one_order(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    async with two_instances(redis) as (one, two, urls):
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
        await stop(one, two)


async def wait_until_cluster(
    process: ServerProcess, *, connections: int, timeout: float = 10
) -> None:
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
    async with two_instances(redis) as (one, two, urls):
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
                await redis.kill()
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
        await stop(one, two)


async def test_two_hypercorn_workers_share_broadcasts_and_drain_independently(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    env = cluster_env(redis, TRIO_WS_DRAIN_TIMEOUT="60", TRIO_WS_PROGRESS_INTERVAL="1")
    async with running(hypercorn("--workers", "2"), env) as server:
        url = await server.ws_url()
        pids = await worker_pids(server, 2)
        assert len(pids) == 2
        async with AsyncExitStack() as stack:
            # Connect until both workers have two clients. The kernel picks the worker, and
            # one idle worker can win every accept of sequential connects: connect in rounds
            # of several at once, so that the other worker takes some while one is busy.
            by_worker: dict[str, list[Client]] = {instance: [] for instance in pids}
            opened = 0

            async def connect(name: str) -> None:
                ws = await connect_websocket_url(nursery, f"{url}/{name}")
                stack.push_async_callback(ws.aclose)
                client = Client(name, ws, await next_frame(ws))
                if len(by_worker[client.welcome["instance"]]) < 2:
                    by_worker[client.welcome["instance"]].append(client)
                    nursery.start_soon(client.collect)
                else:
                    await ws.aclose()

            while min(len(group) for group in by_worker.values()) < 2:
                assert opened < 200, f"the kernel sent everything to one worker: {by_worker}"
                async with trio.open_nursery() as round_:
                    for _ in range(8):
                        round_.start_soon(connect, f"c{opened}")
                        opened += 1
            (a, a_clients), (b, b_clients) = by_worker.items()
            everyone = a_clients + b_clients
            sent = []
            for i in range(20):
                text = f"w{i:02d}"
                sent.append(text)
                await everyone[i % 4].ws.send_message(text)
            await wait_until(lambda: all(len(c.messages) >= 20 for c in everyone), timeout=10)
            assert_everyone_got_everything_once_in_one_order(everyone, sent)

            # Drain: both workers warn their clients and keep sharing broadcasts meanwhile.
            server.send(signal.SIGTERM)
            await b_clients[0].ws.send_message("during the drain")
            await wait_until(lambda: "during the drain" in a_clients[1].texts, timeout=10)
            # Worker A's clients leave: A exits; the parent then terminates B, which goes on
            # draining (it owns SIGTERM) and serving its own clients.
            for client in a_clients:
                await client.ws.aclose()
            await server.wait_for_line(rf"\[{pids[a]}\] trio_ws\.core\.drain: drain finished")
            await trio.sleep(0.5)
            assert server.process.returncode is None
            await b_clients[0].ws.send_message("after A left")
            await wait_until(lambda: "after A left" in b_clients[1].texts, timeout=10)
            for client in b_clients:
                await client.ws.aclose()
        assert await server.wait_exit(timeout=20) == 0
        assert server.count(rf"\[{pids[b]}\] trio_ws\.core\.drain: drain finished") == 1
        assert server.count(r"Traceback") == 0
        assert server.count(r"without a broker") == 0  # the multi-worker warning is for no broker


async def worker_pids(server: ServerProcess, workers: int) -> dict[str, int]:
    """Instance id -> PID of each worker, from the broker's startup line."""
    pattern = r"\[(\d+)\] trio_ws\.brokers\.redis: broker: Redis at .* instance (\w+);"
    await wait_until(lambda: server.count(pattern) >= workers, timeout=20)
    found = (re.search(pattern, line) for line in server.lines)
    return {match.group(2): int(match.group(1)) for match in found if match}


async def test_an_instance_drains_while_the_other_keeps_serving(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    async with two_instances(redis) as (one, two, urls):
        async with clients(nursery, urls, ["stays-on-one", "on-two"]) as (staying, other):
            await wait_until_cluster(two, connections=2)
            one.send(signal.SIGTERM)
            await one.wait_for_line(r"drain: warned 1 client")
            # The draining instance still delivers the cluster's broadcasts to its client.
            await other.ws.send_message("from two, during one's drain")
            await wait_until(lambda: staying.texts == ["from two, during one's drain"])
            await staying.ws.send_message("from one's last client")
            await wait_until(lambda: "from one's last client" in other.texts)
            status, _ = await http_json(await one.base_url(), "/ready")
            assert status == 503
            status, _ = await http_json(await two.base_url(), "/ready")
            assert status == 200
            _, health = await http_json(await two.base_url(), "/health")
            await wait_until_cluster(two, connections=2)
            # The serving instance takes new clients, draining one refuses them with 1001.
            async with open_websocket_url(urls[0] + "/late") as late:
                assert (await close_code(late))[0] == 1001
            async with open_websocket_url(urls[1] + "/newcomer") as newcomer:
                assert (await next_frame(newcomer))["type"] == "welcome"
            await staying.ws.aclose()
            assert await one.wait_exit() == 0
            # One left the cluster at once (no wait for its entry to expire).
            await wait_until_cluster(two, connections=1, timeout=5)
            _, health = await http_json(await two.base_url(), "/health")
            assert health["cluster"]["instances"] == 1
        two.send(signal.SIGTERM)
        assert await two.wait_exit() == 0


async def test_unreachable_redis_at_startup_is_one_clear_error(redis: RedisServer) -> None:
    await redis.kill()
    env = cluster_env(redis, TRIO_WS_REDIS_URL=f"redis://:secret@127.0.0.1:{redis.port}/0")
    async with running(LAUNCHER, env, ready=False) as server:
        assert await server.wait_exit(timeout=20) == 1
    assert f"cannot reach Redis at redis://:***@127.0.0.1:{redis.port}/0" in server.log
    assert "secret" not in server.log
    assert "Traceback" not in server.log


async def test_a_client_drained_off_one_instance_resumes_on_another_and_loses_nothing(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    """The deploy story end to end: warned by the draining instance, the client leaves,
    reconnects to the other with the last id it saw, and gets every broadcast it missed."""
    async with two_instances(redis) as (old, new, urls):
        async with clients(nursery, [urls[1]], ["publisher"]) as (publisher,):
            sent: list[str] = []

            async def publish(count: int) -> None:
                for _ in range(count):
                    sent.append(f"n{len(sent):03d}")
                    await publisher.ws.send_message(sent[-1])
                    await trio.sleep(0.005)

            received: list[dict[str, Any]] = []
            async with open_websocket_url(urls[0] + "/mover") as ws:
                await next_frame(ws)
                await publish(20)
                while len(received) < 20:
                    frame = await next_frame(ws)
                    if frame["type"] == "message":
                        received.append(frame)
                old.send(signal.SIGTERM)
                while (frame := await next_frame(ws))["type"] != "shutdown":
                    received.append(frame)
            # Away: the cluster goes on talking.
            await publish(30)
            last_seen = received[-1]["id"]
            async with open_websocket_url(f"{urls[1]}/mover?since={last_seen}") as ws:
                welcome = await next_frame(ws)
                assert welcome["instance"] == publisher.welcome["instance"]
                assert welcome["resumed"]["complete"] is True
                assert welcome["resumed"]["replayed"] == 30
                await publish(10)
                while len(received) < 60:
                    received.append(await next_frame(ws))
            assert [f["text"] for f in received] == sent  # all 60, once, in order
            assert await old.wait_exit() == 0
        new.send(signal.SIGTERM)
        assert await new.wait_exit() == 0


async def test_idle_hypercorn_workers_leave_the_cluster_when_the_parent_stops(
    redis: RedisServer,
) -> None:
    """Quart cancels the app's tasks when its lifespan ends: the lifespan waits for the hub to
    finish, leaving the cluster included, so no stale instance stays counted."""
    async with running(hypercorn("--workers", "2"), cluster_env(redis)) as server:
        await worker_pids(server, 2)
        await trio.sleep(3)  # past a heartbeat or two, as a server that has been up a while
        server.send(signal.SIGTERM)
        assert await server.wait_exit(timeout=20) == 0
    assert server.count(r"trio_ws\.brokers\.redis: broker: instance \w+ left the cluster") == 2
    assert server.count(r"could not leave the cluster") == 0
    assert server.count(r"lifespan shutdown before a drain") == 0


async def test_an_id_held_on_one_instance_cannot_be_taken_on_the_other(
    redis: RedisServer,
) -> None:
    """Without its resume key, alice cannot be taken on the other instance (4009); her genuine
    reconnect there, with the key, is accepted, and her stale connection on the first instance
    is closed with 4500 (within a heartbeat); once she has gone, the id is free on both."""
    async with two_instances(redis) as (one, two, urls):
        async with open_websocket_url(urls[0] + "/alice") as alice:
            key = (await next_frame(alice))["resume_key"]
            for query in ("", "?key=" + "A" * 32):
                async with open_websocket_url(urls[1] + "/alice" + query) as impostor:
                    assert await close_code(impostor) == (4009, "client id in use; retry later")
            await alice.send_message("still alice")
            assert (await next_frame(alice))["from"] == "alice"
            # A server-assigned id is held the same way.
            async with open_websocket_url(urls[0]) as anon:
                anon_id = (await next_frame(anon))["client_id"]
                async with open_websocket_url(f"{urls[1]}/{anon_id}") as impostor:
                    assert (await close_code(impostor))[0] == 4009
            # The genuine client, moved to the other instance, presents its key.
            async with open_websocket_url(f"{urls[1]}/alice?key={key}") as moved:
                welcome = await next_frame(moved)
                assert (welcome["client_id"], welcome["resume_key"]) == ("alice", key)
                assert await close_code(alice) == (4500, "replaced by a newer connection")
                # And nobody can take it there either, nor back on the first.
                for url in urls:
                    async with open_websocket_url(url + "/alice") as impostor:
                        assert (await close_code(impostor))[0] == 4009
        assert "refused with 4009, the id is held by a connection on another instance" in two.log
        # Everyone left: the id is free on both instances.
        for url in urls:
            async with open_websocket_url(url + "/alice") as fresh:
                welcome = await next_frame(fresh)
                assert welcome["client_id"] == "alice"
                assert welcome["resume_key"] != key
        await stop(one, two)
