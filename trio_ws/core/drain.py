"""The drain: wait for clients to leave by themselves, then close the rest at a deadline.

Theory of operation: :class:`Drain` owns the whole story of one process's drain: whether it was
requested (and why), its watcher task, and its report. Its watcher waits for the request,
warns every client, then runs :func:`drain`, which waits for the registry to empty inside
``trio.move_on_after(deadline)``, logging progress every ``progress_every_s`` from a sibling
task. It ends in one of three ways:

* ``drained``: the last client left; nothing is left to close;
* ``deadline``: time ran out; the remaining clients are asked to close with 1001;
* ``forced``: the operator asked twice (a second SIGINT); the same as the deadline, now.

After asking clients to close it waits a little (``close_grace_s``) for their close handshakes,
so that the process exits with every close frame sent rather than cutting sockets. Every
connection that ends during the drain is counted by how it ended (left by itself, closed as
slow with 4008, closed at the deadline, closed for another reason), so the report is true
under load. All time comes from trio's clock: tests run the 1800 s drain in milliseconds on a
MockClock.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from trio_ws.core import protocol
from trio_ws.core.protocol import CloseCode, Frame
from trio_ws.core.words import plural

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from trio_ws.core.registry import Connection, Registry

LOGGER = logging.getLogger(__name__)

#: How long to wait for close handshakes after asking the remaining clients to close.
CLOSE_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class DrainPolicy:
    deadline_s: float = 1800.0
    progress_every_s: float = 10.0
    close_grace_s: float = CLOSE_GRACE_S

    def progress_times(self, started_at: float) -> Iterator[float]:
        """Every time a progress line is due, strictly before the deadline (lazily)."""
        count = math.ceil(self.deadline_s / self.progress_every_s) - 1
        return (started_at + self.progress_every_s * k for k in range(1, count + 1))

    def time_left(self, started_at: float, now: float) -> float:
        return max(0.0, started_at + self.deadline_s - now)


class DrainState(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


class DrainEnd(enum.Enum):
    DRAINED = "drained"
    DEADLINE = "deadline"
    FORCED = "forced"


@dataclass(slots=True)
class DrainTally:
    """How the connections present when the drain started ended, so far."""

    at_start: int = 0
    left: int = 0  # closed by the client (or its network)
    slow: int = 0  # closed by the server as slow consumers (4008)
    at_deadline: int = 0  # closed by the server at the deadline or when forced (1001)
    other: int = 0  # closed by the server for another reason (replaced, protocol errors)

    def count(self, connection: Connection) -> None:
        code = connection.close_code
        if code is None:
            self.left += 1
        elif code == CloseCode.SLOW_CONSUMER:
            self.slow += 1
        elif code == CloseCode.GOING_AWAY:
            self.at_deadline += 1
        else:
            self.other += 1

    def describe(self) -> str:
        return (
            f"{plural(self.at_start, 'connection')} at start: {self.left} left by themselves, "
            f"{self.slow} closed as slow (4008), {self.at_deadline} closed at the deadline "
            f"(1001), {self.other} closed for other reasons"
        )


@dataclass(frozen=True, slots=True)
class DrainOutcome:
    end: DrainEnd
    duration_s: float
    connections_at_start: int
    #: Connections asked to close at the deadline (or when forced).
    closed_by_server: int
    #: How the connections ended, when the caller counted them (:meth:`Drain.note_gone`).
    tally: DrainTally
    #: Connections still registered when the process gave up waiting for their close.
    unfinished: int = 0


async def drain(
    registry: Registry, policy: DrainPolicy, force: trio.Event, tally: DrainTally | None = None
) -> DrainOutcome:
    """Wait until ``registry`` is empty, the deadline passes, or ``force`` is set.

    Clients still connected at the deadline (or when forced) are asked to close with 1001.
    ``tally`` is counted by the caller as connections end (:meth:`Drain.note_gone`).

    Cancellation: safe; nothing is left half done (close requests are synchronous).
    """
    started = trio.current_time()
    at_start = len(registry)
    tally = tally if tally is not None else DrainTally(at_start=at_start)
    end = DrainEnd.DRAINED
    closed = 0
    with trio.move_on_after(policy.deadline_s) as deadline_scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_log_progress, registry, policy, started)

            async def stop_when_forced() -> None:
                nonlocal end
                await force.wait()
                end = DrainEnd.FORCED
                nursery.cancel_scope.cancel()

            nursery.start_soon(stop_when_forced)
            await registry.wait_empty()
            nursery.cancel_scope.cancel()
    if deadline_scope.cancelled_caught:
        end = DrainEnd.DEADLINE

    elapsed = trio.current_time() - started
    unfinished = 0
    if end is DrainEnd.DRAINED:
        LOGGER.info("drain complete: the last client left after %.1fs", elapsed)
    else:
        if end is DrainEnd.DEADLINE:
            LOGGER.warning(
                "drain deadline of %gs reached: closing %s with 1001",
                policy.deadline_s,
                plural(len(registry), "remaining connection"),
            )
            reason = "drain deadline reached"
        else:
            LOGGER.warning(
                "drain cut short after %.1fs: closing %s with 1001",
                elapsed,
                plural(len(registry), "remaining connection"),
            )
            reason = "server shutting down now"
        closed = registry.close_all(CloseCode.GOING_AWAY, reason)
        with trio.move_on_after(policy.close_grace_s) as grace_scope:
            await registry.wait_empty()
        if grace_scope.cancelled_caught:
            unfinished = len(registry)
            LOGGER.warning(
                "%s did not finish their close handshake within %gs",
                plural(unfinished, "connection"),
                policy.close_grace_s,
            )
    outcome = DrainOutcome(
        end=end,
        duration_s=trio.current_time() - started,
        connections_at_start=at_start,
        closed_by_server=closed,
        tally=tally,
        unfinished=unfinished,
    )
    LOGGER.info(
        "drain finished (%s) in %.1fs: %s", outcome.end.value, outcome.duration_s, tally.describe()
    )
    return outcome


async def _log_progress(registry: Registry, policy: DrainPolicy, started: float) -> None:
    for due in policy.progress_times(started):
        await trio.sleep_until(due)
        LOGGER.info(
            "drain progress: %s left, %.1fs elapsed, %.1fs left",
            plural(len(registry), "connection"),
            due - started,
            policy.time_left(started, due),
        )


@dataclass(slots=True)
class Drain:
    """One process's drain: requested once (by a signal, an operator or the host), then run by
    :meth:`watch` beside the server's other tasks. Sync methods never block."""

    policy: DrainPolicy
    wall_clock: Callable[[], float] = time.time
    state: DrainState = DrainState.SERVING
    reason: str = ""
    refused: int = 0
    tally: DrainTally = field(default_factory=DrainTally)
    outcome: DrainOutcome | None = None
    _requested: trio.Event = field(default_factory=trio.Event)
    _force: trio.Event = field(default_factory=trio.Event)
    _stopped: trio.Event = field(default_factory=trio.Event)
    _started_at: float | None = None  # trio clock
    _started_wall: float | None = None

    @property
    def requested(self) -> bool:
        """True from the request on: new connections are refused."""
        return self.state is not DrainState.SERVING

    @property
    def stopped(self) -> bool:
        return self.state is DrainState.STOPPED

    def request(self, reason: str) -> bool:
        """Start the drain (idempotent); return True if this call started it."""
        if self._requested.is_set():
            return False
        self.reason = reason
        self.state = DrainState.DRAINING
        self._requested.set()
        return True

    def force(self, reason: str) -> None:
        """Close every client now, drain or not (an operator pressing Ctrl+C twice)."""
        LOGGER.warning("%s: closing every connection now", reason)
        self.request(reason)
        self._force.set()

    def note_refused(self, peer: str) -> None:
        self.refused += 1
        LOGGER.info("refused a new connection from %s during the drain (1001)", peer)

    def note_gone(self, connection: Connection, remaining: int) -> None:
        """A connection left the registry; during the drain, count how it ended."""
        if self._started_at is None or self.state is not DrainState.DRAINING:
            return
        self.tally.count(connection)
        LOGGER.info(
            "drain: client %s %s after %.1fs of drain, %s left",
            connection.client_id,
            "left" if connection.close_code is None else f"was closed ({connection.close_code})",
            trio.current_time() - self._started_at,
            plural(remaining, "connection"),
        )

    async def wait_requested(self) -> None:
        await self._requested.wait()

    async def wait_stopped(self) -> None:
        """Return once the drain is over (every client gone or closed)."""
        await self._stopped.wait()

    async def watch(self, registry: Registry) -> None:
        """Wait for the request, warn every client, drain; then the state is ``stopped``."""
        await self._requested.wait()
        self._started_at = trio.current_time()
        self._started_wall = self.wall_clock()
        self.tally.at_start = len(registry)
        deadline_wall = self._started_wall + self.policy.deadline_s
        LOGGER.info(
            "drain started (%s): %s, deadline %gs (at %s)",
            self.reason,
            plural(self.tally.at_start, "connection"),
            self.policy.deadline_s,
            protocol.iso_time(deadline_wall),
        )
        warned = registry.broadcast(
            Frame(
                protocol.shutdown_frame(
                    reason=f"server is shutting down ({self.reason}); please reconnect",
                    seconds_left=self.policy.deadline_s,
                    ts=self._started_wall,
                )
            )
        )
        LOGGER.info("drain: warned %s", plural(warned, "client"))
        try:
            self.outcome = await drain(registry, self.policy, self._force, self.tally)
        finally:
            self.state = DrainState.STOPPED
            self._stopped.set()

    def report(self) -> dict[str, Any] | None:
        """The drain's part of ``/health``; None before it starts."""
        if self._started_at is None or self._started_wall is None:
            return None
        now = trio.current_time()
        tally = self.tally
        return {
            "reason": self.reason,
            "started_at": protocol.iso_time(self._started_wall),
            "elapsed_s": round(now - self._started_at, 3),
            "time_left_s": round(self.policy.time_left(self._started_at, now), 3),
            "deadline_s": self.policy.deadline_s,
            "connections_at_start": tally.at_start,
            "left": tally.left,
            "closed_slow": tally.slow,
            "closed_at_deadline": tally.at_deadline,
            "closed_other": tally.other,
        }
