"""A group send planned for the members as they were reaches the members as they are.

The Streams layer keeps a digest beside each group in Redis (the members' count and
the XOR of their SHA-1s), changed by every script that changes the group, so a
steady group's send checks its plan without reading the members. Here a second
process changes a group every way a layer can between the sends of a process that
planned for the group as it was: each send must reach exactly the members of its
moment, once, and the digest must follow the members. compat.core (no digest: its
script compares the members themselves) runs the same sequence.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from streamlayer.base import StreamlayerLayer
from streamlayer.stored import xor_digest
from streamlayer.testing import RedisServer

from .layers import layer_class, layer_factory

STORED = ["streamlayer.StreamsChannelLayer", "streamlayer.compat.core.RedisChannelLayer"]
ROOM = "room"


@pytest.fixture(params=STORED)
async def make(
    request: pytest.FixtureRequest, fresh_server: RedisServer
) -> AsyncIterator[Callable[..., StreamlayerLayer]]:
    def build(**options: Any) -> StreamlayerLayer:
        return layer_class(request.param)(hosts=[fresh_server.url], **options)

    async with layer_factory(build) as factory:
        yield factory


@pytest.fixture
async def client(fresh_server: RedisServer) -> AsyncIterator[Redis]:
    redis = Redis(host="127.0.0.1", port=fresh_server.port)
    yield redis
    await redis.aclose()


async def recv(layer: StreamlayerLayer, channel: str) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), 15)


async def assert_digest_follows(
    client: Redis, layer: Any, *, kept: bool = False, stale: bool = False
) -> None:
    """Where the Streams layer keeps a digest beside its group, it is the members'
    digest and lives as long as they do. ``stale``: it may also be one whose count is
    not the members' (left by an eviction of the members' set, and not changed since:
    a send rebuilds it rather than believe it). ``kept``: there must be one while
    there are members."""
    keys = layer.membership_keys(ROOM)
    if len(keys) == 1:
        return  # compat.core keeps none
    group, digest = keys
    members = [m.decode() for m in await client.zrange(group, 0, -1)]
    stored = await client.get(digest)
    if stored is None:
        assert not (kept and members), f"no digest for {members}"
        return
    count = int(stored.split(b":")[0])
    if count != len(members):
        assert stale, f"a stale digest {stored!r} for {members}"
        return
    assert stored.decode() == xor_digest(members), f"digest {stored!r}, members {members}"
    assert abs(await client.pttl(group) - await client.pttl(digest)) <= 5


async def live_members(client: Redis, layer: StreamlayerLayer) -> set[str]:
    cutoff = time.time() - layer.group_expiry
    raw = await client.zrangebyscore(layer.group_key(ROOM), f"({cutoff}", "+inf")  # type: ignore[attr-defined]
    return {m.decode() for m in raw}


async def test_every_change_to_a_group_is_seen_by_the_next_send(make: Any, client: Redis) -> None:
    """120 random changes (joins with and without presence, leaves, expiry, a
    presence refresh, the group's keys lost and the memberships restored, the digest
    or the members' set evicted), each followed by a send from the planning process:
    every channel gets exactly the sends made while it was a member, in order."""
    sender = make(prefix="digest", capacity=1000)
    member = make(prefix="digest", capacity=1000, presence_timeout=3600)
    local = [await member.new_channel() for _ in range(4)]
    pool = [*local, "worker-0", "worker-1", "worker-2"]
    for channel in local:  # each received once: live, as a connected consumer is
        await member.send(channel, {"type": "hello"})
        await recv(member, channel)
    group_keys = [*member.presence_keys(ROOM), *member.membership_keys(ROOM)]
    expected: dict[str, list[int]] = {channel: [] for channel in pool}
    rng = random.Random(21)
    kinds = ["add"] * 6 + ["presence", "discard", "discard", "age", "refresh", "restore"]
    kinds += ["evict_digest", "evict_group"]
    seen: set[str] = set()
    stale = False  # whether the digest may be stale (see assert_digest_follows)
    for step in range(120):
        kind = rng.choice(kinds)
        channel = rng.choice(local if kind == "presence" else pool)
        if kind == "add":
            await member.group_add(ROOM, channel)
        elif kind == "presence":
            await member.group_add(ROOM, channel, presence={"user": step})
        elif kind == "discard":
            await member.group_discard(ROOM, channel)
        elif kind == "age":  # its membership older than group_expiry
            await client.zadd(member.group_key(ROOM), {channel: 1.0}, xx=True)  # type: ignore[attr-defined]
        elif kind == "refresh":
            await member.presence_book.refresh()  # type: ignore[attr-defined]
        elif kind == "restore":  # the group's data lost; this process restores its own
            await client.delete(*group_keys)
            await member.restore_memberships()  # type: ignore[attr-defined]
            await member.presence_book.refresh()  # type: ignore[attr-defined]
        elif kind == "evict_digest":
            await client.delete(member.membership_keys(ROOM)[-1])  # type: ignore[attr-defined]
        else:  # the members' set evicted, the digest left
            await client.delete(member.group_key(ROOM))  # type: ignore[attr-defined]
        seen.add(kind)
        # Every change of the group drops a stale digest; only these leave it.
        stale = kind == "evict_group" or (stale and kind == "age")
        await assert_digest_follows(client, member, stale=stale)
        members = await live_members(client, member)
        await sender.group_send(ROOM, {"type": "m", "n": step})
        for name in members:
            expected[name].append(step)
        await assert_digest_follows(client, member, stale=stale)
    assert seen == set(kinds), "the sequence left out a kind of change"
    # The group steady again: one script call a send, and a digest kept.
    for name in local:
        await member.group_add(ROOM, name)
    members = await live_members(client, member)
    await sender.group_send(ROOM, {"type": "m", "n": 1000})  # plans for them
    known = sender._known_members[ROOM]  # type: ignore[attr-defined]
    for n in (1001, 1002, 1003):
        await sender.group_send(ROOM, {"type": "m", "n": n})
    # Each found the members as planned (a changed group is read into a new object).
    assert sender._known_members[ROOM] is known  # type: ignore[attr-defined]
    for n in (1000, 1001, 1002, 1003):
        for name in members:
            expected[name].append(n)
    await assert_digest_follows(client, member, kept=True)
    for channel in pool:
        await sender.send(channel, {"type": "end"})
        got = []
        while (message := await recv(member, channel))["type"] != "end":
            got.append(message["n"])
        assert got == expected[channel], channel
    assert sum(map(len, expected.values())) > 200  # the sends reached members
