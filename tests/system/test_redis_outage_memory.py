"""During a Redis outage, what clients publish cannot fill the server's memory: the messages
waiting for Redis are bounded in bytes (``TRIO_WS_REDIS_PENDING_MAX_BYTES``), the oldest left
out of the cluster (their clients here had them), and delivery through Redis resumes when it
is back (docs/design/cluster-log.md, "Pending messages").

Real processes: a redis-server killed by its PID (a crash), ``python -m trio_ws`` against it,
and a flooder publishing maximum-size messages as fast as the server takes them (publish
limits off for it), for a bounded time and count.
"""

from __future__ import annotations

from typing import Any

import trio

from tests.procutil import LAUNCHER, running
from tests.redisutil import redis_server
from tests.system.test_redis_limits import (
    MESSAGE_SIZE,
    MIB,
    flood,
    fresh_message_is_delivered,
    seconds_until_ready,
    server_env,
)
from tests.system.test_waiting_connections import rss_mb
from tests.wsutil import http_get, http_json

#: Small, so that a flood of a few seconds is many times over it.
BUDGET = 8 * MIB


async def test_pending_messages_stay_within_their_byte_budget_during_an_outage(
    tmp_path: Any,
) -> None:
    env = {"TRIO_WS_REDIS_PENDING_MAX_BYTES": str(BUDGET)}
    async with (
        redis_server(str(tmp_path)) as redis,
        running(LAUNCHER, server_env(redis, **env)) as server,
    ):
        base = await server.base_url()
        url = await server.ws_url()
        assert (await http_get(base, "/ready"))[0] == 200
        await redis.kill()
        with trio.fail_after(20):
            while (await http_get(base, "/ready"))[0] != 503:  # noqa: ASYNC110 (a process)
                await trio.sleep(0.1)
        rss_before = rss_mb(server.pid)
        peak = rss_before

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss_mb(server.pid))
                await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            sent = await flood(url)
            nursery.cancel_scope.cancel()
        status, health = await http_json(base, "/health")
        assert status == 200
        broker = health["broker"]
        print(
            f"\n{sent} messages of {MESSAGE_SIZE} bytes during the outage "
            f"({sent * MESSAGE_SIZE / MIB:.0f} MiB): RSS {rss_before:.1f} -> peak {peak:.1f} MB; "
            f"pending {broker['pending']} ({broker['pending_bytes'] / MIB:.1f} MiB), "
            f"{broker['dropped_during_outages']} left out of the cluster"
        )
        assert sent * MESSAGE_SIZE >= 3 * BUDGET, f"only {sent} messages: the flood proves little"
        assert broker["pending_bytes"] <= BUDGET + 2 * MESSAGE_SIZE
        assert broker["dropped_during_outages"] > 0
        assert peak - rss_before < BUDGET / MIB + 24
        # Redis is back (empty, on the same port): what was pending goes out, and a fresh
        # message is delivered through Redis again.
        await redis.start()
        await seconds_until_ready(base, 30)
        await fresh_message_is_delivered(url)
        assert server.count(r"Traceback") == 0, server.log[-3000:]
        assert server.count(r"will not reach other processes") >= 1
