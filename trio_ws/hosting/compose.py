"""Settings -> broker -> hub: the one place where the parts of a server are put together."""

from __future__ import annotations

import gc
import logging
from typing import TYPE_CHECKING

from trio_ws.brokers.local import LocalBroker
from trio_ws.core.hub import Hub

if TYPE_CHECKING:
    from trio_ws.core.broker import Broker
    from trio_ws.settings import Settings

LOGGER = logging.getLogger(__name__)


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
        stream_maxlen=settings.redis_stream_maxlen,
    )


def create_hub(settings: Settings) -> Hub:
    return Hub(settings, broker=create_broker(settings))


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
