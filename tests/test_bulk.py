"""send_bulk() and group_send_bulk(): many messages in one round trip, in order, on
every layer and topology, with the single sends' capacity rules made exact for a
batch (a channel takes a prefix of it; send_bulk says how many)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from asgiref.sync import async_to_sync

from streamlayer import BulkChannelFull, ChannelFull
from streamlayer.testing import RedisServer
from streamlayer.tools.demo import CountingConnection

from .conftest import LayerFactory
from .layers import keeps, layer_class, layer_factory, requires
from .test_streams import wait_until_blocked

RECEIVE_TIMEOUT = 10
#: The layers that keep what they accept in Redis (the fault tests' subjects).
ON_STORED_LAYERS = pytest.mark.parametrize(
    "path", ["streamlayer.StreamsChannelLayer", "streamlayer.compat.core.RedisChannelLayer"]
)


async def recv(layer: Any, channel: str) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), RECEIVE_TIMEOUT)


async def take(layer: Any, channel: str, count: int) -> list[Any]:
    return [(await recv(layer, channel))["i"] for _ in range(count)]


async def assert_empty(layer: Any, channel: str, wait: float = 0.3) -> None:
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(channel), wait)


def numbered(count: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"type": "n", "i": i} for i in range(start, start + count)]


def queued_channels(make_layer: LayerFactory, normal: str, specific: str) -> list[str]:
    return [normal, specific] if keeps(make_layer, "queueing") else [specific]


async def test_send_bulk_delivers_in_order(make_layer: LayerFactory) -> None:
    layer = make_layer(capacity=500)
    specific = await layer.new_channel()
    for channel in queued_channels(make_layer, "bulk-fifo", specific):
        await layer.send_bulk(channel, numbered(300))
        assert await take(layer, channel, 300) == list(range(300))
    assert layer.stats.sent == 300 * len(queued_channels(make_layer, "x", specific))


async def test_encrypted_bulk_sends(make_layer: LayerFactory) -> None:
    """Each message of a batch is encrypted as a single send's is: a layer with the
    key reads them, in order."""
    keys = ["a-key-at-least-32-bytes-long-0123456789"]
    sender = make_layer(capacity=100, symmetric_encryption_keys=keys)
    receiver = make_layer(capacity=100, symmetric_encryption_keys=keys)
    channel = await receiver.new_channel()
    await receiver.group_add("bulk-secret", channel)
    await sender.send_bulk(channel, numbered(10))
    await sender.group_send_bulk("bulk-secret", numbered(10, start=10))
    assert await take(receiver, channel, 20) == list(range(20))
    assert receiver.stats.decode_errors == 0


async def test_send_bulk_fills_part_way_and_says_how_many(make_layer: LayerFactory) -> None:
    """A batch larger than the room left: the first messages that fit are stored, in
    order, the rest refused, and the caller learns how many went."""
    requires(make_layer, "capacity")
    layer = make_layer(capacity=5)
    specific = await layer.new_channel()
    for channel in ("bulk-full", specific):
        await layer.send(channel, {"type": "n", "i": -1})
        batch = numbered(8)
        with pytest.raises(BulkChannelFull, match=r"accepted the first 4 of 8") as caught:
            await layer.send_bulk(channel, batch)
        assert isinstance(caught.value, ChannelFull)
        assert (caught.value.accepted, caught.value.refused) == (4, 4)
        assert await take(layer, channel, 5) == [-1, 0, 1, 2, 3]
        await assert_empty(layer, channel)
        # The rest, sent again once there is room, follows in order.
        await layer.send_bulk(channel, batch[caught.value.accepted :])
        assert await take(layer, channel, 4) == [4, 5, 6, 7]
    assert (layer.stats.sent, layer.stats.full) == (2 * 9, 2 * 4)


async def test_group_send_bulk_reaches_every_member_in_order(make_layer: LayerFactory) -> None:
    requires(make_layer, "remote_members")
    one, two = make_layer(capacity=500), make_layer(capacity=500)
    a, b, c = await one.new_channel(), await one.new_channel(), await two.new_channel()
    for channel in (a, b, c, "bulk-worker"):
        await one.group_add("bulk-room", channel)
    await two.group_send_bulk("bulk-room", numbered(100))
    for layer, channel in ((one, a), (one, b), (two, c), (one, "bulk-worker")):
        assert await take(layer, channel, 100) == list(range(100))
    assert two.stats.sent == 400


async def test_group_send_bulk_on_local_members(make_layer: LayerFactory) -> None:
    """What every layer can do (Pub/Sub too): members of the sending process."""
    layer = make_layer(capacity=500)
    channels = [await layer.new_channel() for _ in range(5)]
    for channel in channels:
        await layer.group_add("bulk-local", channel)
    await layer.group_send_bulk("bulk-local", numbered(50))
    for channel in channels:
        assert await take(layer, channel, 50) == list(range(50))
    await layer.group_send_bulk("bulk-nobody", numbered(3))  # an empty group: nothing


async def test_group_send_bulk_gives_a_full_member_a_prefix(make_layer: LayerFactory) -> None:
    requires(make_layer, "capacity")
    one, two = make_layer(capacity=3), make_layer(capacity=3)
    a, b = await one.new_channel(), await two.new_channel()
    for channel in (a, b, "bulk-normal"):
        await one.group_add("bulk-partial", channel)
    await one.send(a, {"type": "n", "i": -1})
    await one.group_send_bulk("bulk-partial", numbered(4))  # no exception: skipped, counted
    assert await take(one, a, 3) == [-1, 0, 1]
    assert await take(two, b, 3) == [0, 1, 2]
    assert await take(one, "bulk-normal", 3) == [0, 1, 2]
    await assert_empty(one, a)
    await assert_empty(two, b)
    assert one.stats.full == 2 + 1 + 1


async def test_a_bad_message_sends_nothing(make_layer: LayerFactory) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    await layer.group_add("bulk-bad", channel)
    bad = [{"type": "ok"}, {"type": "ok"}, ["not", "a", "dict"]]
    with pytest.raises(TypeError, match=r"messages\[2\]: message must be a dict"):
        await layer.send_bulk(channel, bad)
    with pytest.raises(ValueError, match=r"messages\[0\]: .*reserved key"):
        await layer.group_send_bulk("bulk-bad", [{"type": "x", "__asgi_channel__": "y"}])
    with pytest.raises(TypeError, match="list of message dicts"):
        await layer.send_bulk(channel, {"type": "one message, not a list"})
    with pytest.raises(TypeError, match="Channel name must be"):
        await layer.send_bulk("bad name!!", [{"type": "x"}])
    await layer.send_bulk(channel, [])  # nothing to send
    await assert_empty(layer, channel)


async def test_bulk_sends_from_sync_code(make_layer: LayerFactory) -> None:
    """async_to_sync from worker threads, as a Django view or a Celery task calls it."""
    layer = make_layer(capacity=1000)
    channel = await layer.new_channel()
    await layer.group_add("bulk-threads", channel)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            async_to_sync(layer.send_bulk)(
                channel, [{"type": "n", "n": n, "i": i} for i in range(5)]
            )
            async_to_sync(layer.group_send_bulk)("bulk-threads", [{"type": "g", "n": n, "i": 9}])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    await asyncio.get_running_loop().run_in_executor(None, lambda: [t.join() for t in threads])
    assert not errors
    got = [await recv(layer, channel) for _ in range(18)]
    for n in range(3):
        assert [m["i"] for m in got if m["n"] == n] == [0, 1, 2, 3, 4, 9]


@pytest.mark.parametrize(
    "path",
    [
        "streamlayer.StreamsChannelLayer",
        "streamlayer.compat.core.RedisChannelLayer",
        "streamlayer.compat.pubsub.RedisPubSubChannelLayer",
    ],
)
async def test_a_bulk_send_is_one_round_trip(fresh_server: RedisServer, path: str) -> None:
    """1,000 messages: one write to Redis for send_bulk, and for group_send_bulk to a
    group whose members did not change (the sender's writes, counted on its connection
    as the demo counts them; the receiving process reads on connections of its own)."""
    cls = layer_class(path)
    counted = {"address": fresh_server.url, "connection_class": CountingConnection}

    async with layer_factory(lambda **o: cls(capacity=2000, **o)) as make:
        receiver = make(hosts=[fresh_server.url])
        sender = make(hosts=[counted])
        channel = await receiver.new_channel()
        await receiver.group_add("bulk-trips", channel)
        for send, target in (
            (sender.send_bulk, channel),
            (sender.group_send_bulk, "bulk-trips"),
        ):
            for _ in range(2):  # reads the members; loads the scripts (one each call)
                await send(target, numbered(1))
                assert await take(receiver, channel, 1) == [0]
            before = CountingConnection.writes
            await send(target, numbered(1000))
            assert CountingConnection.writes - before == 1, send.__name__
            assert await take(receiver, channel, 1000) == list(range(1000))


@pytest.mark.faults
@ON_STORED_LAYERS
async def test_bulk_sends_through_killed_connections_arrive_once(
    fresh_server: RedisServer, path: str
) -> None:
    """Bulk sends and group bulk sends while every connection is killed ten times over:
    a batch whose reply was lost is retried and stored once, so each receiver gets
    every message of every batch that returned, exactly once and in order."""
    cls = layer_class(path)
    async with layer_factory(
        lambda **o: cls(hosts=[fresh_server.url], capacity=5000, **o)
    ) as make:
        sender, receiver = make(prefix="bulkfaults"), make(prefix="bulkfaults")
        own, normal = await receiver.new_channel(), "bulk-jobs"
        await receiver.group_add("bulk-room", own)
        await receiver.group_add("bulk-room", normal)
        kill = fresh_server.keep_killing_clients
        killing = asyncio.ensure_future(asyncio.to_thread(kill, 10, 0.01, ("normal",)))
        batches = 0
        while not killing.done() and batches < 40:
            start = batches * 20
            await sender.send_bulk(own, numbered(10, start))
            await sender.group_send_bulk("bulk-room", numbered(10, start + 10))
            batches += 1
        await killing
        assert batches >= 2, "the kills ended before two rounds of bulk sends"
        assert sender.stats.retries > 0, "no bulk send met a killed connection"
        expected_own = list(range(batches * 20))
        expected_normal = [i for i in expected_own if i % 20 >= 10]
        assert await take(receiver, own, len(expected_own)) == expected_own
        assert await take(receiver, normal, len(expected_normal)) == expected_normal
        await assert_empty(receiver, own)
        await assert_empty(receiver, normal)


@pytest.mark.faults
@ON_STORED_LAYERS
async def test_bulk_sends_wait_out_a_pause(fresh_server: RedisServer, path: str) -> None:
    """A 500 ms CLIENT PAUSE in the middle of a run of bulk sends: the sends wait it
    out, and everything they accepted arrives once and in order."""
    cls = layer_class(path)
    async with layer_factory(
        lambda **o: cls(hosts=[fresh_server.url], capacity=5000, **o)
    ) as make:
        sender, receiver = make(prefix="bulkpause"), make(prefix="bulkpause")
        own = await receiver.new_channel()
        await receiver.group_add("bulk-room", own)
        await sender.send_bulk(own, numbered(10))  # connected and scripts loaded
        pausing = asyncio.ensure_future(asyncio.to_thread(fresh_server.pause, 500))
        started, rounds, paused_rounds = time.monotonic(), 0, 0
        # Until a round began once Redis had answered the CLIENT PAUSE: on a loaded
        # machine the thread may take longer to send it than three rounds take, and
        # the test once ended before any send met the pause.
        while paused_rounds == 0 or rounds < 3:
            paused = pausing.done()
            start = 10 + rounds * 20
            await sender.send_bulk(own, numbered(10, start))
            await sender.group_send_bulk("bulk-room", numbered(10, start + 10))
            rounds += 1
            paused_rounds += paused
            if not paused:  # pace the rounds before it (capacity 5000: 250 rounds)
                await asyncio.wait([pausing], timeout=0.01)
        await pausing
        assert time.monotonic() - started >= 0.4, "no bulk send waited for the pause"
        expected = list(range(10 + rounds * 20))
        assert await take(receiver, own, len(expected)) == expected
        await assert_empty(receiver, own)


@pytest.mark.faults
@ON_STORED_LAYERS
async def test_bulk_sends_after_an_empty_restart_arrive(
    fresh_server: RedisServer, path: str
) -> None:
    """Redis restarts without its data under a receiving process: once it is back
    (its reconnect notice), bulk and group bulk sends reach it again, each message
    once and in order, the group's through the membership the process restored."""
    cls = layer_class(path)
    notices = {"on_disconnect": "redis.disconnect", "on_reconnect": "redis.reconnect"}
    async with layer_factory(lambda **o: cls(hosts=[fresh_server.url], **notices, **o)) as make:
        sender, receiver = make(prefix="bulkreset"), make(prefix="bulkreset")
        own = await receiver.new_channel()
        receiver.want_notices(own)
        await receiver.group_add("bulk-room", own)
        await sender.group_send_bulk("bulk-room", numbered(10))
        assert await take(receiver, own, 10) == list(range(10))
        waiting = asyncio.ensure_future(recv(receiver, own))
        await wait_until_blocked(fresh_server)
        await asyncio.to_thread(fresh_server.restart)  # no persistence: back empty
        assert (await waiting)["type"] == "redis.disconnect"
        back = await recv(receiver, own)
        assert (back["type"], back["recovered"]) == ("redis.reconnect", False)
        await sender.send_bulk(own, numbered(10, 10))
        await sender.group_send_bulk("bulk-room", numbered(10, 20))
        assert await take(receiver, own, 20) == list(range(10, 30))
        await assert_empty(receiver, own)
