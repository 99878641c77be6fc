"""The in-process broker's history: the newest broadcasts after ``since`` that fit in a count
and a byte budget (each counted as its text and sender plus 64 bytes)."""

from __future__ import annotations

import pytest
import trio

from trio_ws.brokers.local import LocalBroker
from trio_ws.core.broker import Broadcast, Outgoing

#: "s" sends "m0".."m3": each counts 2 + 1 + 64 = 67 bytes.
HISTORY_RULES = [
    pytest.param(10, 10_000, ["m1", "m2", "m3"], True, id="everything after since"),
    pytest.param(2, 10_000, ["m2", "m3"], False, id="over the count: the newest, incomplete"),
    pytest.param(10, 3 * 67, ["m1", "m2", "m3"], True, id="exactly the byte budget: complete"),
    pytest.param(10, 3 * 67 - 1, ["m2", "m3"], False, id="over the bytes: newest, incomplete"),
    pytest.param(10, 66, [], False, id="not even the newest fits: none, incomplete"),
]


class Collector:
    instance_id = "i1"

    def __init__(self) -> None:
        self.ids: list[str | None] = []

    def deliver(self, broadcast: Broadcast) -> None:
        self.ids.append(broadcast.id)

    def held_ids(self) -> dict[str, str]:
        return {}

    def replaced_elsewhere(self, claims: list[tuple[str, str]]) -> None:
        pass

    def local_state(self) -> tuple[int, bool]:
        return 0, False


@pytest.mark.parametrize(("limit", "max_bytes", "texts", "complete"), HISTORY_RULES)
async def test_history_rules(limit: int, max_bytes: int, texts: list[str], complete: bool) -> None:
    broker = LocalBroker(lambda: 1_000.0)
    member = Collector()
    async with trio.open_nursery() as nursery:
        await nursery.start(broker.run, member)
        for i in range(4):
            await broker.publish(Outgoing("message", 1.0, sender="s", text=f"m{i}"))
        since = member.ids[0]
        assert since is not None
        history = await broker.history(since, limit=limit, max_bytes=max_bytes)
        assert [b.message.text for b in history.broadcasts] == texts
        assert history.complete is complete
        nursery.cancel_scope.cancel()
