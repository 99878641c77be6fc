"""Under Hypercorn's command line: ``hypercorn --worker-class trio trio_ws.app:app``.

Hypercorn hides shutdown from the app (docs/design/hypercorn.md), so each of its modes needs
its own wiring, all of it here:

* ``hypercorn-inprocess`` (``--workers 0``): the app owns SIGTERM/SIGINT while it drains, then
  hands shutdown back to Hypercorn with a SIGINT, which Hypercorn takes as "shut down" (trio
  turns it into KeyboardInterrupt).
* ``hypercorn-worker`` (one or more spawned workers, the default): the parent owns the signals
  and only sets a multiprocessing Event that its workers poll. We poll the same Event, raise the
  worker's ``graceful_timeout`` above the drain deadline so Hypercorn does not cancel
  connections first, and also own SIGTERM/SIGINT in the worker, for signals sent to the whole
  process group (systemd, a terminal's Ctrl+C) and for the parent's ``terminate()`` of workers
  still draining when another worker exits first.

This is the only module that reads ``multiprocessing``'s private attributes: the keyword
arguments Hypercorn's parent gives each worker.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

import trio

from trio_ws.hosting.modes import RunMode
from trio_ws.hosting.signals import SHUTDOWN_SIGNALS, on_signal

if TYPE_CHECKING:
    from hypercorn.config import Config

    from trio_ws.core.hub import Hub

LOGGER = logging.getLogger(__name__)

#: How often a CLI worker checks Hypercorn's shutdown Event (Hypercorn itself checks every 0.1 s).
PARENT_POLL_S = 0.05


def started_by_hypercorn() -> bool:
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return "hypercorn.__main__" in sys.modules or (
        main_spec is not None and main_spec.name == "hypercorn.__main__"
    )


def detect() -> RunMode | None:
    """The Hypercorn CLI mode this process runs in, or None if Hypercorn's CLI did not start it."""
    if _worker_kwargs() is not None:
        return RunMode.HYPERCORN_WORKER
    if started_by_hypercorn() and multiprocessing.parent_process() is None:
        return RunMode.HYPERCORN_INPROCESS
    return None


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


def worker_config() -> Config | None:
    """The Hypercorn config the parent gave this worker (changed in place: Hypercorn reads it for
    each new connection and at shutdown)."""
    kwargs = _worker_kwargs()
    return None if kwargs is None else kwargs["config"]


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
                    on_signal(hub.drain, signum)

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
