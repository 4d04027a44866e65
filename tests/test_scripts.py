"""Each Lua script on its own, against a real server (every script in
``streamlayer.scripts`` has a test here: the last test checks it), and the
key-naming helpers."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from streamlayer import scripts
from streamlayer.keys import (
    classic_backup_key,
    classic_channel_key,
    classic_group_key,
    non_local_name,
    scan_pattern,
)
from streamlayer.scripts import (
    CLASSIC_GROUP_SEND,
    CLASSIC_GROUP_SEND_KNOWN,
    CLASSIC_RESTORE_BACKUP,
    CLASSIC_SEND,
    GROUP_ADD,
    GROUP_MEMBERS,
    PRESENCE_JOIN,
    PRESENCE_LEAVE,
    PRESENCE_READ,
    PRESENCE_REFRESH,
    STREAM_ACK,
    STREAM_APPEND,
    STREAM_APPEND_EACH,
    STREAM_FORGET_CONSUMER,
    STREAM_GROUP_JOIN,
    STREAM_GROUP_PUBLISH,
    STREAM_GROUP_SEND_KNOWN,
    STREAM_HISTORY,
    STREAM_INBOX_ADVANCE,
    STREAM_JOIN_CONSUMERS,
    LuaScript,
)
from streamlayer.stored import xor_digest
from streamlayer.testing import RedisServer


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    redis = Redis(host="127.0.0.1", port=redis_server.port)
    yield redis
    await redis.flushall()
    await redis.aclose()


def test_key_names() -> None:
    assert non_local_name("specific.abc!def") == "specific.abc!"
    assert non_local_name("http.request") == "http.request"
    assert classic_channel_key("asgi", "specific.abc!def") == "asgispecific.abc!"
    assert classic_channel_key("asgi", "worker") == "asgiworker"
    assert classic_backup_key("asgiworker") == "asgiworker$inflight"
    assert classic_group_key("asgi", "room") == "asgi:group:room"
    assert scan_pattern("a*b?[c]") == "a\\*b\\?\\[c\\]*"


async def test_send_checks_capacity_trims_and_sets_ttl(client: Redis) -> None:
    now = time.time()

    def send(*members: bytes, retry: str = "0") -> list[object]:
        pairs = [value for i, m in enumerate(members) for value in (now + i * 1e-6, m)]
        return [now - 60, 2, 60, *pairs, retry]

    await client.zadd("k", {"old": now - 100})
    assert await CLASSIC_SEND(client, ["k"], send(b"m1")) == 1  # and trims "old"
    assert await client.zrange("k", 0, -1) == [b"m1"]
    # A batch is added while there is room: a prefix, in order.
    assert await CLASSIC_SEND(client, ["k"], send(b"m2", b"m3", b"m4")) == 1
    assert await client.zrange("k", 0, -1) == [b"m1", b"m2"]
    assert await CLASSIC_SEND(client, ["k"], send(b"m5")) == 0  # full
    # A retry counts what its first attempt added, though the channel is full now.
    assert await CLASSIC_SEND(client, ["k"], send(b"m2", b"m6", retry="1")) == 1
    assert await client.zcard("k") == 2
    assert 0 < await client.ttl("k") <= 60
    await client.delete("k")
    assert await CLASSIC_SEND(client, ["k"], send(b"b", b"a")) == 2
    assert await client.zrange("k", 0, -1) == [b"b", b"a"]  # the batch's order, not the members'


async def test_send_loads_itself_after_script_flush(client: Redis) -> None:
    await client.script_flush()
    now = time.time()
    assert await CLASSIC_SEND(client, ["k"], [now - 60, 5, 60, now, b"m", "0"]) == 1
    assert (await client.script_exists(CLASSIC_SEND.sha)) == [True]


async def test_group_members_drops_expired(client: Redis) -> None:
    now = time.time()
    await client.zadd("g", {"stale": now - 100, "fresh": now})
    assert await GROUP_MEMBERS(client, ["g"], [now - 50]) == [b"fresh"]
    assert await client.zcard("g") == 1
    # With the Streams layer's digest: it follows.
    await _kept_group(client, "g", "gd", {"stale": now - 100, "fresh": now, "new": now})
    assert sorted(await GROUP_MEMBERS(client, ["g", "gd"], [now - 50])) == [b"fresh", b"new"]
    await _assert_digest_follows(client, "g", "gd")


# --- a group's digest (the Streams layer's; see _MEMBERSHIP) ---------------------------


async def _kept_group(client: Redis, key: str, digest: str, members: dict[str, float]) -> None:
    """A group as the Streams layer keeps it: its members and their digest, one TTL."""
    await client.delete(key, digest)
    await client.zadd(key, members)
    await client.set(digest, xor_digest(members), ex=60)
    await client.expire(key, 60)


async def _assert_digest_follows(client: Redis, key: str, digest: str) -> None:
    """The stored digest is the digest of the members the set holds (none: no digest),
    and it lives as long as the set."""
    members = [m.decode() for m in await client.zrange(key, 0, -1)]
    stored = await client.get(digest)
    if not members:
        assert stored is None, f"a digest {stored!r} outlived its group"
        return
    assert stored == xor_digest(members).encode(), f"digest {stored!r} for {members}"
    assert abs(await client.pttl(key) - await client.pttl(digest)) <= 5


def test_the_digest_is_order_free_and_counts() -> None:
    assert xor_digest(["a", "b", "c"]) == xor_digest(["c", "a", "b"])
    assert xor_digest([]) == "0:" + "0" * 40
    assert xor_digest(["a"]).startswith("1:") and len(xor_digest(["a"])) == 42
    assert xor_digest(["a", "b"]) != xor_digest(["a", "c"])


async def test_group_add_keeps_the_digest_from_an_empty_group(client: Redis) -> None:
    now = time.time()
    assert await GROUP_ADD(client, ["g", "gd"], [now, 60, "a", "b"]) == 2
    await _assert_digest_follows(client, "g", "gd")
    assert await GROUP_ADD(client, ["g", "gd"], [now + 1, 90, "b", "c"]) == 1  # b renewed
    await _assert_digest_follows(client, "g", "gd")
    assert 60 < await client.ttl("gd") <= 90
    assert await client.zscore("g", "b") == pytest.approx(now + 1)
    # Without a digest key (compat.core): a plain ZADD and EXPIRE.
    assert await GROUP_ADD(client, ["plain"], [now, 60, "x"]) == 1
    assert await client.zrange("plain", 0, -1) == [b"x"] and await client.ttl("plain") > 0


async def test_a_digest_that_does_not_follow_its_group_is_dropped(client: Redis) -> None:
    """Evicted (missing while the group has members): left missing, never started
    from nothing. Stale (its count is not the group's: the set was evicted or changed
    by hand): dropped at the next change. Not a digest: dropped too."""
    now = time.time()
    await client.zadd("g", {"a": now})
    await GROUP_ADD(client, ["g", "gd"], [now, 60, "b"])
    assert await client.exists("gd") == 0
    await client.set("gd", xor_digest(["a", "b", "c"]))
    await GROUP_ADD(client, ["g", "gd"], [now, 60, "d"])
    assert await client.exists("gd") == 0
    await client.set("gd", "junk")
    await GROUP_MEMBERS(client, ["g", "gd"], [now - 50])
    assert await client.exists("gd") == 0
    # A group that is gone (expired, evicted) beside a digest: a new group starts afresh.
    await client.delete("g")
    await client.set("gd", xor_digest(["a", "b"]))
    await GROUP_ADD(client, ["g", "gd"], [now, 60, "z"])
    await _assert_digest_follows(client, "g", "gd")


async def test_the_steady_send_compares_the_digest_not_the_members(client: Redis) -> None:
    """A digest set by hand for members the set does not hold is believed: the check
    reads the digest (and the expired members), not every member."""
    now = time.time()
    await client.zadd("g", {"a": now, "x": now})
    await client.set("gd", xor_digest(["a", "b"]))
    args = [now - 50, xor_digest(["a"]), *_append([b"m"], ["t1", "", 5, 60_000])]
    planned_for_b = [now - 50, xor_digest(["a", "b"]), *_append([b"m"], ["t1", "", 5, 60_000])]
    assert (await STREAM_GROUP_SEND_KNOWN(client, ["g", "gd", "a", "da"], args))[0] == -1
    assert await STREAM_GROUP_SEND_KNOWN(client, ["g", "gd", "a", "da"], planned_for_b) == [0]


async def test_group_send_skips_full_keys(client: Redis) -> None:
    now = time.time()
    await client.zadd("full", {"x": now})
    await client.zadd("short", {"stale": now - 10})
    args = [
        *[b"to-a", 5, 60, now],
        *[b"to-full", 1, 60, now],
        *[b"to-short", 1, 5, now],  # a 5 s expiry: "stale" is trimmed, so there is room
        *[b"to-a-2", 5, 60, now + 1e-6],  # a bulk send's second message to "a"
    ]
    assert await CLASSIC_GROUP_SEND(client, ["a", "full", "short", "a"], args) == 1
    assert await client.zrange("a", 0, -1) == [b"to-a", b"to-a-2"]
    assert await client.zrange("full", 0, -1) == [b"x"]
    assert await client.zrange("short", 0, -1) == [b"to-short"]
    assert 0 < await client.ttl("short") <= 5 < await client.ttl("a")


async def test_restore_backup_keeps_scores(client: Redis) -> None:
    await client.zadd("c", {"later": 20.0})
    await client.zadd("c$inflight", {"first": 10.0, "second": 15.0})
    assert await CLASSIC_RESTORE_BACKUP(client, ["c", "c$inflight"], []) == 2
    assert await client.zrange("c", 0, -1) == [b"first", b"second", b"later"]
    assert await client.exists("c$inflight") == 0


async def test_forget_consumer_keeps_one_that_owns_entries(client: Redis, prefix: str) -> None:
    key = f"{prefix}:s:chan:{{forget}}"
    await client.xgroup_create(key, "g", id="0", mkstream=True)
    await client.xadd(key, {"d": b"x"})
    await client.xreadgroup("g", "owner", {key: ">"})
    await client.xgroup_createconsumer(key, "g", "idle")
    assert await STREAM_FORGET_CONSUMER(client, [key], ["g", "owner"]) == 0
    assert await STREAM_FORGET_CONSUMER(client, [key], ["g", "idle"]) == 1
    names = {c["name"] for c in await client.xinfo_consumers(key, "g")}
    assert names == {b"owner"}
    await client.delete(key)


def _publish_args(tag: str, retry: str, *payloads: bytes, length: int = 3) -> list[object]:
    far_past = "1-0"
    return [0, tag, length, far_past, 60_000, "e1", *payloads, retry]


async def test_group_publish_retry_records_the_message_once(client: Redis) -> None:
    keys = ["g:{r}", "h:{r}", "m:{r}", "gd:{r}"]
    await _kept_group(client, "g:{r}", "gd:{r}", {"member": time.time(), "old": 0.0})
    first = await STREAM_GROUP_PUBLISH(client, keys, _publish_args("tag1", "0", b"p"))
    again = await STREAM_GROUP_PUBLISH(client, keys, _publish_args("tag1", "1", b"p"))
    assert first == again  # the retry found the first attempt's entry
    assert first[0] == b"e1" and first[1] == 1 and first[3:] == [b"member"]
    assert await client.xlen("h:{r}") == 1
    other = await STREAM_GROUP_PUBLISH(client, keys, _publish_args("tag2", "1", b"q"))
    assert other[2] != first[2] and await client.xlen("h:{r}") == 2
    # A batch: an id each, in order; retried, found again.
    batch = await STREAM_GROUP_PUBLISH(client, keys, _publish_args("tag3", "0", b"x", b"y"))
    assert batch[1] == 2 and batch[2] < batch[3] and batch[4:] == [b"member"]
    assert (
        await STREAM_GROUP_PUBLISH(client, keys, _publish_args("tag3", "1", b"x", b"y")) == batch
    )
    assert await client.xlen("h:{r}") == 3  # capped at 3
    await _assert_digest_follows(client, "g:{r}", "gd:{r}")  # without "old"


async def test_group_publish_caps_history_and_remembers_the_newest_trimmed(client: Redis) -> None:
    keys = ["g:{r}", "h:{r}", "m:{r}"]
    ids = []
    for n in range(5):
        reply = await STREAM_GROUP_PUBLISH(client, keys, _publish_args(f"t{n}", "0", b"p"))
        ids.append(reply[2])
    assert await client.xlen("h:{r}") == 3
    assert await client.hget("m:{r}", "trimmed") == ids[1]
    # Read from the newest trimmed entry: complete; from before it: not.
    for since, complete in ((ids[1], 1), (ids[0], 0)):
        reply = await STREAM_HISTORY(
            client, ["h:{r}", "m:{r}"], ["e1", since, 10, 3, "1-0", 60_000, "e2"]
        )
        assert reply[0] == b"e1" and reply[1] == complete and reply[2] == ids[4]
        assert [entry[0] for entry in reply[3]] == ids[2:]


# --- helpers for the Streams scripts --------------------------------------------------


def _digest(*members: str) -> str:
    """What the one-trip group sends compare: SHA-1 of the sorted names, one a line."""
    return hashlib.sha1("\n".join(sorted(members)).encode()).hexdigest()


def _minid(seconds_ago: float = 60) -> str:
    return f"{int((time.time() - seconds_ago) * 1000)}-0"


async def _fields(client: Redis, stream: str) -> list[dict[bytes, bytes]]:
    return [fields for _id, fields in await client.xrange(stream)]


# --- compat.core's one-trip group send -------------------------------------------------


async def test_classic_group_send_known_adds_only_for_the_planned_members(client: Redis) -> None:
    now = time.time()
    await client.zadd("g", {"a": now, "b": now, "gone": now - 100})
    changed = await CLASSIC_GROUP_SEND_KNOWN(
        client, ["g", "a"], [now - 50, _digest("a"), b"msg", 5, 60, now, "0"]
    )
    assert changed[0] == -1 and sorted(changed[1:]) == [b"a", b"b"]
    assert await client.exists("a") == 0  # nothing added when the members changed
    planned = [now - 50, _digest("a", "b"), b"m-a", 5, 60, now, b"m-b", 5, 60, now, "0"]
    assert await CLASSIC_GROUP_SEND_KNOWN(client, ["g", "a", "b"], planned) == [0]
    assert await client.zrange("a", 0, -1) == [b"m-a"] and await client.zrange("b", 0, -1) == [
        b"m-b"
    ]
    assert await client.zscore("g", "gone") is None  # expired members dropped after the send
    # A retry (its first attempt may have landed) does not check: the same members
    # get the same serialized message again, which a sorted set holds once.
    retried = [now - 50, _digest("someone else"), b"m-a", 5, 60, now, "1"]
    assert await CLASSIC_GROUP_SEND_KNOWN(client, ["g", "a"], retried) == [0]
    assert await client.zcard("a") == 1


# --- the Streams layer's appends -------------------------------------------------------


def _append(
    payloads: list[bytes],
    *records: list[object],
    positions: list[str] | None = None,
    group: str = "",
    retry: str = "0",
) -> list[object]:
    """STREAM_APPEND's arguments: the batch, each destination's record (tag, channels,
    capacity, expiry in ms), then group, now in ms and the retry flag."""
    batch: list[object] = [len(payloads)]
    for payload, position in zip(payloads, positions or [""] * len(payloads), strict=True):
        batch += [payload, position]
    tail = [group, int(time.time() * 1000), retry]
    return [*batch, *(value for record in records for value in record), *tail]


async def test_stream_append_refuses_at_capacity_and_sets_the_ttl(client: Redis) -> None:
    for stream, side, channel in [("s", "d", ""), ("inbox", "state", "x.p!1")]:
        for n in range(2):
            args = _append([b"m"], [f"t{n}", channel, 2, 60_000])
            assert await STREAM_APPEND(client, [stream, side], args) == 0
        refused = await STREAM_APPEND(
            client, [stream, side], _append([b"m"], ["t9", channel, 2, 60_000])
        )
        assert refused == 1, f"{stream}: a third message past capacity 2 was stored"
        assert await client.xlen(stream) == 2
        assert 0 < await client.pttl(stream) <= 60_000
    # An inbox counts per channel: another channel of the same process still has room.
    args = _append([b"m"], ["t5", "x.p!2", 2, 60_000])
    assert await STREAM_APPEND(client, ["inbox", "state"], args) == 0
    assert [f.get(b"c") for f in await _fields(client, "inbox")] == [b"x.p!1", b"x.p!1", b"x.p!2"]


async def test_stream_append_takes_a_prefix_of_a_batch(client: Redis) -> None:
    """A batch goes in order while the channel has room; each inbox channel takes its
    own prefix, and the entries name only the channels that still had room."""
    batch = [b"one", b"two", b"three"]
    assert await STREAM_APPEND(client, ["s", "d"], _append(batch, ["t", "", 2, 60_000])) == 1
    assert [f[b"d"] for f in await _fields(client, "s")] == [b"one", b"two"]
    assert [f[b"i"] for f in await _fields(client, "s")] == [b"t:1", b"t:2"]
    await client.hset("state", mapping={"x.p!1": 1, "^": 1})  # one reported as queued
    args = _append(batch, ["u", "x.p!1,x.p!2", "2,5", 60_000])
    assert await STREAM_APPEND(client, ["inbox", "state"], args) == 2  # x.p!1 took one
    named = [(f[b"d"], f[b"c"]) for f in await _fields(client, "inbox")]
    assert named == [(b"one", b"x.p!1,x.p!2"), (b"two", b"x.p!2"), (b"three", b"x.p!2")]
    # Every channel full: nothing is appended, and every pair is refused.
    args = _append(batch, ["v", "x.p!1", 2, 60_000])
    assert await STREAM_APPEND(client, ["inbox", "state"], args) == 3
    assert await client.xlen("inbox") == 3


async def test_stream_append_each_answers_as_the_calls_would_one_by_one(client: Redis) -> None:
    """Several STREAM_APPEND calls to the same keys merged into one script call (how the
    batcher sends concurrent appends to one stream): each call's reply, in order, and
    the same entries, as the calls made one after another give; a retried call among
    them is still found out by its tag. (The calls made one by one take
    STREAM_APPEND's steady-state path where it applies, the merged ones the general
    path: the two store the same entries.)"""
    for stream, side, first, second in [("inbox", "state", "x.p!1", "x.p!2"), ("s", "d", "", "")]:
        calls = [
            _append([b"a"], ["t1", first, 2, 60_000]),
            _append([b"b"], ["t2", second, 2, 60_000]),
            _append([b"c", b"d"], ["t3", first, 2, 60_000]),  # past capacity: refuses
            _append([b"a"], ["t1", first, 2, 60_000], retry="1"),  # t1 again: landed
            _append([b"e"], ["t4", first, 2, 60_000]),  # full
        ]
        one_by_one = [await STREAM_APPEND(client, [stream, side], call) for call in calls]
        merged: list[object] = []
        for call in calls:
            merged += [len(call), *call]
        together = await STREAM_APPEND_EACH(client, [f"{stream}2", f"{side}2"], merged)
        assert together == one_by_one, stream
        assert one_by_one[2] >= 1 and one_by_one[3] == 0 and one_by_one[4] == 1, one_by_one
        alone = await _fields(client, stream)
        assert await _fields(client, f"{stream}2") == alone
        assert [f[b"d"] for f in alone][:2] == [b"a", b"b"]
        assert 0 < await client.pttl(f"{stream}2") <= 60_000


async def test_stream_append_trims_each_channel_by_its_own_expiry(client: Redis) -> None:
    old = f"{int((time.time() - 10) * 1000)}-0"
    for stream in ("short", "long"):
        await client.xadd(stream, {"d": b"old", "i": "t0"}, id=old)
    keys = ["short", "d1", "long", "d2"]
    args = _append([b"new"], ["t1", "", 5, 5_000], ["t2", "", 5, 60_000], group="room")
    assert await STREAM_APPEND(client, keys, args) == 0
    assert [f[b"d"] for f in await _fields(client, "short")] == [b"new"]
    assert [f[b"d"] for f in await _fields(client, "long")] == [b"old", b"new"]
    assert 0 < await client.pttl("short") <= 5_000 < await client.pttl("long")


async def test_a_retried_append_is_stored_once(client: Redis) -> None:
    """The script's retry path finds the entries a lost reply hid, on a normal channel's
    stream and on a process inbox, and answers what the first attempt refused."""
    for stream, side, channel in [("s", "d", ""), ("inbox", "state", "x.p!1")]:
        record = ["tag-1", channel, 10, 60_000]
        first = await STREAM_APPEND(client, [stream, side], _append([b"p"], record))
        again = await STREAM_APPEND(client, [stream, side], _append([b"p"], record, retry="1"))
        assert first == again == 0
        assert await client.xlen(stream) == 1
        await STREAM_APPEND(
            client, [stream, side], _append([b"p"], ["tag-2", channel, 10, 60_000], retry="1")
        )
        assert await client.xlen(stream) == 2
        batch = [b"a"] * 10
        record = ["tag-3", channel, 10, 60_000]
        assert await STREAM_APPEND(client, [stream, side], _append(batch, record)) == 2
        assert await STREAM_APPEND(client, [stream, side], _append(batch, record, retry="1")) == 2
        assert await client.xlen(stream) == 10


async def test_a_retried_append_already_delivered_is_not_stored_again(client: Redis) -> None:
    """On a normal channel the first attempt can land, be received, acknowledged and
    deleted before the retry (after a lost reply) runs: the retry finds the tag the
    acknowledgement kept, and stores nothing."""
    stream, done = "chan", "done"
    record = ["tag-1", "", 10, 60_000]
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    assert await STREAM_APPEND(client, [stream, done], _append([b"p"], record)) == 0
    [[_, [(entry_id, fields)]]] = await client.xreadgroup("g", "c", {stream: ">"})
    now = int(time.time() * 1000)
    ack = ["g", "c", entry_id, fields[b"i"], now, 15_000, "0"]  # retry flag last
    assert await STREAM_ACK(client, [stream, done], ack) == 1
    assert await client.xlen(stream) == 0
    assert await STREAM_APPEND(client, [stream, done], _append([b"p"], record, retry="1")) == 0
    assert await client.xlen(stream) == 0, "the retry stored a second copy"
    # Without the record, the same retry would store it again.
    assert await STREAM_APPEND(client, [stream, "none"], _append([b"p"], record, retry="1")) == 0
    assert await client.xlen(stream) == 1


async def test_stream_append_sends_to_each_destination_and_counts_the_full(
    client: Redis,
) -> None:
    keys = ["s1", "d1", "full", "d2", "inbox", "state"]
    await client.xadd("full", {"d": b"x", "i": "old"})
    records = [["t1", "", 5, 60_000], ["t2", "", 1, 60_000], ["t3", "x.p!1,x.p!2", 5, 60_000]]
    args = _append([b"msg"], *records, positions=["e:1-0"], group="room")
    assert await STREAM_APPEND(client, keys, args) == 1
    [entry] = await _fields(client, "s1")
    assert entry[b"d"] == b"msg" and entry[b"g"] == b"room" and entry[b"p"] == b"e:1-0"
    assert await client.xlen("full") == 1
    [entry] = await _fields(client, "inbox")
    assert entry[b"c"] == b"x.p!1,x.p!2"
    # Retried: found by its tags, stored nowhere twice.
    args = _append([b"msg"], *records, positions=["e:1-0"], group="room", retry="1")
    assert await STREAM_APPEND(client, keys, args) == 1
    assert (await client.xlen("s1"), await client.xlen("inbox")) == (1, 1)


@pytest.mark.parametrize("digest", ["kept", "missing", "stale"])
async def test_stream_group_send_known_appends_only_for_the_planned_members(
    client: Redis, digest: str
) -> None:
    """Whatever the digest's state (kept by the scripts; missing: evicted, or the
    group older than it; stale: its count is not the group's), the members are
    compared rightly, and after a send the digest follows the group."""
    now = time.time()
    await _kept_group(client, "g", "gd", {"a": now, "b": now, "gone": now - 100})
    if digest == "missing":
        await client.delete("gd")
    elif digest == "stale":
        await client.set("gd", xor_digest(["a", "b"]), ex=60)
    record = ["t1", "", 5, 60_000]
    changed = await STREAM_GROUP_SEND_KNOWN(
        client, ["g", "gd", "a", "da"], [now - 50, xor_digest(["a"]), *_append([b"m"], record)]
    )
    assert changed[0] == -1 and sorted(changed[1:]) == [b"a", b"b"]
    assert await client.exists("a") == 0
    assert await client.zscore("g", "gone")  # nothing written when nothing was sent
    keys = ["g", "gd", "a", "da", "b", "db"]
    records = [record, ["t2", "", 5, 60_000]]
    planned = [now - 50, xor_digest(["a", "b"]), *_append([b"m", b"n"], *records)]
    assert await STREAM_GROUP_SEND_KNOWN(client, keys, planned) == [0]
    assert (await client.xlen("a"), await client.xlen("b")) == (2, 2)
    assert await client.zscore("g", "gone") is None
    await _assert_digest_follows(client, "g", "gd")
    # A retry checks the members too (its first attempt may not have landed), and
    # the tags keep what did land from being stored twice.
    retried = [now - 50, xor_digest(["a", "b"]), *_append([b"m", b"n"], *records, retry="1")]
    assert await STREAM_GROUP_SEND_KNOWN(client, keys, retried) == [0]
    assert (await client.xlen("a"), await client.xlen("b")) == (2, 2)
    # A member that joined since: found, nothing sent.
    await GROUP_ADD(client, ["g", "gd"], [now, 60, "c"])
    assert (await STREAM_GROUP_SEND_KNOWN(client, keys, planned))[0] == -1
    assert (await client.xlen("a"), await client.xlen("b")) == (2, 2)


async def test_stream_append_replays_in_order_with_positions(client: Redis) -> None:
    payloads, positions = [b"one", b"two", b"three"], ["e:1-0", "e:2-0", "e:3-0"]
    args = _append(payloads, ["r", "", 2, 60_000], positions=positions, group="room")
    assert await STREAM_APPEND(client, ["s", "d"], args) == 1
    entries = await _fields(client, "s")
    assert [(f[b"d"], f[b"p"]) for f in entries] == [(b"one", b"e:1-0"), (b"two", b"e:2-0")]
    args = _append(payloads, ["q", "x.p!1", 5, 60_000], positions=positions, group="room")
    assert await STREAM_APPEND(client, ["inbox", "st"], args) == 0
    assert [f[b"c"] for f in await _fields(client, "inbox")] == [b"x.p!1"] * 3


# --- the Streams layer's readers -------------------------------------------------------


async def test_stream_ack_acknowledges_what_its_consumer_still_owns(client: Redis) -> None:
    await client.xgroup_create("s", "g", id="0", mkstream=True)
    mine = await client.xadd("s", {"d": b"a", "i": "t1"})
    theirs = await client.xadd("s", {"d": b"b", "i": "t2"})
    await client.xreadgroup("g", "me", {"s": ">"}, count=1)
    await client.xreadgroup("g", "other", {"s": ">"}, count=1)
    now = int(time.time() * 1000)

    def ack(entry: bytes, tag: str, retry: str) -> list[object]:
        return ["g", "me", entry, tag, now, 15_000, retry]

    assert await STREAM_ACK(client, ["s", "done"], ack(theirs, "t2", "0")) == 0
    assert await STREAM_ACK(client, ["s", "done"], ack(mine, "t1", "0")) == 1
    assert [entry for entry, _ in await client.xrange("s")] == [theirs]  # acknowledged, deleted
    assert await client.zscore("done", "t1") is not None  # the tag a retried send finds
    assert 0 < await client.pttl("done") <= 15_000
    # Not pending to anyone: a retry knows its first attempt acknowledged it; a first
    # attempt must not deliver it (another consumer did).
    assert await STREAM_ACK(client, ["s", "done"], ack(mine, "t1", "1")) == 1
    assert await STREAM_ACK(client, ["s", "done"], ack(mine, "t1", "0")) == 0
    # Still pending to another consumer: not ours, retry or not.
    assert await STREAM_ACK(client, ["s", "done"], ack(theirs, "t2", "1")) == 0
    # The stream gone (Redis lost it after the read): nobody else can have it.
    assert await STREAM_ACK(client, ["lost", "done"], ack(mine, "t1", "0")) == 1


async def test_stream_join_consumers_creates_the_group_once(client: Redis) -> None:
    assert await STREAM_JOIN_CONSUMERS(client, ["s"], ["g", 60_000]) == 1
    await client.xadd("s", {"d": b"x"})
    await client.xreadgroup("g", "c", {"s": ">"})
    assert await STREAM_JOIN_CONSUMERS(client, ["s"], ["g", 60_000]) == 1  # BUSYGROUP: kept
    [group] = await client.xinfo_groups("s")
    assert group["name"] == b"g" and group["pending"] == 1
    assert 0 < await client.pttl("s") <= 60_000


async def test_stream_inbox_advance_records_trims_and_reports(client: Redis) -> None:
    ids = [await client.xadd("inbox", {"d": b"m", "c": "x.p!1"}) for _ in range(3)]
    await client.hset("state", mapping={"x.p!2": 4})
    args = [ids[1], 60_000, ids[2], 7, "x.p!1,7,x.p!2,0"]
    assert await STREAM_INBOX_ADVANCE(client, ["state", "inbox"], args) is None  # no cursor yet
    assert [entry for entry, _ in await client.xrange("inbox")] == [ids[2]]  # below ids[2] gone
    state = await client.hgetall("state")
    assert state == {b"@": ids[1], b"^": b"7", b"x.p!1": b"7"}  # a 0 report deletes the field
    assert 0 < await client.pttl("state") <= 60_000
    again = [ids[2], 60_000, "", 0, "x.p!1,0"]
    assert await STREAM_INBOX_ADVANCE(client, ["state", "inbox"], again) == ids[1]
    assert await client.xlen("inbox") == 1  # '' trims nothing
    assert await client.hgetall("state") == {b"@": ids[2], b"^": b"0"}


async def test_stream_group_join_joins_and_reads_after_the_position(client: Redis) -> None:
    keys = ["g:{j}", "h:{j}", "m:{j}", "gd:{j}"]
    ids = []
    for n in range(3):
        reply = await STREAM_GROUP_PUBLISH(
            client, keys, _publish_args(f"t{n}", "0", b"p%d" % n, length=10)
        )
        ids.append(reply[2])
    now = time.time()
    args = ["chan", now, 60, "e1", ids[0], 10, "1-0", 60_000, "e2"]
    epoch, complete, newest, entries = await STREAM_GROUP_JOIN(client, keys, args)
    assert (epoch, complete, newest) == (b"e1", 1, ids[2])
    assert [entry[0] for entry in entries] == ids[1:]
    assert await client.zscore("g:{j}", "chan") == pytest.approx(now)
    await _assert_digest_follows(client, "g:{j}", "gd:{j}")
    # From another epoch (Redis lost the history the position came from): everything
    # retained, marked incomplete.
    args = ["chan", now, 60, "older", ids[0], 10, "1-0", 60_000, "e2"]
    _epoch, complete, _newest, entries = await STREAM_GROUP_JOIN(client, keys, args)
    assert complete == 0 and [entry[0] for entry in entries] == ids
    await _assert_digest_follows(client, "g:{j}", "gd:{j}")


# --- presence --------------------------------------------------------------------------

PKEYS = ["m", "p", "d", "md"]  # members, presence records, deadlines, members' digest


async def test_presence_join_says_whether_the_presence_is_new(client: Redis) -> None:
    now = time.time()
    assert await PRESENCE_JOIN(client, PKEYS, ["tab", now, 60, b"r1", now + 30]) == 1
    assert await PRESENCE_JOIN(client, PKEYS, ["tab", now, 60, b"r2", now + 30]) == 0
    assert await client.hget("p", "tab") == b"r2"
    assert await client.zscore("m", "tab") == pytest.approx(now)
    assert await client.zscore("d", "tab") == pytest.approx(now + 30)
    assert all([0 < await client.ttl(k) <= 60 for k in PKEYS])
    await _assert_digest_follows(client, "m", "md")


async def test_presence_leave_returns_the_record_and_leaves_a_tombstone(client: Redis) -> None:
    now = time.time()
    await PRESENCE_JOIN(client, PKEYS, ["tab", now, 60, b"rec", now + 30])
    await PRESENCE_JOIN(client, PKEYS, ["other", now, 60, b"rec", now + 30])
    assert await PRESENCE_LEAVE(client, PKEYS, ["tab", now]) == b"rec"
    await _assert_digest_follows(client, "m", "md")
    assert await client.zscore("m", "tab") is None and await client.hget("p", "tab") is None
    assert await client.zscore("d", "tab") == pytest.approx(-now)  # discarded: a tombstone
    assert await PRESENCE_LEAVE(client, PKEYS, ["tab", now]) is None
    await GROUP_ADD(client, ["m", "md"], [now, 60, "worker"])  # a member without presence
    assert await PRESENCE_LEAVE(client, PKEYS, ["worker", now]) is None
    assert await client.zscore("d", "worker") is None
    await _assert_digest_follows(client, "m", "md")
    assert await PRESENCE_LEAVE(client, PKEYS, ["other", now]) == b"rec"
    await _assert_digest_follows(client, "m", "md")  # the last one: no digest left


async def test_presence_read_leaves_out_the_expired_and_the_ended(client: Redis) -> None:
    now = time.time()
    await client.zadd("m", {"w": now, "old": now - 120, "a": now, "dead": now})
    await client.hset("p", mapping={"a": b"ra", "dead": b"rd", "old": b"ro"})
    await client.zadd("d", {"a": now + 30, "dead": now - 1, "old": now + 30})
    args = [now - 60, now]
    assert await PRESENCE_READ(client, PKEYS, ["size", *args]) == 2
    assert sorted(await PRESENCE_READ(client, PKEYS, ["channels", *args])) == [b"a", b"w"]
    assert await PRESENCE_READ(client, PKEYS, ["presence", *args]) == [b"a", b"ra"]


async def test_presence_refresh_keeps_restores_forgets_and_sweeps(client: Redis) -> None:
    now = time.time()
    cutoff = now - 60
    await _kept_group(client, "m", "md", {"kept": now, "expired": now - 120, "dead": now})
    await client.hset("p", mapping={"kept": b"rk", "expired": b"re", "dead": b"rd", "swept": b""})
    await client.zadd("d", {"kept": now + 1, "dead": now - 1, "swept": -now, "kicked": -now})
    await client.zadd("d", {"ancient": -(now - 120)})  # a tombstone from before the cutoff
    await client.hset("p", "ancient", b"")
    mine = ["kept", b"rk", "swept", b"rs", "kicked", b"rx", "expired", b"re", "lost", b"rl"]
    reply = await PRESENCE_REFRESH(client, PKEYS, [now, now + 30, cutoff, 60, *mine])
    back, left, gone, swept = reply
    assert sorted(back) == [b"lost", b"swept"]  # swept while away, or lost with Redis's data
    assert left == [b"expired", b"re"]  # its membership expired: the group is told
    assert sorted(gone) == [b"expired", b"kicked"]  # discarded by another process
    assert swept == [b"dead", b"rd"]  # another process's member, not refreshed
    assert await client.zscore("d", "kept") == pytest.approx(now + 30)
    assert await client.hget("p", "swept") == b"rs" and await client.zscore("m", "swept")
    assert await client.zscore("m", "dead") is None and await client.hget("p", "dead") == b""
    assert await client.zscore("d", "dead") == pytest.approx(-now)
    assert await client.zscore("d", "kicked") is None
    assert (
        await client.zscore("d", "ancient") is None and await client.hget("p", "ancient") is None
    )
    await _assert_digest_follows(client, "m", "md")


def test_every_script_has_a_test_here() -> None:
    """Each LuaScript constant of streamlayer.scripts is called by a test in this file."""
    names = [name for name, value in vars(scripts).items() if isinstance(value, LuaScript)]
    source = Path(__file__).read_text()
    untested = [name for name in names if f"await {name}(" not in source]
    assert len(names) >= 18 and not untested, f"no script-level test calls {untested}"
