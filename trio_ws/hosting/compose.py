"""Settings -> broker -> hub -> app: the one place where the parts of a server are put together,
and the start-up and shutdown every run mode shares."""

from __future__ import annotations

import gc
import logging
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from trio_ws import __version__
from trio_ws.brokers.local import LocalBroker
from trio_ws.core.broker import BrokerUnavailableError
from trio_ws.core.drain import CLOSE_GRACE_S
from trio_ws.core.hub import Hub
from trio_ws.core.tokens import policy_from_settings
from trio_ws.hosting import fdlimit, hypercorn_cli, metrics, metrics_server, modes, signals
from trio_ws.hosting.logs import configure_logging, set_instance
from trio_ws.hosting.modes import RunMode
from trio_ws.hosting.sockets import tune_listeners
from trio_ws.settings import Settings, stream_entry_bytes
from trio_ws.shell import hypercorn_guard, hypercorn_limits
from trio_ws.shell.app import TrioWsApp, create_app
from trio_ws.shell.sinks import DirectPath

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

    from trio_ws.core.broker import Broker

LOGGER = logging.getLogger(__name__)

#: How long the lifespan's shutdown waits for the broker to leave the cluster (a Redis command).
LEAVE_TIMEOUT_S = 5.0


def create_broker(settings: Settings) -> Broker:
    """The broker the settings ask for: Redis with ``redis_url``, else in-process."""
    if settings.redis_url is None:
        # A resuming client gets at most half a queue of history: keep no more than a queue.
        return LocalBroker(history_size=settings.queue_size)
    # Imported here: a single process never loads coredis.
    from trio_ws.brokers.redis import RedisBroker

    return RedisBroker(
        settings.redis_url,
        prefix=settings.redis_prefix,
        stream_maxlen=settings.redis_stream_entries,
        stream_max_bytes=settings.redis_stream_max_bytes,
        pending_max_bytes=settings.redis_pending_max_bytes,
        max_entry_bytes=stream_entry_bytes(settings.max_message_size),
    )


def create_hub(settings: Settings) -> Hub:
    token_policy = policy_from_settings(settings, lambda path: Path(path).read_text())
    return Hub(settings, broker=create_broker(settings), token_policy=token_policy)


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a server's steady state.

    Everything built at startup (modules, the app) is moved out of the collector's sight
    (``gc.freeze``), and the youngest generation is collected every 10,000 allocations instead
    of 700: a broadcast allocates a little per client, and frequent young collections that find
    nothing cost a quarter of the CPU per delivery at 1,000 clients (bench/run.py, fanout1000,
    measured before write-through with a threshold of 50,000: 26.8 -> 20.2 us). 50,000 saved no
    more CPU than 10,000 and made each collection a pause long enough to show in connect p99
    (11 ms against 3 ms). Reference cycles are still collected, just less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)
    LOGGER.info("garbage collector: startup objects frozen, thresholds %s", gc.get_threshold())


def build_app(
    settings: Settings | None = None,
    *,
    hub: Hub | None = None,
    run_mode: RunMode | None = None,
    direct_writes: bool = True,
) -> TrioWsApp:
    """The whole server as an ASGI app. Without arguments it reads ``TRIO_WS_*`` and detects
    the run mode (this is ``trio_ws.app:app``).

    Errors: :class:`trio_ws.SettingsError` for an invalid environment variable.
    """
    if settings is None:
        settings = Settings.from_env(os.environ)
    configure_logging(settings.log_level_number, settings.log_format)
    try:
        # Before anything is served, in every run mode: without it one client can stop the
        # server (docs/design/hypercorn.md, "Errors inside Hypercorn").
        hypercorn_guard.install()
        # And without this one a client can fill the memory (docs/design/hypercorn.md, "The
        # message-size limit").
        hypercorn_limits.install()
    except (hypercorn_guard.HypercornGuardError, hypercorn_limits.HypercornLimitsError) as error:
        signals.exit_at_startup(str(error))
    hub = hub if hub is not None else create_hub(settings)
    set_instance(hub.instance_id)
    app = create_app(hub, lifespan=partial(_lifespan, settings, hub, run_mode))
    app.direct = DirectPath(enabled=direct_writes)
    return app


async def _lifespan(
    settings: Settings, hub: Hub, run_mode: RunMode | None, app: TrioWsApp
) -> AsyncGenerator[None, None]:
    """Start-up and shutdown around serving, in every mode."""
    mode = run_mode or hypercorn_cli.detect() or RunMode.EMBEDDED
    app.run_mode = mode
    modes.log_startup(mode, settings, version=__version__, workers=hypercorn_cli.worker_count())
    under_cli = mode in (RunMode.HYPERCORN_WORKER, RunMode.HYPERCORN_INPROCESS)
    if under_cli:
        config = hypercorn_cli.worker_config()
        if config is not None:
            needed = settings.drain_timeout + modes.GRACE_MARGIN_S
            modes.configure_hypercorn(config, settings, graceful_timeout_s=needed)
        tune_listeners(settings)
    # Before the first connection: the cap must fit under the file limit.
    fdlimit.apply_file_limit(hub.admission)
    tune_gc()
    if settings.metrics_port:
        await _start_metrics(settings, hub, app, mode)
    try:
        await app.nursery.start(hub.run)
    except* BrokerUnavailableError as group:
        if mode is RunMode.EMBEDDED:
            raise
        signals.exit_at_startup(str(group.exceptions[0]))
    if under_cli:
        app.nursery.start_soon(hypercorn_cli.own_signals, hub, mode)
        app.nursery.start_soon(signals.exit_watchdog, hub.drain, signals.exit_watchdog_s(settings))
    yield
    # Lifespan shutdown: normally the drain is long over. Under Hypercorn's command line an idle
    # worker can get here before its own watcher starts the drain (both poll the parent's
    # shutdown event): with nobody connected that drain is just quick. A host that shuts down
    # with clients and without a drain (an embedding test, a custom runner) still gets every
    # client closed with 1001.
    if not hub.drain.requested and len(hub.registry) == 0:
        hub.request_drain("lifespan shutdown")
    elif not hub.drain.stopped:
        hub.force_close("lifespan shutdown before a drain")
    # Then wait for the hub to finish, leaving the cluster included: Quart cancels the app's
    # tasks (the broker's among them) as soon as this returns.
    with trio.move_on_after(CLOSE_GRACE_S + LEAVE_TIMEOUT_S):
        await hub.wait_finished()


async def _start_metrics(settings: Settings, hub: Hub, app: TrioWsApp, mode: RunMode) -> None:
    """Serve /metrics beside the app until the process ends (docs/metrics.md). Under
    ``--workers N`` every worker shares its figures with the one that holds the port."""
    folder = None
    if mode is RunMode.HYPERCORN_WORKER:
        folder = metrics_server.group_folder()
        if not metrics_server.prepare_folder(folder):
            folder = None
    sources = metrics.Sources(
        hub, limits=app.websocket_limits, loop_lag=metrics.LoopLag(), mode=mode.value
    )
    server = metrics_server.MetricsServer(settings, sources, folder=folder)
    app.metrics = server
    try:
        await app.nursery.start(server.run)
    except* metrics_server.MetricsBindError as group:
        if mode is RunMode.EMBEDDED:
            raise
        error = group.exceptions[0]
        signals.exit_at_startup(getattr(error, "strerror", None) or str(error))
