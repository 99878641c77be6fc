"""How the process was started, and what trio_ws must do in each case to drain properly.

Hypercorn hides shutdown from the app (see ``shared/notes/hypercorn-trio.md``): under its CLI the
signal goes to a parent process, and open WebSockets are cancelled 3 s after it. So each mode
needs its own wiring, all of it here:

* ``launcher`` (``python -m trio_ws``, ``trio-ws``): our own process owns the signals and gives
  Hypercorn a ``shutdown_trigger`` that returns when the drain is over. Public API only.
* ``hypercorn-inprocess`` (``hypercorn --workers 0``): the app owns SIGTERM/SIGINT while it
  drains, then hands shutdown back to Hypercorn with a SIGINT, which Hypercorn takes as
  "shut down" (trio turns it into KeyboardInterrupt).
* ``hypercorn-worker`` (``hypercorn`` as typed, one or more spawned workers): the parent owns the
  signals and only sets a multiprocessing Event that its workers poll. We poll the same Event
  (a private attribute of the worker process), raise the worker's ``graceful_timeout`` above the
  drain deadline so Hypercorn does not cancel connections first, and also own SIGTERM/SIGINT in
  the worker, for signals sent to the whole process group (systemd, a terminal's Ctrl+C) and for
  the parent's ``terminate()`` of workers still draining when another worker exits first.
* ``embedded``: any other host (tests, a custom runner); the host calls ``Hub.request_drain``.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import multiprocessing
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from trio_ws.core.drain import CLOSE_GRACE_S
from trio_ws.core.hub import HubState

if TYPE_CHECKING:
    from trio_ws.core.hub import Hub
    from trio_ws.settings import Settings

LOGGER = logging.getLogger(__name__)

#: How often a CLI worker checks Hypercorn's shutdown Event (Hypercorn itself checks every 0.1 s).
PARENT_POLL_S = 0.05
#: Extra time Hypercorn gives connections beyond our drain deadline, so that it never cancels a
#: connection before the drain has closed it properly.
GRACE_MARGIN_S = CLOSE_GRACE_S + 10.0

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunMode(enum.Enum):
    LAUNCHER = "launcher"
    HYPERCORN_INPROCESS = "hypercorn-inprocess"
    HYPERCORN_WORKER = "hypercorn-worker"
    EMBEDDED = "embedded"


def detect() -> RunMode:
    """Tell the Hypercorn CLI modes apart; anything else is ``embedded``."""
    if _worker_kwargs() is not None:
        return RunMode.HYPERCORN_WORKER
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    started_by_hypercorn = "hypercorn.__main__" in sys.modules or (
        main_spec is not None and main_spec.name == "hypercorn.__main__"
    )
    if started_by_hypercorn and multiprocessing.parent_process() is None:
        return RunMode.HYPERCORN_INPROCESS
    return RunMode.EMBEDDED


def _worker_kwargs() -> dict[str, Any] | None:
    """The keyword arguments Hypercorn's parent gave this worker, if this is a CLI worker.

    ``BaseProcess._kwargs`` is private to CPython's multiprocessing; Hypercorn passes
    ``config``, ``sockets`` and ``shutdown_event`` (hypercorn/run.py ``_populate``).
    """
    if multiprocessing.parent_process() is None:
        return None
    kwargs = getattr(multiprocessing.current_process(), "_kwargs", None)
    if isinstance(kwargs, dict) and "shutdown_event" in kwargs and "config" in kwargs:
        return kwargs
    return None


def worker_count() -> int:
    kwargs = _worker_kwargs()
    return int(getattr(kwargs["config"], "workers", 1)) if kwargs is not None else 1


def prepare_worker(settings: Settings) -> None:
    """Adjust this CLI worker's Hypercorn config so the drain can run to its deadline."""
    kwargs = _worker_kwargs()
    if kwargs is None:
        return
    config = kwargs["config"]
    needed = settings.drain_timeout + GRACE_MARGIN_S
    if float(config.graceful_timeout) < needed:
        LOGGER.info(
            "raising this worker's graceful_timeout from %gs to %gs so the drain can finish",
            config.graceful_timeout,
            needed,
        )
        config.graceful_timeout = needed
    # Hypercorn reads the limit for each new connection: this bounds what it buffers (16 MiB by
    # default); the app closes anything over max_message_size itself, in every mode.
    config.websocket_max_message_size = settings.transport_max_message_size


def prepare_process() -> None:
    """At import of ``trio_ws.app``, before Hypercorn calls ``trio.run``.

    With ``--workers 0`` the drain hands shutdown back to Hypercorn with a SIGINT, which trio
    turns into KeyboardInterrupt only if SIGINT had Python's default handler when ``trio.run``
    started. A process started in the background by a shell inherits SIGINT *ignored*; restore
    the default so the hand-over works (trio_ws owns SIGINT anyway while it serves).
    """
    if detect() is not RunMode.HYPERCORN_INPROCESS:
        return
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        LOGGER.info("SIGINT was inherited as ignored: restored, for the hand-over after a drain")


