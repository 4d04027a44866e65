"""Lua scripts, one named constant each, sent with EVALSHA.

Each script states its KEYS and ARGV in its first lines. Every key a script
touches is passed in KEYS (never built inside the script), which keeps them
usable on Redis Cluster once the keys share a hash slot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import asyncio as aioredis
from redis.exceptions import NoScriptError

__all__ = [
    "CLASSIC_GROUP_MEMBERS",
    "CLASSIC_GROUP_SEND",
    "CLASSIC_RESTORE_BACKUP",
    "CLASSIC_SEND",
    "LuaScript",
]


@dataclass(frozen=True)
class LuaScript:
    """A script called by its SHA; loaded into a server the first time it is missing there."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())

    async def __call__(
        self, client: aioredis.Redis, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            # First use on this server, or its script cache was emptied by a restart.
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


CLASSIC_SEND = LuaScript(
    "classic_send",
    """
-- KEYS[1]: the channel's sorted set
-- ARGV[1]: serialized message (member)   ARGV[2]: send time (score)
-- ARGV[3]: drop members scored at or below this (send time - expiry)
-- ARGV[4]: capacity   ARGV[5]: key TTL in seconds
-- Returns 1 when stored, 0 when the channel is full.
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[3])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
    return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
""",
)

CLASSIC_GROUP_MEMBERS = LuaScript(
    "classic_group_members",
    """
-- KEYS[1]: the group's sorted set of channel names
-- ARGV[1]: drop members that joined at or before this time (now - group_expiry)
-- Returns the remaining member channel names.
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[1])
return redis.call('ZRANGE', KEYS[1], 0, -1)
""",
)

CLASSIC_GROUP_SEND = LuaScript(
    "classic_group_send",
    """
-- KEYS[1..n]: channel sorted sets on this shard
-- ARGV[1..n]: the serialized message for each key
-- ARGV[n+1..2n]: the capacity of each key
-- ARGV[2n+1]: send time   ARGV[2n+2]: expiry cutoff   ARGV[2n+3]: key TTL
-- Returns how many keys were full (and skipped).
local n = #KEYS
local now, cutoff, ttl = ARGV[2 * n + 1], ARGV[2 * n + 2], ARGV[2 * n + 3]
local full = 0
for i = 1, n do
    redis.call('ZREMRANGEBYSCORE', KEYS[i], 0, cutoff)
    if redis.call('ZCARD', KEYS[i]) < tonumber(ARGV[n + i]) then
        redis.call('ZADD', KEYS[i], now, ARGV[i])
        redis.call('EXPIRE', KEYS[i], ttl)
    else
        full = full + 1
    end
end
return full
""",
)

CLASSIC_RESTORE_BACKUP = LuaScript(
    "classic_restore_backup",
    """
-- KEYS[1]: a channel's sorted set   KEYS[2]: its $inflight backup
-- Moves every message a channels_redis receiver left in flight back into the
-- channel, keeping its original score (so its place in the order), and
-- returns how many were moved.
local parked = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for i = 1, #parked, 2 do
    redis.call('ZADD', KEYS[1], parked[i + 1], parked[i])
end
redis.call('DEL', KEYS[2])
return #parked / 2
""",
)
