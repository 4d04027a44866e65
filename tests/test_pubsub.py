"""RedisPubSubChannelLayer's own promises: wire compatibility with
channels_redis.pubsub, hooks that fire, subscriptions that come back after real
faults, no polling, nothing left behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from channels_redis.pubsub import RedisPubSubChannelLayer as IncumbentLayer

from streamlayer.compat import RedisPubSubChannelLayer
from streamlayer.compat.pubsub import RELEASE_AFTER
from streamlayer.testing import RedisServer, SentinelSetup

from .layers import side_by_side

KEYS = ["a-key-at-least-32-bytes-long-0123456789"]


async def recv(layer: Any, channel: str, within: float = 10) -> dict[str, Any]:
    message: dict[str, Any] = await asyncio.wait_for(layer.receive(channel), within)
    return message


async def until_subscribed(server: RedisServer, name: str, count: int = 1) -> None:
    """Until ``count`` connections subscribe to ``name`` on the server (bounded)."""
    for _ in range(500):
        with server.client() as client:
            if client.pubsub_numsub(name)[0][1] >= count:
                return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{name!r} never got {count} subscriber(s)")


def subscribed(server: RedisServer) -> set[str]:
    with server.client() as client:
        return {c.decode() for c in client.pubsub_channels()}


# --- wire compatibility -------------------------------------------------------------------


@pytest.fixture(params=[None, KEYS], ids=["plain", "encrypted"])
async def pair(
    request: pytest.FixtureRequest, shard_servers: list[RedisServer], prefix: str
) -> AsyncIterator[tuple[RedisPubSubChannelLayer, Any]]:
    """(ours, theirs) sharing three shards and a prefix."""
    hosts = [server.url for server in shard_servers]
    layers = side_by_side(RedisPubSubChannelLayer, IncumbentLayer, hosts, prefix, request.param)
    async with layers as pair:
        yield pair


@pytest.mark.compat
@pytest.mark.parametrize("direction", ["ours->theirs", "theirs->ours"])
async def test_channels_and_groups_cross_over(
    pair: tuple[RedisPubSubChannelLayer, Any], direction: str
) -> None:
    ours, theirs = pair
    sender, receiver = (ours, theirs) if direction == "ours->theirs" else (theirs, ours)
    channels = [await receiver.new_channel() for _ in range(6)]  # spread over the shards
    for i, channel in enumerate(channels):
        await sender.send(channel, {"type": "direct", "i": i, "raw": b"\x00\x01"})
        assert await recv(receiver, channel) == {"type": "direct", "i": i, "raw": b"\x00\x01"}
    for n, channel in enumerate(channels):
        await receiver.group_add(f"room-{n}", channel)
    for n in range(len(channels)):
        await sender.group_send(f"room-{n}", {"type": "group", "n": n})
    for n, channel in enumerate(channels):
        assert await recv(receiver, channel) == {"type": "group", "n": n}


@pytest.mark.compat
async def test_same_pubsub_names_and_bytes_as_channels_redis(
    redis_server: RedisServer, prefix: str
) -> None:
    ours = RedisPubSubChannelLayer(hosts=[redis_server.url], prefix=prefix)
    theirs = IncumbentLayer(hosts=[redis_server.url], prefix=prefix)
    assert ours.group_channel("room") == theirs._get_layer()._get_group_channel_name("room")
    message = {"type": "x", "n": [1, 2], "b": b"\xff"}
    assert ours.serialize(message) == theirs.serialize(message)
    await ours.close()
    await theirs.flush()


# --- hooks and recovery -----------------------------------------------------------------


@pytest.fixture
async def layer(fresh_server: RedisServer) -> AsyncIterator[RedisPubSubChannelLayer]:
    made = RedisPubSubChannelLayer(
        hosts=[fresh_server.url],
        prefix="ps",
        on_disconnect="redis.disconnect",
        on_reconnect="redis.reconnect",
    )
    yield made
    await made.flush()
    await made.close()


async def two_members(layer: RedisPubSubChannelLayer) -> tuple[str, str]:
    a, b = await layer.new_channel(), await layer.new_channel()
    layer.want_notices(a)
    layer.want_notices(b)
    await layer.group_add("lobby", a)
    await layer.group_add("lobby", b)
    await layer.send(a, {"type": "before"})
    assert await recv(layer, a) == {"type": "before"}
    return a, b


async def assert_recovered(layer: RedisPubSubChannelLayer, server: RedisServer, *channels: str):  # type: ignore[no-untyped-def]
    """Both hooks reached every channel, every subscription is back, traffic flows."""
    for channel in channels:
        assert await recv(layer, channel, 30) == {"type": "redis.disconnect"}
        assert await recv(layer, channel, 30) == {"type": "redis.reconnect", "recovered": False}
    assert subscribed(server) >= {*channels, layer.group_channel("lobby")}
    await layer.group_send("lobby", {"type": "after"})
    for channel in channels:
        assert await recv(layer, channel) == {"type": "after"}
    await layer.send(channels[0], {"type": "direct-after"})
    assert await recv(layer, channels[0]) == {"type": "direct-after"}


@pytest.mark.faults
async def test_killed_subscriber_connection(
    layer: RedisPubSubChannelLayer, fresh_server: RedisServer
) -> None:
    a, b = await two_members(layer)
    assert fresh_server.kill_clients(kinds=("pubsub",)) == 1
    await assert_recovered(layer, fresh_server, a, b)
    assert layer.stats.reconnects == 1


@pytest.mark.faults
async def test_server_restart(layer: RedisPubSubChannelLayer, fresh_server: RedisServer) -> None:
    a, b = await two_members(layer)
    fresh_server.stop()
    restarting = asyncio.ensure_future(asyncio.to_thread(fresh_server.start))
    await layer.group_send("lobby", {"type": "during"})  # retried, not raised
    await restarting
    got = [await recv(layer, a, 30) for _ in range(2)]
    assert got[0] == {"type": "redis.disconnect"}
    assert got[1] == {"type": "redis.reconnect", "recovered": False}
    # The publish retried into the restarted server may land before or after the
    # resubscribe: Pub/Sub keeps no promise for it, only that nothing raised.
    await until_subscribed(fresh_server, layer.group_channel("lobby"))
    assert subscribed(fresh_server) >= {a, b, layer.group_channel("lobby")}
    await layer.group_send("lobby", {"type": "after"})
    for channel in (a, b):
        seen = await recv(layer, channel)
        if seen == {"type": "during"}:
            seen = await recv(layer, channel)
        if seen["type"] == "redis.disconnect":  # b's notices (a's were read above)
            assert await recv(layer, channel) == {"type": "redis.reconnect", "recovered": False}
            seen = await recv(layer, channel)
            if seen == {"type": "during"}:
                seen = await recv(layer, channel)
        assert seen == {"type": "after"}


@pytest.mark.faults
async def test_pause_delays_but_loses_nothing_published_after(
    layer: RedisPubSubChannelLayer, fresh_server: RedisServer
) -> None:
    a, _ = await two_members(layer)
    fresh_server.pause(1500)
    await layer.group_send("lobby", {"type": "during pause"})  # waits, does not raise
    assert await recv(layer, a) == {"type": "during pause"}


@pytest.mark.faults
async def test_sentinel_failover(prefix: str) -> None:
    setup = SentinelSetup().start()
    try:
        layer = RedisPubSubChannelLayer(
            hosts=[setup.host_entry()],
            prefix=prefix,
            retry_timeout=30,
            on_disconnect="redis.disconnect",
            on_reconnect="redis.reconnect",
        )
        channel = await layer.new_channel()
        layer.want_notices(channel)
        await layer.group_add("failover", channel)
        await layer.group_send("failover", {"type": "before"})
        assert await recv(layer, channel) == {"type": "before"}
        old_port = setup.current_master_port()
        assert await asyncio.to_thread(setup.failover) != old_port
        assert await recv(layer, channel, 30) == {"type": "redis.disconnect"}
        back = await recv(layer, channel, 30)
        assert back == {"type": "redis.reconnect", "recovered": False}
        await layer.group_send("failover", {"type": "after"})
        assert await recv(layer, channel, 30) == {"type": "after"}
        await layer.flush()
        await layer.close()
    finally:
        setup.cleanup()


# --- resource hygiene ---------------------------------------------------------------------


async def test_an_idle_subscriber_does_not_poll(
    layer: RedisPubSubChannelLayer, fresh_server: RedisServer
) -> None:
    channel = await layer.new_channel()
    waiting = asyncio.ensure_future(layer.receive(channel))
    subscriber = next(iter(layer._here().subscribers.values()))
    before = subscriber.wakeups
    await asyncio.sleep(1.0)  # idle time is what is under test (the incumbent wakes 10x/s)
    assert subscriber.wakeups == before
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_flush_and_close_leave_no_task_or_connection(fresh_server: RedisServer) -> None:
    baseline = fresh_server.connected_clients()
    layer = RedisPubSubChannelLayer(hosts=[fresh_server.url], prefix="clean")
    for round_ in range(2):
        channel = await layer.new_channel()
        await layer.group_add("g", channel)
        await layer.group_send("g", {"type": "x", "round": round_})
        assert await recv(layer, channel) == {"type": "x", "round": round_}
        await (layer.flush() if round_ == 0 else layer.close())
        tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("streamlayer-")]
        assert not [t for t in tasks if not t.done()]
        assert fresh_server.connected_clients() == baseline
        assert subscribed(fresh_server) == set()


async def test_an_exited_consumer_is_unsubscribed(
    layer: RedisPubSubChannelLayer, fresh_server: RedisServer
) -> None:
    """Channels cancels receive() when a consumer exits: its subscriptions end after
    RELEASE_AFTER seconds, while a receive() that comes back in time loses nothing."""
    channel = await layer.new_channel()
    await layer.group_add("lobby", channel)
    for _ in range(2):
        waiting = asyncio.ensure_future(layer.receive(channel))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await layer.group_send("lobby", {"type": "while away"})
        assert await recv(layer, channel) == {"type": "while away"}
    waiting = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    for _ in range(int(RELEASE_AFTER * 40)):  # bounded: RELEASE_AFTER plus a margin
        if not subscribed(fresh_server):
            break
        await asyncio.sleep(0.05)
    assert subscribed(fresh_server) == set()


async def test_group_add_of_a_foreign_channel_is_refused(layer: RedisPubSubChannelLayer) -> None:
    with pytest.raises(ValueError, match="channel of this process"):
        await layer.group_add("lobby", "specific.elsewhere!abc")


async def test_two_event_loops_at_once_and_no_leak_after_one_ends(
    fresh_server: RedisServer,
) -> None:
    """One layer used from the main loop and from a thread's own loop at the same time;
    when the thread's loop ends, its subscriber and connections go with it."""
    layer = RedisPubSubChannelLayer(hosts=[fresh_server.url], prefix="loops")
    mine = await layer.new_channel()
    await layer.send(mine, {"type": "warm-up"})  # this loop's publishing connection
    assert await recv(layer, mine) == {"type": "warm-up"}
    baseline = fresh_server.connected_clients()

    async def elsewhere() -> dict[str, Any]:
        theirs = await layer.new_channel()
        await layer.send(mine, {"type": "hello", "reply_to": theirs})
        return await recv(layer, theirs)

    other_loop = asyncio.ensure_future(asyncio.to_thread(asyncio.run, elsewhere()))
    hello = await recv(layer, mine)
    await layer.send(hello["reply_to"], {"type": "reply"})
    assert await asyncio.wait_for(other_loop, 10) == {"type": "reply"}
    for _ in range(200):  # the server notices closed sockets a moment later (bounded)
        if fresh_server.connected_clients() == baseline:
            break
        await asyncio.sleep(0.01)
    assert fresh_server.connected_clients() == baseline
    await layer.flush()
    await layer.close()
