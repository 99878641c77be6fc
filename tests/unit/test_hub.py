"""The hub (core service) on a mock clock, with no sockets."""

from __future__ import annotations

import json
import logging
import signal
from typing import Any

import pytest
import trio
import trio.testing

from trio_ws.brokers.local import LocalBroker
from trio_ws.core.drain import DrainState
from trio_ws.core.health import health_report
from trio_ws.core.hub import NO_PONG_REASON, Hub, claim_value
from trio_ws.core.protocol import (
    PING,
    ClientIdError,
    CloseCode,
    IdInUseError,
    StaleAttemptError,
)
from trio_ws.core.registry import Connection
from trio_ws.hosting.signals import on_signal
from trio_ws.settings import Settings


def frames(conn: Connection) -> list[dict[str, Any]]:
    return [json.loads(frame.text) for frame in conn.outbox.take_queued()]


def make_hub(**changes: Any) -> Hub:
    changes.setdefault("presence_interval", 0)  # its own tests turn it on
    return Hub(
        Settings(**changes),
        broker=LocalBroker(lambda: 1_000.0),
        instance_id="i1",
        wall_clock=lambda: 1_000.0,
    )


def test_connect_queues_a_welcome_first() -> None:
    hub = make_hub()
    alice = hub.connect("alice", "1.2.3.4:5")
    bob = hub.connect(None, "1.2.3.4:6")
    assert bob.client_id.startswith("anon-")
    assert alice.resume_key is not None
    assert frames(alice) == [
        {
            "type": "welcome",
            "client_id": "alice",
            "instance": "i1",
            "active_connections": 1,
            "last_id": None,
            "server_time": "1970-01-01T00:16:40.000Z",
            "ts": 1000.0,
            "resume_key": alice.resume_key,
        }
    ]
    assert frames(bob)[0]["active_connections"] == 2


def test_bad_client_id_is_refused() -> None:
    hub = make_hub()
    with pytest.raises(ClientIdError):
        hub.connect("no spaces", "p")
    assert len(hub.registry) == 0


def test_reconnect_with_the_resume_key_replaces_the_old_connection() -> None:
    hub = make_hub()
    old = hub.connect("alice", "p1")
    new = hub.connect("alice", "p2", resume_key=old.resume_key)
    assert (old.close_code, old.close_requested) == (CloseCode.REPLACED, True)
    assert new.resume_key == old.resume_key  # the genuine client keeps its key
    assert hub.registry.get("alice") is new
    hub.disconnect(old)  # the old handler's cleanup must not remove the new one
    assert hub.registry.get("alice") is new


async def test_publish_reaches_everyone_including_the_sender_with_increasing_ids() -> None:
    hub = make_hub()
    a, b = hub.connect("a", "p"), hub.connect("b", "p")
    frames(a), frames(b)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        await hub.publish("a", "one")
        await hub.publish("b", "two <b>")
        # Queued before publish returned: the in-process broker delivers synchronously.
        for conn in (a, b):
            assert [(f["id"], f["from"], f["text"]) for f in frames(conn)] == [
                ("1000000-0", "a", "one"),
                ("1000000-1", "b", "two <b>"),
            ]
        nursery.cancel_scope.cancel()


async def test_periodic_every_interval_until_the_drain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = make_hub(broadcast_interval=10, drain_timeout=100)
    conn = hub.connect("a", "p")
    frames(conn)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        await trio.sleep(35)
        assert [(f["type"], f["id"]) for f in frames(conn)] == [
            ("periodic", "1000000-0"),
            ("periodic", "1000000-1"),
            ("periodic", "1000000-2"),
        ]
        hub.request_drain("test")
        await trio.sleep(50)
        got = frames(conn)
        assert [f["type"] for f in got] == ["shutdown"]  # no periodic once draining
        assert got[0]["seconds_left"] == 100
        hub.disconnect(conn)
    assert hub.drain.state is DrainState.STOPPED
    assert trio.current_time() == 85


