"""A rolling deploy under load, with real processes and a real Redis: 500 clients on instance
A, a publisher on instance B at 50 messages a second, SIGTERM to A. Every client moves to B
(by the page's policy, and again reconnecting at once with a 1 s connect timeout) and resumes
with ``?since=``: nothing lost, nothing duplicated, every resume complete, and B's ``/ready``
tells the truth throughout. The scenario is bench/storm.py's; its figures are in
docs/benchmarks.md."""

from __future__ import annotations

import pytest

from bench.storm import StormConfig, StormResult, run_storm


def assert_nothing_lost(result: StormResult) -> None:
    assert result.connected_to_a == result.clients
    assert result.never_back == 0, result.attempts
    assert result.back_s["all_back"]
    assert result.lost["total"] == 0, result.lost
    assert result.duplicated["total"] == 0, result.duplicated
    assert result.resumes["resumed"] == result.clients
    assert result.resumes["incomplete"] == 0, result.resumes
    # B stayed ready, and was: its broker never went down and it still delivers at the end.
    assert not result.b_ready["ever_not_200"], result.b_ready
    assert result.b_broker["states"] == ["up"], result.b_broker
    assert result.probe["ok"], result.probe
    assert result.a_returncode == 0


@pytest.mark.parametrize("policy", ["page", "immediate"])
async def test_a_rolling_deploy_under_load_loses_nothing(policy: str) -> None:
    result = await run_storm(
        StormConfig(clients=500, rate=50, policy=policy, connect_timeout=1.0, seed=1)  # type: ignore[arg-type]
    )
    assert_nothing_lost(result)
