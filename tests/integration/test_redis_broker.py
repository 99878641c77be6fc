"""The Redis broker in one trio run: several hubs (as several processes would have), one real
redis-server, no sockets to clients (frames are read from the connections' outboxes)."""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from typing import Any

import coredis
import pytest
import trio

from tests.redisutil import RedisServer, redis_server
from tests.wsutil import wait_until
from trio_ws.brokers.entries import decode_entry, encode_entry
from trio_ws.brokers.redis import RedisBroker
from trio_ws.core.broker import BrokerState, Outgoing
from trio_ws.core.health import health_report
from trio_ws.core.hub import Hub
from trio_ws.core.protocol import CloseCode
from trio_ws.core.registry import Connection
from trio_ws.settings import Settings, redact_url


@pytest.fixture
async def redis(tmp_path: Any) -> AsyncIterator[RedisServer]:
    async with redis_server(str(tmp_path)) as server:
        yield server


def make_hub(redis: RedisServer, name: str, **broker_options: Any) -> Hub:
    settings = Settings(
        queue_size=100_000, broadcast_interval=0, presence_interval=0, redis_url=redis.url
    )
    broker = RedisBroker(redis.url, **broker_options)
    return Hub(settings, broker=broker, instance_id=name)


def queued_frames(connection: Connection) -> list[dict[str, Any]]:
    """Every frame queued for ``connection`` since the last call (the one place that reads a
    connection's outbox)."""
    return [json.loads(frame.text) for frame in connection.outbox.take_queued()]


def received(connection: Connection) -> list[dict[str, Any]]:
    """The broadcasts queued for ``connection`` since the last call."""
    return [f for f in queued_frames(connection) if f["type"] in ("message", "periodic")]


def test_entries_round_trip_and_urls_hide_passwords() -> None:
    message = Outgoing("message", 1.5, sender="a", text='x "y"\n')
    assert decode_entry(encode_entry("i1", 7, message)) == ("i1", 7, message)
    periodic = Outgoing("periodic", 2.0, active_connections=5)
    assert decode_entry(encode_entry("i2", 1, periodic)) == ("i2", 1, periodic)
    with pytest.raises(KeyError):
        decode_entry({"some": "entry"})
    assert redact_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert redact_url("redis://:pw@h/0") == "redis://:***@h/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


async def test_connections_killed_repeatedly_lose_and_duplicate_nothing(
    redis: RedisServer,
) -> None:
    """Redis stays up (the stream survives), but the brokers' connections are cut again and
    again while both hubs publish: replay from the last id and re-sending what was in flight
    must give every client every message once, in one order."""
    hubs = [make_hub(redis, "one"), make_hub(redis, "two")]
    conns = [hub.connect(f"c-{hub.instance_id}", "p") for hub in hubs]
    per_hub = 300
    async with trio.open_nursery() as nursery:
        for hub in hubs:
            await nursery.start(hub.run)
        admin = coredis.Redis.from_url(redis.url, decode_responses=True)
        async with admin:

            async def publish(hub: Hub) -> None:
                for i in range(per_hub):
                    await hub.publish(hub.instance_id, f"{hub.instance_id}:{i:04d}")
                    if i % 10 == 0:
                        await trio.sleep(0.005)

            async def cut_connections() -> None:
                for _ in range(8):
                    await trio.sleep(0.05)
                    await admin.client_kill(type_=coredis.PureToken.NORMAL)

            async with trio.open_nursery() as inner:
                for hub in hubs:
                    inner.start_soon(publish, hub)
                inner.start_soon(cut_connections)
            frames: list[list[dict[str, Any]]] = [[] for _ in hubs]

            def all_arrived() -> bool:
                for got, conn in zip(frames, conns, strict=True):
                    got.extend(received(conn))
                return all(len(got) >= 2 * per_hub for got in frames)

            await wait_until(all_arrived, timeout=20)
            await trio.sleep(0.3)
            all_arrived()
        outages = sum(hub.broker.health()["outages"] for hub in hubs)
        assert outages >= 1, "the test did not cut any connection"
        expected = sorted(f"{h.instance_id}:{i:04d}" for h in hubs for i in range(per_hub))
        for got in frames:
            texts = [f["text"] for f in got]
            assert sorted(texts) == expected  # nothing lost, nothing twice
        nursery.cancel_scope.cancel()


