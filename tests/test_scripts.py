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
