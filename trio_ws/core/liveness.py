"""Liveness: which connections are due a ping, and which failed to answer one in time.

Pure and sans-IO: no sockets, and no clock of its own (every call is given ``now``, from trio's
clock in the hub's pinger task, from a table in the tests). The hub's pinger
(:meth:`trio_ws.core.hub.Hub.run`) asks :meth:`LivenessSchedule.tick` what to do, writes one
pre-built ping frame to each connection it names, and closes the overdue ones with 4010.

Theory of operation:

* **Spread over the interval.** The ping interval is cut into ``slots`` ticks (20). Each
  connection is put in one slot as it joins, round-robin, and is pinged when its slot comes
  round, once per interval. So 10,000 connections cost 500 small writes per tick rather than
  10,000 at once, and a reconnect storm (thousands joining within a second) is spread evenly too.
* **Alive means heard from.** Any byte from the client after a ping (its pong, or any frame)
  answers it: the shell stamps ``heard_at`` on the connection when it reads (one clock read
  per read, no per-byte work). A client is never asked for a pong as such, so a busy client is never
  closed because its pong was late behind its own messages.
* **Overdue.** The pings of one tick form a group. ``pong_timeout`` after the group was pinged,
  each member that has heard nothing since is overdue, and is forgotten here (the hub closes it).
  With a pong timeout longer than the interval a client gets several pings, and the first one
  it left unanswered counts. Groups hold weak references: a connection that has gone is not
  kept in memory until its group's time is up.
* **Late ticks catch up.** A tick called late (a busy event loop) does every slot it missed, so
  no connection loses its ping or its check; the schedule never drifts.
"""

from __future__ import annotations

import collections
import weakref
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

#: How many ticks one ping interval is cut into.
SLOTS = 20

#: ``ping_slot`` of a connection the schedule does not watch.
NOT_WATCHED = -1


class Watched(Protocol):
    """What the schedule needs of a connection (``trio_ws.core.registry.Connection``)."""

    #: When bytes last arrived from the client (trio's clock); stamped by the shell.
    heard_at: float
    #: The slot it is pinged in, or :data:`NOT_WATCHED`; owned by the schedule.
    ping_slot: int


W = TypeVar("W", bound=Watched)


@dataclass(frozen=True, slots=True)
class LivenessPolicy:
    """How often to ping, and how long a client may take to answer."""

    #: Seconds between two pings of one connection; 0: no pings, and no pong timeout.
    ping_interval: float
    #: Seconds a client has to send anything after a ping; 0: never closed for silence.
    pong_timeout: float
    slots: int = SLOTS

    @property
    def pings(self) -> bool:
        return self.ping_interval > 0

    @property
    def checks_answers(self) -> bool:
        return self.ping_interval > 0 and self.pong_timeout > 0

    @property
    def tick_s(self) -> float:
        """Time between two ticks: how late a ping or a check can be, at most."""
        return self.ping_interval / self.slots


@dataclass(frozen=True, slots=True)
class Due(Generic[W]):
    """What one tick asks for: ping these, close those."""

    ping: list[W]
    overdue: list[W]


class LivenessSchedule(Generic[W]):
    """The connections to ping, slot by slot, and the pings still waiting for an answer."""

    def __init__(self, policy: LivenessPolicy) -> None:
        self.policy = policy
        self._slots: list[dict[W, None]] = [{} for _ in range(policy.slots)]
        self._joined = 0
        #: The slot the next tick pings, and when that tick is due (None before the first).
        self._cursor = 0
        self._next_tick: float | None = None
        #: The groups still waiting for answers: (when pinged, who), oldest first.
        self._waiting: collections.deque[tuple[float, list[weakref.ref[W]]]] = collections.deque()

    def __len__(self) -> int:
        return sum(len(slot) for slot in self._slots)

    @property
    def next_tick(self) -> float | None:
        """When :meth:`tick` has something to do next (None before the first tick)."""
        return self._next_tick

    def watch(self, connection: W, now: float) -> None:
        """Start pinging ``connection`` (no-op with pings off). Joining counts as being heard:
        its first ping comes within one interval."""
        if not self.policy.pings or connection.ping_slot != NOT_WATCHED:
            return
        connection.heard_at = now
        slot = self._joined % self.policy.slots
        self._joined += 1
        connection.ping_slot = slot
        self._slots[slot][connection] = None

    def forget(self, connection: W) -> None:
        """Stop pinging ``connection`` (idempotent); a group it is in skips it from now on."""
        slot = connection.ping_slot
        if slot != NOT_WATCHED:
            connection.ping_slot = NOT_WATCHED
            self._slots[slot].pop(connection, None)

    def tick(self, now: float) -> Due[W]:
        """Whom to close (overdue, forgotten here) and whom to ping, as of ``now``.

        The first call starts the schedule; from then on call it at :attr:`next_tick` or later.
        """
        overdue = self._take_overdue(now)
        ping: list[W] = []
        if not self.policy.pings:
            return Due(ping, overdue)
        if self._next_tick is None:
            self._next_tick = now
        while self._next_tick <= now:
            slot = self._slots[self._cursor]
            if slot:
                group = list(slot)
                ping.extend(group)
                if self.policy.checks_answers:
                    self._waiting.append((now, [weakref.ref(c) for c in group]))
            self._cursor = (self._cursor + 1) % self.policy.slots
            self._next_tick += self.policy.tick_s
        return Due(ping, overdue)

    def _take_overdue(self, now: float) -> list[W]:
        overdue: list[W] = []
        waiting = self._waiting
        timeout = self.policy.pong_timeout
        while waiting and waiting[0][0] + timeout <= now:
            pinged_at, group = waiting.popleft()
            for ref in group:
                connection = ref()
                if connection is None:
                    continue  # gone, and already forgotten
                if connection.ping_slot != NOT_WATCHED and connection.heard_at <= pinged_at:
                    self.forget(connection)
                    overdue.append(connection)
        return overdue
