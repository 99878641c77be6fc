"""The hub: the server's core, with no knowledge of Quart or Hypercorn.

It owns the registry, numbers broadcast messages, and runs two sibling tasks in whatever nursery
the host gives it: the periodic broadcaster (in its own cancel scope, cancelled when the drain
starts) and the drain watcher (which waits for a drain request, warns every client, then runs
:func:`trio_ws.drain.drain` under its ``move_on_after`` deadline). When the drain is over,
:meth:`Hub.wait_stopped` returns, which is what the serving layer turns into "shut down now".

Sync methods never block; only ``run`` and ``wait_*`` are async.
"""

from __future__ import annotations

import enum
import itertools
import logging
import signal
import time
from typing import TYPE_CHECKING, Any

import trio

from trio_ws import protocol
from trio_ws.drain import DrainOutcome, DrainPolicy, drain
from trio_ws.protocol import CloseCode, Frame
from trio_ws.registry import Connection, Registry

if TYPE_CHECKING:
    from collections.abc import Callable

    from trio_ws.settings import Settings

LOGGER = logging.getLogger(__name__)

REFUSED_REASON = "server is shutting down; reconnect to another instance"

#: Most bytes one socket write may carry when a client's writer catches up on a backlog. The
#: write is shielded (no half frames on the wire), so this also bounds what a client that reads
#: at a trickle can make a close or a pong wait for.
BATCH_LIMIT_BYTES = 64 * 1024


