"""The signal policy, the same in every run mode that owns signals.

* The first SIGTERM or SIGINT starts the drain.
* During the drain a second SIGINT (an operator's Ctrl+C) closes every client now; a repeated
  SIGTERM does not, because process managers repeat it (Hypercorn's parent sends it to its
  workers more than once) without meaning "now".
* After the drain, a SIGINT exits at once, without waiting for sockets.

Also here: the last-resort exit watchdog, and the exit for a server that cannot start.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING, NoReturn

import trio

if TYPE_CHECKING:
    from trio_ws.core.drain import Drain
    from trio_ws.settings import Settings

LOGGER = logging.getLogger(__name__)

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)

#: Exit status when the server cannot start (an unreachable broker), as for a port in use.
EXIT_STARTUP_FAILED = 1


def on_signal(drain: Drain, signum: int) -> None:
    name = signal.Signals(signum).name
    if not drain.requested:
        LOGGER.info("received %s: starting the drain", name)
        drain.request(name)
    elif drain.stopped:
        if signum == signal.SIGINT:
            LOGGER.warning("SIGINT after the drain: exiting now, without waiting for sockets")
            logging.shutdown()
            os._exit(130)
        LOGGER.info("received %s after the drain: the process is already stopping", name)
    elif signum == signal.SIGINT:
        drain.force(f"received a second {name}")
    else:
        LOGGER.info("received %s again: the drain goes on", name)


async def forward_signals(drain: Drain, *, task_status: trio.TaskStatus[None]) -> None:
    """Apply the policy to SIGTERM and SIGINT until cancelled.

    Keep it running until the process ends: a signal still pending when the receiver closes
    would be re-raised under its default action and kill the process.
    """
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            on_signal(drain, signum)


def exit_watchdog_s(settings: Settings) -> float:
    """How long the process may take to exit once the drain is over.

    Normally it takes well under a second. What can hold it is a send to a client that stopped
    reading (Hypercorn's socket send cannot be cancelled), which TCP_USER_TIMEOUT ends.
    """
    return (settings.stall_timeout or 60.0) + 10.0


async def exit_watchdog(drain: Drain, seconds: float) -> None:
    """Run beside the server; cancelled when it exits normally. A last resort."""
    await drain.wait_stopped()
    await trio.sleep(seconds)
    LOGGER.warning("still running %gs after the drain ended: exiting now", seconds)
    logging.shutdown()
    os._exit(0)


def exit_at_startup(reason: str) -> NoReturn:
    """Stop the process before it serves anyone: one log line, exit status 1.

    A hard exit, because an exception in the lifespan startup is logged by Quart with a
    traceback and then Hypercorn serves anyway, without the broker.
    """
    LOGGER.error("cannot start: %s", reason)
    logging.shutdown()
    os._exit(EXIT_STARTUP_FAILED)