async def test_one_periodic_message_per_interval_for_the_whole_cluster(
    redis: RedisServer,
) -> None:
    interval = 0.25
    hubs = []
    for name in ("one", "two", "three"):
        settings = Settings(broadcast_interval=interval, redis_url=redis.url)
        hubs.append(Hub(settings, broker=RedisBroker(redis.url), instance_id=name))
    conns = [hub.connect(f"c-{hub.instance_id}", "p") for hub in hubs]
    async with trio.open_nursery() as nursery:
        for hub in hubs:
            await nursery.start(hub.run)
        started = trio.current_time()
        await trio.sleep(10 * interval + 0.1)
        elapsed = trio.current_time() - started
        got = [received(conn) for conn in conns]
        nursery.cancel_scope.cancel()
    # The same periodic frames (same ids) everywhere, about one per interval, not three.
    assert got[0] == got[1] == got[2]
    assert all(frame["type"] == "periodic" for frame in got[0])
    assert 8 <= len(got[0]) <= elapsed / interval + 1
    # Each reports the cluster's connections (3), not one process's (1), once counted.
    assert got[0][-1]["active_connections"] == 3


async def test_a_crashed_process_drops_out_of_the_cluster_count(redis: RedisServer) -> None:
    options = {"heartbeat_s": 0.05, "instance_ttl_s": 0.3}
    survivor, crashed = (
        make_hub(redis, "survivor", **options),
        make_hub(redis, "crashed", **options),
    )
    survivor.connect("a", "p")
    for name in ("b", "c"):
        crashed.connect(name, "p")
    async with trio.open_nursery() as nursery:
        await nursery.start(survivor.run)
        crashed_scope = trio.CancelScope()

        async def run_until_crash() -> None:
            with crashed_scope:
                await crashed.run()

        nursery.start_soon(run_until_crash)
        await wait_until(lambda: survivor.cluster_connections() == 3)
        # Cancelled without leaving the cluster: as if the process was killed.
        crashed_scope.cancel()
        cluster = survivor.broker.cluster()
        assert cluster is not None
        assert cluster.instances == 2
        await wait_until(lambda: survivor.cluster_connections() == 1, timeout=3)
        assert health_report(survivor)["cluster"]["instances"] == 1
        nursery.cancel_scope.cancel()


async def test_publishing_during_an_outage_reaches_local_clients_at_once(
    redis: RedisServer,
) -> None:
    hub = make_hub(redis, "solo")
    conn = hub.connect("a", "p")
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        await redis.kill()
        await wait_until(lambda: hub.broker.state is BrokerState.DOWN, timeout=10)
        assert hub.not_ready_reason() == "broker unavailable"
        await hub.publish("a", "while Redis is down")
        frames = received(conn)
        assert [(f["id"], f["text"]) for f in frames] == [(None, "while Redis is down")]
        await redis.start()
        await wait_until(lambda: hub.broker.state is BrokerState.UP, timeout=10)
        assert hub.not_ready_reason() is None
        await hub.publish("a", "after")

        def both_arrived() -> bool:
            frames.extend(received(conn))
            return len(frames) >= 2

        await wait_until(both_arrived)
        # Its own outage message came back through the new stream and was not delivered twice.
        assert [f["text"] for f in frames] == ["while Redis is down", "after"]
        assert frames[1]["id"] is not None
        nursery.cancel_scope.cancel()


