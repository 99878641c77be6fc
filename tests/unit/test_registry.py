from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from trio_ws.core.protocol import CloseCode, Frame
from trio_ws.core.registry import Connection, Registry


def connection(client_id: str, queue_size: int = 4) -> Connection:
    return Connection(client_id, peer="127.0.0.1:1", connected_at=0.0, queue_size=queue_size)


def drain_outbox(conn: Connection) -> list[str]:
    return [frame.text for frame in conn.outbox.take_queued()]


def test_add_remove_and_count() -> None:
    registry = Registry()
    a, b = connection("a"), connection("b")
    assert registry.add(a) is None
    assert registry.add(b) is None
    assert len(registry) == 2
    assert a in registry
    assert registry.remove(a)
    assert not registry.remove(a)  # idempotent
    assert list(registry) == [b]
    assert registry.statistics().total_connected == 2


def test_same_id_replaces_and_old_cleanup_cannot_remove_the_new() -> None:
    registry = Registry()
    old, new = connection("a"), connection("a")
    registry.add(old)
    assert registry.add(new) is old
    assert old not in registry
    assert not registry.remove(old)  # the old connection's late cleanup
    assert registry.get("a") is new
    assert registry.statistics().replaced == 1


def test_broadcast_queues_one_shared_frame_for_everyone() -> None:
    registry = Registry()
    conns = [connection(str(i)) for i in range(3)]
    for conn in conns:
        registry.add(conn)
    assert registry.broadcast(Frame("hello")) == 3
    outboxes = [drain_outbox(conn) for conn in conns]
    assert outboxes == [["hello"]] * 3


def test_slow_client_is_removed_and_asked_to_close(caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry()
    slow, healthy = connection("slow", queue_size=2), connection("healthy", queue_size=100)
    registry.add(slow)
    registry.add(healthy)
    delivered = [registry.broadcast(Frame(f"m{i}")) for i in range(5)]
    assert delivered == [2, 2, 1, 1, 1]
    assert slow not in registry
    assert (slow.close_code, slow.close_requested) == (CloseCode.SLOW_CONSUMER, True)
    assert drain_outbox(slow) == ["m0", "m1"]  # never fed a gap, cut cleanly
    assert drain_outbox(healthy) == [f"m{i}" for i in range(5)]
    assert registry.statistics().slow_disconnects == 1
    assert (
        "client slow (127.0.0.1:1) disconnected (slow consumer): outbox full at 2 frames"
        in caplog.text
    )


def test_first_close_request_wins() -> None:
    conn = connection("a")
    assert conn.request_close(1001, "first")
    assert not conn.request_close(4008, "second")
    assert (conn.close_code, conn.close_reason) == (1001, "first")


class ExplodingConnection(Connection):
    __slots__ = ()

    def request_close(self, code: int, reason: str, final: Frame | None = None) -> bool:
        raise OSError("socket already gone")


def test_an_error_closing_one_client_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = Registry()
    a, bad, c = (
        connection("a"),
        ExplodingConnection("bad", peer="p", connected_at=0, queue_size=1),
        connection("c"),
    )
    for conn in (a, bad, c):
        registry.add(conn)
    with caplog.at_level(logging.ERROR):
        assert registry.close_all(1001, "deadline") == 2
    assert a.close_requested
    assert c.close_requested
    assert "could not close client <Connection bad from p>; closing the others" in caplog.text


async def test_wait_empty(autojump_clock: trio.testing.MockClock) -> None:
    registry = Registry()
    await registry.wait_empty()  # empty: returns at once
    a, b = connection("a"), connection("b")
    registry.add(a)
    registry.add(b)

    async def leave(conn: Connection, after: float) -> None:
        await trio.sleep(after)
        registry.remove(conn)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leave, a, 5)
        nursery.start_soon(leave, b, 7)
        await registry.wait_empty()
        assert trio.current_time() == 7


async def test_concurrent_connect_disconnect_storm(autojump_clock: trio.testing.MockClock) -> None:
    """Hundreds of tasks connecting, broadcasting and leaving in random order leave nothing."""
    registry = Registry()
    received: dict[str, int] = {}

    async def client(i: int) -> None:
        conn = connection(f"c{i % 50}", queue_size=1000)  # ids collide on purpose
        await trio.sleep((i * 7919) % 13 / 10)
        previous = registry.add(conn)
        if previous is not None:
            previous.request_close(CloseCode.REPLACED, "replaced")
        registry.broadcast(Frame(f"from {i}"))
        await trio.sleep((i * 104729) % 17 / 10)
        registry.remove(conn)
        received[conn.client_id] = len(drain_outbox(conn))

    async with trio.open_nursery() as nursery:
        for i in range(500):
            nursery.start_soon(client, i)
    assert len(registry) == 0
    await registry.wait_empty()
    assert registry.statistics().total_connected == 500
    assert all(count >= 1 for count in received.values())  # everyone saw at least its own


def test_a_backlog_comes_out_as_one_batch_within_the_limit() -> None:
    # Sizes count whole frames: a 3-byte text is a 5-byte frame.
    conn = Connection("a", peer="p", connected_at=0, queue_size=10, batch_limit=15)
    frames = [Frame(text) for text in ["aaa", "bbb", "ccc", "dddddddddddd", "e"]]
    for frame in frames:
        assert conn.offer(frame)
    assert conn.outbox.take_batch() == frames[:3]  # 15 bytes: exactly the limit
    assert conn.outbox.take_batch() == [frames[3]]  # larger than the limit: alone
    assert conn.outbox.take_batch() == [frames[4]]
    assert conn.outbox.take_batch() == []


def test_batch_limit_0_gives_frames_one_by_one() -> None:
    conn = Connection("a", peer="p", connected_at=0, queue_size=10, batch_limit=0)
    frames = [Frame("a"), Frame("b")]
    for frame in frames:
        conn.offer(frame)
    assert [conn.outbox.take_batch(), conn.outbox.take_batch()] == [
        [frames[0]],
        [frames[1]],
    ]


def test_a_closing_connection_gets_no_more_frames_and_is_not_called_slow() -> None:
    registry = Registry()
    closing, open_ = connection("closing", queue_size=1), connection("open", queue_size=100)
    registry.add(closing)
    registry.add(open_)
    closing.request_close(1001, "drain deadline reached")
    assert [registry.broadcast(Frame(f"m{i}")) for i in range(3)] == [1, 1, 1]
    assert closing in registry  # still registered until its close handshake is done
    assert registry.statistics().slow_disconnects == 0
    assert drain_outbox(closing) == []


def test_a_resumed_connection_drops_broadcasts_it_has_until_a_newer_one() -> None:
    conn = Connection("a", peer="p", connected_at=0.0, queue_size=8)
    conn.resume_floor = (100, 2)
    for message_id in ("99-9", "100-2"):  # had them (before ``since``, or replayed)
        assert conn.offer(Frame("old", message_id))
    assert conn.offer(Frame("no id"))  # a frame without an id (shutdown, outage) always goes
    assert conn.offer(Frame("new", "100-3"))
    # Never happens (broadcasts come in id order); it shows the floor went with "new".
    assert conn.offer(Frame("later", "100-1"))
    assert [frame.text for frame in conn.take_queued()] == ["no id", "new", "later"]