class HubState(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


class Hub:
    """Connections, broadcasts, the periodic message and the drain."""

    def __init__(self, settings: Settings, *, wall_clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.registry = Registry()
        self.policy = DrainPolicy(
            deadline_s=settings.drain_timeout, progress_every_s=settings.progress_interval
        )
        self._wall_clock = wall_clock
        self._message_ids = itertools.count(1)
        self._messages_broadcast = 0
        self._refused = 0
        self._state = HubState.SERVING
        self._drain_requested = trio.Event()
        self._force = trio.Event()
        self._stopped = trio.Event()
        self._drain_reason = ""
        self._drain_started_at: float | None = None  # trio clock
        self._drain_started_wall: float | None = None
        self._drain_at_start = 0
        self.outcome: DrainOutcome | None = None
        self._started_wall = wall_clock()

    # -- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> HubState:
        return self._state

    @property
    def draining(self) -> bool:
        """True from the drain request on: new connections are refused."""
        return self._state is not HubState.SERVING

    def is_ready(self) -> bool:
        return self._state is HubState.SERVING

    # -- connections ---------------------------------------------------------------------------

    def connect(self, client_id: str | None, peer: str) -> Connection:
        """Register a new client and queue its welcome frame.

        An older connection with the same id is asked to close with 4500: the newest wins, so a
        reconnecting client is never locked out by its own stale connection.

        Errors: :class:`trio_ws.protocol.ClientIdError` for a bad id; :class:`RuntimeError` if
        the hub is draining (callers check :attr:`draining` and refuse with 1001 first).
        """
        if self.draining:
            raise RuntimeError("the hub is draining; refuse the connection with 1001")
        if client_id is None:
            client_id = protocol.new_client_id()
        else:
            protocol.validate_client_id(client_id)
        now = self._wall_clock()
        connection = Connection(
            client_id,
            peer=peer,
            connected_at=now,
            queue_size=self.settings.queue_size,
            batch_limit=BATCH_LIMIT_BYTES,
        )
        previous = self.registry.add(connection)
        connection.offer(
            Frame(
                protocol.welcome_frame(
                    client_id=client_id, active_connections=len(self.registry), ts=now
                )
            )
        )
        if previous is not None:
            previous.request_close(CloseCode.REPLACED, "replaced by a newer connection")
            LOGGER.info(
                "client %s reconnected from %s: older connection from %s closed with 4500",
                client_id,
                peer,
                previous.peer,
            )
        LOGGER.info(
            "client %s connected from %s, %d active connections",
            client_id,
            peer,
            len(self.registry),
        )
        return connection

    def disconnect(self, connection: Connection) -> None:
        """Forget ``connection`` (idempotent); called however the connection ended."""
        if not self.registry.remove(connection):
            return
        duration = self._wall_clock() - connection.connected_at
        if self._state is HubState.DRAINING and self._drain_started_at is not None:
            elapsed = trio.current_time() - self._drain_started_at
            LOGGER.info(
                "drain: client %s %s after %.1fs of drain, %d connections remain",
                connection.client_id,
                "was closed" if connection.close_requested else "left",
                elapsed,
                len(self.registry),
            )
        else:
            LOGGER.info(
                "client %s disconnected after %.1fs, %d active connections",
                connection.client_id,
                duration,
                len(self.registry),
            )

    def note_refused(self, peer: str) -> None:
        self._refused += 1
        LOGGER.info("refused a new connection from %s during the drain (1001)", peer)

    # -- broadcasting --------------------------------------------------------------------------

    def publish(self, sender: str, text: str) -> int:
        """Broadcast a client's text to every client, the sender included; return deliveries."""
        frame = protocol.message_frame(
            message_id=next(self._message_ids), sender=sender, text=text, ts=self._wall_clock()
        )
        self._messages_broadcast += 1
        return self.registry.broadcast(Frame(frame))

    def broadcast_periodic(self) -> int:
        frame = protocol.periodic_frame(
            message_id=next(self._message_ids),
            active_connections=len(self.registry),
            ts=self._wall_clock(),
        )
        self._messages_broadcast += 1
        return self.registry.broadcast(Frame(frame))

    # -- drain control -------------------------------------------------------------------------

    def request_drain(self, reason: str) -> bool:
        """Start the drain (idempotent); return True if this call started it."""
        if self._drain_requested.is_set():
            return False
        self._drain_reason = reason
        self._state = HubState.DRAINING
        self._drain_requested.set()
        return True

    def force_close(self, reason: str) -> None:
        """Close every client now, drain or not (an operator pressing Ctrl+C twice)."""
        LOGGER.warning("%s: closing every connection now", reason)
        self.request_drain(reason)
        self._force.set()

    def handle_signal(self, signum: int) -> None:
        """The first SIGTERM/SIGINT starts the drain; a second SIGINT forces it.

        A repeated SIGTERM never forces: process managers repeat it (Hypercorn's parent sends
        it to its workers more than once) without meaning "now".
        """
        name = signal.Signals(signum).name
        if not self.draining:
            LOGGER.info("received %s: starting the drain", name)
            self.request_drain(name)
        elif signum == signal.SIGINT and not self._stopped.is_set():
            self.force_close(f"received a second {name}")
        else:
            LOGGER.info("received %s again: the drain goes on", name)

    async def wait_stopped(self) -> None:
        """Return once the drain is over (every client gone or closed)."""
        await self._stopped.wait()

    # -- the tasks -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the periodic broadcaster and the drain watcher; return when the drain is over."""
        async with trio.open_nursery() as nursery:
            periodic = trio.CancelScope()
            nursery.start_soon(self._broadcast_periodically, periodic)
            nursery.start_soon(self._watch_for_drain, periodic)
            task_status.started()

    async def _broadcast_periodically(self, scope: trio.CancelScope) -> None:
        interval = self.settings.broadcast_interval
        if interval <= 0:
            return
        with scope:
            next_at = trio.current_time() + interval
            while True:
                await trio.sleep_until(next_at)
                self.broadcast_periodic()
                next_at += interval

    async def _watch_for_drain(self, periodic: trio.CancelScope) -> None:
        await self._drain_requested.wait()
        periodic.cancel()
        self._drain_started_at = trio.current_time()
        self._drain_started_wall = self._wall_clock()
        self._drain_at_start = len(self.registry)
        deadline_wall = self._drain_started_wall + self.policy.deadline_s
        LOGGER.info(
            "drain started (%s): %d connections, deadline %gs (at %s)",
            self._drain_reason,
            self._drain_at_start,
            self.policy.deadline_s,
            protocol.iso_time(deadline_wall),
        )
        warned = self.registry.broadcast(
            Frame(
                protocol.shutdown_frame(
                    reason=f"server is shutting down ({self._drain_reason}); please reconnect",
                    seconds_left=self.policy.deadline_s,
                    ts=self._drain_started_wall,
                )
            )
        )
        LOGGER.info("drain: warned %d clients", warned)
        try:
            self.outcome = await drain(self.registry, self.policy, self._force)
        finally:
            self._state = HubState.STOPPED
            self._stopped.set()

    # -- reporting -----------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """What ``/health`` reports: the original design's fields plus drain progress."""
        now = self._wall_clock()
        stats = self.registry.statistics()
        report: dict[str, Any] = {
            "status": "ok" if self._state is HubState.SERVING else self._state.value,
            "active_connections": stats.connections,
            "shutdown_in_progress": self.draining,
            "timestamp": protocol.iso_time(now),
            "uptime_s": round(now - self._started_wall, 3),
            "connections_total": stats.total_connected,
            "slow_disconnects": stats.slow_disconnects,
            "replaced_connections": stats.replaced,
            "messages_broadcast": self._messages_broadcast,
            "refused_during_drain": self._refused,
            "drain": None,
        }
        if self._drain_started_at is not None and self._drain_started_wall is not None:
            elapsed = trio.current_time() - self._drain_started_at
            report["drain"] = {
                "reason": self._drain_reason,
                "started_at": protocol.iso_time(self._drain_started_wall),
                "elapsed_s": round(elapsed, 3),
                "time_left_s": round(
                    self.policy.time_left(self._drain_started_at, trio.current_time()), 3
                ),
                "deadline_s": self.policy.deadline_s,
                "connections_at_start": self._drain_at_start,
            }
        return report
