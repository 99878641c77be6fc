"""Who may publish (TRIO_WS_CLIENT_PUBLISH), the operator's kick, and the two /health views:
the core's decisions, without sockets."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.lowlevel

from trio_ws.brokers.local import LocalBroker
from trio_ws.core.health import health_report, public_health
from trio_ws.core.hub import Hub
from trio_ws.core.permissions import ClientPublish, may_publish, refusal_reason
from trio_ws.core.protocol import CloseCode
from trio_ws.core.registry import Connection
from trio_ws.settings import Settings


@pytest.mark.parametrize(
    ("policy", "authenticated", "allowed"),
    [
        (ClientPublish.ALL, False, True),
        (ClientPublish.ALL, True, True),
        (ClientPublish.TOKEN, False, False),
        (ClientPublish.TOKEN, True, True),
        (ClientPublish.NONE, False, False),
        (ClientPublish.NONE, True, False),
    ],
)
def test_who_may_publish(policy: ClientPublish, authenticated: bool, allowed: bool) -> None:
    assert may_publish(policy, authenticated=authenticated) is allowed


@pytest.mark.parametrize("policy", [ClientPublish.TOKEN, ClientPublish.NONE])
def test_a_refusal_says_why_and_that_nothing_was_broadcast(policy: ClientPublish) -> None:
    reason = refusal_reason(policy)
    assert "not broadcast" in reason
    assert len(reason.encode()) < 123  # fits a close frame's reason too


def test_the_policy_names_are_the_settings_values() -> None:
    for value in ("all", "token", "none"):
        settings = Settings(client_publish=value, jwt_secret="s" * 32)
        assert ClientPublish(settings.client_publish).value == value


def test_a_connection_is_not_authenticated_unless_told() -> None:
    plain = Connection("a", peer="p", connected_at=0.0, queue_size=4)
    signed = Connection("b", peer="p", connected_at=0.0, queue_size=4, authenticated=True)
    assert (plain.authenticated, signed.authenticated) == (False, True)
    policy = ClientPublish.TOKEN
    assert not may_publish(policy, authenticated=plain.authenticated)
    assert may_publish(policy, authenticated=signed.authenticated)


def make_hub() -> Hub:
    return Hub(
        Settings(presence_interval=0),
        broker=LocalBroker(lambda: 1_000.0),
        instance_id="i1",
        wall_clock=lambda: 1_000.0,
    )


def test_kick_closes_the_client_with_4503_and_only_it() -> None:
    hub = make_hub()
    alice = hub.connect("alice", "1.2.3.4:5")
    bob = hub.connect("bob", "1.2.3.4:6")
    assert hub.kick("alice", "127.0.0.1") is True
    assert (alice.close_code, alice.closing, bob.closing) == (
        CloseCode.CLOSED_BY_OPERATOR,
        True,
        False,
    )
    assert hub.kick("alice", "127.0.0.1") is False  # already closing
    assert hub.kick("carol", "127.0.0.1") is False  # not here


def test_kick_closes_every_tab_of_a_token_user() -> None:
    hub = make_hub()
    tabs = [hub.connect("alice", f"1.2.3.4:{port}", authenticated=True) for port in (5, 6)]
    bob = hub.connect("bob", "1.2.3.4:7", authenticated=True)
    assert hub.kick("alice", "127.0.0.1") is True
    assert [tab.close_code for tab in tabs] == [CloseCode.CLOSED_BY_OPERATOR] * 2
    assert not bob.closing


def test_a_kick_from_another_instance_closes_the_client_here() -> None:
    hub = make_hub()
    alice = hub.connect("alice", "1.2.3.4:5")
    hub.kicked_elsewhere(["alice", "nobody"])
    assert alice.close_code == CloseCode.CLOSED_BY_OPERATOR


async def test_without_a_cluster_a_kick_anywhere_is_a_kick_here() -> None:
    hub = make_hub()
    hub.connect("alice", "1.2.3.4:5")
    assert await hub.kick_anywhere("alice", "127.0.0.1") is True
    assert await hub.kick_anywhere("carol", "127.0.0.1") is False


async def test_refused_publishes_are_counted_and_logged_at_a_pace(caplog: Any) -> None:
    hub = make_hub()
    alice = hub.connect("alice", "1.2.3.4:5")
    with caplog.at_level("INFO"):
        for _ in range(5):
            hub.note_publish_refused(alice, "none")
        await trio.lowlevel.checkpoint()
    assert hub.publishes_refused == 5
    assert len([r for r in caplog.records if "refused by TRIO_WS_CLIENT_PUBLISH" in r.message]) == 1
    assert health_report(hub)["publishes_refused"] == 5


def test_public_health_holds_what_a_probe_needs_and_no_detail() -> None:
    hub = make_hub()
    hub.connect("alice", "1.2.3.4:5")
    public = public_health(hub)
    assert public == {
        "status": "ok",
        "instance": "i1",
        "active_connections": 1,
        "cluster": None,
        "shutdown_in_progress": False,
        "drain": None,
    }
    detail = health_report(hub)
    assert {"broker", "uptime_s", "max_connections"} <= detail.keys()
    # Every public field is also in the detail, with the same meaning.
    for name in ("status", "instance", "active_connections", "shutdown_in_progress"):
        assert detail[name] == public[name]
    json.dumps(public)
