"""Connection limits: how many WebSockets this process holds, per client address, and how fast
one address may open them.

Theory of operation: the ``/ws`` endpoint asks :meth:`Admission.admit` once per handshake,
after accepting it and before registering the client; the answer is ``None`` (admitted: the
endpoint must call :meth:`Admission.release` however the connection ends) or the limit that
refused it (the endpoint closes with 1013 Try Again Later). Three limits, checked in this order:

* ``max_connections``: WebSockets held by this process (admitted and not yet released);
* ``handshake_rate_per_ip``: a token bucket per client address, refilled at that rate and
  holding one second of it (at least one token); every attempt that gets this far takes a
  token, refused or not, so an address that keeps hammering stays refused;
* ``max_connections_per_ip``: WebSockets held per client address.

The per-address limits are off at 0. Addresses are counted as :func:`address_key` says: an IPv4
address, or the /64 an IPv6 address belongs to (one host usually owns a whole /64).

Memory is bounded by traffic, not by history: an address is forgotten when its last connection
is released, and its bucket as soon as the bucket would be full again (a full bucket and no
bucket are the same thing). Time comes from trio's clock (tests use MockClock). Refusals are
counted by limit for ``/health`` and logged at most once per ``log_every_s``, with a count, so
that a flood of refusals is not a flood of log lines.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from trio_ws.core.throttle import Throttle
from trio_ws.core.words import plural

if TYPE_CHECKING:
    from collections.abc import Callable

LOGGER = logging.getLogger(__name__)

#: How often refusals are logged (with their count), at most.
REFUSAL_LOG_EVERY_S = 10.0


class Limit(enum.Enum):
    """The limit that refused a connection; the value is its name in /health and the logs."""

    MAX_CONNECTIONS = "max_connections"
    MAX_CONNECTIONS_PER_IP = "max_connections_per_ip"
    HANDSHAKE_RATE_PER_IP = "handshake_rate_per_ip"

    @property
    def close_reason(self) -> str:
        """The close frame's reason (1013): what the client may do about it."""
        return _CLOSE_REASONS[self]


_CLOSE_REASONS = {
    Limit.MAX_CONNECTIONS: "server at its connection limit; retry later, with backoff",
    Limit.MAX_CONNECTIONS_PER_IP: "too many connections from your address; retry later",
    Limit.HANDSHAKE_RATE_PER_IP: "too many connection attempts from your address; retry later",
}


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    #: WebSockets this process holds at most (>= 1).
    max_connections: int
    #: WebSockets one address holds at most; 0: no limit.
    max_connections_per_ip: int = 0
    #: Handshakes per second one address may start, on average; 0: no limit.
    handshake_rate_per_ip: float = 0.0

    @property
    def burst(self) -> float:
        """Handshakes one address may start at once: one second's worth, at least one."""
        return max(1.0, self.handshake_rate_per_ip)


@functools.lru_cache(maxsize=4096)  # parsing is most of a fast handshake's limit check
def address_key(host: str) -> str:
    """What the per-address limits count: the IPv4 address (also inside an IPv4-mapped IPv6
    one), the /64 of an IPv6 address; anything else (a Unix socket's name) as it is."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class TokenBuckets:
    """One token bucket per key, refilled at ``rate`` per second up to ``burst`` tokens.

    Buckets are kept in the order they were last used; the oldest are dropped as soon as they
    are full, so only the keys used within the last ``burst / rate`` seconds are remembered.
    """

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        #: key -> (tokens left, when they were counted); insertion order is last use.
        self._buckets: dict[str, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> bool:
        """Take one token from ``key``'s bucket; False (and nothing taken) if it has none."""
        self._forget_full(now)
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        taken = tokens >= 1.0
        if taken:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        return taken

    def _forget_full(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            key = next(iter(buckets))
            tokens, at = buckets[key]
            if tokens + (now - at) * self.rate < self.burst:
                return
            del buckets[key]


class Admission:
    """The connection limits of one process: admit, release, and count the refusals."""

    def __init__(
        self,
        policy: LimitPolicy,
        *,
        clock: Callable[[], float] = trio.current_time,
        log_every_s: float = REFUSAL_LOG_EVERY_S,
    ) -> None:
        self.policy = policy
        self._clock = clock
        #: WebSockets admitted and not yet released.
        self.active = 0
        self._per_key: dict[str, int] = {}
        self._buckets = (
            TokenBuckets(policy.handshake_rate_per_ip, policy.burst)
            if policy.handshake_rate_per_ip > 0
            else None
        )
        self.refused: Counter[Limit] = Counter()
        self._log = Throttle(log_every_s)
        self._unlogged: Counter[Limit] = Counter()

    def lower_max_connections(self, max_connections: int) -> None:
        """Lower the per-process cap (the host does, when the file limit is too low for it)."""
        if 1 <= max_connections < self.policy.max_connections:
            self.policy = LimitPolicy(
                max_connections,
                self.policy.max_connections_per_ip,
                self.policy.handshake_rate_per_ip,
            )

    @property
    def full(self) -> bool:
        """True while a new connection would be refused for ``max_connections``."""
        return self.active >= self.policy.max_connections

    def tracked_addresses(self) -> int:
        """Addresses remembered (connected ones, and buckets not yet full): bounded by traffic."""
        return len(self._per_key) + (len(self._buckets) if self._buckets is not None else 0)

    def admit(self, key: str, peer: str = "") -> Limit | None:
        """Admit one connection from address ``key`` (see :func:`address_key`), or say which
        limit refuses it. An admitted connection must be :meth:`release`\\ d exactly once."""
        policy = self.policy
        refusal: Limit | None = None
        if self.active >= policy.max_connections:
            refusal = Limit.MAX_CONNECTIONS
        elif self._buckets is not None and not self._buckets.take(key, self._clock()):
            refusal = Limit.HANDSHAKE_RATE_PER_IP
        elif 0 < policy.max_connections_per_ip <= self._per_key.get(key, 0):
            refusal = Limit.MAX_CONNECTIONS_PER_IP
        if refusal is not None:
            self._refused(refusal, peer or key)
            return refusal
        self.active += 1
        self._per_key[key] = self._per_key.get(key, 0) + 1
        return None

    def release(self, key: str) -> None:
        """The connection admitted for ``key`` has ended."""
        count = self._per_key.get(key, 0)
        if count <= 0:
            raise RuntimeError(f"release without admit for {key!r}")
        self.active -= 1
        if count == 1:
            del self._per_key[key]
        else:
            self._per_key[key] = count - 1

    def refused_report(self) -> dict[str, int]:
        return {limit.value: self.refused[limit] for limit in Limit}

    def _refused(self, limit: Limit, peer: str) -> None:
        self.refused[limit] += 1
        self._unlogged[limit] += 1
        count = self._log.event(self._clock())
        if count is None:
            return
        counts = ", ".join(f"{n} {limit.value}" for limit, n in self._unlogged.items())
        self._unlogged.clear()
        if count == 1:
            LOGGER.warning(
                "refused a connection from %s over the connection limits (%s): closed with "
                "1013; further refusals are logged at most every %gs, with a count",
                peer,
                counts,
                self._log.interval_s,
            )
        else:
            LOGGER.warning(
                "refused %s over the connection limits since the last such line (%s), the "
                "latest from %s; %d connections held",
                plural(count, "connection"),
                counts,
                peer,
                self.active,
            )
