"""The in-process broker: one process is the whole cluster.

``publish`` numbers the message and delivers it at once, with no task switch and no copy; the
last ``history_size`` broadcasts are kept for clients that resume after a reconnect.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING

import trio

from trio_ws.core.broker import Broadcast, Broker, History, HistoryBudget, Member, Outgoing
from trio_ws.core.protocol import parse_message_id

if TYPE_CHECKING:
    from collections.abc import Callable


class StreamIds:
    """Ids in the Redis Stream format, increasing even if the wall clock steps back."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self._ms = 0
        self._seq = -1

    def next(self) -> tuple[str, tuple[int, int]]:
        """The next id, as text and as the pair that orders it."""
        ms = int(self._wall_clock() * 1000)
        if ms > self._ms:
            self._ms, self._seq = ms, 0
        else:
            self._seq += 1
        return f"{self._ms}-{self._seq}", (self._ms, self._seq)


class LocalBroker(Broker):
    """One process is the whole cluster: delivery happens inside ``publish``.

    The last ``history_size`` broadcasts are kept for clients that resume after a reconnect.
    """

    kind = "local"

    def __init__(
        self, wall_clock: Callable[[], float] = time.time, history_size: int = 10_000
    ) -> None:
        self._ids = StreamIds(wall_clock)
        self._deliver: Callable[[Broadcast], None] | None = None
        self._history: collections.deque[tuple[tuple[int, int], Broadcast]] = collections.deque(
            maxlen=history_size
        )
        # Clients resuming from an id before this were not served by this process (or their
        # broadcasts have since dropped out of the history): what they missed is unknown.
        self._floor = (int(wall_clock() * 1000), -1)

    @property
    def last_id(self) -> str | None:
        return self._history[-1][1].id if self._history else None

    async def history(self, since: str, *, limit: int, max_bytes: int) -> History:
        key = parse_message_id(since)
        budget = HistoryBudget(limit, max_bytes)
        newer: list[Broadcast] = []
        complete = key >= self._floor
        for entry_key, broadcast in reversed(self._history):
            if entry_key <= key:
                break
            if not budget.take(broadcast.message):
                complete = False
                break
            newer.append(broadcast)
        newer.reverse()
        return History(newer, complete)

    async def run(
        self, member: Member, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._deliver = member.deliver
        task_status.started()
        await trio.sleep_forever()

    async def publish(self, message: Outgoing) -> None:
        if self._deliver is None:
            raise RuntimeError("LocalBroker.publish before run() started")
        message_id, key = self._ids.next()
        broadcast = Broadcast(message_id, message)
        if len(self._history) == self._history.maxlen:
            self._floor = self._history[0][0]
        self._history.append((key, broadcast))
        # No checkpoint: a client's message reaches every local client before its reader
        # task next waits, exactly as a direct broadcast would.
        self._deliver(broadcast)
