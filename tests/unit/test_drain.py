"""The drain policy on a mock clock: a 1800 s drain runs in milliseconds."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from trio_ws.core.drain import DrainEnd, DrainPolicy, DrainTally, drain
from trio_ws.core.protocol import CloseCode
from trio_ws.core.registry import Connection, Registry


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("drain progress")]


def registry_with(count: int) -> tuple[Registry, list[Connection]]:
    registry = Registry()
    conns = [Connection(f"c{i}", peer="p", connected_at=0, queue_size=4) for i in range(count)]
    for conn in conns:
        registry.add(conn)
    return registry, conns


def test_progress_times_every_10s_until_the_deadline() -> None:
    times = list(DrainPolicy(deadline_s=1800, progress_every_s=10).progress_times(started_at=100))
    assert (times[0], times[-1], len(times)) == (110.0, 1890.0, 179)
    assert list(DrainPolicy(deadline_s=25, progress_every_s=10).progress_times(0.0)) == [10, 20]
    assert list(DrainPolicy(deadline_s=0, progress_every_s=10).progress_times(0.0)) == []


def test_time_left_never_negative() -> None:
    policy = DrainPolicy(deadline_s=30)
    assert policy.time_left(started_at=10, now=15) == 25
    assert policy.time_left(started_at=10, now=100) == 0


async def test_deadline_closes_the_rest_with_1001(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    registry, conns = registry_with(3)

    async def close_handshake(conn: Connection) -> None:
        with trio.CancelScope() as scope:
            conn.bind_close(scope)  # as the shell does: a close request cancels its I/O
            await trio.sleep_forever()
        await trio.sleep(0.5)
        tally.count(conn)  # as Hub.disconnect does, through Drain.note_gone
        registry.remove(conn)

    tally = DrainTally(at_start=3)
    async with trio.open_nursery() as nursery:
        for conn in conns:
            nursery.start_soon(close_handshake, conn)
        outcome = await drain(registry, DrainPolicy(), trio.Event(), tally)
    assert outcome.end is DrainEnd.DEADLINE
    assert outcome.duration_s == 1800.5
    assert (outcome.connections_at_start, outcome.closed_by_server) == (3, 3)
    assert all(c.close_code == CloseCode.GOING_AWAY for c in conns)
    assert {c.close_reason for c in conns} == {"drain deadline reached"}
    lines = progress_lines(caplog)
    assert len(lines) == 179
    assert lines[0] == "drain progress: 3 connections left, 10.0s elapsed, 1790.0s left"
    assert lines[-1] == "drain progress: 3 connections left, 1790.0s elapsed, 10.0s left"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [w.getMessage() for w in warnings] == [
        "drain deadline of 1800s reached: closing 3 remaining connections with 1001"
    ]
    assert caplog.records[-1].getMessage() == (
        "drain finished (deadline) in 1800.5s: 3 connections at start: 0 left by themselves, "
        "0 closed as slow (4008), 3 closed at the deadline (1001), 0 closed for other reasons"
    )


async def test_returns_when_the_last_client_leaves(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    registry, (a, b) = registry_with(2)

    async def leave(conn: Connection, after: float) -> None:
        await trio.sleep(after)
        registry.remove(conn)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(leave, a, 12)
        nursery.start_soon(leave, b, 25)
        outcome = await drain(registry, DrainPolicy(), trio.Event())
    assert outcome.end is DrainEnd.DRAINED
    assert trio.current_time() == 25
    assert not a.close_requested
    assert not b.close_requested
    assert progress_lines(caplog) == [
        "drain progress: 2 connections left, 10.0s elapsed, 1790.0s left",
        "drain progress: 1 connection left, 20.0s elapsed, 1780.0s left",
    ]
    assert "drain complete: the last client left after 25.0s" in caplog.text


async def test_no_clients_means_no_wait(autojump_clock: trio.testing.MockClock) -> None:
    outcome = await drain(Registry(), DrainPolicy(), trio.Event())
    assert (outcome.end, outcome.duration_s) == (DrainEnd.DRAINED, 0)


async def test_force_closes_everyone_now(autojump_clock: trio.testing.MockClock) -> None:
    registry, conns = registry_with(2)
    force = trio.Event()

    async def operator() -> None:
        await trio.sleep(42)
        force.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(operator)
        outcome = await drain(registry, DrainPolicy(close_grace_s=3), force)
    assert outcome.end is DrainEnd.FORCED
    # Nobody completed a close handshake: the drain gave them close_grace_s, then returned.
    assert outcome.duration_s == 45
    assert {c.close_reason for c in conns} == {"server shutting down now"}


async def test_unfinished_close_handshakes_are_reported(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    registry, _ = registry_with(2)
    await drain(registry, DrainPolicy(deadline_s=5, close_grace_s=2), trio.Event())
    assert trio.current_time() == 7
    assert "2 connections did not finish their close handshake within 2s" in caplog.text
