"""``/health``: one report composed from each part's own statistics and report methods.

Two views: :func:`public_health`, what a load balancer's probe or a deploy script needs
(status, counts, the drain), which anyone may read; and :func:`health_report`, the whole
detail (the broker's address and errors, limits, totals), for operators only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from trio_ws.core import protocol
from trio_ws.core.broker import BrokerState
from trio_ws.core.drain import DrainState

if TYPE_CHECKING:
    from trio_ws.core.hub import Hub


def status(hub: Hub) -> str:
    """``ok``, ``degraded`` (the broker is down), ``draining`` or ``stopped``."""
    state: DrainState = hub.drain.state
    if state is not DrainState.SERVING:
        return str(state.value)
    return "ok" if hub.broker.state is BrokerState.UP else "degraded"


def public_health(hub: Hub) -> dict[str, Any]:
    """What anyone may know: whether this instance serves, how many it holds, and the drain.
    Nothing about the broker's address, the process, or an error's text (which can quote a
    client's message)."""
    cluster = hub.broker.cluster()
    return {
        "status": status(hub),
        "instance": hub.instance_id,
        "active_connections": len(hub.registry),
        "cluster": None
        if cluster is None
        else {
            "instances": cluster.instances,
            "connections": hub.cluster_connections(),
            "draining_instances": cluster.draining_instances,
        },
        "shutdown_in_progress": hub.draining,
        "drain": hub.drain.report(),
    }


def health_report(hub: Hub) -> dict[str, Any]:
    """The original design's fields, the cluster, the broker and the drain's progress."""
    stats = hub.registry.statistics()
    cluster = hub.broker.cluster()
    return {
        "status": status(hub),
        "instance": hub.instance_id,
        "active_connections": stats.connections,
        "cluster": None
        if cluster is None
        else {
            "instances": cluster.instances,
            "connections": hub.cluster_connections(),
            "draining_instances": cluster.draining_instances,
            "age_s": round(trio.current_time() - cluster.as_of, 3),
        },
        "broker": hub.broker.health(),
        "shutdown_in_progress": hub.draining,
        "timestamp": protocol.iso_time(hub.wall_time()),
        "uptime_s": round(hub.uptime_s, 3),
        "connections_total": stats.total_connected,
        "slow_disconnects": stats.slow_disconnects,
        "no_pong_disconnects": hub.no_pong_disconnects,
        "protocol_errors": hub.protocol_errors,
        "replaced_connections": stats.replaced,
        "messages_broadcast": hub.messages_broadcast,
        "publishes_refused": hub.publishes_refused,
        "refused_during_drain": hub.drain.refused,
        "max_connections": hub.admission.policy.max_connections,
        "refused_over_limits": hub.admission.refused_report(),
        "drain": hub.drain.report(),
    }