async def test_a_frozen_redis_is_noticed_by_the_command_timeout(redis: RedisServer) -> None:
    """SIGSTOP: the connection stays open but nothing answers, as with a half-open connection."""
    hub = make_hub(redis, "solo", command_timeout=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        assert redis.process is not None
        redis.process.send_signal(signal.SIGSTOP)
        try:
            frozen_at = trio.current_time()
            await wait_until(lambda: hub.broker.state is BrokerState.DOWN, timeout=10)
            # The blocking read's own 1 s plus the 0.5 s timeout, with scheduling slack.
            assert trio.current_time() - frozen_at < 4
        finally:
            redis.process.send_signal(signal.SIGCONT)
        await wait_until(lambda: hub.broker.state is BrokerState.UP, timeout=10)
        nursery.cancel_scope.cancel()


async def test_the_cluster_count_includes_this_process_as_of_now(redis: RedisServer) -> None:
    other = make_hub(redis, "other", heartbeat_s=60)
    this = make_hub(redis, "this", heartbeat_s=60)
    other.connect("o", "p")
    async with trio.open_nursery() as nursery:
        await nursery.start(other.run)
        await nursery.start(this.run)  # its one heartbeat so far: "other" has 1, "this" 0
        assert this.cluster_connections() == 1
        conn = this.connect("t", "p")
        # No heartbeat since: its own client counts at once, in the welcome too.
        assert this.cluster_connections() == 2
        assert queued_frames(conn)[0]["active_connections"] == 2
        assert health_report(this)["cluster"]["connections"] == 2
        nursery.cancel_scope.cancel()


async def test_resuming_after_a_redis_restart_replays_no_copies(redis: RedisServer) -> None:
    """After a restart each process sends its recent messages again; the readers skip those
    copies, and so must a resuming client's history."""
    hub = make_hub(redis, "solo")
    seen = hub.connect("seen", "p")
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        for i in range(5):
            await hub.publish("seen", f"m{i}")
        await wait_until(lambda: health_report(hub)["broker"]["pending"] == 0)
        since = received(seen)[-1]["id"]
        await redis.kill()
        await wait_until(lambda: hub.broker.state is BrokerState.DOWN, timeout=10)
        # A periodic message during the outage stays local: it is not sent to the cluster later.
        await hub.broadcast_periodic()
        assert health_report(hub)["broker"]["pending"] == 0
        await redis.start()
        await wait_until(lambda: hub.broker.state is BrokerState.UP, timeout=10)
        await wait_until(lambda: health_report(hub)["broker"]["duplicates_skipped"] == 5)
        back = hub.connect("back", "p", resuming=True)
        await hub.resume(back, since)
        await trio.sleep(0.3)
        frames = queued_frames(back)
        # Nothing missed, nothing replayed; and since Redis lost the entry it resumed from,
        # the client is told it cannot be sure.
        assert frames[0]["resumed"] == {"since": since, "replayed": 0, "complete": False}
        assert frames[1:] == []
        nursery.cancel_scope.cancel()


async def test_histories_cancelled_mid_read_never_wedge_the_broker(redis: RedisServer) -> None:
    """A reconnect storm: many clients resume and drop their connection while their history is
    being read. However often that happens, broadcasts must keep flowing."""
    hub = make_hub(redis, "solo")
    watcher = hub.connect("watcher", "p")
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        for i in range(2000):  # enough history that each read takes a while
            await hub.publish("watcher", f"old {i}")
        await wait_until(lambda: health_report(hub)["broker"]["pending"] == 0, timeout=10)
        since = received(watcher)[0]["id"]

        async def resume_then_drop(index: int, deadline: float) -> bool:
            connection = hub.connect(f"storm-{index}", "p", resuming=True)
            try:
                with trio.move_on_after(deadline) as scope:
                    await hub.resume(connection, since)
                return scope.cancelled_caught
            finally:
                hub.disconnect(connection)

        cancelled = 0
        rounds = 0
        with trio.move_on_after(30):
            while cancelled < 2000:
                rounds += 1
                outcomes: list[bool] = []

                async def one(index: int, outcomes: list[bool] = outcomes) -> None:
                    # Spread over the life of a read: while connecting, sending, waiting.
                    outcomes.append(await resume_then_drop(index, (index % 20) * 0.0005))

                async with trio.open_nursery() as storm:
                    for index in range(100):
                        storm.start_soon(one, index)
                cancelled += sum(outcomes)
        assert cancelled >= 200, f"only {cancelled} reads were cancelled in {rounds} rounds"

        await hub.publish("watcher", "still alive?")
        got: list[str] = []

        def arrived() -> bool:
            got.extend(frame["text"] for frame in received(watcher))
            return "still alive?" in got

        try:
            await wait_until(arrived, timeout=5)
        except trio.TooSlowError:
            pytest.fail(
                f"the broker wedged after {cancelled} cancelled history reads "
                f"({rounds} rounds): {hub.broker.health()}"
            )
        nursery.cancel_scope.cancel()


async def test_resumes_that_arrive_together_cost_one_read(redis: RedisServer) -> None:
    hub = make_hub(redis, "solo")
    watcher = hub.connect("watcher", "p")
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        for i in range(20):
            await hub.publish("watcher", f"m{i}")
        await wait_until(lambda: health_report(hub)["broker"]["pending"] == 0)
        since = received(watcher)[9]["id"]
        reads_before = health_report(hub)["broker"]["history_reads"]
        welcomes: list[dict[str, Any]] = []

        async def resume(index: int) -> None:
            connection = hub.connect(f"back-{index}", "p", resuming=True)
            await hub.resume(connection, since)
            welcomes.append(queued_frames(connection)[0])

        async with trio.open_nursery() as storm:
            for index in range(200):
                storm.start_soon(resume, index)
        assert health_report(hub)["broker"]["history_reads"] - reads_before <= 2
        assert [w["resumed"] for w in welcomes] == [
            {"since": since, "replayed": 10, "complete": True}
        ] * 200
        nursery.cancel_scope.cancel()


async def test_a_resume_replays_the_newest_broadcasts_that_fit_in_its_budget(
    redis: RedisServer,
) -> None:
    hub = make_hub(redis, "solo")
    watcher = hub.connect("watcher", "p")
    big = "x" * ((Settings().resume_bytes) // 8)  # about 8 fit
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        await hub.publish("watcher", "small")
        for i in range(12):
            await hub.publish("watcher", f"{i:02d}{big}")
        await wait_until(lambda: health_report(hub)["broker"]["pending"] == 0)
        since = received(watcher)[0]["id"]
        back = hub.connect("back", "p", resuming=True)
        await hub.resume(back, since)
        welcome, *replayed = queued_frames(back)
        assert welcome["resumed"]["complete"] is False
        assert [frame["text"][:2] for frame in replayed] == [
            "05",
            "06",
            "07",
            "08",
            "09",
            "10",
            "11",
        ]
        nursery.cancel_scope.cancel()


async def test_no_heartbeat_registers_a_process_again_after_it_left(redis: RedisServer) -> None:
    hub = make_hub(redis, "leaver", heartbeat_s=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        admin = coredis.Redis.from_url(redis.url, decode_responses=True)
        async with admin:
            assert await admin.exists(["trio_ws:instance:leaver"]) == 1
            await hub.broker.leave()
            await trio.sleep(0.3)  # six heartbeat periods
            assert await admin.exists(["trio_ws:instance:leaver"]) == 0
            assert "leaver" not in await admin.smembers("trio_ws:instances")
        nursery.cancel_scope.cancel()


async def test_a_stalled_broker_is_noticed_by_the_watchdog_then_delivers_once(
    redis: RedisServer,
) -> None:
    """SIGSTOP, with a command timeout far longer than the test: only the watchdog can notice.
    What was published meanwhile reaches this process's clients at once, and the other
    process's once Redis is back; each once."""
    stall = 1.5
    options = {"command_timeout": 60.0, "stall_timeout": stall}
    sender, other = make_hub(redis, "sender", **options), make_hub(redis, "other", **options)
    here, there = sender.connect("here", "p"), other.connect("there", "p")
    async with trio.open_nursery() as nursery:
        for hub in (sender, other):
            await nursery.start(hub.run)
        await sender.publish("here", "before")
        await wait_until(lambda: len(received(there)) == 1)
        assert redis.process is not None
        redis.process.send_signal(signal.SIGSTOP)
        try:
            frozen_at = trio.current_time()
            for i in range(3):
                await sender.publish("here", f"frozen {i}")
            await wait_until(lambda: sender.broker.state is BrokerState.DOWN, timeout=10)
            # The stall bound, plus one look of the watchdog (a quarter of it) and some slack.
            assert trio.current_time() - frozen_at < stall * 1.25 + 1
            assert sender.not_ready_reason() == "broker unavailable"
            assert health_report(sender)["broker"]["stalls"] == 1
            await wait_until(lambda: other.broker.state is BrokerState.DOWN, timeout=10)
        finally:
            redis.process.send_signal(signal.SIGCONT)
        await wait_until(
            lambda: all(hub.broker.state is BrokerState.UP for hub in (sender, other)), timeout=15
        )
        frames: dict[str, list[dict[str, Any]]] = {"here": received(here), "there": []}

        def all_arrived() -> bool:
            frames["there"].extend(received(there))
            return len(frames["there"]) >= 3

        await wait_until(all_arrived, timeout=10)
        await trio.sleep(0.5)  # time for a copy to show up, if one were delivered
        frames["here"].extend(received(here))
        frames["there"].extend(received(there))
        frozen = [f"frozen {i}" for i in range(3)]
        assert [f["text"] for f in frames["here"]] == ["before", *frozen]
        assert all(f["id"] is None for f in frames["here"][1:])
        assert [f["text"] for f in frames["there"]] == frozen
        nursery.cancel_scope.cancel()


async def claim(hub: Hub, client_id: str, key: str | None = None) -> bool:
    """Connect ``client_id`` to ``hub`` (presenting ``key``) and claim it across the cluster;
    a refused claim is disconnected, as the endpoint does."""
    connection = hub.connect(client_id, "p", resume_key=key)
    granted = await hub.claim_across_cluster(connection, key)
    if not granted:
        hub.disconnect(connection)
    return granted


async def test_ids_held_across_the_cluster_survive_a_redis_restart(redis: RedisServer) -> None:
    one, two = make_hub(redis, "one"), make_hub(redis, "two")
    async with trio.open_nursery() as nursery:
        await nursery.start(one.run)
        await nursery.start(two.run)
        assert await claim(one, "alice")
        alice = one.registry.get("alice")
        assert alice is not None
        assert alice.resume_key is not None
        assert not await claim(two, "alice")
        assert not await claim(two, "alice", "B" * 32)
        # Redis restarts empty: each process writes the ids it holds anew.
        await redis.kill()
        await wait_until(lambda: one.broker.state is BrokerState.DOWN, timeout=10)
        await redis.start()
        await wait_until(lambda: one.broker.state is two.broker.state is BrokerState.UP, timeout=10)
        await trio.sleep(0.2)  # a heartbeat: the instances are known again
        assert not await claim(two, "alice")
        assert await claim(two, "alice", alice.resume_key)
        # The first process is told, at its next heartbeat, and closes its stale connection.
        await wait_until(lambda: alice.close_code == CloseCode.REPLACED, timeout=5)
        # The id left the first process: it is free once the second lets it go too.
        one.disconnect(alice)
        moved = two.registry.get("alice")
        assert moved is not None
        two.disconnect(moved)
        with trio.fail_after(3):  # the second process's release is on its way, as a retry
            while not await claim(one, "alice"):  # noqa: ASYNC110  # state in Redis
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_the_ids_of_a_crashed_process_free_themselves(redis: RedisServer) -> None:
    options = {"heartbeat_s": 0.05, "instance_ttl_s": 0.3}
    survivor, crashed = (
        make_hub(redis, "survivor", **options),
        make_hub(redis, "crashed", **options),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(survivor.run)
        crashed_scope = trio.CancelScope()

        async def run_until_crash(task_status: trio.TaskStatus[None]) -> None:
            with crashed_scope:
                await crashed.run(task_status=task_status)

        await nursery.start(run_until_crash)
        assert await claim(crashed, "bob")
        assert not await claim(survivor, "bob")
        crashed_scope.cancel()  # without leaving the cluster: as if the process was killed
        with trio.fail_after(3):
            while not await claim(survivor, "bob"):  # noqa: ASYNC110  # the TTL, in Redis
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
