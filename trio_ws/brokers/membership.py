"""This process's place in the cluster, kept in Redis: its heartbeat, the cluster view, the
claim on each periodic message, and leaving.

* Every heartbeat writes this process's connection count to a key that expires after
  ``instance_ttl_s`` (a crashed process drops out), and reads the others' entries.
* The periodic message of each interval is sent by whichever process first claims its slot with
  ``SET NX``: one per interval for the whole cluster.
* Leaving deletes the entry; no heartbeat may write it again afterwards.

The client is passed to each call: the broker replaces it after an outage.
"""

from __future__ import annotations

import json
import math
import os
import socket
from typing import TYPE_CHECKING

from coredis.tokens import PureToken

from trio_ws.core.broker import ClusterView

if TYPE_CHECKING:
    import coredis


class Membership:
    """The keys of one process's membership, and the commands that keep them."""

    def __init__(self, prefix: str, instance_id: str, instance_ttl_s: float) -> None:
        self.instance_id = instance_id
        self.instance_ttl_s = instance_ttl_s
        self._instances_key = f"{prefix}:instances"
        self._instance_key = f"{prefix}:instance:{instance_id}"
        self._instance_prefix = f"{prefix}:instance:"
        self._periodic_prefix = f"{prefix}:periodic:"
        #: Set by :meth:`leave`: from then on no heartbeat registers this process again.
        self.leaving = False

    async def heartbeat(
        self, client: coredis.Redis[str], connections: int, draining: bool, now: float
    ) -> ClusterView | None:
        """Write this process's entry (it expires unless renewed) and read everyone's; None
        once leaving (nothing written)."""
        if self.leaving:
            return None
        info = json.dumps(
            {
                "connections": connections,
                "draining": draining,
                "pid": os.getpid(),
                "host": socket.gethostname(),
            }
        )
        async with client.pipeline(transaction=False) as pipe:
            pipe.set(self._instance_key, info, px=int(self.instance_ttl_s * 1000))
            pipe.sadd(self._instances_key, [self.instance_id])
            members_request = pipe.smembers(self._instances_key)
        members = sorted(await members_request)
        values = await client.mget([self._instance_prefix + m for m in members])
        gone = [m for m, value in zip(members, values, strict=True) if value is None]
        if gone:
            await client.srem(self._instances_key, gone)
        alive = [json.loads(value) for value in values if value is not None]
        return ClusterView(
            instances=len(alive),
            connections=sum(int(entry["connections"]) for entry in alive),
            draining_instances=sum(1 for entry in alive if entry["draining"]),
            as_of=now,
            own_connections=connections,
        )

    async def claim_periodic(self, client: coredis.Redis[str], slot: int, interval: float) -> bool:
        """Whether this process won ``slot``: its periodic message is the cluster's."""
        won = await client.set(
            f"{self._periodic_prefix}{slot}",
            self.instance_id,
            condition=PureToken.NX,
            # Long enough that no process still working on the slot can claim it again.
            px=max(1000, math.ceil(interval * 3000)),
        )
        return bool(won)

    async def leave(self, client: coredis.Redis[str]) -> None:
        """Remove this process's entry now (rather than when it expires)."""
        self.leaving = True
        async with client.pipeline(transaction=False) as pipe:
            pipe.delete([self._instance_key])
            pipe.srem(self._instances_key, [self.instance_id])
