"""The outbox's writer: a task only while a backlog exists (a fake sink, no sockets)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
import trio.testing

from trio_ws.core.outbox import WAKE, Outbox, Written
from trio_ws.core.protocol import Frame

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence


class FakeSink:
    """Takes frames through at once while ``open``; ``write`` waits for ``release``."""

    kind = "fake"

    def __init__(self) -> None:
        self.through = True
        self.written: list[str] = []
        self.release = trio.Event()

    def try_write(self, frame: Frame) -> Written:
        if not self.through:
            return Written.NOTHING
        self.written.append(frame.text)
        return Written.ALL

    async def write(self, frames: Sequence[Frame]) -> bool:
        await self.release.wait()
        self.written += [frame.text for frame in frames if frame is not WAKE]
        return True

    async def close(self, code: int, reason: str) -> None:
        pass


class Spawner:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.started = 0

    def __call__(self, fn: Callable[[], Awaitable[None]]) -> None:
        self.started += 1
        self.nursery.start_soon(fn)


async def test_no_writer_while_the_socket_takes_everything() -> None:
    outbox, sink = Outbox(max_frames=10, batch_limit=1000), FakeSink()
    outbox.offer(Frame("welcome"))
    async with trio.open_nursery() as nursery:
        spawn = Spawner(nursery)
        outbox.start(sink, spawn)  # the welcome goes through without a task
        for i in range(3):
            assert outbox.offer(Frame(f"m{i}"))
        assert spawn.started == 0
    assert sink.written == ["welcome", "m0", "m1", "m2"]
    assert len(outbox) == 0


async def test_a_writer_for_a_backlog_only_then_none_again() -> None:
    outbox, sink = Outbox(max_frames=10, batch_limit=1000), FakeSink()
    async with trio.open_nursery() as nursery:
        spawn = Spawner(nursery)
        outbox.start(sink, spawn)
        sink.through = False  # the socket is full
        for i in range(3):
            assert outbox.offer(Frame(f"m{i}"))
        assert spawn.started == 1  # one writer for the whole backlog
        await trio.testing.wait_all_tasks_blocked()
        sink.through = True
        sink.release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert sink.written == ["m0", "m1", "m2"]
        assert len(outbox) == 0
        assert outbox.offer(Frame("m3"))  # through again: no writer
        assert spawn.started == 1
        sink.through = False
        assert outbox.offer(Frame("m4"))  # a new backlog: a new writer
        assert spawn.started == 2
    assert sink.written == ["m0", "m1", "m2", "m3", "m4"]


async def test_after_stop_frames_stay_queued_and_no_writer_starts() -> None:
    outbox, sink = Outbox(max_frames=10), FakeSink()
    async with trio.open_nursery() as nursery:
        spawn = Spawner(nursery)
        outbox.start(sink, spawn)
        outbox.stop()
        assert outbox.offer(Frame("late"))
        assert spawn.started == 0
    assert [frame.text for frame in outbox.take_queued()] == ["late"]
    assert outbox.writer == ""


async def test_run_writer_writes_the_backlog_then_stops_when_cancelled() -> None:
    outbox, sink = Outbox(max_frames=10, batch_limit=1000), FakeSink()
    sink.through = False
    sink.release.set()
    for text in ("a", "b"):
        outbox.offer(Frame(text))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run_writer, sink)
        await trio.testing.wait_all_tasks_blocked()
        assert sink.written == ["a", "b"]
        assert outbox.writer == "fake"
        nursery.cancel_scope.cancel()
    assert outbox.writer == ""  # stopped
    assert outbox.offer(Frame("late"))
    assert len(outbox) == 1
