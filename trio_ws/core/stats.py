"""The server's counters as plain numbers: what ``/metrics`` reports, counted where it happens.

Theory of operation: the core counts in plain ``int`` attributes, and nothing else. Reading
them, naming them and formatting them for Prometheus is the hosting layer's job
(``trio_ws/hosting/metrics.py``), done when a scrape asks. The hot path (one broadcast to
thousands of clients) pays a few additions per *broadcast*, never one per delivery: the registry
already returns how many clients took a frame, and the hub adds that number once.

Latency is sampled: one broadcast in :data:`LATENCY_SAMPLE_EVERY` is timed, from its publish
time (the ``ts`` its publisher stamped) to the end of its fan-out here, into a fixed-bucket
:class:`Histogram`.
"""

from __future__ import annotations

import bisect
from collections import Counter

#: One broadcast in this many has its publish-to-write time recorded.
LATENCY_SAMPLE_EVERY = 8

#: Upper bounds (seconds) of the publish-to-write histogram's buckets.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

#: Upper bounds (seconds) of the event-loop lag histogram's buckets.
LOOP_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Counts of observations per bucket (not cumulative), their sum and count. Pure."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        #: ``counts[i]``: observations <= bounds[i] and > bounds[i - 1]; the last is +Inf.
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` for each bucket, +Inf last (Prometheus's form)."""
        total = 0
        result = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            result.append((bound, total))
        return result


class HubStats:
    """What the hub counts. Every attribute only grows (they are Prometheus counters)."""

    __slots__ = (
        "api_publishes",
        "bytes_delivered",
        "closed",
        "deliveries",
        "kicks",
        "last_lag",
        "latency",
        "limits_hit",
        "message_broadcasts",
        "messages_received",
        "periodic_broadcasts",
        "refused",
        "replayed",
        "resumes",
        "resumes_incomplete",
        "token_expiries",
    )

    def __init__(self) -> None:
        #: Text messages clients sent that were handed to the broker.
        self.messages_received = 0
        #: Broadcasts delivered to this process, by kind.
        self.message_broadcasts = 0
        self.periodic_broadcasts = 0
        #: Frames of broadcasts handed to a client's outbox (written at once or queued).
        self.deliveries = 0
        #: Their bytes, as WebSocket frames.
        self.bytes_delivered = 0
        #: Connections that ended, by close code as a string ("none": the client left first).
        self.closed: Counter[str] = Counter()
        #: Connections refused before they were registered, by reason (``origin``, ``token``,
        #: ``id_in_use``, ``bad_request``, ``stale_attempt``; the limits and the drain count
        #: their own).
        self.refused: Counter[str] = Counter()
        #: Per-connection limits that closed a client ("publish_rate", "message_size", ...).
        self.limits_hit: Counter[str] = Counter()
        self.resumes = 0
        self.resumes_incomplete = 0
        self.replayed = 0
        #: Messages ``POST /publish`` took (``accepted``) or answered 503 for (``refused``).
        self.api_publishes: Counter[str] = Counter()
        #: Connections closed by the operator (4503), and for an expired token (4502).
        self.kicks = 0
        self.token_expiries = 0
        self.latency = Histogram(LATENCY_BUCKETS)
        #: The latest sampled publish-to-write time: how far this process runs behind.
        self.last_lag = 0.0


class WriteStats:
    """How frames left the outboxes: shared by every outbox of a hub. Counted by the writer
    tasks, once per batch they write, never per frame offered: a frame written straight through
    adds nothing here (those are about ``deliveries - backlog_frames``)."""

    __slots__ = ("backlog_frames", "batches", "partial")

    def __init__(self) -> None:
        #: Batch writes made by writer tasks to catch up on a queue (one socket write each).
        self.batches = 0
        #: The frames those batches carried.
        self.backlog_frames = 0
        #: Frames the socket took only in part, finished by the writer task.
        self.partial = 0
