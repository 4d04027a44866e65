"""group_send in one round trip on a single server (the stored layers): a script
checks the group's members are those the layer planned for, and sends; a group that
changed answers with its members and takes a second trip."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from streamlayer.base import StreamlayerLayer
from streamlayer.testing import RedisServer

from .layers import layer_class, layer_factory

STORED = ["streamlayer.StreamsChannelLayer", "streamlayer.compat.core.RedisChannelLayer"]


@pytest.fixture(params=STORED)
async def make(
    request: pytest.FixtureRequest, fresh_server: RedisServer
) -> AsyncIterator[Callable[..., StreamlayerLayer]]:
    """Layers of the parametrized class on the test's own server; the first is
    flushed, all are closed after the test."""

    def build(**options: Any) -> StreamlayerLayer:
        return layer_class(request.param)(hosts=[fresh_server.url], **options)

    async with layer_factory(build) as factory:
        yield factory


async def recv(layer: StreamlayerLayer, channel: str, within: float = 15) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), within)


# --- group_send in one round trip (single server) -------------------------------------


async def take(layer: StreamlayerLayer, channel: str, count: int) -> list[dict[str, Any]]:
    return [await recv(layer, channel) for _ in range(count)]


def script_calls(server: RedisServer) -> int:
    with server.client() as client:
        stats = client.info("commandstats")
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha",))


async def test_a_steady_group_costs_one_script_call_per_send(
    fresh_server: RedisServer, make: Any
) -> None:
    """The members are read once; later sends check them and append in one script."""
    sender = make(prefix="known")
    member = make(prefix="known")
    channels = [await member.new_channel() for _ in range(3)]
    for channel in channels:
        await member.group_add("steady", channel)
    await member.group_add("steady", "jobs")  # a normal channel too
    await sender.group_send("steady", {"type": "first"})  # reads the members: two calls
    await sender.group_send("steady", {"type": "second"})  # loads the script, if need be
    # Both layers plan where a steady group's sends go once (per destination stream or
    # key, not per member), and keep the plan with the members it was made for.
    plan = sender._known_members["steady"].plan
    before = await asyncio.to_thread(script_calls, fresh_server)
    for i in range(10):
        await sender.group_send("steady", {"type": "m", "i": i})
    assert await asyncio.to_thread(script_calls, fresh_server) - before == 10
    assert plan is not None and sender._known_members["steady"].plan is plan
    for channel in [*channels, "jobs"]:
        got = await take(member, channel, 12)
        assert [m.get("i") for m in got] == [None, None, *range(10)]


async def test_members_that_changed_since_the_last_send_are_found(
    fresh_server: RedisServer, make: Any
) -> None:
    """Another process adds and discards members (and one expires) between two sends
    of this one: each send reaches exactly the members of that moment."""
    sender = make(prefix="known", group_expiry=60)
    other = make(prefix="known", group_expiry=60)
    a, b, c = [await other.new_channel() for _ in range(3)]
    await other.group_add("room", a)
    await other.group_add("room", b)
    await sender.group_send("room", {"type": "m", "n": 1})  # known: a, b
    await other.group_add("room", c)
    await other.group_discard("room", a)
    await sender.group_send("room", {"type": "m", "n": 2})  # stale: now b, c
    await sender.group_send("room", {"type": "m", "n": 3})  # known: b, c
    with fresh_server.client() as client:  # b's membership is older than group_expiry
        client.zadd(other.group_key("room"), {b: time.time() - 3600})
    await sender.group_send("room", {"type": "m", "n": 4})  # stale: c only
    assert [m["n"] for m in await take(other, a, 1)] == [1]
    assert [m["n"] for m in await take(other, b, 3)] == [1, 2, 3]
    assert [m["n"] for m in await take(other, c, 3)] == [2, 3, 4]
    for channel in (a, b, c):
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(other.receive(channel), 0.2)
    assert sender.stats.sent == 2 + 2 + 2 + 1


async def test_one_trip_group_sends_through_killed_connections_arrive_once(
    fresh_server: RedisServer, make: Any
) -> None:
    """Retried one-trip sends (their reply lost with the connection) are not stored
    twice, whether the members changed in between or not."""
    sender = make(prefix="known", capacity=2000)
    member = make(prefix="known", capacity=2000)
    channel = await member.new_channel()
    await member.group_add("burst", channel)
    await member.group_add("burst", "burst-jobs")
    kill = fresh_server.keep_killing_clients
    killing = asyncio.ensure_future(asyncio.to_thread(kill, 10, 0.01, ("normal",)))
    sent = 0
    while not killing.done() and sent < 1000:
        await sender.group_send("burst", {"type": "m", "i": sent})
        sent += 1
    await killing
    assert [m["i"] for m in await take(member, channel, sent)] == list(range(sent))
    assert [m["i"] for m in await take(member, "burst-jobs", sent)] == list(range(sent))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(member.receive("burst-jobs"), 0.3)


async def test_a_large_group_is_compared_by_digest(fresh_server: RedisServer, make: Any) -> None:
    """300 members (normal channels, names in no particular order): the steady sends
    still take one script call each, and everyone gets everything."""
    sender = make(prefix="large", capacity=100)
    names = [f"ch-{(i * 7919) % 1000:03d}-{i}" for i in range(300)]
    for name in names:
        await sender.group_add("crowd", name)
    await sender.group_send("crowd", {"type": "m", "i": 0})
    await sender.group_send("crowd", {"type": "m", "i": 1})
    before = await asyncio.to_thread(script_calls, fresh_server)
    await sender.group_send("crowd", {"type": "m", "i": 2})
    assert await asyncio.to_thread(script_calls, fresh_server) - before == 1
    for name in names[::37]:
        assert [m["i"] for m in await take(sender, name, 3)] == [0, 1, 2]


async def test_a_retried_send_checks_the_members_too(fresh_server: RedisServer) -> None:
    """The one-trip send's first attempt fails on a killed connection after a member
    left: the retry checks the members as a first attempt does, so the member that
    left gets nothing (it used to skip the check and send to the members it planned
    for). The Streams layer's dedup tags make the check safe on a retry."""
    from streamlayer import StreamsChannelLayer

    layer = StreamsChannelLayer(hosts=[fresh_server.url], prefix="retrycheck")
    try:
        stay, leave = await layer.new_channel(), await layer.new_channel()
        for channel in (stay, leave):
            await layer.group_add("room", channel)
        await layer.group_send("room", {"type": "m", "n": 0})  # plans for both from now
        assert [(await recv(layer, c))["n"] for c in (stay, leave)] == [0, 0]
        await layer.group_discard("room", leave)
        waiting = asyncio.ensure_future(layer.receive(leave))
        await asyncio.sleep(0.05)
        assert fresh_server.kill_clients() >= 1  # the next send's connection is dead
        await layer.group_send("room", {"type": "m", "n": 1})
        assert (await recv(layer, stay))["n"] == 1
        done, _ = await asyncio.wait([waiting], timeout=0.5)
        assert not done, f"the member that left got {waiting.result()}"
        waiting.cancel()
        assert layer.stats()["duplicates"] == 0
    finally:
        await layer.flush()
        await layer.close()
