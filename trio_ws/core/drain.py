"""The drain: wait for clients to leave by themselves, then close the rest at a deadline.

Theory of operation: the drain starts after every client has been warned. It waits for the
registry to empty inside ``trio.move_on_after(deadline)``, logging progress every
``progress_every_s`` from a sibling task. It ends in one of three ways:

* ``drained``: the last client left; nothing is left to close;
* ``deadline``: time ran out; the remaining clients are asked to close with 1001;
* ``forced``: the operator asked twice (a second SIGINT); the same as the deadline, now.

After asking clients to close it waits a little (``close_grace_s``) for their close handshakes,
so that the process exits with every close frame sent rather than cutting sockets.
All time comes from trio's clock, so tests run the 1800 s drain in milliseconds on a MockClock.
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from trio_ws.core.protocol import CloseCode

if TYPE_CHECKING:
    from collections.abc import Iterator

    from trio_ws.core.registry import Registry

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


class DrainEnd(enum.Enum):
    DRAINED = "drained"
    DEADLINE = "deadline"
    FORCED = "forced"


@dataclass(frozen=True, slots=True)
class DrainOutcome:
    end: DrainEnd
    duration_s: float
    connections_at_start: int
    closed_by_server: int


async def drain(registry: Registry, policy: DrainPolicy, force: trio.Event) -> DrainOutcome:
    """Wait until ``registry`` is empty, the deadline passes, or ``force`` is set.

    Clients still connected at the deadline (or when forced) are asked to close with 1001.

    Cancellation: safe; nothing is left half done (close requests are synchronous).
    """
    started = trio.current_time()
    at_start = len(registry)
    end = DrainEnd.DRAINED
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
    closed = 0
    if end is DrainEnd.DRAINED:
        LOGGER.info("drain complete: the last client left after %.1fs", elapsed)
    else:
        if end is DrainEnd.DEADLINE:
            LOGGER.warning(
                "drain deadline of %gs reached: closing %d remaining connections with 1001",
                policy.deadline_s,
                len(registry),
            )
            reason = "drain deadline reached"
        else:
            LOGGER.warning(
                "drain cut short after %.1fs: closing %d remaining connections with 1001",
                elapsed,
                len(registry),
            )
            reason = "server shutting down now"
        closed = registry.close_all(CloseCode.GOING_AWAY, reason)
        with trio.move_on_after(policy.close_grace_s) as grace_scope:
            await registry.wait_empty()
        if grace_scope.cancelled_caught:
            LOGGER.warning(
                "%d connections did not finish their close handshake within %gs",
                len(registry),
                policy.close_grace_s,
            )
    outcome = DrainOutcome(
        end=end,
        duration_s=trio.current_time() - started,
        connections_at_start=at_start,
        closed_by_server=closed,
    )
    LOGGER.info(
        "drain finished (%s) in %.1fs: %d connections at start, %d left by themselves, "
        "%d closed by the server",
        outcome.end.value,
        outcome.duration_s,
        at_start,
        max(0, at_start - closed),
        closed,
    )
    return outcome


async def _log_progress(registry: Registry, policy: DrainPolicy, started: float) -> None:
    for due in policy.progress_times(started):
        await trio.sleep_until(due)
        LOGGER.info(
            "drain progress: %d connections left, %.1fs elapsed, %.1fs left",
            len(registry),
            due - started,
            policy.time_left(started, due),
        )