def on_signal(hub: Hub, signum: int) -> None:
    """Signals in every mode: drain, then force, then (SIGINT once more) exit at once."""
    if signum == signal.SIGINT and hub.state is HubState.STOPPED:
        LOGGER.warning("SIGINT after the drain: exiting now, without waiting for sockets")
        os._exit(130)
    hub.handle_signal(signum)


#: Exit status when the server cannot start (an unreachable broker), as for a port in use.
EXIT_STARTUP_FAILED = 1


def exit_at_startup(reason: str) -> NoReturn:
    """Stop the process before it serves anyone: one log line, exit status 1.

    A hard exit, because an exception in the lifespan startup is logged by Quart with a
    traceback and then Hypercorn serves anyway, without the broker.
    """
    LOGGER.error("cannot start: %s", reason)
    logging.shutdown()
    os._exit(EXIT_STARTUP_FAILED)


def exit_watchdog_s(settings: Settings) -> float:
    """How long the process may take to exit once the drain is over.

    Normally it takes well under a second. What can hold it is a send to a client that stopped
    reading (Hypercorn's socket send cannot be cancelled), which TCP_USER_TIMEOUT ends.
    """
    return (settings.stall_timeout or 60.0) + 10.0


async def exit_watchdog(hub: Hub, seconds: float) -> None:
    """Run beside the server; cancelled when it exits normally. A last resort."""
    await hub.wait_stopped()
    await trio.sleep(seconds)
    LOGGER.warning("still running %gs after the drain ended: exiting now", seconds)
    os._exit(0)


def log_startup(mode: RunMode, settings: Settings, *, version: str) -> None:
    workers = worker_count()
    LOGGER.info(
        "trio_ws %s starting: mode=%s pid=%d workers=%d %s",
        version,
        mode.value,
        os.getpid(),
        workers,
        settings.describe(),
    )
    if mode is RunMode.HYPERCORN_WORKER:
        LOGGER.warning(
            "mode hypercorn-worker: during a drain Hypercorn's parent closes this worker's "
            "listener, so new connections (and /health, /ready) go unanswered instead of "
            "getting 1001 or 503, and a second SIGINT sent to the parent alone cannot force the "
            "close (signal the process group); run `python -m trio_ws` or "
            "`hypercorn --workers 0` to avoid both"
        )
    if workers > 1 and settings.redis_url is None:
        LOGGER.warning(
            "%d Hypercorn workers without a broker: broadcasts reach only this worker's "
            "clients; set TRIO_WS_REDIS_URL so that every worker shares every broadcast",
            workers,
        )
    if mode is RunMode.EMBEDDED:
        LOGGER.info("mode embedded: signals are left to the host, which starts the drain")


async def own_signals(hub: Hub, mode: RunMode) -> None:
    """Run in the app's nursery in the Hypercorn CLI modes: turn signals into the drain.

    In the worker mode this also watches Hypercorn's shutdown Event, and when the drain was
    started by a signal to this worker alone, asks the parent to stop afterwards (a worker
    that simply exited would be respawned by the parent).
    In the in-process mode the receiver is closed after the drain and a SIGINT hands shutdown
    back to Hypercorn.
    """
    kwargs = _worker_kwargs()
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:

            async def forward_signals() -> None:
                async for signum in signals:
                    on_signal(hub, signum)

            nursery.start_soon(forward_signals)
            if kwargs is not None:
                nursery.start_soon(_watch_parent, hub, kwargs["shutdown_event"])
            await hub.wait_stopped()
            if kwargs is not None and not kwargs["shutdown_event"].is_set():
                _stop_parent()
            if mode is RunMode.HYPERCORN_WORKER:
                # Keep the receiver open until the process ends: a SIGTERM still pending when it
                # closes would be re-raised under the default action and kill the worker.
                await trio.sleep_forever()
            nursery.cancel_scope.cancel()
    if mode is RunMode.HYPERCORN_INPROCESS:
        LOGGER.info("drain over: handing shutdown back to Hypercorn")
        # run_sync_soon runs the callback from trio's own loop, so the KeyboardInterrupt that
        # trio makes of the SIGINT reaches Hypercorn's main task rather than this task.
        trio.lowlevel.current_trio_token().run_sync_soon(signal.raise_signal, signal.SIGINT)


async def _watch_parent(hub: Hub, shutdown_event: Any) -> None:
    # multiprocessing's Event has no async wait; Hypercorn polls it the same way.
    while not shutdown_event.is_set():  # noqa: ASYNC110
        await trio.sleep(PARENT_POLL_S)
    if not hub.draining:
        LOGGER.info("Hypercorn is shutting down (its parent got SIGTERM or SIGINT)")
        hub.request_drain("hypercorn shutdown")


def _stop_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:
        return
    LOGGER.info("drain began with a signal to this worker only: asking Hypercorn to stop")
    with contextlib.suppress(ProcessLookupError):
        os.kill(parent.pid, signal.SIGTERM)
