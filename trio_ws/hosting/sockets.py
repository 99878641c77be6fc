"""Socket options the server needs and Hypercorn does not set.

``TCP_USER_TIMEOUT`` bounds how long sent data may stay unacknowledged. Hypercorn's socket send
is shielded from cancellation, so without it a client that stops reading can hold its
connection's send (and the process's exit) for as long as the kernel keeps retrying, which is
many minutes. Accepted sockets inherit the option from the listening socket, so setting it once
on each listener covers every connection.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trio_ws.settings import Settings

LOGGER = logging.getLogger(__name__)

_FD_DIR = "/proc/self/fd"


def set_stall_timeout_on_listeners(timeout_s: float) -> int:
    """Set ``TCP_USER_TIMEOUT`` on every listening TCP socket of this process; return how many.

    The listeners are found through ``/proc/self/fd`` because in Hypercorn's CLI modes they are
    created by Hypercorn (in the parent process, for workers). Linux only; elsewhere returns 0.
    """
    if timeout_s <= 0 or not hasattr(socket, "TCP_USER_TIMEOUT") or not os.path.isdir(_FD_DIR):
        return 0
    milliseconds = max(1, round(timeout_s * 1000))
    tuned = 0
    for name in os.listdir(_FD_DIR):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            # A dup shares the open socket, so an option set on it applies to the original.
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue  # closed meanwhile (the fd of os.listdir itself, for one)
        with sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            if sock.type != socket.SOCK_STREAM:
                continue
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, milliseconds)
            tuned += 1
    return tuned


def tune_listeners(settings: Settings) -> int:
    """Set ``stall_timeout`` as TCP_USER_TIMEOUT on this process's listeners, with a log line."""
    tuned = set_stall_timeout_on_listeners(settings.stall_timeout)
    LOGGER.info("TCP_USER_TIMEOUT %gs set on %d listeners", settings.stall_timeout, tuned)
    return tuned
