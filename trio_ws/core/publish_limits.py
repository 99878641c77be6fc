"""Per-connection publish limits: token buckets for messages and bytes a second.

Theory of operation:

* A :class:`TokenBucket` holds up to ``capacity`` tokens and gains ``rate`` a second.
  :meth:`TokenBucket.take` always takes what it is asked for, going into debt if it must, and
  returns how long the caller must wait until the debt is paid: 0 when the tokens were there.
  Time is a parameter (``now``), so the bucket is pure and its tests need no clock.
* A :class:`PublishLimit` is one connection's pair of buckets (messages, bytes). The shell's
  reader calls :meth:`PublishLimit.admit` before it publishes each message the client sent:
  over the limit, the reader sleeps until the tokens are back and reads nothing meanwhile, so
  the client's TCP window fills and the kernel slows the client down. A message counts once,
  whatever the number of clients it reaches.
* A client that stays over its limit for :data:`THROTTLED_CLOSE_AFTER_S` seconds in a row (each
  message it sent in that time had to wait) is abusive: ``admit`` returns False and the shell
  sends an ``error`` frame and closes it with 1008. A person chatting never waits at all; a
  paste of a hundred lines waits a few seconds, then the bucket refills.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from trio_ws.settings import Settings

#: Seconds a client may stay over its publish limit, throttled, before it is closed with 1008.
THROTTLED_CLOSE_AFTER_S = 10.0

#: The reason in the close frame of a client closed for staying over its limit.
RATE_LIMITED_REASON = "publish rate limit exceeded"


class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` a second; ``rate`` 0 means no limit."""

    __slots__ = ("_at", "_tokens", "capacity", "rate")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self._tokens = capacity
        self._at = now

    def take(self, n: float, now: float) -> float:
        """Take ``n`` tokens (into debt if there are fewer); return the seconds until the
        balance is back to zero: 0.0 if no wait is needed."""
        if self.rate <= 0:
            return 0.0
        elapsed = max(0.0, now - self._at)
        self._at = max(self._at, now)
        tokens = min(self.capacity, self._tokens + elapsed * self.rate) - n
        self._tokens = tokens
        return 0.0 if tokens >= 0 else -tokens / self.rate


@dataclass(frozen=True, slots=True)
class PublishPolicy:
    """What one connection may publish: ``rate`` messages a second with bursts of ``burst``,
    and ``bytes_rate`` bytes a second with bursts of ``bytes_burst``; a rate of 0 is no limit."""

    rate: float
    burst: int
    bytes_rate: int
    bytes_burst: int
    close_after_s: float = THROTTLED_CLOSE_AFTER_S

    @classmethod
    def from_settings(cls, settings: Settings) -> PublishPolicy:
        """The byte bucket holds one second of ``publish_bytes_rate``, and at least one message
        of the largest size allowed, so any single message passes at once after a pause."""
        return cls(
            rate=settings.publish_rate,
            burst=max(1, settings.publish_burst),
            bytes_rate=settings.publish_bytes_rate,
            bytes_burst=max(settings.publish_bytes_rate, settings.max_message_size),
        )

    @property
    def enabled(self) -> bool:
        return self.rate > 0 or self.bytes_rate > 0


class PublishLimit:
    """One connection's publish limit: a message bucket, a byte bucket, and how long the
    client has been over them without a break."""

    __slots__ = ("_bytes", "_messages", "policy", "throttled_since")

    def __init__(self, policy: PublishPolicy, now: float) -> None:
        self.policy = policy
        self._messages = TokenBucket(policy.rate, policy.burst, now)
        self._bytes = TokenBucket(policy.bytes_rate, policy.bytes_burst, now)
        #: When the client's current run of throttled messages began (None: not throttled).
        self.throttled_since: float | None = None

    def take(self, size: int, now: float) -> float:
        """Count one message of ``size`` bytes; return the seconds to wait before publishing it
        (0.0: at once)."""
        wait = max(self._messages.take(1, now), self._bytes.take(size, now))
        if wait <= 0:
            self.throttled_since = None
        elif self.throttled_since is None:
            self.throttled_since = now
        return wait

    def abusive(self, now: float) -> bool:
        """Whether the client has been over its limit for ``close_after_s`` without a break."""
        since = self.throttled_since
        return since is not None and now - since >= self.policy.close_after_s

    async def admit(self, size: int) -> bool:
        """Wait until a message of ``size`` bytes may be published; False (at once) if the
        client has been over its limit for too long and must be closed."""
        now = trio.current_time()
        wait = self.take(size, now)
        if wait <= 0:
            return True
        if self.abusive(now):
            return False
        await trio.sleep(wait)
        return True
