"""This process's place in the cluster, kept in Redis: its heartbeat, the cluster view, the
claim on each periodic message, the client ids its connections hold, and leaving.

* Every heartbeat writes this process's connection count to a key that expires after
  ``instance_ttl_s`` (a crashed process drops out), and reads the others' entries.
* The periodic message of each interval is sent by whichever process first claims its slot with
  ``SET NX``: one per interval for the whole cluster.
* The ids held (without tokens) are a hash per process, ``<prefix>:ids:<instance>``: id ->
  claim (the digest of the connection's resume key, a dot, the connection's attempt number),
  expiring with the process's entry (the heartbeat renews both). A claim (one Lua script, so
  atomic) looks for the id in the hashes of the other live processes: held there, it is
  granted only to an attempt that presents the same digest, which also removes the other
  process's entry and tells it, in its list ``<prefix>:evict:<instance>``, which claim was
  taken over; each heartbeat takes that list, and the hub closes the connections that made
  those claims (4500). An operator's kick (``DELETE /clients/<id>``) puts ``<id> kick`` in
  every other live process's list, and those close the client with 4503. Every session
  starts by writing the hash anew from the registry, so what an outage left out of date is put
  right.
* Leaving deletes the entry; no heartbeat may write it again afterwards.

The client is passed to each call: the broker replaces it after an outage.
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from coredis.tokens import PureToken

from trio_ws.core.broker import ClusterView

if TYPE_CHECKING:
    import coredis


#: ARGV: prefix, this instance, client id, claim to store, digest presented ("" for none),
#: the hash's time to live in ms. 1: granted (and stored); 0: held by another live process.
CLAIM_ID_SCRIPT = """
local prefix, me, id = ARGV[1], ARGV[2], ARGV[3]
for _, other in ipairs(redis.call('SMEMBERS', prefix .. ':instances')) do
  if other ~= me then
    local held = redis.call('HGET', prefix .. ':ids:' .. other, id)
    if held and redis.call('EXISTS', prefix .. ':instance:' .. other) == 1 then
      if ARGV[5] == '' or string.match(held, '^[^.]*') ~= ARGV[5] then return 0 end
      redis.call('HDEL', prefix .. ':ids:' .. other, id)
      redis.call('RPUSH', prefix .. ':evict:' .. other, id .. ' ' .. held)
      redis.call('PEXPIRE', prefix .. ':evict:' .. other, ARGV[6])
    end
  end
end
redis.call('HSET', prefix .. ':ids:' .. me, id, ARGV[4])
redis.call('PEXPIRE', prefix .. ':ids:' .. me, ARGV[6])
return 1
"""

#: KEYS: this process's hash; ARGV: client id, claim. Deletes the claim if it is still that one.
RELEASE_ID_SCRIPT = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class IdRequest:
    """A claim of ``client_id`` with ``value`` (see :data:`CLAIM_ID_SCRIPT`; ``presented``: the
    digest of the key the attempt presented), or its release (``claim`` False)."""

    client_id: str
    value: str
    presented: str | None
    claim: bool


#: What an eviction list holds instead of a claim when an operator closes the client (a claim
#: is ``<digest>.<attempt>``, never this).
KICK = "kick"

#: ARGV: prefix, this instance, client id, the lists' time to live in ms. Asks every other live
#: process to close the client (with tokens its connections hold no id, so all are asked);
#: returns 1 if one of them holds the id, 0 otherwise.
KICK_ID_SCRIPT = """
local prefix, me, id = ARGV[1], ARGV[2], ARGV[3]
local held = 0
for _, other in ipairs(redis.call('SMEMBERS', prefix .. ':instances')) do
  if other ~= me and redis.call('EXISTS', prefix .. ':instance:' .. other) == 1 then
    if redis.call('HEXISTS', prefix .. ':ids:' .. other, id) == 1 then held = 1 end
    redis.call('RPUSH', prefix .. ':evict:' .. other, id .. ' ' .. ARGV[5])
    redis.call('PEXPIRE', prefix .. ':evict:' .. other, ARGV[4])
  end
end
return held
"""

#: KEYS: this process's evictions. Takes them all: ``"<client id> <claim>"`` each.
TAKE_EVICTIONS_SCRIPT = """
local items = redis.call('LRANGE', KEYS[1], 0, -1)
redis.call('DEL', KEYS[1])
return items
"""


class Membership:
    """The keys of one process's membership, and the commands that keep them."""

    def __init__(self, prefix: str, instance_id: str, instance_ttl_s: float) -> None:
        self.instance_id = instance_id
        self.instance_ttl_s = instance_ttl_s
        self._instances_key = f"{prefix}:instances"
        self._instance_key = f"{prefix}:instance:{instance_id}"
        self._instance_prefix = f"{prefix}:instance:"
        self._periodic_prefix = f"{prefix}:periodic:"
        self._prefix = prefix
        #: This process's held ids (see the module docstring).
        self.ids_key = f"{prefix}:ids:{instance_id}"
        self.evict_key = f"{prefix}:evict:{instance_id}"
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
            pipe.pexpire(self.ids_key, int(self.instance_ttl_s * 1000))
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

    async def run_id_requests(
        self, client: coredis.Redis[str], requests: list[IdRequest]
    ) -> list[bool]:
        """Claims and releases, in order, in one pipeline: for a claim, whether the id is this
        process's now (:data:`CLAIM_ID_SCRIPT`); for a release, True."""
        ttl_ms = int(self.instance_ttl_s * 1000)
        async with client.pipeline(transaction=False) as pipe:
            results = [
                pipe.eval(
                    CLAIM_ID_SCRIPT,
                    [],
                    [
                        self._prefix,
                        self.instance_id,
                        request.client_id,
                        request.value,
                        request.presented or "",
                        ttl_ms,
                    ],
                )
                if request.claim
                else pipe.eval(
                    RELEASE_ID_SCRIPT, [self.ids_key], [request.client_id, request.value]
                )
                for request in requests
            ]
        return [
            bool(await result) if request.claim else True
            for request, result in zip(requests, results, strict=True)
        ]

    async def take_evictions(self, client: coredis.Redis[str]) -> list[tuple[str, str]]:
        """The claims of this process that reconnects on other processes took over since the
        last call: ``(client id, claim)``."""
        items = await client.eval(TAKE_EVICTIONS_SCRIPT, [self.evict_key], [])
        taken = []
        for item in cast("list[str]", items or []):
            client_id, _, claim = str(item).partition(" ")
            taken.append((client_id, claim))
        return taken

    async def kick(self, client: coredis.Redis[str], client_id: str) -> bool:
        """Ask the other live processes to close ``client_id`` at their next heartbeat: True
        if one of them holds the id."""
        held = await client.eval(
            KICK_ID_SCRIPT,
            [],
            [self._prefix, self.instance_id, client_id, int(self.instance_ttl_s * 1000), KICK],
        )
        return bool(held)

    async def write_ids(self, client: coredis.Redis[str], held: dict[str, str]) -> None:
        """Replace this process's held ids with ``held`` (a session's start)."""
        async with client.pipeline(transaction=True) as pipe:
            pipe.delete([self.ids_key])
            if held:
                pipe.hset(self.ids_key, held)
                pipe.pexpire(self.ids_key, int(self.instance_ttl_s * 1000))

    async def leave(self, client: coredis.Redis[str]) -> None:
        """Remove this process's entry now (rather than when it expires)."""
        self.leaving = True
        async with client.pipeline(transaction=False) as pipe:
            pipe.delete([self._instance_key, self.ids_key, self.evict_key])
            pipe.srem(self._instances_key, [self.instance_id])
