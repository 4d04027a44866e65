"""Each Lua script on its own, against a real server, and the key-naming helpers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from streamlayer.keys import (
    classic_backup_key,
    classic_channel_key,
    classic_group_key,
    non_local_name,
    scan_pattern,
)
from streamlayer.scripts import (
    CLASSIC_GROUP_SEND,
    CLASSIC_RESTORE_BACKUP,
    CLASSIC_SEND,
    GROUP_MEMBERS,
    STREAM_FORGET_CONSUMER,
    STREAM_GROUP_PUBLISH,
    STREAM_HISTORY,
)
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
    assert await CLASSIC_SEND(client, ["k"], [b"old", now - 100, now - 60, 2, 60]) == 1
    assert await CLASSIC_SEND(client, ["k"], [b"m1", now, now - 60, 2, 60]) == 1  # trims "old"
    assert await client.zrange("k", 0, -1) == [b"m1"]
    assert await CLASSIC_SEND(client, ["k"], [b"m2", now, now - 60, 2, 60]) == 1
    assert await CLASSIC_SEND(client, ["k"], [b"m3", now, now - 60, 2, 60]) == 0  # full
    assert await client.zcard("k") == 2
    assert 0 < await client.ttl("k") <= 60


async def test_send_loads_itself_after_script_flush(client: Redis) -> None:
    await client.script_flush()
    now = time.time()
    assert await CLASSIC_SEND(client, ["k"], [b"m", now, now - 60, 5, 60]) == 1
    assert (await client.script_exists(CLASSIC_SEND.sha)) == [True]


async def test_group_members_drops_expired(client: Redis) -> None:
    now = time.time()
    await client.zadd("g", {"stale": now - 100, "fresh": now})
    assert await GROUP_MEMBERS(client, ["g"], [now - 50]) == [b"fresh"]
    assert await client.zcard("g") == 1


async def test_group_send_skips_full_keys(client: Redis) -> None:
    now = time.time()
    await client.zadd("full", {"x": now})
    args = [b"to-a", b"to-full", 5, 1, now, now - 60, 60]
    assert await CLASSIC_GROUP_SEND(client, ["a", "full"], args) == 1
    assert await client.zrange("a", 0, -1) == [b"to-a"]
    assert await client.zrange("full", 0, -1) == [b"x"]


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


def _publish_args(payload: bytes, tag: str, retry: str, length: int = 3) -> list[object]:
    far_past = "1-0"
    return [0, payload, tag, length, far_past, 60_000, "e1", retry]


async def test_group_publish_retry_records_the_message_once(client: Redis) -> None:
    keys = ["g:{r}", "h:{r}", "m:{r}"]
    await client.zadd("g:{r}", {"member": time.time()})
    first = await STREAM_GROUP_PUBLISH(client, keys, _publish_args(b"p", "tag1", "0"))
    again = await STREAM_GROUP_PUBLISH(client, keys, _publish_args(b"p", "tag1", "1"))
    assert first == again  # the retry found the first attempt's entry
    assert first[0] == b"e1" and first[2:] == [b"member"]
    assert await client.xlen("h:{r}") == 1
    other = await STREAM_GROUP_PUBLISH(client, keys, _publish_args(b"q", "tag2", "1"))
    assert other[1] != first[1] and await client.xlen("h:{r}") == 2


async def test_group_publish_caps_history_and_remembers_the_newest_trimmed(client: Redis) -> None:
    keys = ["g:{r}", "h:{r}", "m:{r}"]
    ids = []
    for n in range(5):
        reply = await STREAM_GROUP_PUBLISH(client, keys, _publish_args(b"p", f"t{n}", "0"))
        ids.append(reply[1])
    assert await client.xlen("h:{r}") == 3
    assert await client.hget("m:{r}", "trimmed") == ids[1]
    # Read from the newest trimmed entry: complete; from before it: not.
    for since, complete in ((ids[1], 1), (ids[0], 0)):
        reply = await STREAM_HISTORY(
            client, ["h:{r}", "m:{r}"], ["e1", since, 10, 3, "1-0", 60_000, "e2"]
        )
        assert reply[0] == b"e1" and reply[1] == complete and reply[2] == ids[4]
        assert [entry[0] for entry in reply[3]] == ids[2:]
