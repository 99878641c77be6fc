"""A client's outbox: the one way a frame reaches a client's socket.

Theory of operation (the write path's rules; docs/design/write-path.md has the reasoning):

1. **A broadcast never waits.** :meth:`Outbox.offer` is synchronous. With nothing queued it
   hands the frame to the :class:`Sink` at once (``try_write``: a non-blocking write, no task
   switch), which is how almost every frame leaves; otherwise it queues the frame, within a
   bound in frames and in bytes. An outbox over its bound refuses the frame, and the caller
   closes the client as slow (4008): a client is never silently fed less.
2. **Order is kept.** Write-through is tried only when nothing is queued, and a sink answers
   ``NOTHING`` while one of its writes is in progress, so a frame can never overtake one that
   is queued or being written.
3. **Frames are never interleaved.** A sink writes whole frames. A write-through the socket took
   only in part (``PARTIAL``) leaves the rest with the sink, which finishes it before any other
   write on that connection, ours or the server's own (pings, pongs, close frames). The outbox
   then queues :data:`WAKE`, an empty frame whose only job is to wake the writer so the rest is
   written without waiting for the next broadcast.
4. **One writer, only while there is a backlog.** The writer is the only loop that waits on a
   socket: it writes a backlog in batches of at most ``batch_limit`` bytes (one system call for
   many frames), so a client that fell behind catches up quickly and a close frame never waits
   behind more than one batch. It is a task the outbox starts (through the shell's nursery)
   when a frame has to be queued, and it ends when the queue is empty: an idle client, almost
   every client almost all the time, costs no task, no event and no queue.

The outbox knows nothing of sockets, Quart or Hypercorn: sinks do (``trio_ws.shell.sinks``).
"""

from __future__ import annotations

import collections
import enum
from typing import TYPE_CHECKING, Protocol

import trio

from trio_ws.core.protocol import Frame
from trio_ws.core.stats import WriteStats

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    #: Starts a task (``nursery.start_soon``): where the outbox's writer runs.
    Spawn = Callable[[Callable[[], Awaitable[None]]], object]


class Written(enum.Enum):
    """What a sink's ``try_write`` did with a frame."""

    ALL = "all"  # the socket took the whole frame (or the connection is closing: dropped)
    PARTIAL = "partial"  # it took part; the sink keeps the rest and the writer must flush it
    NOTHING = "nothing"  # it took nothing: queue the frame


class Sink(Protocol):
    """Where an outbox's frames go: one client's WebSocket."""

    #: Names the write path in reports and tests ("direct", "asgi").
    kind: str

    def try_write(self, frame: Frame) -> Written:
        """Write ``frame`` now if that needs no waiting. Sync: it never blocks.

        Must answer ``NOTHING`` while a :meth:`write` is in progress (rule 2).
        """

    async def write(self, frames: Sequence[Frame]) -> bool:
        """Finish any partly written frame, then write ``frames`` whole (:data:`WAKE` writes
        nothing). False if the connection is closing: the frames are dropped with it.

        Cancellation: never leaves half a frame behind.
        """

    async def close(self, code: int, reason: str) -> None:
        """Send a close frame with ``code`` and ``reason``."""


#: Wakes a writer to finish a partly written frame; writes nothing itself.
WAKE = Frame("", wire=b"")


