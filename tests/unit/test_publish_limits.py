from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from trio_ws.core.publish_limits import (
    THROTTLED_CLOSE_AFTER_S,
    PublishLimit,
    PublishPolicy,
    TokenBucket,
)
from trio_ws.settings import Settings

# (rate, capacity, [(n, now, expected wait), ...]): each bucket starts full at time 0.
BUCKET_CASES = {
    "within the burst: no wait": (10, 20, [(1, 0, 0.0)] * 20),
    "one over the burst: a tenth of a second": (
        10,
        3,
        [(1, 0, 0), (1, 0, 0), (1, 0, 0), (1, 0, 0.1)],
    ),
    "debt adds up": (10, 1, [(1, 0, 0), (1, 0, 0.1), (1, 0, 0.2), (1, 0, 0.3)]),
    "paid back after the wait, then the next one waits": (
        10,
        1,
        [(1, 0, 0), (1, 0, 0.1), (1, 0.1, 0.1)],
    ),
    "refills with time": (10, 2, [(2, 0, 0), (1, 0.1, 0), (1, 0.15, 0.05)]),
    "never holds more than its capacity": (10, 2, [(1, 0, 0), (3, 100, 0.1)]),
    "a message larger than the bucket passes after a wait": (1000, 500, [(2000, 0, 1.5)]),
    "bytes: one second of the rate": (
        65536,
        65536,
        [(65536, 0, 0), (32768, 0.5, 0.0), (1, 0.5, 1 / 65536)],
    ),
    "rate 0: no limit": (0, 1, [(10**9, 0, 0.0)] * 3),
    "a clock that goes back changes nothing": (10, 1, [(1, 5, 0), (1, 4, 0.1)]),
}


@pytest.mark.parametrize("case", BUCKET_CASES.values(), ids=BUCKET_CASES.keys())
def test_token_bucket(case: tuple[float, float, list[tuple[float, float, float]]]) -> None:
    rate, capacity, steps = case
    bucket = TokenBucket(rate, capacity, now=0.0)
    for step, (n, now, expected) in enumerate(steps):
        assert bucket.take(n, now) == pytest.approx(expected), f"step {step}"


POLICY = PublishPolicy(rate=10, burst=20, bytes_rate=65536, bytes_burst=65536)


@pytest.mark.parametrize(
    ("policy", "enabled"),
    [
        (POLICY, True),
        (PublishPolicy(rate=0, burst=20, bytes_rate=1000, bytes_burst=65536), True),
        (PublishPolicy(rate=5, burst=1, bytes_rate=0, bytes_burst=65536), True),
        (PublishPolicy(rate=0, burst=20, bytes_rate=0, bytes_burst=65536), False),
    ],
)
def test_either_rate_enables_the_limit(policy: PublishPolicy, *, enabled: bool) -> None:
    assert policy.enabled is enabled


def test_policy_from_the_default_settings() -> None:
    policy = PublishPolicy.from_settings(Settings())
    assert policy == PublishPolicy(rate=10, burst=20, bytes_rate=65536, bytes_burst=65536)
    small = PublishPolicy.from_settings(Settings(publish_bytes_rate=1000, publish_burst=0))
    # The byte bucket holds at least one message of the largest size; a burst of 0 is 1.
    assert (small.bytes_burst, small.burst) == (65536, 1)


def test_the_slower_bucket_decides() -> None:
    limit = PublishLimit(POLICY, now=0.0)
    assert limit.take(65536, 0.0) == 0.0  # one largest message: the byte bucket is empty
    assert limit.take(6554, 0.0) == pytest.approx(0.1, abs=1e-4)  # bytes, not messages, wait
    limit = PublishLimit(POLICY, now=0.0)
    for _ in range(20):
        assert limit.take(10, 0.0) == 0.0
    assert limit.take(10, 0.0) == pytest.approx(0.1)  # messages wait, bytes would not


def test_abusive_only_after_being_throttled_without_a_break() -> None:
    limit = PublishLimit(POLICY, now=0.0)
    for _ in range(20):
        limit.take(1, 0.0)
    assert limit.take(1, 0.0) > 0
    assert limit.abusive(0.0) is False  # throttled since 0.0, not yet for long
    assert not limit.abusive(THROTTLED_CLOSE_AFTER_S - 0.01)
    assert limit.abusive(THROTTLED_CLOSE_AFTER_S)
    # A message that finds its token waiting ends the run of throttling.
    assert limit.take(1, 100.0) == 0.0
    assert limit.throttled_since is None
    assert not limit.abusive(200.0)


async def test_a_flooder_is_paced_then_refused(autojump_clock: trio.testing.MockClock) -> None:
    """The shell's loop, on trio's clock: a client that always has a message ready."""
    limit = PublishLimit(POLICY, trio.current_time())
    start = trio.current_time()
    admitted: list[float] = []
    with trio.fail_after(60):
        while await limit.admit(100):
            admitted.append(trio.current_time() - start)
    refused_at = trio.current_time() - start
    assert admitted[:20] == [0.0] * 20  # the burst passes at once
    gaps = [b - a for a, b in itertools.pairwise(admitted[19:])]
    assert gaps == pytest.approx([0.1] * len(gaps))  # then 10 a second
    assert refused_at == pytest.approx(THROTTLED_CLOSE_AFTER_S, abs=0.11)
    assert len(admitted) == pytest.approx(20 + 10 * THROTTLED_CLOSE_AFTER_S, abs=1)


async def test_a_person_chatting_never_waits(autojump_clock: trio.testing.MockClock) -> None:
    """Typing bursts of 5 lines a second apart, and a paste of 20 lines: no wait at all."""
    limit = PublishLimit(POLICY, trio.current_time())
    for burst in (5, 3, 20, 5, 1):
        before = trio.current_time()
        for _ in range(burst):
            assert await limit.admit(200)
        assert trio.current_time() == before
        await trio.sleep(2.0)


async def test_a_long_paste_waits_but_is_not_closed(autojump_clock: trio.testing.MockClock) -> None:
    """100 lines at once: the last 80 are paced at 10 a second (8 s), under the 10 s bound."""
    limit = PublishLimit(POLICY, trio.current_time())
    start = trio.current_time()
    for _ in range(100):
        assert await limit.admit(80)
    assert trio.current_time() - start == pytest.approx(8.0)
