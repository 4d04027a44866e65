"""Lua scripts, one named constant each, sent with EVALSHA.

Each script states its KEYS and ARGV in its first lines. Every key a script
touches is passed in KEYS (never built inside the script), which keeps them
usable on Redis Cluster once the keys share a hash slot.

Memory: a Redis at its ``maxmemory`` refuses a script's write only if it is the
script's *first* write (it cannot stop a script halfway). So every script that
stores a message writes it before anything else (a trim, dropping expired group
members) and undoes it if there was no room: a full Redis then refuses the
send with ``OOM``. The reader's bookkeeping, which frees memory, must work on a
full Redis: it trims first.

The retry flag: a script that a call retries after a lost reply (a send, an
acknowledgement) takes as its *last* argument ``'1'`` when an earlier attempt
of the same call may have landed, ``'0'`` otherwise; it then looks for that
attempt's effect (a dedup tag, an acknowledged entry) instead of repeating it.
:meth:`~streamlayer.base.StreamlayerLayer.call_script` with ``idempotent=True``
appends it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError

from .redispy import evalsha, exchange

__all__ = [
    "CLASSIC_GROUP_SEND",
    "CLASSIC_GROUP_SEND_KNOWN",
    "CLASSIC_RESTORE_BACKUP",
    "CLASSIC_SEND",
    "GROUP_ADD",
    "GROUP_MEMBERS",
    "PRESENCE_JOIN",
    "PRESENCE_LEAVE",
    "PRESENCE_READ",
    "PRESENCE_REFRESH",
    "STREAM_ACK",
    "STREAM_APPEND",
    "STREAM_APPEND_EACH",
    "STREAM_FORGET_CONSUMER",
    "STREAM_GROUP_JOIN",
    "STREAM_GROUP_PUBLISH",
    "STREAM_GROUP_SEND_KNOWN",
    "STREAM_HISTORY",
    "STREAM_INBOX_ADVANCE",
    "STREAM_JOIN_CONSUMERS",
    "LuaScript",
    "run_scripts",
]


@dataclass(frozen=True)
class LuaScript:
    """A script called by its SHA; loaded into a server the first time it is missing there."""

    name: str
    source: str
    #: A script that runs several calls of this one with the same KEYS as one call
    #: (ARGV: each call's argument count, then its arguments; the reply: each call's
    #: reply), for the batcher to merge concurrent calls into; None: never merged.
    each: LuaScript | None = None
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


async def run_scripts(
    connection: AbstractConnection, calls: list[tuple[LuaScript, Sequence[Any], Sequence[Any]]]
) -> list[Any]:
    """``calls`` as EVALSHAs in one write to ``connection`` (one of the caller's own),
    their replies in order (an error reply as its exception): how the batcher runs
    its lone calls and its pipelines. (:class:`LuaScript` itself goes through a
    redis-py client: a Redis Cluster's, or the inbox reader's bookkeeping when it is a
    round trip of its own.)

    Calls that found their script missing (first use on this server, or its script
    cache was emptied by a restart) did not run: the scripts are loaded and those
    calls run again, in one more round trip on the same connection (calls queued
    behind it, which met the same empty cache, take two and so stay behind)."""
    results = await exchange(connection, [evalsha(s.sha, keys, args) for s, keys, args in calls])
    missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
    if not missing:
        return results
    scripts = {calls[i][0].sha: calls[i][0] for i in missing}
    loads = [("SCRIPT", "LOAD", script.source) for script in scripts.values()]
    again = [evalsha(calls[i][0].sha, calls[i][1], calls[i][2]) for i in missing]
    replies = await exchange(connection, [*loads, *again])
    for loaded in replies[: len(loads)]:
        if isinstance(loaded, Exception):  # refused (an ACL without SCRIPT LOAD, say)
            raise loaded
    for i, result in zip(missing, replies[len(loads) :], strict=True):
        results[i] = result
    return results


CLASSIC_SEND = LuaScript(
    "classic_send",
    """
-- KEYS[1]: the channel's sorted set
-- ARGV[1]: drop members scored at or below this (send time - the channel's expiry)
-- ARGV[2]: capacity   ARGV[3]: key TTL in seconds
-- ARGV[4..#ARGV-1]: (score, serialized message) per message, in order (the scores rise:
-- a sorted set orders equal scores by member, and the members start with random bytes)
-- ARGV[#ARGV]: '1' when an earlier attempt of this call may have landed
-- Adds the messages while the channel has room; returns how many it added (a prefix:
-- nothing is read meanwhile, so a full channel stays full). A retry counts a message
-- its first attempt added as added. Each ZADD comes before the trim (a full Redis
-- refuses the first: see the module docstring).
local cutoff, capacity = ARGV[1], tonumber(ARGV[2])
local retry = ARGV[#ARGV] == '1'
local added = 0
for i = 4, #ARGV - 1, 2 do
    if not (retry and redis.call('ZSCORE', KEYS[1], ARGV[i + 1])) then
        if redis.call('ZCOUNT', KEYS[1], '(' .. cutoff, '+inf') >= capacity then
            break
        end
        redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1])
        if added == 0 then
            redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, cutoff)
        end
    end
    added = added + 1
end
if added > 0 then
    redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return added
""",
)

# A group's members are a sorted set (channel -> join time). The Streams layer keeps
# a digest beside it (see keys.stream_group_digest_key): how many channels the set
# holds, ':', and the XOR of each one's SHA-1 as 40 hex digits. Adding a member and
# removing it flip the same bits, so every change keeps the digest in O(1), and the
# same members give the same digest whatever happened in between (an empty restart
# and the joins that restored it included): a sender's plan is checked against it
# without reading the members (STREAM_GROUP_SEND_KNOWN). So every script that changes
# a Streams group does it through these functions. compat.core passes no digest key:
# channels_redis processes change its groups without one.
#
# A digest that does not follow its set (evicted by a maxmemory policy, or its set
# evicted or changed by hand: its count differs from ZCARD) is dropped at the next
# change and rebuilt from the members by the next group send that finds them as
# planned (after its messages: see the module docstring on memory).
_MEMBERSHIP = """
local function words_of(hex)
    -- 40 hex digits as five 32-bit words (what bit.bxor works on)
    local words = {}
    for w = 1, 5 do
        words[w] = tonumber(string.sub(hex, 8 * w - 7, 8 * w), 16)
    end
    return words
end

local function parse_digest(raw)
    -- The count and words of a stored digest; nil when it is not one
    local count, hex = string.match(raw, '^(%d+):(%x+)$')
    if not count or #hex ~= 40 then
        return nil
    end
    return tonumber(count), words_of(hex)
end

local function open_members(group, digest_key)
    -- The members of ``group`` with their digest, for the functions below. words:
    -- false when no digest is kept (compat.core) or it is missing or stale.
    local m = {group = group, key = digest_key, words = false, count = 0, changed = false}
    if not digest_key then
        return m
    end
    local raw = redis.call('GET', digest_key)
    local size = redis.call('ZCARD', group)
    local count, words = nil, nil
    if raw then
        count, words = parse_digest(raw)
    end
    if count and count == size then
        m.words, m.count = words, count
    elseif size == 0 then
        m.words, m.changed = {0, 0, 0, 0, 0}, raw ~= false
    elseif raw then
        m.stale = true  -- dropped at close: the next group send rebuilds it
    end
    return m
end

local function flip(m, channel, delta)
    if m.words then
        local words, its = m.words, words_of(redis.sha1hex(channel))
        for w = 1, 5 do
            words[w] = bit.bxor(words[w], its[w])
        end
        m.count = m.count + delta
        m.changed = true
    end
end

local function digest_text(m)
    local w = m.words
    return m.count .. ':' .. bit.tohex(w[1]) .. bit.tohex(w[2]) .. bit.tohex(w[3])
        .. bit.tohex(w[4]) .. bit.tohex(w[5])
end

local function add_member(m, channel, joined)
    -- 1 when ``channel`` is new to the group, else 0 (its join time is renewed).
    local added = redis.call('ZADD', m.group, joined, channel)
    if added == 1 then
        flip(m, channel, 1)
    end
    return added
end

local function remove_member(m, channel)
    if redis.call('ZREM', m.group, channel) == 1 then
        flip(m, channel, -1)
    end
end

local function expire_members(m, cutoff)
    -- Drops the members that joined at or before ``cutoff``.
    if m.words then
        for _, channel in ipairs(redis.call('ZRANGEBYSCORE', m.group, '-inf', cutoff)) do
            flip(m, channel, -1)
        end
    end
    redis.call('ZREMRANGEBYSCORE', m.group, '-inf', cutoff)
end

local function close_members(m, ttl)
    -- Stores the digest if it changed. ``ttl`` (seconds): the group's new TTL, or nil
    -- to keep the set's; the digest always lives exactly as long as its set.
    if m.stale or (m.changed and m.count == 0) then
        redis.call('DEL', m.key)
    elseif m.changed then
        redis.call('SET', m.key, digest_text(m))
        if not ttl then
            local left = redis.call('PTTL', m.group)
            if left > 0 then
                redis.call('PEXPIRE', m.key, left)
            end
        end
    end
    if ttl then
        redis.call('EXPIRE', m.group, ttl)
        if m.key and m.words and m.count > 0 then
            redis.call('EXPIRE', m.key, ttl)
        end
    end
end
"""

GROUP_MEMBERS = LuaScript(
    "group_members",
    _MEMBERSHIP
    + """
-- KEYS[1]: the group's sorted set of channel names   KEYS[2]: its digest (Streams)
-- ARGV[1]: drop members that joined at or before this time (now - group_expiry)
-- Returns the remaining member channel names.
local m = open_members(KEYS[1], KEYS[2])
expire_members(m, ARGV[1])
close_members(m)
return redis.call('ZRANGE', KEYS[1], 0, -1)
""",
)

GROUP_ADD = LuaScript(
    "group_add",
    _MEMBERSHIP
    + """
-- KEYS[1]: the group's sorted set of channel names   KEYS[2]: its digest (Streams)
-- ARGV[1]: join time   ARGV[2]: the group's TTL in seconds   ARGV[3..]: channels
-- Adds the channels (group_add, and memberships restored after Redis lost its data)
-- and refreshes the group's TTL. Returns how many were new.
local m = open_members(KEYS[1], KEYS[2])
local added = 0
for i = 3, #ARGV do
    added = added + add_member(m, ARGV[i], ARGV[1])
end
close_members(m, ARGV[2])
return added
""",
)

_MEMBERS_CHANGED = """
local function members_changed(group_key, cutoff, digest, check)
    -- When `check`, compares the members that joined after `cutoff` with `digest`
    -- (SHA-1 of the names sorted and joined by newlines): returns {-1, member...} when
    -- they differ, false when they are the same. Writes nothing: the caller drops
    -- the expired members after its sends (their first write must be a message).
    if not check then
        return false
    end
    local members = redis.call('ZRANGEBYSCORE', group_key, '(' .. cutoff, '+inf')
    local sorted = {}
    for i, member in ipairs(members) do
        sorted[i] = member
    end
    table.sort(sorted)
    if redis.sha1hex(table.concat(sorted, '\\n')) == digest then
        return false
    end
    local reply = {-1}
    for _, member in ipairs(members) do
        reply[#reply + 1] = member
    end
    return reply
end
"""

_CLASSIC_ADD_ALL = """
local function add_all(k, a, n)
    -- KEYS[k+i]: a channel's sorted set (a key repeats for each message of a bulk send,
    -- in order)   ARGV[a+4i-3..a+4i]: what goes there: the serialized message, the
    -- channel's capacity, its expiry in seconds, the message's score (send time; rising
    -- within a bulk send)
    -- Returns how many were refused (the channel was full).
    local full = 0
    for i = 1, n do
        local key, at = KEYS[k + i], a + 4 * (i - 1)
        local expiry = tonumber(ARGV[at + 3])
        local cutoff = tonumber(ARGV[at + 4]) - expiry
        if redis.call('ZCOUNT', key, '(' .. cutoff, '+inf') < tonumber(ARGV[at + 2]) then
            redis.call('ZADD', key, ARGV[at + 4], ARGV[at + 1])
            redis.call('ZREMRANGEBYSCORE', key, 0, cutoff)
            redis.call('EXPIRE', key, math.max(1, math.ceil(expiry)))
        else
            full = full + 1
        end
    end
    return full
end
"""

CLASSIC_GROUP_SEND = LuaScript(
    "classic_group_send",
    _CLASSIC_ADD_ALL
    + """
-- KEYS[1..n]: channel sorted sets on this shard (repeated per message of a bulk send)
-- ARGV[1..4n]: per key, as add_all: message, capacity, expiry, score
-- Returns how many were refused (the channel was full).
return add_all(0, 0, #KEYS)
""",
)

CLASSIC_GROUP_SEND_KNOWN = LuaScript(
    "classic_group_send_known",
    _MEMBERS_CHANGED
    + _CLASSIC_ADD_ALL
    + """
-- KEYS[1]: the group's sorted set of members
-- KEYS[2..n+1]: channel sorted sets of the members the caller knows of (as
-- CLASSIC_GROUP_SEND)
-- ARGV[1]: drop members that joined at or before this time (now - group_expiry)
-- ARGV[2]: SHA-1 of the members the keys were planned for, sorted, joined by newlines
-- ARGV[3..4n+2]: as CLASSIC_GROUP_SEND (message, capacity, expiry, score per key)
-- ARGV[#ARGV]: '1' when an earlier attempt of this call may have landed (its reply was
-- lost): the members are not checked then, as adding the same serialized message
-- again changes nothing
-- Returns {full} when the members are as planned and the messages were added;
-- otherwise adds nothing and returns {-1, member...} for the caller to plan again.
local changed = members_changed(KEYS[1], ARGV[1], ARGV[2], ARGV[#ARGV] ~= '1')
if changed then
    return changed
end
local full = add_all(1, 2, #KEYS - 1)
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[1])
return {full}
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

# STREAM_APPEND (every send, bulk send, group send and replay) and
# STREAM_GROUP_SEND_KNOWN append a batch of messages (one for a plain send) to one or
# more destination streams of one hash slot, in order.
#
# A normal channel's stream holds only its own messages: capacity is its length once
# its expired entries are trimmed (its own ``expiry``, which ``channel_expiry`` may
# set per channel), and its entries stay until a receive() acknowledges them.
# ``delivered`` is the sorted set of tags STREAM_ACK recorded for it: a retried send
# whose first attempt landed and was already received, acknowledged and deleted finds
# its tag there instead of in the stream.
#
# A process inbox is shared by every process-specific channel of one process, and its
# reader moves entries to local queues before their receive() comes. So the inbox's
# length says nothing about one channel. A channel's unreceived messages are those
# still in the inbox naming it (the reader trims what it handed on) plus those in its
# process's queue, which the reader reports at every trim, in the inbox's state hash
# (STREAM_INBOX_ADVANCE): its field for the channel, and '^' the largest of them. The
# sum is exact or over (receives since the report), never under. While the inbox's
# length plus the largest report is below every destination's capacity, nothing
# needs looking at per channel (the steady state: one XLEN, one HGET); otherwise the
# script counts the inbox's entries per channel once (up to INBOX_SCAN of them; past
# that, as if every one named each channel: a process that reads nothing is refused)
# and keeps the counts as it appends. An entry goes to the destination channels with
# room, named in its 'c' field; a channel at capacity is refused here, where the
# sender hears of it, and nothing is ever dropped after it was accepted. Nothing trims
# an inbox but its reader: an expired entry is dropped when it is read (each channel's
# own expiry), and the inbox outlives the longest expiry.
#
# A batch: within one script call nothing is read and nothing expires, so a channel
# that fills up stays full: each channel takes a prefix of the batch, in order, and
# refuses the rest. Its messages' dedup tags are the batch's tag, then ':' and the
# message's number (a batch of one keeps the tag as it is).
_STREAM_APPEND = """
-- The batch in ``argv`` (ARGV, or one call's arguments of STREAM_APPEND_EACH): its
-- messages' payloads and history positions, the group ('' for a send), the time of
-- the call in ms and the retry flag.
local function read_batch(argv, a)
    local n = tonumber(argv[a + 1])
    local batch = {n = n, payloads = {}, positions = {}}
    for m = 1, n do
        batch.payloads[m] = argv[a + 2 * m]
        batch.positions[m] = argv[a + 2 * m + 1]
    end
    local last = #argv
    batch.group, batch.now, batch.retry = argv[last - 2], tonumber(argv[last - 1]), argv[last]
    return batch, a + 1 + 2 * n
end

local function nth_tag(tag, m, n)
    if n == 1 then
        return tag
    end
    return tag .. ':' .. m
end

-- A retry after a lost reply: how many of the batch's messages the first attempt left
-- in ``key`` (looking back ``scan`` entries beyond the batch) or, for a normal channel,
-- in its ``delivered`` tags. 0: it did not land, or it stored nothing.
local function landed(key, delivered, tag, n, scan)
    local wanted = {}
    for m = 1, n do
        wanted[nth_tag(tag, m, n)] = true
    end
    local found = 0
    for _, entry in ipairs(redis.call('XREVRANGE', key, '+', '-', 'COUNT', scan + n)) do
        local fields = entry[2]
        for j = 1, #fields, 2 do
            if fields[j] == 'i' and wanted[fields[j + 1]] then
                wanted[fields[j + 1]] = nil
                found = found + 1
            end
        end
    end
    if delivered then
        for wanted_tag in pairs(wanted) do
            if redis.call('ZSCORE', delivered, wanted_tag) then
                found = found + 1
            end
        end
    end
    return found
end

local function add_entry(key, batch, m, tag, channels)
    local fields = {'d', batch.payloads[m], 'i', nth_tag(tag, m, batch.n)}
    if channels ~= '' then
        fields[#fields + 1] = 'c'
        fields[#fields + 1] = channels
    end
    local position = batch.positions[m]
    if position ~= '' then
        -- A group message with history: the receiver puts its position in the message.
        fields[#fields + 1] = 'g'
        fields[#fields + 1] = batch.group
        fields[#fields + 1] = 'p'
        fields[#fields + 1] = position
    end
    return redis.call('XADD', key, '*', unpack(fields))
end

-- A normal channel: returns how many of the batch's messages it refused (full).
local function append_channel(key, delivered, batch, tag, capacity, expiry_ms)
    local n = batch.n
    local minid = string.format('%.0f-0', math.max(0, batch.now - expiry_ms))
    local accepted = 0
    for m = 1, n do
        -- The message first (a full Redis refuses it: see the module docstring), then
        -- the expired entries go, and the message too if the rest leaves it no room.
        local id = add_entry(key, batch, m, tag, '')
        if m == 1 then
            redis.call('XTRIM', key, 'MINID', minid)
        end
        if redis.call('XLEN', key) > capacity then
            redis.call('XDEL', key, id)
            break
        end
        accepted = accepted + 1
    end
    if accepted > 0 then
        redis.call('PEXPIRE', key, math.max(1000, expiry_ms))
    end
    return n - accepted
end

-- How far back a retried inbox append looks for its first attempt; one its reader
-- already took is dropped by the reader's own dedup of recent tags.
local INBOX_RETRY_SCAN = 1000
-- How many inbox entries a capacity check counts per channel at most.
local INBOX_SCAN = 512

local function split(text)
    local items = {}
    for item in string.gmatch(text, '[^,]+') do
        items[#items + 1] = item
    end
    return items
end

-- Per channel: how many of the inbox's entries name it (entries not read and reported
-- yet). nil when there are too many to count.
local function inbox_counts(key, length)
    if length > INBOX_SCAN then
        return nil
    end
    local counts = {}
    for _, entry in ipairs(redis.call('XRANGE', key, '-', '+')) do
        local fields = entry[2]
        for j = 1, #fields, 2 do
            if fields[j] == 'c' then
                for name in string.gmatch(fields[j + 1], '[^,]+') do
                    counts[name] = (counts[name] or 0) + 1
                end
            end
        end
    end
    return counts
end

-- Each of ``channels``' unreceived messages (reported, plus inbox entries naming it),
-- and whether they were counted per channel (else every entry counts for each).
local function backlogs(key, state, channels, length)
    local counts = inbox_counts(key, length)
    local held = {}
    for first = 1, #channels, 1000 do  -- unpack() has a limit: HMGET in slices
        local last = math.min(first + 999, #channels)
        local reported = redis.call('HMGET', state, unpack(channels, first, last))
        for i = first, last do
            local inbox = length
            if counts then
                inbox = counts[channels[i]] or 0
            end
            held[i] = (tonumber(reported[i - first + 1]) or 0) + inbox
        end
    end
    return held, counts ~= nil
end

-- A process inbox: ``listed`` names the destination channels (comma-separated),
-- ``capacities`` their capacities (one for all, or one each). Returns how many
-- (channel, message) pairs were refused.
local function append_inbox(key, state, batch, tag, listed, capacities, expiry_ms)
    local n = batch.n
    local caps = split(capacities)
    local least = tonumber(caps[1])
    for i = 2, #caps do
        least = math.min(least, tonumber(caps[i]))
    end
    local length = redis.call('XLEN', key)
    local top = tonumber(redis.call('HGET', state, '^')) or 0
    local channels, held, counted
    local refused, added = 0, 0
    for m = 1, n do
        local names = listed
        if held or length + top >= least then
            if not held then
                channels = split(listed)
                held, counted = backlogs(key, state, channels, length)
            end
            local accepted = {}
            for i = 1, #channels do
                if held[i] < tonumber(caps[i] or caps[1]) then
                    accepted[#accepted + 1] = channels[i]
                    held[i] = held[i] + 1
                elseif not counted then
                    held[i] = held[i] + 1  -- uncounted: every entry counts for each
                end
            end
            refused = refused + #channels - #accepted
            if #accepted == 0 then
                -- Every channel is full, and stays so for the rest of the batch.
                refused = refused + (n - m) * #channels
                break
            end
            if #accepted < #channels then
                names = table.concat(accepted, ',')
            end
        end
        add_entry(key, batch, m, tag, names)
        length, added = length + 1, added + 1
    end
    if added > 0 then
        redis.call('PEXPIRE', key, math.max(1000, expiry_ms))
    end
    return refused
end

local function append_all(k, argv, a)
    -- argv: ARGV, or one call's arguments (STREAM_APPEND_EACH)
    -- argv[a+1]: n, how many messages the batch has
    -- argv[a+2..a+1+2n]: each message's payload and history position ('' for none)
    -- then per destination d, with KEYS[k+2d-1] its stream and KEYS[k+2d] its delivered
    -- tags (a normal channel) or its state hash (a process inbox), four values: dedup
    -- tag, channels ('' for a normal channel; an inbox's destination channels,
    -- comma-separated), capacity (an inbox's: one for all its channels, or one each,
    -- comma-separated), expiry in ms (an inbox's: the longest of the layer)
    -- argv[#argv-2]: group ('' for a send)   argv[#argv-1]: now in ms
    -- argv[#argv]: '1' on a retry
    -- Returns how many (channel, message) pairs were refused: no room.
    -- A retry that finds its first attempt landed appends nothing, and counts the
    -- batch's messages it did not find as refused.
    local batch, i = read_batch(argv, a)
    local full, key, last = 0, k + 1, #argv
    while i + 4 <= last - 3 do
        local tag, listed, capacity, expiry_ms = argv[i + 1], argv[i + 2], argv[i + 3],
            tonumber(argv[i + 4])
        local found = 0
        if batch.retry == '1' and listed == '' then
            found = landed(KEYS[key], KEYS[key + 1], tag, batch.n, tonumber(capacity))
        elseif batch.retry == '1' then
            found = landed(KEYS[key], false, tag, batch.n, INBOX_RETRY_SCAN)
        end
        if found > 0 then
            full = full + batch.n - found
        elseif listed == '' then
            full = full + append_channel(KEYS[key], KEYS[key + 1], batch, tag,
                tonumber(capacity), expiry_ms)
        else
            full = full + append_inbox(KEYS[key], KEYS[key + 1], batch, tag, listed, capacity,
                expiry_ms)
        end
        key, i = key + 2, i + 4
    end
    return full
end
"""

STREAM_APPEND_EACH = LuaScript(
    "stream_append_each",
    _STREAM_APPEND
    + """
-- KEYS: as STREAM_APPEND, the same for every call
-- ARGV: per call of STREAM_APPEND, how many arguments it has, then those arguments
-- Returns each call's reply, in order: the calls run one after another, exactly as
-- they would in a pipeline, in one script call instead of one each (the batcher
-- merges concurrent sends to one stream this way; see streamlayer.batching).
local replies, i = {}, 1
while i <= #ARGV do
    local count, argv = tonumber(ARGV[i]), {}
    for j = 1, count do
        argv[j] = ARGV[i + j]
    end
    replies[#replies + 1] = append_all(0, argv, 0)
    i = i + 1 + count
end
return replies
""",
)

# The commonest append, ahead of the general one: one message, no history position,
# not a retry, to one process inbox with room to spare (its length plus the largest
# reported backlog below the capacity: append_inbox's steady state, which looks at no
# channel). It does what append_all does then, the same entry and TTL, without
# building the batch or defining the functions: Redis' time for it fell from 7.4 to
# 4.6 us (docs/performance.rst, "A fifth run"). Anything else falls through to the
# general path, which decides afresh.
_STREAM_APPEND_STEADY = """
if #ARGV == 10 and ARGV[1] == '1' and ARGV[3] == '' and ARGV[5] ~= '' and ARGV[10] == '0' then
    local least = tonumber(ARGV[6])  -- nil: one capacity per channel (the general path)
    if least then
        local length = redis.call('XLEN', KEYS[1])
        if length + (tonumber(redis.call('HGET', KEYS[2], '^')) or 0) < least then
            redis.call('XADD', KEYS[1], '*', 'd', ARGV[2], 'i', ARGV[4], 'c', ARGV[5])
            redis.call('PEXPIRE', KEYS[1], math.max(1000, tonumber(ARGV[7])))
            return 0
        end
    end
end
"""

STREAM_APPEND = LuaScript(
    "stream_append",
    """
-- KEYS, ARGV: as append_all (the batch; destinations on this shard and slot; group,
-- now, '1' on a retry)
-- Returns how many (channel, message) pairs were refused (no room): for a send to
-- one channel, how many of the batch's last messages it refused.
"""
    + _STREAM_APPEND_STEADY
    + _STREAM_APPEND
    + """
return append_all(0, ARGV, 0)
""",
    each=STREAM_APPEND_EACH,
)


STREAM_GROUP_SEND_KNOWN = LuaScript(
    "stream_group_send_known",
    _MEMBERSHIP
    + _STREAM_APPEND
    + """
-- KEYS[1]: the group's sorted set of members   KEYS[2]: its digest
-- KEYS[3..]: as STREAM_APPEND, for the members the caller knows of
-- ARGV[1]: drop members that joined at or before this time (now - group_expiry)
-- ARGV[2]: the digest of the members the destinations were planned for (their count,
-- ':', the XOR of their SHA-1s: see _MEMBERSHIP)
-- ARGV[3..]: as STREAM_APPEND (the batch, destinations, group, now, '1' on a retry)
-- One round trip for a group whose members have not changed since the caller last
-- read them: when they are still those, appends as STREAM_APPEND does and returns
-- {full}; otherwise appends nothing and returns {-1, member...} for the caller to plan
-- again. The members are compared through the kept digest, less those that expired
-- (O(1) for a steady group: the members are not read); only a digest that is missing
-- or stale is rebuilt from them, and stored after the send. A retry checks too (its
-- first attempt may not have landed, and a member may have left since): when the
-- members are unchanged, appending to the same destinations again is found out by the
-- dedup tags; when they changed, the caller plans again with the same tags.
local m = open_members(KEYS[1], KEYS[2])
if not m.words then
    m.words, m.count, m.stale = {0, 0, 0, 0, 0}, 0, false
    for _, channel in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
        flip(m, channel, 1)
    end
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, channel in ipairs(expired) do
    flip(m, channel, -1)
end
if digest_text(m) ~= ARGV[2] then
    local reply = {-1}
    for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf')) do
        reply[#reply + 1] = member
    end
    return reply
end
local full = append_all(2, ARGV, 2)
if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
end
close_members(m)
return {full}
""",
)


STREAM_ACK = LuaScript(
    "stream_ack",
    """
-- KEYS[1]: a normal channel's stream   KEYS[2]: its delivered tags (a sorted set)
-- ARGV[1]: consumer group   ARGV[2]: consumer   ARGV[3]: entry id
-- ARGV[4]: the entry's dedup tag   ARGV[5]: now in ms
-- ARGV[6]: how long a retried send may still come (ms): tags are kept that long
-- ARGV[7]: '1' when an earlier attempt of this call may have landed (its reply was lost)
-- Acknowledges the entry and deletes it (a delivered message leaves no trace but its
-- tag, which a retried send of it finds), if the consumer still owns it. Returns 1
-- when the caller may deliver it, 0 when another consumer took it over (XAUTOCLAIM
-- after claim_after) and delivers it instead. When the stream or its group is gone
-- (Redis lost its data after the entry was read) nobody else can have it: 1.
local group, consumer, id = ARGV[1], ARGV[2], ARGV[3]
local mine = redis.pcall('XPENDING', KEYS[1], group, id, id, 1, consumer)
if type(mine) == 'table' and mine.err then
    return 1
end
if #mine == 0 then
    if ARGV[7] ~= '1' then
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
if ARGV[4] ~= '' then
    local now, keep = tonumber(ARGV[5]), tonumber(ARGV[6])
    redis.call('ZADD', KEYS[2], now, ARGV[4])
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - keep)
    redis.call('PEXPIRE', KEYS[2], keep)
end
return 1
""",
)

STREAM_JOIN_CONSUMERS = LuaScript(
    "stream_join_consumers",
    """
-- KEYS[1]: a normal channel's stream   ARGV[1]: consumer group   ARGV[2]: key TTL in ms
-- Creates the consumer group (and the stream) unless it exists; returns 1. A trim
-- that removes nothing runs first: a full Redis refuses only a script's first write
-- (see the module docstring), and a receiver that cannot join could never drain
-- the backlog that filled it.
redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', '1000000000')
local created = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
if type(created) == 'table' and created.err and not string.find(created.err, 'BUSYGROUP') then
    return redis.error_reply(created.err)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
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

STREAM_INBOX_ADVANCE = LuaScript(
    "stream_inbox_advance",
    """
-- KEYS[1]: a process's inbox state (a hash: field '@' is the reader's cursor, '^' the
-- largest backlog of any of its channels, every other field one channel's backlog in
-- the process's queue)   KEYS[2]: its inbox stream
-- ARGV[1]: the id of the last entry handed on   ARGV[2]: the state's TTL in ms
-- ARGV[3]: trim entries below this id ('' to trim nothing)
-- ARGV[4]: the largest backlog now   ARGV[5]: 'channel,backlog,channel,backlog...':
-- the channels whose backlog changed since the last report (0: none left)
-- Records the reader's position, drops what it handed on and reports the backlogs, in
-- one step: what it trims leaves the inbox as it shows up in the reports, so senders'
-- checks (see append_inbox) never count a message twice or miss it. Reports are
-- absolute values, so a report sent again after a lost reply changes nothing. Returns
-- the cursor's previous value (false when missing), which tells the reader whether
-- Redis still holds the inbox it was reading.
local previous = redis.call('HGET', KEYS[1], '@')
-- The trim first: on a full Redis the writes after a script's first one are not
-- refused, and this bookkeeping is what frees memory (see the module docstring).
if ARGV[3] ~= '' then
    redis.call('XTRIM', KEYS[2], 'MINID', ARGV[3])
end
local set, gone = {'@', ARGV[1], '^', ARGV[4]}, {}
local channel
for item in string.gmatch(ARGV[5], '[^,]+') do
    if channel == nil then
        channel = item
    else
        if item == '0' then
            gone[#gone + 1] = channel
        else
            set[#set + 1] = channel
            set[#set + 1] = item
        end
        channel = nil
    end
end
for first = 1, #gone, 1000 do  -- unpack() has a limit: in slices
    redis.call('HDEL', KEYS[1], unpack(gone, first, math.min(first + 999, #gone)))
end
for first = 1, #set, 2000 do
    -- pcall: on a full Redis with nothing to trim this is the first write, refused;
    -- the reader goes on (the reports stay as they were: an over-count).
    redis.pcall('HSET', KEYS[1], unpack(set, first, math.min(first + 1999, #set)))
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return previous
""",
)


# --- group history (replay) ----------------------------------------------------------
#
# A group with history keeps, on its own hash slot: the membership sorted set, a
# capped stream of its recent messages, and a small hash holding the stream's
# epoch (a random name given when the stream is born: a position from an earlier
# incarnation, after Redis lost its data, is recognisably foreign) and the highest
# entry id ever trimmed (a replay from a position below it has a gap).

_HISTORY = """
local function id_parts(id)
    local dash = string.find(id, '-', 1, true)
    return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end

-- True when stream id a is greater than stream id b.
local function id_after(a, b)
    local ams, aseq = id_parts(a)
    local bms, bseq = id_parts(b)
    return ams > bms or (ams == bms and aseq > bseq)
end

-- The stream's epoch, named now (from the caller's candidate) if it has none.
local function epoch_of(meta, candidate)
    local epoch = redis.call('HGET', meta, 'epoch')
    if not epoch then
        redis.call('HSET', meta, 'epoch', candidate)
        epoch = candidate
    end
    return epoch
end

-- Trim to maxlen entries and drop those before minid, remembering the newest removed.
local function trim_history(hist, meta, maxlen, minid)
    local removed = false
    local len = redis.call('XLEN', hist)
    if len > maxlen then
        local gone = redis.call('XRANGE', hist, '-', '+', 'COUNT', len - maxlen)
        removed = gone[#gone][1]
        redis.call('XTRIM', hist, 'MAXLEN', maxlen)
    end
    local expired = redis.call('XREVRANGE', hist, '(' .. minid, '-', 'COUNT', 1)
    if #expired > 0 then
        if not removed or id_after(expired[1][1], removed) then
            removed = expired[1][1]
        end
        redis.call('XTRIM', hist, 'MINID', minid)
    end
    if removed then
        redis.call('HSET', meta, 'trimmed', removed)
    end
end

local function keep_alive(hist, meta, ttl)
    redis.call('PEXPIRE', hist, ttl)
    redis.call('PEXPIRE', meta, ttl)
end

-- The newest id the stream ever held (what a reader is up to when it saw everything).
local function newest(hist, meta)
    local top = redis.call('XREVRANGE', hist, '+', '-', 'COUNT', 1)
    if #top > 0 then
        return top[1][1]
    end
    return redis.call('HGET', meta, 'trimmed') or '0-0'
end

-- {epoch, complete, newest id, entries}: the entries after since_id (up to limit, oldest
-- first), or with since_epoch '' the latest limit entries. complete is 1 when nothing
-- after the position was lost: same epoch and nothing newer than it trimmed. From
-- another epoch every retained entry is new to the reader, but some may be missing.
local function read_history(hist, meta, epoch, since_epoch, since_id, limit)
    local entries
    local complete = 1
    if since_epoch == '' then
        entries = redis.call('XREVRANGE', hist, '+', '-', 'COUNT', limit)
        local ordered = {}
        for i = #entries, 1, -1 do
            ordered[#ordered + 1] = entries[i]
        end
        entries = ordered
    elseif since_epoch ~= epoch then
        complete = 0
        entries = redis.call('XRANGE', hist, '-', '+', 'COUNT', limit)
    else
        local trimmed = redis.call('HGET', meta, 'trimmed')
        if trimmed and id_after(trimmed, since_id) then
            complete = 0
        end
        entries = redis.call('XRANGE', hist, '(' .. since_id, '+', 'COUNT', limit)
    end
    return {epoch, complete, newest(hist, meta), entries}
end
"""

STREAM_GROUP_PUBLISH = LuaScript(
    "stream_group_publish",
    _HISTORY
    + _MEMBERSHIP
    + """
-- KEYS[1]: the group's members   KEYS[2]: its history stream   KEYS[3]: its history meta
-- KEYS[4]: the members' digest
-- ARGV[1]: drop members that joined at or before this time   ARGV[2]: the batch's
-- dedup tag (its messages' tags are it, ':' and their number; a batch of one: it)
-- ARGV[3]: history length   ARGV[4]: history MINID   ARGV[5]: history TTL in ms
-- ARGV[6]: a new epoch, if the stream has none   ARGV[7..#ARGV-1]: the messages' payloads
-- ARGV[#ARGV]: '1' when this call retries an attempt whose reply was lost
-- Records the messages in the history, in order, and returns {epoch, n, their entry
-- ids (n), members...}: one atomic step, so a concurrent join sees each message either
-- in the history it replays or as a live delivery, never both and never neither. A
-- retry that finds its first attempt landed answers its ids ('' for one trimmed since).
local epoch = epoch_of(KEYS[3], ARGV[6])
local n = #ARGV - 7
local tags, ids = {}, {}
for m = 1, n do
    tags[m] = n == 1 and ARGV[2] or ARGV[2] .. ':' .. m
end
local landed = false
if ARGV[#ARGV] == '1' then
    local index = {}
    for m = 1, n do
        index[tags[m]] = m
    end
    local scan = math.min(tonumber(ARGV[3]), 1000) + n
    for _, entry in ipairs(redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', scan)) do
        local fields = entry[2]
        for j = 1, #fields, 2 do
            if fields[j] == 'i' and index[fields[j + 1]] then
                ids[index[fields[j + 1]]] = entry[1]
                landed = true
            end
        end
    end
end
for m = 1, n do
    if landed then
        ids[m] = ids[m] or ''
    else
        -- The messages first (a full Redis refuses the first), then the trim.
        ids[m] = redis.call('XADD', KEYS[2], '*', 'd', ARGV[6 + m], 'i', tags[m])
    end
end
if not landed then
    trim_history(KEYS[2], KEYS[3], tonumber(ARGV[3]), ARGV[4])
end
keep_alive(KEYS[2], KEYS[3], ARGV[5])
local members = open_members(KEYS[1], KEYS[4])
expire_members(members, ARGV[1])
close_members(members)
local result = {epoch, n}
for m = 1, n do
    result[#result + 1] = ids[m]
end
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    result[#result + 1] = member
end
return result
""",
)

STREAM_GROUP_JOIN = LuaScript(
    "stream_group_join",
    _HISTORY
    + _MEMBERSHIP
    + """
-- KEYS[1]: the group's members   KEYS[2]: its history stream   KEYS[3]: its history meta
-- KEYS[4]: the members' digest
-- ARGV[1]: channel   ARGV[2]: join time   ARGV[3]: membership TTL in seconds
-- ARGV[4]: epoch of the caller's position   ARGV[5]: entry id of that position
-- ARGV[6]: history length   ARGV[7]: history MINID   ARGV[8]: history TTL in ms
-- ARGV[9]: a new epoch, if the stream has none
-- Joins and reads the history after the position in one atomic step (see
-- stream_group_publish). Returns {epoch, complete, newest id, entries}.
local members = open_members(KEYS[1], KEYS[4])
add_member(members, ARGV[1], ARGV[2])
close_members(members, ARGV[3])
local epoch = epoch_of(KEYS[3], ARGV[9])
trim_history(KEYS[2], KEYS[3], tonumber(ARGV[6]), ARGV[7])
keep_alive(KEYS[2], KEYS[3], ARGV[8])
return read_history(KEYS[2], KEYS[3], epoch, ARGV[4], ARGV[5], tonumber(ARGV[6]))
""",
)

STREAM_HISTORY = LuaScript(
    "stream_history",
    _HISTORY
    + """
-- KEYS[1]: a group's history stream   KEYS[2]: its history meta
-- ARGV[1]: epoch of the caller's position ('' for the latest entries)
-- ARGV[2]: entry id of that position   ARGV[3]: at most this many entries
-- ARGV[4]: history length   ARGV[5]: history MINID   ARGV[6]: history TTL in ms
-- ARGV[7]: a new epoch, if the stream has none
-- Returns {epoch, complete, newest id, entries} (see read_history).
local epoch = epoch_of(KEYS[2], ARGV[7])
trim_history(KEYS[1], KEYS[2], tonumber(ARGV[4]), ARGV[5])
keep_alive(KEYS[1], KEYS[2], ARGV[6])
return read_history(KEYS[1], KEYS[2], epoch, ARGV[1], ARGV[2], tonumber(ARGV[3]))
""",
)

# --- presence --------------------------------------------------------------------------
#
# A group's presence sits beside its membership, on the same slot (Streams) or shard
# (compat.core), in two keys besides the members' sorted set (KEYS[1] of every script
# here; KEYS[4], the Streams layer's, is the members' digest: see _MEMBERSHIP): a
# hash, member channel -> its presence record (the serialized info and join time; ''
# after a sweep ended it), and a sorted set of deadlines, member channel -> when its
# presence ends unless its process refreshes it. A negative deadline is a
# tombstone, minus the time it was set: the presence was swept (record '') or the
# channel discarded (no record), kept so that the channel's process, if it is still
# there, tells which when it next refreshes (a swept member comes back; a discarded
# one is forgotten). Tombstones go after group_expiry.

PRESENCE_JOIN = LuaScript(
    "presence_join",
    _MEMBERSHIP
    + """
-- KEYS[1]: the group's members   KEYS[2]: its presence records   KEYS[3]: their deadlines
-- KEYS[4]: the members' digest (Streams)
-- ARGV[1]: channel   ARGV[2]: now (the join time)   ARGV[3]: the keys' TTL in seconds
-- ARGV[4]: the channel's presence record   ARGV[5]: when its presence ends unless
-- refreshed
-- Joins the group with presence in one step. Returns 1 when the channel had no
-- presence in the group (a join to tell the members of), 0 when it had (its record is
-- replaced).
local members = open_members(KEYS[1], KEYS[4])
add_member(members, ARGV[1], ARGV[2])
local before = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
close_members(members, ARGV[3])
for i = 2, 3 do
    redis.call('EXPIRE', KEYS[i], ARGV[3])
end
if before and before ~= '' then
    return 0
end
return 1
""",
)

PRESENCE_LEAVE = LuaScript(
    "presence_leave",
    _MEMBERSHIP
    + """
-- KEYS: as PRESENCE_JOIN   ARGV[1]: channel   ARGV[2]: now
-- Removes the channel from the group (group_discard) and ends its presence. Returns
-- its presence record, or false when it had none. A channel that had presence leaves
-- a tombstone: its process, if another one discarded it, forgets it instead of
-- restoring it.
local members = open_members(KEYS[1], KEYS[4])
remove_member(members, ARGV[1])
close_members(members)
local record = redis.call('HGET', KEYS[2], ARGV[1])
if not record then
    return false
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], -tonumber(ARGV[2]), ARGV[1])
if record == '' then
    return false
end
return record
""",
)

PRESENCE_READ = LuaScript(
    "presence_read",
    """
-- KEYS: as PRESENCE_JOIN
-- ARGV[1]: 'size', 'channels' or 'presence'
-- ARGV[2]: members that joined at or before this time have expired (now - group_expiry)
-- ARGV[3]: now: a presence whose deadline passed has ended (its process stopped
-- refreshing it), and the membership with it, even before a sweep removes them
-- Writes nothing. 'size': how many live members; 'channels': their names; 'presence':
-- {channel, record, ...} for the live members with presence.
local cutoff, now = tonumber(ARGV[2]), tonumber(ARGV[3])
local ended = {}
for _, channel in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '(0', now)) do
    ended[channel] = true
end
if ARGV[1] == 'size' then
    local size = redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[2], '+inf')
    for channel in pairs(ended) do
        local joined = redis.call('ZSCORE', KEYS[1], channel)
        if joined and tonumber(joined) > cutoff then
            size = size - 1
        end
    end
    return size
end
local live = {}
local reply = {}
for _, channel in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[2], '+inf')) do
    if not ended[channel] then
        live[channel] = true
        reply[#reply + 1] = channel
    end
end
if ARGV[1] == 'channels' then
    return reply
end
reply = {}
local records = redis.call('HGETALL', KEYS[2])
for i = 1, #records, 2 do
    if live[records[i]] and records[i + 1] ~= '' then
        reply[#reply + 1] = records[i]
        reply[#reply + 1] = records[i + 1]
    end
end
return reply
""",
)

PRESENCE_REFRESH = LuaScript(
    "presence_refresh",
    _MEMBERSHIP
    + """
-- KEYS: as PRESENCE_JOIN
-- ARGV[1]: now   ARGV[2]: the new deadline of this process's members' presence
-- ARGV[3]: members that joined at or before this time have expired (now - group_expiry)
-- ARGV[4]: the keys' TTL in seconds
-- ARGV[5..]: this process's live members with presence, each followed by its record
-- One process's refresh of one group, and a sweep of the others. For each of this
-- process's members:
--   still a member: its presence goes on (deadline moved; its record put back if Redis
--     lost it);
--   swept (its process was away longer than presence_timeout) or lost with Redis's
--     data: it is alive, so it comes back, membership and presence: 'back';
--   discarded by another process: forgotten, nobody to tell: 'gone';
--   its membership expired (group_expiry) or removed without its presence: its
--     presence ends: 'left' (with its record, to tell the members) and 'gone'.
-- Then every other member whose presence ended (deadline passed) is swept: removed from
-- the group, its presence ended, a tombstone kept: 'swept' (with records).
-- Returns {back, left (channel, record...), gone, swept (channel, record...)}.
local now, deadline, cutoff = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local members = open_members(KEYS[1], KEYS[4])
local back, left, gone, swept = {}, {}, {}, {}
for i = 5, #ARGV, 2 do
    local channel, record = ARGV[i], ARGV[i + 1]
    local joined = tonumber(redis.call('ZSCORE', KEYS[1], channel))
    local held = redis.call('HGET', KEYS[2], channel)
    local ends = tonumber(redis.call('ZSCORE', KEYS[3], channel))
    if joined and joined > cutoff then
        if not held or held == '' then
            redis.call('HSET', KEYS[2], channel, record)
            back[#back + 1] = channel
        end
        redis.call('ZADD', KEYS[3], deadline, channel)
    elseif held == '' or (not joined and not held and not ends) then
        add_member(members, channel, now)
        redis.call('HSET', KEYS[2], channel, record)
        redis.call('ZADD', KEYS[3], deadline, channel)
        back[#back + 1] = channel
    else
        if held then
            left[#left + 1] = channel
            left[#left + 1] = held
            redis.call('HDEL', KEYS[2], channel)
        end
        remove_member(members, channel)
        redis.call('ZREM', KEYS[3], channel)
        gone[#gone + 1] = channel
    end
end
for _, channel in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '(0', now)) do
    local held = redis.call('HGET', KEYS[2], channel)
    remove_member(members, channel)
    redis.call('HSET', KEYS[2], channel, '')
    redis.call('ZADD', KEYS[3], -now, channel)
    if held and held ~= '' then
        swept[#swept + 1] = channel
        swept[#swept + 1] = held
    end
end
-- Tombstones set before the cutoff (scores between -cutoff and 0) are older than a
-- membership's life: their channels cannot come back.
local oldest = '(' .. (-cutoff)
local old = redis.call('ZRANGEBYSCORE', KEYS[3], oldest, '(0')
for _, channel in ipairs(old) do
    redis.call('HDEL', KEYS[2], channel)
end
if #old > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[3], oldest, '(0')
end
if #back > 0 then
    close_members(members, ARGV[4])
    for i = 2, 3 do
        redis.call('EXPIRE', KEYS[i], ARGV[4])
    end
else
    close_members(members)
end
return {back, left, gone, swept}
""",
)