class Outbox:
    """Frames waiting for one client, and the writer that writes them while there are any."""

    __slots__ = (
        "_frames",
        "_max_bytes",
        "_max_frames",
        "_queued_bytes",
        "_sink",
        "_spawn",
        "_writing",
        "batch_limit",
        "stats",
    )

    def __init__(
        self,
        *,
        max_frames: int,
        max_bytes: int | None = None,
        batch_limit: int = 0,
        stats: WriteStats | None = None,
    ) -> None:
        #: Created with the first queued frame, dropped when the writer has emptied it.
        self._frames: collections.deque[Frame] | None = None
        self._max_frames = max_frames
        self._max_bytes = max_bytes if max_bytes is not None else 1 << 62
        self._queued_bytes = 0
        #: Most bytes one batch write carries (a larger frame goes alone); 0: one frame a write.
        self.batch_limit = batch_limit
        self._sink: Sink | None = None
        #: Where the slow path is counted (the hub's, shared by every outbox).
        self.stats = stats if stats is not None else WriteStats()
        self._spawn: Spawn | None = None
        self._writing = False

    def __len__(self) -> int:
        return len(self._frames) if self._frames else 0

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    @property
    def max_frames(self) -> int:
        return self._max_frames

    @property
    def writer(self) -> str:
        """The kind of sink frames go to ("" before :meth:`start` and after :meth:`stop`)."""
        return self._sink.kind if self._sink is not None else ""

    def offer(self, frame: Frame) -> bool:
        """Write ``frame`` through if nothing is queued, else queue it (and start the writer);
        never waits.

        False if the outbox is full (in frames or bytes): the caller closes the client as slow.
        """
        sink = self._sink
        if sink is not None and not self._frames:
            written = sink.try_write(frame)
            if written is Written.ALL:
                return True
            if written is Written.PARTIAL:
                frame = WAKE
                self.stats.partial += 1
        size = len(frame.wire)
        frames = self._frames
        if frames is None:
            frames = self._frames = collections.deque()
        if len(frames) >= self._max_frames or self._queued_bytes + size > self._max_bytes:
            return False
        frames.append(frame)
        self._queued_bytes += size
        if not self._writing and self._spawn is not None:
            self._writing = True
            self._spawn(self._write_backlog)
        return True

    def take_queued(self) -> list[Frame]:
        """Take every queued frame back (a resume queues them again after the history)."""
        frames = list(self._frames or ())
        self._frames = None
        self._queued_bytes = 0
        return frames

    def take_batch(self) -> list[Frame]:
        """The first queued frame with the frames behind it, within ``batch_limit`` bytes
        ([] if none is queued)."""
        frames = self._frames
        if not frames:
            return []
        first = frames.popleft()
        batch = [first]
        size = len(first.wire)
        while frames and size + len(frames[0].wire) <= self.batch_limit:
            size += len(frames[0].wire)
            batch.append(frames.popleft())
        self._queued_bytes -= size
        if not frames:
            self._frames = None
        return batch

    def start(self, sink: Sink, spawn: Spawn) -> None:
        """From now on, write to ``sink``: through at once when nothing is queued, else by a
        writer task started with ``spawn`` (the caller's nursery: a writer's error, or the
        nursery's cancellation, ends the connection, as it did with a writer per connection).

        What is queued already (the welcome, a resume's history) goes first: written through
        if the socket takes it now, else by a writer. Call :meth:`stop` before the nursery
        closes.
        """
        self._sink, self._spawn = sink, spawn
        frames = self._frames
        while frames:
            written = sink.try_write(frames[0])
            if written is Written.NOTHING:
                break
            self._queued_bytes -= len(frames.popleft().wire)
            if written is Written.PARTIAL:
                frames.appendleft(WAKE)  # the writer finishes the frame
                break
        if frames:
            self._writing = True
            spawn(self._write_backlog)
        else:
            self._frames = None

    def stop(self) -> None:
        """No more writes and no more writers: frames offered from now on stay queued (the
        connection is ending)."""
        self._sink = self._spawn = None

    async def run_writer(self, sink: Sink) -> None:
        """:meth:`start` with a nursery of its own, until cancelled; then :meth:`stop`. For a
        caller without a nursery at hand (the shell passes its own to :meth:`start`)."""
        async with trio.open_nursery() as nursery:
            self.start(sink, nursery.start_soon)
            try:
                await trio.sleep_forever()
            finally:
                self.stop()

    async def _write_backlog(self) -> None:
        """The writer: write the backlog in batches until it is empty, then end."""
        try:
            while self._frames and (sink := self._sink) is not None:
                # take_batch() has no checkpoint, and a write the socket takes at once has none
                # either: let a cancellation in here.
                await trio.lowlevel.checkpoint_if_cancelled()
                batch = self.take_batch()
                # Counted per batch (one socket write), never per frame offered: a broadcast
                # costs nothing here whichever way its frame leaves.
                stats = self.stats
                stats.batches += 1
                stats.backlog_frames += len(batch)
                if not await sink.write(batch):
                    self.stop()  # closing: what is queued goes with the connection
                    return
        finally:
            self._writing = False
