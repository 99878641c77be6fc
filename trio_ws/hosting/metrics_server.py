"""The ``/metrics`` server: a small trio task on its own port, and under ``--workers N`` the
snapshots that let one worker answer for the whole process group.

Theory of operation:

* **Serving** (:class:`MetricsServer`): ``TRIO_WS_METRICS_HOST:PORT``, loopback by default:
  ``/metrics`` has no authentication, so it is not on the public port. ``GET /metrics`` only;
  each scrape reads the figures at that moment (:func:`trio_ws.hosting.metrics.collect`).
* **Several workers** (``hypercorn --workers N``): every worker writes a snapshot of its
  figures (JSON) to a folder it shares with its siblings, once a second; the worker that holds
  the metrics port (the first to bind it; another takes over within seconds if it exits)
  answers a scrape with its own live figures merged with its live siblings' snapshots
  (:func:`trio_ws.hosting.metrics.merge`). ``docs/design/metrics.md`` says why this rather
  than prometheus-client's multiprocess mode.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from trio_ws.hosting.metrics import Family, Sources, collect, from_json, merge, render, to_json

if TYPE_CHECKING:
    from trio_ws.settings import Settings

LOGGER = logging.getLogger(__name__)

#: How often a worker writes its snapshot for the worker that serves the port.
SNAPSHOT_EVERY_S = 1.0
#: A sibling's snapshot older than this is left out (its worker is stuck or gone).
SNAPSHOT_STALE_S = 15.0
#: How often a worker that could not bind the metrics port tries again (its holder may exit).
REBIND_EVERY_S = 2.0
#: Most bytes of a scrape's request head; a request gets this long to arrive.
MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT_S = 5.0


# -- several workers ------------------------------------------------------------------------


def group_folder() -> Path:
    """Where the workers of one Hypercorn parent leave their snapshots: named after the parent."""
    return Path(tempfile.gettempdir()) / f"trio_ws-metrics-{os.getuid()}-{os.getppid()}"


def prepare_folder(folder: Path) -> bool:
    """Create ``folder`` (mode 0700), and check it is ours alone: another user's folder could
    feed us false figures. False (with an error line) if it is not usable."""
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    try:
        info = folder.lstat()
    except OSError as error:
        LOGGER.error("metrics: cannot use %s (%s): this worker's figures only", folder, error)
        return False
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        LOGGER.error(
            "metrics: %s is not a private folder of this user: this worker's figures only", folder
        )
        return False
    return True


def write_snapshot(folder: Path, families: list[Family]) -> None:
    path = folder / f"{os.getpid()}.json"
    temporary = folder / f".{os.getpid()}.tmp"
    temporary.write_text(to_json(families))
    temporary.replace(path)  # atomic: a reader never sees half a snapshot


def remove_snapshot(folder: Path) -> None:
    """This worker's snapshot, and the folder if it was the last one in it."""
    with contextlib.suppress(OSError):
        (folder / f"{os.getpid()}.json").unlink(missing_ok=True)
        folder.rmdir()


def read_siblings(folder: Path, *, now: float | None = None) -> list[list[Family]]:
    """The other live workers' latest snapshots; those of exited workers are removed."""
    now = time.time() if now is None else now
    groups = []
    for path in folder.glob("*.json"):
        try:
            pid = int(path.stem)
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        if not _alive(pid):
            path.unlink(missing_ok=True)
            continue
        try:
            if now - path.stat().st_mtime > SNAPSHOT_STALE_S:
                continue
            groups.append(from_json(path.read_text()))
        except (OSError, ValueError) as error:
            LOGGER.debug("metrics: skipped snapshot %s: %r", path, error)
    return groups


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- the task -------------------------------------------------------------------------------


class MetricsBindError(OSError):
    """The metrics port could not be bound (and no sibling worker may hold it)."""


@dataclass(slots=True)
class MetricsServer:
    """What one process does for /metrics: measure, snapshot, and maybe serve."""

    settings: Settings
    sources: Sources
    #: The folder shared with sibling workers, or None for a single process.
    folder: Path | None = None
    #: Where it listens once bound (host, port), for tests and the log line.
    address: tuple[str, int] | None = None

    def scrape(self) -> bytes:
        groups = [collect(self.sources)]
        if self.folder is not None:
            groups.extend(read_siblings(self.folder))
        return render(merge(groups))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Measure the loop lag, keep the snapshot fresh (several workers), serve the port.

        Errors: :class:`MetricsBindError` before ``started`` if the port cannot be bound and
        no sibling worker can be holding it.
        """
        async with trio.open_nursery() as nursery:
            if self.sources.loop_lag is not None:
                nursery.start_soon(self.sources.loop_lag.run)
            if self.folder is None:
                listeners = await self._bind()
                task_status.started()
                await self._serve(listeners)
            else:
                nursery.start_soon(self._keep_snapshot, self.folder)
                task_status.started()
                await self._serve_when_free()

    async def _bind(self) -> list[trio.SocketListener]:
        settings = self.settings
        try:
            listeners = await trio.open_tcp_listeners(
                settings.metrics_port, host=settings.metrics_host
            )
        except OSError as error:
            raise MetricsBindError(
                error.errno, f"cannot serve /metrics on {settings.metrics_description}: {error}"
            ) from error
        sockname = listeners[0].socket.getsockname()
        self.address = (sockname[0], sockname[1])
        LOGGER.info("metrics on %s", settings.metrics_description)
        return listeners

    async def _serve_when_free(self) -> None:
        """Several workers: the first to bind serves; the others try again now and then."""
        said = False
        while True:
            try:
                listeners = await self._bind()
            except MetricsBindError as error:
                if error.errno != errno.EADDRINUSE:
                    LOGGER.error("%s; trying again every %gs", error.strerror, REBIND_EVERY_S)
                elif not said:
                    LOGGER.info(
                        "metrics port %d held by another worker (or process): this worker's "
                        "figures reach it through %s",
                        self.settings.metrics_port,
                        self.folder,
                    )
                said = True
                await trio.sleep(REBIND_EVERY_S)
                continue
            await self._serve(listeners)

    async def _keep_snapshot(self, folder: Path) -> None:
        try:
            while True:
                try:
                    write_snapshot(folder, collect(self.sources))
                except OSError as error:
                    LOGGER.warning("metrics: cannot write a snapshot in %s: %r", folder, error)
                await trio.sleep(SNAPSHOT_EVERY_S)
        finally:
            remove_snapshot(folder)

    async def _serve(self, listeners: list[trio.SocketListener]) -> None:
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                with contextlib.suppress(trio.BrokenResourceError):
                    await self._answer(stream)

    async def _answer(self, stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            head += chunk
            if len(head) > MAX_REQUEST_BYTES:
                await _respond(stream, 431, b"request head too large\n")
                return
        words = head.split(b"\r\n", 1)[0].split()
        if len(words) != 3 or words[0] not in (b"GET", b"HEAD"):
            await _respond(stream, 405, b"only GET /metrics\n")
            return
        if words[1].split(b"?", 1)[0] != b"/metrics":
            await _respond(stream, 404, b"see /metrics\n")
            return
        body = self.scrape()
        await _respond(
            stream, 200, body, content_type=CONTENT_TYPE_PLAIN_0_0_4, head_only=words[0] == b"HEAD"
        )


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Too Large"}


async def _respond(
    stream: trio.SocketStream,
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    head_only: bool = False,
) -> None:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    await stream.send_all(head if head_only else head + body)
