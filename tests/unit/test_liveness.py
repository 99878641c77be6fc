"""The liveness schedule: pure, driven by tables of (time, what arrives) -> what to do."""

from __future__ import annotations

import pytest

from trio_ws.core.liveness import NOT_WATCHED, LivenessPolicy, LivenessSchedule


class Client:
    __slots__ = ("__weakref__", "heard_at", "name", "ping_slot")

    def __init__(self, name: str) -> None:
        self.name = name
        self.heard_at = 0.0
        self.ping_slot = NOT_WATCHED

    def __repr__(self) -> str:
        return self.name


def run(
    policy: LivenessPolicy, clients: int, heard: dict[float, list[int]], until: float, step: float
) -> tuple[list[tuple[float, str]], list[tuple[float, str]]]:
    """Watch ``clients`` at 0, tick every ``step`` until ``until``; at each time of ``heard``
    those clients send something. Returns (pings, closes) as (time, name)."""
    schedule: LivenessSchedule[Client] = LivenessSchedule(policy)
    everyone = [Client(f"c{i}") for i in range(clients)]
    for client in everyone:
        schedule.watch(client, 0.0)
    pings: list[tuple[float, str]] = []
    closes: list[tuple[float, str]] = []
    steps = round(until / step)
    for n in range(steps + 1):
        now = round(n * step, 6)
        for index in heard.get(now, []):
            everyone[index].heard_at = now
        due = schedule.tick(now)
        pings += [(now, c.name) for c in due.ping]
        closes += [(now, c.name) for c in due.overdue]
    return pings, closes


# interval 2 s in 2 slots (a tick a second), timeout 1 s: one client, in slot 0.
FAST = LivenessPolicy(ping_interval=2.0, pong_timeout=1.0, slots=2)


@pytest.mark.parametrize(
    ("case", "heard", "closes"),
    [
        ("silent: closed one timeout after its first ping", {}, [(1.0, "c0")]),
        ("answers each ping: never closed", {0.5: [0], 2.5: [0], 4.5: [0]}, []),
        ("answers the first, not the second", {0.5: [0]}, [(3.0, "c0")]),
        ("heard just before the ping does not answer it", {0.5: [0], 1.5: [0]}, [(3.0, "c0")]),
        ("heard at the instant of the ping came before it", {2.0: [0]}, [(1.0, "c0")]),
    ],
)
def test_one_client(
    case: str, heard: dict[float, list[int]], closes: list[tuple[float, str]]
) -> None:
    pings, got = run(FAST, 1, heard, until=5.0, step=0.5)
    assert got == closes, case
    # Pinged at 0, 2, 4 until closed; never after.
    closed_at = closes[0][0] if closes else 99.0
    assert pings == [(t, "c0") for t in (0.0, 2.0, 4.0) if t < closed_at], case


def test_pings_are_spread_over_the_interval_round_robin() -> None:
    policy = LivenessPolicy(ping_interval=4.0, pong_timeout=0, slots=4)
    pings, closes = run(policy, 8, {}, until=3.0, step=1.0)
    assert pings == [
        (0.0, "c0"), (0.0, "c4"),
        (1.0, "c1"), (1.0, "c5"),
        (2.0, "c2"), (2.0, "c6"),
        (3.0, "c3"), (3.0, "c7"),
    ]  # fmt: skip
    assert closes == []  # pong timeout 0: nobody is ever closed


def test_a_pong_timeout_longer_than_the_interval_counts_from_the_first_unanswered_ping() -> None:
    policy = LivenessPolicy(ping_interval=2.0, pong_timeout=5.0, slots=1)
    pings, closes = run(policy, 2, {0.5: [1], 2.5: [1], 4.5: [1]}, until=8.0, step=0.5)
    # c0 pinged at 0, 2, 4 and never answers: closed at 0 + 5. c1's first unanswered ping is at
    # 6 (its answers stop after 4.5): still within its time at 8.
    assert closes == [(5.0, "c0")]
    assert [t for t, name in pings if name == "c0"] == [0.0, 2.0, 4.0]
    assert [t for t, name in pings if name == "c1"] == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_a_late_tick_catches_up_on_every_slot_it_missed() -> None:
    policy = LivenessPolicy(ping_interval=4.0, pong_timeout=1.0, slots=4)
    schedule: LivenessSchedule[Client] = LivenessSchedule(policy)
    clients = [Client(f"c{i}") for i in range(4)]
    for client in clients:
        schedule.watch(client, 0.0)
    assert schedule.tick(0.0).ping == clients[:1]
    assert schedule.next_tick == 1.0
    due = schedule.tick(3.5)  # the loop was busy for 2.5 s
    assert due.ping == clients[1:]
    assert due.overdue == clients[:1]  # pinged at 0, silent until 3.5
    assert schedule.next_tick == 4.0


def test_forgotten_connections_are_neither_pinged_nor_closed() -> None:
    schedule: LivenessSchedule[Client] = LivenessSchedule(FAST)
    a, b = Client("a"), Client("b")
    schedule.watch(a, 0.0)
    schedule.watch(b, 0.0)
    assert schedule.tick(0.0).ping == [a]
    schedule.forget(a)
    schedule.forget(a)  # idempotent
    assert a.ping_slot == NOT_WATCHED
    assert schedule.tick(1.0).overdue == []
    assert schedule.tick(1.0).ping == []
    assert len(schedule) == 1


def test_an_overdue_connection_is_forgotten_and_reported_once() -> None:
    schedule: LivenessSchedule[Client] = LivenessSchedule(
        LivenessPolicy(ping_interval=1.0, pong_timeout=2.5, slots=1)
    )
    a = Client("a")
    schedule.watch(a, 0.0)
    for now in (0.0, 1.0, 2.0):
        assert schedule.tick(now).ping == [a]
    due = schedule.tick(5.0)  # three groups expire at once
    assert due.overdue == [a]
    assert due.ping == []
    assert a.ping_slot == NOT_WATCHED


def test_pings_off_means_nothing_is_watched() -> None:
    schedule: LivenessSchedule[Client] = LivenessSchedule(
        LivenessPolicy(ping_interval=0, pong_timeout=20)
    )
    a = Client("a")
    schedule.watch(a, 0.0)
    assert a.ping_slot == NOT_WATCHED
    due = schedule.tick(100.0)
    assert (due.ping, due.overdue) == ([], [])
    assert schedule.next_tick is None


def test_watching_marks_the_client_heard_now() -> None:
    schedule: LivenessSchedule[Client] = LivenessSchedule(FAST)
    a = Client("a")
    schedule.tick(0.0)
    schedule.watch(a, 7.0)
    assert a.heard_at == 7.0


def test_a_gone_connection_is_not_kept_alive_by_the_schedule() -> None:
    import weakref

    schedule: LivenessSchedule[Client] = LivenessSchedule(FAST)
    a = Client("a")
    schedule.watch(a, 0.0)
    assert schedule.tick(0.0).ping == [a]  # now in a group waiting for its answer
    schedule.forget(a)
    gone = weakref.ref(a)
    del a
    assert gone() is None
    assert schedule.tick(1.0).overdue == []