async def test_drain_warns_everyone_and_stops_when_they_leave(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    hub = make_hub(drain_timeout=1800)
    conns = [hub.connect(f"c{i}", "p") for i in range(3)]
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        on_signal(hub.drain, signal.SIGTERM)
        assert hub.draining
        assert hub.not_ready_reason() == "draining"
        await trio.testing.wait_all_tasks_blocked()
        for conn in conns:
            assert frames(conn)[-1]["type"] == "shutdown"
        for i, conn in enumerate(conns):
            await trio.sleep(5)
            hub.disconnect(conn)
            assert health_report(hub)["active_connections"] == 2 - i
    assert trio.current_time() == 15
    assert hub.drain.outcome is not None
    assert hub.drain.outcome.tally.left == 3
    assert hub.drain.outcome.tally.at_deadline == 0
    messages = [r.getMessage() for r in caplog.records]
    assert (
        "drain started (SIGTERM): 3 connections, deadline 1800s (at 1970-01-01T00:46:40.000Z)"
        in messages
    )
    assert "drain: client c0 left after 5.0s of drain, 2 connections left" in messages
    assert "drain: warned 3 clients" in messages


async def test_drain_with_no_clients_is_immediate(autojump_clock: trio.testing.MockClock) -> None:
    hub = make_hub()
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        hub.request_drain("SIGTERM")
        await hub.wait_stopped()
    assert trio.current_time() == 0


async def test_second_sigint_forces_but_repeated_sigterm_does_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = make_hub()
    conn = hub.connect("a", "p")
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        on_signal(hub.drain, signal.SIGTERM)
        await trio.sleep(60)
        on_signal(hub.drain, signal.SIGTERM)  # process managers repeat SIGTERM
        await trio.sleep(60)
        assert not conn.close_requested
        on_signal(hub.drain, signal.SIGINT)  # an operator's second Ctrl+C
        await trio.testing.wait_all_tasks_blocked()
        assert (conn.close_code, conn.close_reason) == (1001, "server shutting down now")
        hub.disconnect(conn)
    assert trio.current_time() == 120


async def test_health_reports_drain_progress(autojump_clock: trio.testing.MockClock) -> None:
    hub = make_hub(drain_timeout=600)
    hub.connect("a", "p")
    report = health_report(hub)
    assert report["status"] == "ok"
    assert report["shutdown_in_progress"] is False
    assert report["drain"] is None
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        hub.request_drain("SIGTERM")
        await trio.sleep(30)
        report = health_report(hub)
        assert report["status"] == "draining"
        assert report["shutdown_in_progress"] is True
        assert report["active_connections"] == 1
        assert report["drain"] == {
            "reason": "SIGTERM",
            "started_at": "1970-01-01T00:16:40.000Z",
            "elapsed_s": 30.0,
            "time_left_s": 570.0,
            "deadline_s": 600.0,
            "connections_at_start": 1,
            "left": 0,
            "closed_slow": 0,
            "closed_at_deadline": 0,
            "closed_other": 0,
        }
        hub.force_close("test over")
        hub.disconnect(hub.registry.get("a"))  # type: ignore[arg-type]
    assert health_report(hub)["status"] == "stopped"


def test_connect_while_draining_is_a_programming_error() -> None:
    hub = make_hub()
    hub.request_drain("test")
    with pytest.raises(RuntimeError, match="refuse the connection with 1001"):
        hub.connect("a", "p")


async def test_a_resuming_client_gets_what_it_missed_then_live_broadcasts() -> None:
    hub = Hub(Settings(queue_size=8), instance_id="i1", broker=LocalBroker(history_size=8))
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        first = hub.connect("first", "p")
        for text in ("one", "two", "three"):
            await hub.publish("first", text)
        seen = frames(first)
        assert seen[0]["last_id"] is None  # nothing broadcast before it connected
        since = seen[1]["id"]  # it saw "one", then lost its connection
        back = hub.connect("back", "p", resuming=True)
        assert frames(back) == []  # nothing before the welcome
        await hub.resume(back, since)
        await hub.publish("first", "four")
        got = frames(back)
        assert got[0]["type"] == "welcome"
        assert got[0]["resumed"] == {"since": since, "replayed": 2, "complete": True}
        assert got[0]["last_id"] == seen[-1]["id"]
        assert [f["text"] for f in got[1:]] == ["two", "three", "four"]
        assert [f["id"] for f in got[1:3]] == [f["id"] for f in seen[2:]]

        # More than half a queue missed, or an id from before the history: incomplete.
        for i in range(6):
            await hub.publish("first", f"more {i}")
        late = hub.connect("late", "p", resuming=True)
        await hub.resume(late, since)
        welcome, *replayed = frames(late)
        assert welcome["resumed"]["complete"] is False
        assert [f["text"] for f in replayed] == ["more 2", "more 3", "more 4", "more 5"]
        old = hub.connect("old", "p", resuming=True)
        await hub.resume(old, "1-0")
        assert frames(old)[0]["resumed"]["complete"] is False
        nursery.cancel_scope.cancel()


def test_a_stale_attempt_never_replaces_the_newer_connection() -> None:
    """A client gave up on an attempt and retried; the retry got through first. The stale
    attempt, registered later, is refused instead of closing the retry with 4500."""
    hub = make_hub()
    stale, retry = hub.new_attempt(), hub.new_attempt()
    newer = hub.connect("alice", "p:2", attempt=retry)
    with pytest.raises(StaleAttemptError):
        hub.connect("alice", "p:1", attempt=stale, resume_key=newer.resume_key)
    assert not newer.closing
    assert hub.registry.get("alice") is newer
    # A genuinely newer attempt with the key still replaces it, as a reconnect must.
    newest = hub.connect("alice", "p:3", attempt=hub.new_attempt(), resume_key=newer.resume_key)
    assert (newer.close_code, hub.registry.get("alice")) == (CloseCode.REPLACED, newest)


async def test_a_resume_replays_more_than_a_few_seconds_of_broadcasts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """At 50 messages a second a storm's gap is many hundreds of broadcasts: the replay is
    bounded in bytes, not in a count that is seconds long."""
    hub = Hub(
        Settings(presence_interval=0), broker=LocalBroker(history_size=5000), instance_id="i1"
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        sender = hub.connect("sender", "p")
        await hub.publish("sender", "first")
        since = frames(sender)[-1]["id"]
        for i in range(1000):
            await hub.publish("sender", f"m{i}")
        back = hub.connect("back", "p", resuming=True)
        await hub.resume(back, since)
        got = frames(back)
        assert got[0]["resumed"] == {"since": since, "replayed": 1000, "complete": True}
        assert [f["text"] for f in got[1:]] == [f"m{i}" for i in range(1000)]
        nursery.cancel_scope.cancel()


async def test_the_drain_report_counts_slow_consumers_apart(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    hub = make_hub(queue_size=2)
    slow, leaver = hub.connect("slow", "p"), hub.connect("leaver", "p")
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        hub.request_drain("SIGTERM")
        await trio.testing.wait_all_tasks_blocked()
        frames(leaver)
        await hub.publish("leaver", "overflows the slow one")
        assert slow.close_code == CloseCode.SLOW_CONSUMER
        hub.disconnect(slow)  # the shell, once its close is sent
        hub.disconnect(leaver)
    assert hub.drain.outcome is not None
    tally = hub.drain.outcome.tally
    assert (tally.at_start, tally.left, tally.slow, tally.at_deadline) == (2, 1, 1, 0)
    assert (
        "2 connections at start: 1 left by themselves, 1 closed as slow (4008), "
        "0 closed at the deadline (1001), 0 closed for other reasons" in caplog.text
    )


async def test_presence_tells_clients_the_count_at_most_once_a_second(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Joins and leaves reach every client as a ``presence`` frame, coalesced: a storm of
    arrivals costs each client one frame per interval, not one per arrival; never in the
    history (no id)."""
    hub = make_hub(presence_interval=1)
    watcher = hub.connect("watcher", "p")
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        await trio.testing.wait_all_tasks_blocked()
        assert [f["type"] for f in frames(watcher)] == ["welcome", "presence"]
        storm = [hub.connect(f"c{i}", "p") for i in range(100)]
        await trio.sleep(0.5)
        assert frames(watcher) == []  # within the interval: nothing yet
        await trio.sleep(0.6)
        assert [(f["type"], f["active_connections"]) for f in frames(watcher)] == [
            ("presence", 101)
        ]
        for conn in storm:
            hub.disconnect(conn)
        await trio.sleep(1.1)
        presence = frames(watcher)
        assert [(f["type"], f["active_connections"]) for f in presence] == [("presence", 1)]
        assert "id" not in presence[0]
        await trio.sleep(5)
        assert frames(watcher) == []  # no change, no frame
        nursery.cancel_scope.cancel()


async def test_the_pinger_pings_everyone_and_closes_the_silent_with_4010(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """One task pings every watched connection each interval with the one pre-built frame;
    a client heard from after each ping stays, a silent one is closed with 4010."""
    caplog.set_level(logging.INFO)
    hub = make_hub(ping_interval=2, pong_timeout=1, broadcast_interval=0)
    talker, silent, unwatched = (
        hub.connect("t", "p1"),
        hub.connect("s", "p2"),
        hub.connect("u", "p3"),
    )
    for conn in (talker, silent, unwatched):
        conn.take_queued()
    hub.watch(talker)
    hub.watch(silent)
    pings_seen: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)

        async def answer() -> None:
            while True:
                await trio.sleep(0.25)
                queued = talker.take_queued()
                if queued:
                    assert all(frame is PING for frame in queued)
                    pings_seen.append(trio.current_time())
                    talker.heard_at = trio.current_time()  # what the shell does on a pong

        nursery.start_soon(answer)
        await trio.sleep(1.5)
        assert (silent.close_code, silent.close_reason) == (CloseCode.NO_PONG, NO_PONG_REASON)
        assert silent.take_queued() == [PING]  # pinged once, silent for its pong timeout
        await trio.sleep(10)
        assert not talker.closing
        assert len(pings_seen) >= 5  # every 2 s
        assert unwatched.take_queued() == []
        assert not unwatched.closing
        assert health_report(hub)["no_pong_disconnects"] == 1
        hub.disconnect(silent)
        hub.disconnect(talker)
        assert len(hub.liveness) == 0
        nursery.cancel_scope.cancel()
    assert "closed 1 silent connection with 4010: nothing received within 1s of a ping" in (
        caplog.text
    )


async def test_pings_are_spread_over_the_interval_and_written_in_batches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """1,000 connections, pings every 20 s: at most 50 (one slot's share) in one tick, and
    every one of them pinged within the interval."""
    hub = make_hub(ping_interval=20, pong_timeout=0, broadcast_interval=0)
    conns = [hub.connect(f"c{i}", "p") for i in range(1000)]
    for conn in conns:
        conn.take_queued()
        hub.watch(conn)
    pinged_per_tick: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        await trio.sleep(0.5)  # between ticks (one a second)
        assert sum(1 for c in conns if c.take_queued() == [PING]) == 50  # the first slot
        for _ in range(20):
            await trio.sleep(1)
            pinged_per_tick.append(sum(1 for c in conns if c.take_queued() == [PING]))
        nursery.cancel_scope.cancel()
    assert sum(pinged_per_tick) == 1000
    assert max(pinged_per_tick) == 50
    assert not any(c.closing for c in conns)  # pong timeout 0: never closed


async def test_no_pinger_with_pings_off(autojump_clock: trio.testing.MockClock) -> None:
    hub = make_hub(ping_interval=0, broadcast_interval=0)
    conn = hub.connect("a", "p")
    conn.take_queued()
    hub.watch(conn)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        await trio.sleep(100)
        assert conn.take_queued() == []
        assert not conn.closing
        nursery.cancel_scope.cancel()


def test_protocol_errors_are_counted_and_logged_at_debug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    hub = make_hub()
    hub.note_protocol_error(1002, "Reserved bits set\x1b[31m", "1.2.3.4:5")
    assert health_report(hub)["protocol_errors"] == 1
    record = caplog.records[-1]
    assert record.levelno == logging.DEBUG
    assert "\x1b" not in record.getMessage()
    assert "protocol error from 1.2.3.4:5, closed with 1002" in record.getMessage()


async def test_the_pinger_lets_other_tasks_run_between_batches(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tick's pings go out in batches of PING_BATCH with a checkpoint after each: another
    task runs in the middle of a tick rather than after all of it."""
    import trio_ws.core.hub as hub_module

    monkeypatch.setattr(hub_module, "PING_BATCH", 10)
    hub = make_hub(ping_interval=20, pong_timeout=0, broadcast_interval=0)
    conns = [hub.connect(f"c{i}", "p") for i in range(1000)]  # 50 a tick
    for conn in conns:
        conn.take_queued()
        hub.watch(conn)
    seen_mid_tick: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)

        async def observe() -> None:
            for _ in range(100):  # bounded: the first tick is over long before
                pinged = sum(1 for c in conns if len(c.outbox))
                if 0 < pinged < 50:
                    seen_mid_tick.append(pinged)
                await trio.lowlevel.checkpoint()

        nursery.start_soon(observe)
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert seen_mid_tick  # the observer ran while the first tick was under way
    assert all(count % 10 == 0 for count in seen_mid_tick)


ANOTHER_KEY = "A" * 32


@pytest.mark.parametrize(
    ("presented", "outcome"),
    [
        (None, "4009"),
        ("", "4009"),
        ("short", "4009"),
        (ANOTHER_KEY, "4009"),
        ("the key", "replaced"),
    ],
)
def test_who_may_take_an_id_that_is_held(presented: str | None, outcome: str) -> None:
    """Without tokens, an id that is held is taken only with its connection's resume key."""
    hub = make_hub()
    holder = hub.connect("alice", "p1")
    key = holder.resume_key if presented == "the key" else presented
    if outcome == "4009":
        with pytest.raises(IdInUseError):
            hub.connect("alice", "p2", resume_key=key)
        assert hub.registry.get("alice") is holder
        assert not holder.closing
    else:
        taker = hub.connect("alice", "p2", resume_key=key)
        assert hub.registry.get("alice") is taker
        assert holder.close_code == CloseCode.REPLACED


def test_a_free_id_keeps_the_key_presented_or_gets_a_new_one() -> None:
    hub = make_hub()
    first = hub.connect("alice", "p1")
    hub.disconnect(first)
    second = hub.connect("alice", "p2", resume_key=first.resume_key)
    assert second.resume_key == first.resume_key  # a tab's key stays the same
    hub.disconnect(second)
    third = hub.connect("alice", "p3", resume_key="not a key")
    assert third.resume_key not in (None, first.resume_key)


def test_with_tokens_a_user_holds_several_connections_each_replaced_only_by_its_key() -> None:
    hub = make_hub()
    tab1 = hub.connect("alice", "p1", authenticated=True)
    tab2 = hub.connect("alice", "p2", authenticated=True)
    assert (tab1.closing, tab2.closing) == (False, False)
    assert len(hub.registry) == 2
    assert tab1.resume_key != tab2.resume_key
    again = hub.connect("alice", "p3", authenticated=True, resume_key=tab1.resume_key)
    assert (tab1.close_code, tab2.closing) == (CloseCode.REPLACED, False)
    assert again.resume_key == tab1.resume_key
    assert {c.peer for c in hub.registry} == {"p2", "p3"}
    assert all(c.authenticated for c in hub.registry)
    hub.disconnect(tab1)  # the replaced tab's late cleanup removes nothing
    assert len(hub.registry) == 2


async def test_a_token_expiring_closes_its_connection_with_4502(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = Hub(
        Settings(presence_interval=0),
        broker=LocalBroker(lambda: 1_000.0),
        wall_clock=lambda: 1_000.0 + trio.current_time(),
    )
    connection = hub.connect("alice", "p1", authenticated=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.close_when_expired, connection, 1_000.0 + trio.current_time() + 30)
        await trio.sleep(29.9)
        assert not connection.closing
        await trio.sleep(0.2)
        assert connection.close_code == CloseCode.TOKEN_EXPIRED


def test_a_claim_taken_over_elsewhere_closes_only_the_connection_that_made_it() -> None:
    hub = make_hub()
    stale = hub.connect("alice", "p1")
    assert stale.resume_key is not None
    taken = claim_value(stale.resume_key, stale.attempt)
    # Meanwhile the client came back here too, with its key: its newer connection stays.
    newer = hub.connect("alice", "p2", resume_key=stale.resume_key)
    hub.replaced_elsewhere([("alice", taken), ("nobody", taken)])
    assert not newer.closing
    hub.replaced_elsewhere([("alice", claim_value(stale.resume_key, newer.attempt))])
    assert newer.close_code == CloseCode.REPLACED
    tokened = hub.connect("bob", "p3", authenticated=True)
    assert tokened.resume_key is not None
    hub.replaced_elsewhere([("bob", claim_value(tokened.resume_key, tokened.attempt))])
    assert not tokened.closing  # with tokens there are no claims to take over


async def test_log_connections_summary_counts_instead_of_a_line_each(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    hub = make_hub(log_connections="summary", drain_timeout=100)
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        conns = [hub.connect(f"c{i}", "p") for i in range(5)]
        hub.disconnect(conns[0])
        await trio.sleep(10.5)
        hub.disconnect(conns[1])
        await trio.sleep(10)
        await trio.sleep(10)  # nothing happened: no line
        hub.connect("late", "p")
        hub.request_drain("test")
        await trio.testing.wait_all_tasks_blocked()
        for conn in hub.registry:
            hub.disconnect(conn)
    messages = [r.getMessage() for r in caplog.records if r.name == "trio_ws.core.hub"]
    assert not any("connected from" in m or "disconnected after" in m for m in messages)
    assert messages == [
        "connections in the last 10.0s: 5 connected, 1 disconnected, 4 active connections",
        "connections in the last 10.0s: 0 connected, 1 disconnected, 3 active connections",
        "connections in the last 0.5s: 1 connected, 0 disconnected, 4 active connections",
    ]
    assert "drain: warned 4 clients" in caplog.text  # the drain's own lines are kept


def test_log_connections_each_is_a_line_per_connect_and_disconnect(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    hub = make_hub()
    hub.disconnect(hub.connect("alice", "1.2.3.4:5"))
    assert [r.getMessage() for r in caplog.records] == [
        "client alice connected from 1.2.3.4:5, 1 active connection",
        "client alice disconnected after 0.0s, 0 active connections",
    ]
