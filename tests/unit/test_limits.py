"""The connection limits' arithmetic (trio_ws/core/limits.py) on trio's MockClock: each table row
is (seconds since the start, event, address, expected answer)."""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from trio_ws.core.limits import Admission, Limit, LimitPolicy, TokenBuckets, address_key
from trio_ws.core.throttle import Throttle

OK = None
CAP, PER_IP, RATE = Limit.MAX_CONNECTIONS, Limit.MAX_CONNECTIONS_PER_IP, Limit.HANDSHAKE_RATE_PER_IP

# (at, "admit" or "release", address, expected answer of admit)
Row = tuple[float, str, str, Limit | None]

TABLES: dict[str, tuple[LimitPolicy, list[Row]]] = {
    "process cap, then room again": (
        LimitPolicy(max_connections=2),
        [
            (0, "admit", "a", OK),
            (0, "admit", "b", OK),
            (0, "admit", "c", CAP),
            (1, "release", "a", OK),
            (1, "admit", "c", OK),
            (1, "admit", "a", CAP),
        ],
    ),
    "per-ip cap counts each address apart": (
        LimitPolicy(max_connections=100, max_connections_per_ip=2),
        [
            (0, "admit", "a", OK),
            (0, "admit", "a", OK),
            (0, "admit", "a", PER_IP),
            (0, "admit", "b", OK),
            (5, "release", "a", OK),
            (5, "admit", "a", OK),
            (5, "admit", "a", PER_IP),
        ],
    ),
    "rate 2/s: a burst of 2, then one token every 0.5 s": (
        LimitPolicy(max_connections=100, handshake_rate_per_ip=2),
        [
            (0, "admit", "a", OK),
            (0, "admit", "a", OK),
            (0, "admit", "a", RATE),
            (0, "admit", "b", OK),
            (0.4, "admit", "a", RATE),  # 0.8 tokens: not yet
            (0.5, "admit", "a", OK),  # 0.8 + 0.2: a refused attempt takes no token
            (10, "admit", "a", OK),
            (10, "admit", "a", OK),
            (10, "admit", "a", RATE),  # the bucket holds one second, however long the pause
        ],
    ),
    "rate below 1/s: a bucket of one": (
        LimitPolicy(max_connections=100, handshake_rate_per_ip=0.5),
        [
            (0, "admit", "a", OK),
            (1, "admit", "a", RATE),
            (2.5, "admit", "a", OK),  # refilled from 0.5 at t=1 to 1.25 (capped at 1)
            (2.5, "admit", "a", RATE),
        ],
    ),
    "the process cap comes first and takes no token": (
        LimitPolicy(max_connections=1, handshake_rate_per_ip=1),
        [
            (0, "admit", "a", OK),
            (0, "admit", "a", CAP),
            (0, "release", "a", OK),
            (1, "admit", "a", OK),
        ],
    ),
    "the rate comes before the per-ip cap, and a refused attempt still costs a token": (
        LimitPolicy(max_connections=100, max_connections_per_ip=1, handshake_rate_per_ip=1),
        [
            (0, "admit", "a", OK),
            (1, "admit", "a", PER_IP),  # token taken, then refused by the per-ip cap
            (1.5, "admit", "a", RATE),
            (2, "admit", "a", PER_IP),
        ],
    ),
}


@pytest.mark.parametrize("name", TABLES)
async def test_admission_table(name: str, mock_clock: trio.testing.MockClock) -> None:
    policy, rows = TABLES[name]
    admission = Admission(policy)
    start = trio.current_time()
    for at, event, address, expected in rows:
        mock_clock.jump(start + at - trio.current_time())
        if event == "release":
            admission.release(address)
        else:
            assert admission.admit(address) is expected, (at, event, address)
    refused = [row[3] for row in rows if row[3] is not None]
    assert admission.refused_report() == {limit.value: refused.count(limit) for limit in Limit}


async def test_the_limits_counts_are_consistent(mock_clock: trio.testing.MockClock) -> None:
    admission = Admission(LimitPolicy(max_connections=3, max_connections_per_ip=2))
    assert admission.admit("a") is OK
    assert admission.admit("a") is OK
    assert admission.admit("b") is OK
    assert (admission.active, admission.full) == (3, True)
    for key in ("a", "a", "b"):
        admission.release(key)
    assert (admission.active, admission.full, admission.tracked_addresses()) == (0, False, 0)
    with pytest.raises(RuntimeError):
        admission.release("a")


async def test_lowering_the_cap(mock_clock: trio.testing.MockClock) -> None:
    admission = Admission(LimitPolicy(max_connections=10, max_connections_per_ip=4))
    admission.lower_max_connections(2)
    admission.lower_max_connections(5)  # never raised
    assert admission.policy == LimitPolicy(max_connections=2, max_connections_per_ip=4)


def test_buckets_forget_full_ones() -> None:
    """Memory follows traffic: 10,000 addresses once each, then a quiet second, then one more:
    only the last one is remembered."""
    buckets = TokenBuckets(rate=1, burst=1)
    for n in range(10_000):
        assert buckets.take(f"10.0.{n // 256}.{n % 256}", now=0.0)
    assert len(buckets) == 10_000
    assert buckets.take("192.0.2.1", now=1.0)
    assert len(buckets) == 1


def test_buckets_refuse_bad_parameters() -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBuckets(rate=0, burst=1)


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
        ("<unknown>", "<unknown>"),
    ],
)
def test_address_key(host: str, key: str) -> None:
    assert address_key(host) == key


async def test_refusals_are_logged_once_per_interval(
    mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "trio_ws.core.limits")
    admission = Admission(LimitPolicy(max_connections=1), log_every_s=10)
    assert admission.admit("a") is OK
    for _ in range(500):
        assert admission.admit("b", "b:1") is CAP
        mock_clock.jump(0.01)
    # 5 s: one line so far (the first refusal).
    assert len(caplog.records) == 1
    assert "refused a connection from b:1" in caplog.records[0].getMessage()
    mock_clock.jump(5.1)  # 10 s after the first line
    assert admission.admit("c", "c:1") is CAP
    assert len(caplog.records) == 2
    assert "refused 500 connections" in caplog.records[1].getMessage()
    assert "500 max_connections" in caplog.records[1].getMessage()


@pytest.mark.parametrize(
    ("times", "lines"),
    [
        ([0, 1, 2, 9.9, 10, 11], [1, None, None, None, 4, None]),
        ([0, 20, 40], [1, 1, 1]),
    ],
)
def test_throttle(times: list[float], lines: list[int | None]) -> None:
    throttle = Throttle(10)
    assert [throttle.event(t) for t in times] == lines
