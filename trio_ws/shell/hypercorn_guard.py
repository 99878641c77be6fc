"""Keep an error inside Hypercorn to the connection that raised it.

Hypercorn runs each connection in ``TCPServer.run``, a task of the server's own nursery. An
exception from that connection's protocol code escapes the nursery and stops the whole server:
every client is dropped without a drain, the launcher exits 1, and under Hypercorn's command
line the parent stops every worker. Inputs that do it with Hypercorn 0.18.0 (tests in
tests/system/test_hostile_input.py):

* a text message over ``websocket_max_message_size``, then a binary one: the message buffer is
  never cleared after Hypercorn's 1009 and gets bytes while holding text (``TypeError``; no
  longer reachable with :mod:`trio_ws.shell.hypercorn_limits`, which closes at its 1009);
* over HTTP/2, a DATA frame on a stream Hypercorn has finished (``KeyError``,
  pgjones/hypercorn#329);
* an app accepting a subprotocol the client did not offer (``AttributeError``; trio_ws never
  accepts one).

The general bug is pgjones/hypercorn#225. :func:`install` wraps ``TCPServer.run`` so that an
``Exception`` ends only its own connection: by the time it reaches the wrapper, Hypercorn's own
``finally`` has closed the connection's socket and its task group has cancelled the
connection's other tasks (the app's handler, which then disconnects the client from the hub).
The wrapper logs one line and returns. Cancellation and ``KeyboardInterrupt`` pass through.

The same wrapper caps the connections that are *waiting*: accepted and not yet past their
request's headers (a TLS handshake included), or idle between two keep-alive requests. Hypercorn
closes each after its keep-alive timeout (from the accept; bytes do not extend it), but has no
bound on how many there are: sockets that send nothing, or a header byte a second, took the
process's last file descriptors, and ``/health`` and new WebSockets went unanswered. A
connection leaves the waiting set when its request's headers are complete (Hypercorn's
``Updated(idle=False)``, which also stops its keep-alive timer) and comes back when it is idle
again (``Updated(idle=True)``). At the cap (:func:`limit_waiting`, fitted under the file limit
by the host) the *oldest* waiting connection is closed to make room: a request that arrives
whole, as ``/health`` and any real client's do, is past its headers long before an attacker
can open the cap's worth of new sockets, while a socket that trickles is always the oldest.

One gap in those events is filled here: a cleartext HTTP/2 connection by prior knowledge starts
as HTTP/1.1, whose parser reads the preface as a request (``Updated(idle=False)``: the timer
stops), and HTTP/2 says nothing more until a stream has come and gone, so a connection that
opened no stream was held for good, uncounted. ``H2Protocol.initiate`` is wrapped to say
whether the new connection is idle.

It fails closed: for a Hypercorn release not checked here, or a ``TCPServer.run``,
``protocol_send`` or ``H2Protocol.initiate`` that is not the one checked, :func:`install`
raises :class:`HypercornGuardError` and the server does not start (docs/design/hypercorn.md,
"Errors inside Hypercorn" and "Connections that never become WebSockets").
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
import traceback
from importlib.metadata import version
from typing import Any

import trio
from hypercorn.events import Updated
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.trio.tcp_server import TCPServer

from trio_ws.core.throttle import Throttle

LOGGER = logging.getLogger(__name__)

#: Hypercorn releases whose ``TCPServer.run`` was read and whose crashes were reproduced.
VERIFIED_HYPERCORN = ("0.18.0",)
#: What ``TCPServer.run`` must still do for the wrapper to be right: run the connection in its
#: own task group and close the stream in its ``finally``.
_EXPECTED_NAMES = ("TaskGroup", "ProtocolWrapper", "_read_data", "_close", "stream")
_MARK = "_trio_ws_guarded"
#: Longest a connection's close may take (the TLS goodbye, the send lock) before its socket is
#: closed without it.
CLOSE_TIMEOUT_S = 5.0
#: At most one log line per kind of contained error in this many seconds.
LOG_INTERVAL_S = 10.0
_last_logged: dict[str, float] = {}
_suppressed: dict[str, int] = {}
#: Waiting connections (see the module docstring) one process keeps at most, unless the host
#: fits a smaller number under its file limit (:func:`limit_waiting`).
WAITING_MAX = 1000
_waiting_limit = WAITING_MAX
#: Waiting connections closed by that cap in this process, for ``/metrics``.
_waiting_closed_total = 0


class HypercornGuardError(RuntimeError):
    """The installed Hypercorn is not the one the guard was checked against."""


def install() -> None:
    """Wrap ``TCPServer.run`` (once per process); raise :class:`HypercornGuardError` if unsafe."""
    original = TCPServer.run
    if getattr(original, _MARK, False):
        return
    problem = check()
    if problem is not None:
        raise HypercornGuardError(
            f"{problem}: refusing to run without the guard that keeps one connection's error "
            "from stopping the server (pgjones/hypercorn#225); install a verified Hypercorn "
            f"{', '.join(VERIFIED_HYPERCORN)}"
        )

    async def run(self: TCPServer) -> None:
        peer = _peer(self)
        waiting = _waiting()
        try:
            await _close_all(waiting.add(self))
            await original(self)
        except* Exception as group:
            _log_contained(peer, group)
        finally:
            waiting.discard(self)

    original_send = TCPServer.protocol_send

    async def protocol_send(self: TCPServer, event: Any) -> None:
        if isinstance(event, Updated):
            waiting = _waiting()
            if event.idle:
                await _close_all(waiting.add(self))
            else:
                waiting.discard(self)
        await original_send(self, event)

    original_close = TCPServer._close

    async def close(self: TCPServer) -> None:
        # Hypercorn half-closes the socket (send_eof) without its send lock, so a client that
        # closes right after the handshake races the reply to its close frame: trio raises
        # BusyResourceError in that send. Under the lock, the reply goes first.
        # Shielded: Hypercorn also closes from the application's task (a response sent before
        # the request's body has all arrived), and Quart cancels that task right then; the
        # close was cancelled at its first checkpoint and the socket stayed open for good.
        # Bounded, as a TLS close may wait on a peer that reads nothing: then the socket is
        # closed without the TLS goodbye.
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                async with self.send_lock:
                    await original_close(self)
                return
            await trio.aclose_forcefully(self.stream)

    original_initiate = H2Protocol.initiate

    async def initiate(self: H2Protocol, *args: Any, **kwargs: Any) -> None:
        await original_initiate(self, *args, **kwargs)
        # Idle (no stream yet) unless an h2c upgrade brought its request as stream 1: the
        # keep-alive timer runs again, and the connection counts as waiting.
        await self.send(Updated(idle=self.idle))

    setattr(run, _MARK, True)
    run.__wrapped__ = original  # type: ignore[attr-defined]  # what check() reads
    close.__wrapped__ = original_close  # type: ignore[attr-defined]
    protocol_send.__wrapped__ = original_send  # type: ignore[attr-defined]
    initiate.__wrapped__ = original_initiate  # type: ignore[attr-defined]
    TCPServer.run = run  # type: ignore[method-assign]
    TCPServer._close = close  # type: ignore[method-assign]
    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
    H2Protocol.initiate = initiate  # type: ignore[method-assign]


def limit_waiting(limit: int) -> None:
    """Keep at most ``limit`` (>= 1) waiting connections in this process."""
    global _waiting_limit  # one process, one file limit
    _waiting_limit = max(1, limit)


def waiting_limit() -> int:
    return _waiting_limit


def waiting_closed_total() -> int:
    """Waiting connections this process closed to stay under the cap (every Trio run)."""
    return _waiting_closed_total


class _Waiting:
    """The waiting connections of one Trio run, oldest first."""

    def __init__(self) -> None:
        self.servers: dict[TCPServer, None] = {}
        self._closes_log = Throttle(LOG_INTERVAL_S)

    def add(self, server: TCPServer) -> list[TCPServer]:
        """``server`` waits (again), as the newest; returns the oldest ones to close, as many
        as are over the cap."""
        self.servers.pop(server, None)
        self.servers[server] = None
        evicted = []
        while len(self.servers) > _waiting_limit:
            oldest = next(iter(self.servers))
            del self.servers[oldest]
            evicted.append(oldest)
            self._closed_one()
        return evicted

    def discard(self, server: TCPServer) -> None:
        self.servers.pop(server, None)

    def _closed_one(self) -> None:
        global _waiting_closed_total  # one process, one count
        _waiting_closed_total += 1
        count = self._closes_log.event(time.monotonic())
        if count is None:
            return
        LOGGER.warning(
            "%d connections waiting for their request's headers: the oldest closed to make "
            "room; %d such in the last %gs",
            _waiting_limit,
            count,
            LOG_INTERVAL_S,
        )


async def _close_all(servers: list[TCPServer]) -> None:
    for server in servers:
        # Its own task then sees its socket closed, and ends as after its keep-alive timeout.
        # Whatever closing it raises belongs to that connection, not to the one running this.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await trio.aclose_forcefully(server.stream)


_WAITING: trio.lowlevel.RunVar[_Waiting] = trio.lowlevel.RunVar("trio_ws_waiting")


def _waiting() -> _Waiting:
    try:
        return _WAITING.get()
    except LookupError:
        waiting = _Waiting()
        _WAITING.set(waiting)
        return waiting


def waiting_count() -> int:
    """Waiting connections in the current Trio run (for tests)."""
    return len(_waiting().servers)


def check() -> str | None:
    """Why the guard cannot be installed on this Hypercorn, or None if it can."""
    installed = version("hypercorn")
    if installed not in VERIFIED_HYPERCORN:
        return f"Hypercorn {installed} is not a verified release"
    run = getattr(TCPServer, "run", None)
    run = getattr(run, "__wrapped__", run)  # installed already: check Hypercorn's own
    if not inspect.iscoroutinefunction(run):
        return "hypercorn.trio.tcp_server.TCPServer.run is gone"
    missing = [name for name in _EXPECTED_NAMES if name not in run.__code__.co_names]
    if missing:
        return f"TCPServer.run no longer uses {', '.join(missing)}"
    close = getattr(TCPServer, "_close", None)
    close = getattr(close, "__wrapped__", close)
    if not inspect.iscoroutinefunction(close) or "send_eof" not in close.__code__.co_names:
        return "TCPServer._close no longer half-closes the stream (send_eof)"
    if "send_lock" not in TCPServer.__init__.__code__.co_names:
        return "TCPServer no longer has a send_lock"
    send = getattr(TCPServer, "protocol_send", None)
    send = getattr(send, "__wrapped__", send)
    if not inspect.iscoroutinefunction(send) or not {"Updated", "idle", "idle_task"} <= set(
        send.__code__.co_names
    ):
        return "TCPServer.protocol_send no longer starts and stops the idle timer on Updated"
    idle = getattr(TCPServer, "_idle_timeout", None)
    if not inspect.iscoroutinefunction(idle) or "keep_alive_timeout" not in (
        idle.__code__.co_names
    ):
        return "TCPServer no longer closes a connection after keep_alive_timeout"
    h2_initiate = getattr(H2Protocol, "initiate", None)
    h2_initiate = getattr(h2_initiate, "__wrapped__", h2_initiate)
    if not inspect.iscoroutinefunction(h2_initiate) or "Updated" in h2_initiate.__code__.co_names:
        return "H2Protocol.initiate is gone, or now reports whether it is idle"
    if not isinstance(getattr(H2Protocol, "idle", None), property):
        return "H2Protocol no longer has an idle property"
    return None


def _peer(server: Any) -> str:
    # Read before the connection runs: once Hypercorn has closed the socket it has no peer.
    stream = server.stream
    sock = getattr(getattr(stream, "transport_stream", stream), "socket", None)
    try:
        host, port = sock.getpeername()[:2]  # type: ignore[union-attr]
    except (AttributeError, OSError, TypeError, ValueError):
        return "<unknown>"
    return f"{host}:{port}"


def _log_contained(peer: str, group: BaseExceptionGroup[Exception]) -> None:
    """One line: the exception types and where the first was raised, never its message (which
    may hold the client's bytes)."""
    leaves = _leaves(group)
    where = "?"
    frames = traceback.extract_tb(leaves[0].__traceback__) if leaves else []
    if frames:
        last = frames[-1]
        where = f"{os.path.basename(last.filename)}:{last.lineno} {last.name}"
    kinds = ", ".join(sorted({type(error).__name__ for error in leaves}))
    # Under attack these come by the thousand: one line per kind and place per interval, with
    # how many were contained since the last line.
    key = f"{kinds} at {where}"
    now = time.monotonic()
    count = _suppressed.get(key, 0) + 1
    if now - _last_logged.get(key, -LOG_INTERVAL_S) < LOG_INTERVAL_S:
        _suppressed[key] = count
        return
    _last_logged[key] = now
    _suppressed[key] = 0
    LOGGER.error(
        "connection from %s ended by an error inside Hypercorn (%s): connection closed, the "
        "server goes on (pgjones/hypercorn#225); %d such in the last %gs",
        peer,
        key,
        count,
        LOG_INTERVAL_S,
    )


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]
