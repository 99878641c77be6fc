"""``Throttle``: at most one log line per interval for a repeated event, with a count."""

from __future__ import annotations

import math


class Throttle:
    """Counts events; says when a line is due (the first event, then at most one per
    ``interval_s``) and how many events it covers. Pure: the caller passes the time."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._next_at = -math.inf
        self._count = 0

    def event(self, now: float) -> int | None:
        """Count one event at ``now``; return the events since the last line, this one
        included, if a line is due now, else None."""
        self._count += 1
        if now < self._next_at:
            return None
        count, self._count = self._count, 0
        self._next_at = now + self.interval_s
        return count

    @property
    def pending(self) -> int:
        """Events counted since the last line."""
        return self._count
