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
    "CLASSIC_GROUP_SEND",
    "CLASSIC_RESTORE_BACKUP",
    "CLASSIC_SEND",
    "GROUP_MEMBERS",
    "STREAM_ACK",
    "STREAM_FORGET_CONSUMER",
    "STREAM_GROUP_SEND",
    "STREAM_SEND",
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

GROUP_MEMBERS = LuaScript(
    "group_members",
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


# --- Streams layer -------------------------------------------------------------------

# Shared by STREAM_SEND and STREAM_GROUP_SEND: append one payload to one stream.
_STREAM_APPEND = """
local function already_there(key, tag, scan)
    local recent = redis.call('XREVRANGE', key, '+', '-', 'COUNT', scan)
    for _, entry in ipairs(recent) do
        local fields = entry[2]
        for j = 1, #fields, 2 do
            if fields[j] == 'i' and fields[j + 1] == tag then
                return entry[1]
            end
        end
    end
    return false
end

local function append(key, payload, tag, capacity, minid, ttl, retry)
    if retry == '1' then
        -- A retry after a lost reply: the first attempt may have landed.
        local found = already_there(key, tag, capacity + 1)
        if found then
            return found
        end
    end
    redis.call('XTRIM', key, 'MINID', minid)
    if redis.call('XLEN', key) >= capacity then
        return false
    end
    local id = redis.call('XADD', key, '*', 'd', payload, 'i', tag)
    redis.call('PEXPIRE', key, ttl)
    return id
end
"""

STREAM_SEND = LuaScript(
    "stream_send",
    _STREAM_APPEND
    + """
-- KEYS[1]: the destination stream (a process inbox or a normal channel)
-- ARGV[1]: payload   ARGV[2]: dedup tag   ARGV[3]: capacity
-- ARGV[4]: MINID (entries older than expiry are trimmed)   ARGV[5]: key TTL in ms
-- ARGV[6]: '1' when this call retries an attempt whose reply was lost
-- Returns the entry id, or false when the stream is at capacity.
return append(KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6])
""",
)

STREAM_GROUP_SEND = LuaScript(
    "stream_group_send",
    _STREAM_APPEND
    + """
-- KEYS[1..n]: destination streams on this shard
-- ARGV[1..n]: payloads   ARGV[n+1..2n]: dedup tags   ARGV[2n+1..3n]: capacities
-- ARGV[3n+1]: MINID   ARGV[3n+2]: key TTL in ms   ARGV[3n+3]: '1' on a retry
-- Returns how many destinations were full (and skipped).
local n = #KEYS
local minid, ttl, retry = ARGV[3 * n + 1], ARGV[3 * n + 2], ARGV[3 * n + 3]
local full = 0
for i = 1, n do
    if not append(KEYS[i], ARGV[i], ARGV[n + i], tonumber(ARGV[2 * n + i]), minid, ttl, retry) then
        full = full + 1
    end
end
return full
""",
)

STREAM_ACK = LuaScript(
    "stream_ack",
    """
-- KEYS[1]: a normal channel's stream   ARGV[1]: consumer group   ARGV[2]: consumer
-- ARGV[3]: entry id   ARGV[4]: '1' when this call retries an attempt whose reply was lost
-- Acknowledges the entry and deletes it (a delivered message leaves no trace), if the
-- consumer still owns it. Returns 1 when the caller may deliver it, 0 when another
-- consumer took it over (XAUTOCLAIM after claim_after) and delivers it instead.
local group, consumer, id = ARGV[1], ARGV[2], ARGV[3]
local mine = redis.call('XPENDING', KEYS[1], group, id, id, 1, consumer)
if #mine == 0 then
    if ARGV[4] ~= '1' then
        return 0
    end
    -- A retry: not pending to anyone means our first attempt acknowledged it.
    local anyone = redis.call('XPENDING', KEYS[1], group, id, id, 1)
    if #anyone > 0 then
        return 0
    end
    return 1
end
redis.call('XACK', KEYS[1], group, id)
redis.call('XDEL', KEYS[1], id)
return 1
""",
)

STREAM_FORGET_CONSUMER = LuaScript(
    "stream_forget_consumer",
    """
-- KEYS[1]: a normal channel's stream   ARGV[1]: consumer group   ARGV[2]: consumer
-- Deletes the consumer if it owns no pending entry (returns 1; 0 if it was kept).
-- Checked and done in one step: a consumer that read an entry meanwhile keeps it
-- (DELCONSUMER would drop its pending entries unseen).
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then
    return 0
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
""",
)
