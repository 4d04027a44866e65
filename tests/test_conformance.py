"""The channel layer specification, written once and run against every layer
class on every topology (one server, three shards, a Sentinel-managed master)."""

from __future__ import annotations

import asyncio
import random
import re
import threading

import pytest
from asgiref.sync import async_to_sync

from streamlayer import ChannelFull

from .conftest import LayerFactory
from .layers import keeps, requires

RECEIVE_TIMEOUT = 10


async def recv(layer, channel, within=RECEIVE_TIMEOUT):  # type: ignore[no-untyped-def]
    return await asyncio.wait_for(layer.receive(channel), within)


async def assert_empty(layer, channel, wait=0.3):  # type: ignore[no-untyped-def]
    """Nothing arrives on ``channel`` within ``wait`` seconds (a negative check needs a bound)."""
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(channel), wait)


def queued_channels(make_layer: LayerFactory, normal: str, specific: str) -> list[str]:
    """The channels to try: the normal one only on layers where a message sent before
    anyone receives waits in Redis (on Pub/Sub only a subscribed channel gets it)."""
    return [normal, specific] if keeps(make_layer, "queueing") else [specific]


# --- send and receive ----------------------------------------------------------------


async def test_send_receive_normal_channel(make_layer: LayerFactory) -> None:
    requires(make_layer, "queueing")
    layer = make_layer()
    await layer.send("test-channel-1", {"type": "test.message", "text": "Ahoy-hoy!"})
    assert await recv(layer, "test-channel-1") == {"type": "test.message", "text": "Ahoy-hoy!"}


async def test_send_receive_process_specific_channel(make_layer: LayerFactory) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    assert "!" in channel
    await layer.send(channel, {"type": "test.message", "n": 1})
    assert await recv(layer, channel) == {"type": "test.message", "n": 1}


async def test_binary_and_nested_values_survive(make_layer: LayerFactory) -> None:
    layer = make_layer()
    channel = await layer.new_channel()
    message = {"type": "t", "bytes": b"\x00\xff", "nested": {"a": [1, 2.5, None, True]}}
    await layer.send(channel, message)
    assert await recv(layer, channel) == message


async def test_new_channel_names_are_unique_and_valid(make_layer: LayerFactory) -> None:
    layer = make_layer()
    names = {await layer.new_channel() for _ in range(100)}
    assert len(names) == 100
    for name in names:
        assert layer.require_valid_channel_name(name)
    assert (await layer.new_channel("http.response")).startswith("http.response.")


async def test_fifo_per_sender_on_both_channel_kinds(make_layer: LayerFactory) -> None:
    layer = make_layer(capacity=500)
    specific = await layer.new_channel()
    for channel in queued_channels(make_layer, "fifo", specific):
        for i in range(200):
            await layer.send(channel, {"type": "n", "i": i})
        got = [(await recv(layer, channel))["i"] for _ in range(200)]
        assert got == list(range(200))


async def test_two_layers_exchange_messages(make_layer: LayerFactory) -> None:
    """Two layer instances stand for two processes sharing the prefix."""
    requires(make_layer, "queueing")
    one, two = make_layer(), make_layer()
    reply_to = await one.new_channel()
    await two.send("requests", {"type": "request", "reply_to": reply_to})
    request = await recv(one, "requests")
    await two.send(request["reply_to"], {"type": "reply"})
    assert await recv(one, reply_to) == {"type": "reply"}


async def test_specific_channel_of_another_layer_is_refused(make_layer: LayerFactory) -> None:
    requires(make_layer, "exclusive_channels")
    one, two = make_layer(), make_layer()
    channel = await one.new_channel()
    with pytest.raises(ValueError, match="new_channel"):
        await two.receive(channel)


# --- capacity -------------------------------------------------------------------------


async def test_capacity_raises_channel_full(make_layer: LayerFactory) -> None:
    requires(make_layer, "capacity")
    layer = make_layer(capacity=3)
    specific = await layer.new_channel()
    for channel in ("full", specific):
        for i in range(3):
            await layer.send(channel, {"type": "n", "i": i})
        with pytest.raises(ChannelFull, match="capacity of 3"):
            await layer.send(channel, {"type": "n", "i": 3})
        # Nothing already accepted is lost, and the channel takes more once drained.
        assert [(await recv(layer, channel))["i"] for _ in range(3)] == [0, 1, 2]
        await layer.send(channel, {"type": "n", "i": 4})
        assert (await recv(layer, channel))["i"] == 4


async def test_channel_capacity_patterns_in_order(make_layer: LayerFactory) -> None:
    requires(make_layer, "capacity")
    layer = make_layer(
        capacity=2,
        channel_capacity={
            "http.request": 4,
            re.compile(r"^websocket\.send!.+"): 1,
            "http.*": 3,
        },
    )
    assert layer.get_capacity("http.request") == 4
    assert layer.get_capacity("http.other") == 3
    assert layer.get_capacity("websocket.send!abc") == 1
    assert layer.get_capacity("other") == 2
    for i in range(4):
        await layer.send("http.request", {"type": "n", "i": i})
    with pytest.raises(ChannelFull):
        await layer.send("http.request", {"type": "n"})
    for _ in range(3):
        await layer.send("http.other", {"type": "n"})
    with pytest.raises(ChannelFull):
        await layer.send("http.other", {"type": "n"})


# --- expiry ---------------------------------------------------------------------------


async def test_expired_messages_are_not_delivered(make_layer: LayerFactory) -> None:
    layer = make_layer(expiry=1)
    specific = await layer.new_channel()
    channels = queued_channels(make_layer, "expiring", specific)
    for channel in channels:
        await layer.send(channel, {"type": "old"})
    await asyncio.sleep(1.5)  # the message must outlive its expiry: time itself is under test
    for channel in channels:
        await layer.send(channel, {"type": "new"})
    for channel in channels:
        assert await recv(layer, channel) == {"type": "new"}


async def test_expired_messages_free_capacity(make_layer: LayerFactory) -> None:
    requires(make_layer, "capacity")
    layer = make_layer(expiry=1, capacity=1)
    await layer.send("cap-exp", {"type": "a"})
    with pytest.raises(ChannelFull):
        await layer.send("cap-exp", {"type": "b"})
    await asyncio.sleep(1.5)
    await layer.send("cap-exp", {"type": "c"})
    assert await recv(layer, "cap-exp") == {"type": "c"}


# --- groups ---------------------------------------------------------------------------


async def test_group_send_reaches_every_member(make_layer: LayerFactory) -> None:
    requires(make_layer, "remote_members")
    one, two = make_layer(), make_layer()
    a, b = await one.new_channel(), await one.new_channel()
    c = await two.new_channel()
    for channel in (a, b, c):
        await one.group_add("room", channel)
    await one.group_add("room", "worker-queue")
    await two.group_send("room", {"type": "chat", "text": "hi"})
    assert await recv(one, a) == {"type": "chat", "text": "hi"}
    assert await recv(one, b) == {"type": "chat", "text": "hi"}
    assert await recv(two, c) == {"type": "chat", "text": "hi"}
    assert await recv(one, "worker-queue") == {"type": "chat", "text": "hi"}


async def test_group_discard(make_layer: LayerFactory) -> None:
    layer = make_layer()
    a, b = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("g", a)
    await layer.group_add("g", b)
    await layer.group_discard("g", b)
    await layer.group_discard("g", "never-a-member")
    await layer.group_send("g", {"type": "x"})
    assert await recv(layer, a) == {"type": "x"}
    await assert_empty(layer, b)


async def test_group_add_twice_delivers_once(make_layer: LayerFactory) -> None:
    layer = make_layer()
    a = await layer.new_channel()
    await layer.group_add("g", a)
    await layer.group_add("g", a)
    await layer.group_send("g", {"type": "x", "n": 1})
    await layer.group_send("g", {"type": "x", "n": 2})
    assert (await recv(layer, a))["n"] == 1
    assert (await recv(layer, a))["n"] == 2
    await assert_empty(layer, a)


async def test_group_send_skips_full_members(make_layer: LayerFactory) -> None:
    requires(make_layer, "capacity")
    one, two = make_layer(capacity=1), make_layer(capacity=1)
    a, b = await one.new_channel(), await two.new_channel()
    await one.group_add("g", a)
    await one.group_add("g", b)
    await one.send(a, {"type": "filler"})
    await one.group_send("g", {"type": "x"})  # no exception: a is full, b is not
    assert await recv(one, a) == {"type": "filler"}
    assert await recv(two, b) == {"type": "x"}
    await assert_empty(one, a)


async def test_group_expiry(make_layer: LayerFactory) -> None:
    requires(make_layer, "group_expiry")
    layer = make_layer(group_expiry=1)
    a = await layer.new_channel()
    await layer.group_add("short", a)
    await asyncio.sleep(1.5)  # membership must outlive group_expiry
    await layer.group_send("short", {"type": "x"})
    await assert_empty(layer, a)


async def test_group_send_to_empty_group(make_layer: LayerFactory) -> None:
    layer = make_layer()
    await layer.group_send("nobody-here", {"type": "x"})


async def test_group_send_to_many_members(make_layer: LayerFactory) -> None:
    layer = make_layer()
    channels = [await layer.new_channel() for _ in range(100)]
    for channel in channels:
        await layer.group_add("big", channel)
    await layer.group_send("big", {"type": "x"})
    results = await asyncio.gather(*(recv(layer, c) for c in channels))
    assert results == [{"type": "x"}] * 100


# --- flush ----------------------------------------------------------------------------


async def test_flush_drops_messages_and_groups(make_layer: LayerFactory) -> None:
    layer = make_layer()
    a = await layer.new_channel()
    await layer.send("flushed", {"type": "x"})
    await layer.send(a, {"type": "x"})
    await layer.group_add("g", a)
    await layer.flush()
    await layer.group_send("g", {"type": "after"})
    await assert_empty(layer, "flushed")
    await assert_empty(layer, a)


# --- invalid input --------------------------------------------------------------------


# Channels' own name pattern ends in "$", which also matches before a final newline.
_NAMES_WITH_NEWLINES = ["chan\n", "specific.abc!x\n"]


@pytest.mark.parametrize(
    "name", ["", "with space", "ü", "a" * 100, 123, None, b"bytes", *_NAMES_WITH_NEWLINES]
)
async def test_invalid_channel_names(make_layer: LayerFactory, name: object) -> None:
    layer = make_layer()
    with pytest.raises(TypeError, match="Channel name must be"):
        await layer.send(name, {"type": "x"})
    with pytest.raises(TypeError, match="Channel name must be"):
        await layer.receive(name)
    with pytest.raises(TypeError, match="Channel name must be"):
        await layer.group_add("g", name)


@pytest.mark.parametrize("name", ["", "bad!group", "with space", "a" * 100, 7, "group\n"])
async def test_invalid_group_names(make_layer: LayerFactory, name: object) -> None:
    layer = make_layer()
    with pytest.raises(TypeError, match="Group name must be"):
        await layer.group_add(name, "channel")
    with pytest.raises(TypeError, match="Group name must be"):
        await layer.group_send(name, {"type": "x"})
    with pytest.raises(TypeError, match="Group name must be"):
        await layer.group_discard(name, "channel")


async def test_invalid_messages(make_layer: LayerFactory) -> None:
    layer = make_layer()
    with pytest.raises(TypeError, match="must be a dict"):
        await layer.send("c", ["not", "a", "dict"])
    with pytest.raises(ValueError, match="reserved key"):
        await layer.send("c", {"type": "x", "__asgi_channel__": "evil"})
    with pytest.raises(TypeError, match="must be a dict"):
        await layer.group_send("g", "text")


# --- cancellation and concurrency -----------------------------------------------------


async def test_cancelled_receive_loses_nothing(make_layer: LayerFactory) -> None:
    layer = make_layer()
    specific = await layer.new_channel()
    for channel in ("cancel-normal", specific):
        waiting = asyncio.ensure_future(layer.receive(channel))
        await asyncio.sleep(0.05)  # let the receive reach its blocking read
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await layer.send(channel, {"type": "x", "n": 1})
        await layer.send(channel, {"type": "x", "n": 2})
        assert (await recv(layer, channel))["n"] == 1
        assert (await recv(layer, channel))["n"] == 2


async def test_random_cancellations_lose_and_duplicate_nothing(make_layer: LayerFactory) -> None:
    layer = make_layer(capacity=1000)
    rng = random.Random(7)
    specific = await layer.new_channel()
    for channel in queued_channels(make_layer, "cancel-storm", specific):
        for i in range(200):
            await layer.send(channel, {"type": "n", "i": i})
        got: list[int] = []
        for _ in range(2000):
            if len(got) == 200:
                break
            try:
                message = await asyncio.wait_for(layer.receive(channel), rng.uniform(0, 0.004))
            except TimeoutError:
                continue
            got.append(message["i"])
        while len(got) < 200:
            got.append((await recv(layer, channel))["i"])
        assert sorted(got) == list(range(200)), "a message was lost or duplicated"
        await assert_empty(layer, channel)


async def test_many_concurrent_receivers(make_layer: LayerFactory) -> None:
    layer = make_layer()
    channels = [await layer.new_channel() for _ in range(50)]
    receivers = [asyncio.ensure_future(recv(layer, c)) for c in channels]
    await asyncio.sleep(0)
    for i, channel in enumerate(channels):
        await layer.send(channel, {"type": "n", "i": i})
    results = await asyncio.gather(*receivers)
    assert [m["i"] for m in results] == list(range(50))


async def test_competing_receivers_on_a_normal_channel(make_layer: LayerFactory) -> None:
    requires(make_layer, "workers")
    one, two = make_layer(capacity=500), make_layer(capacity=500)
    workers = [one, one, two, two]
    got: list[int] = []

    async def work(layer):  # type: ignore[no-untyped-def]
        while len(got) < 200:
            try:
                got.append((await asyncio.wait_for(layer.receive("jobs"), 0.5))["i"])
            except TimeoutError:
                continue

    tasks = [asyncio.ensure_future(work(w)) for w in workers]
    for i in range(200):
        await one.send("jobs", {"type": "job", "i": i})
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    assert sorted(got) == list(range(200))


# --- sync callers ---------------------------------------------------------------------


async def test_async_to_sync_from_threads(make_layer: LayerFactory) -> None:
    layer = make_layer(capacity=1000)
    channel = await layer.new_channel()
    await layer.group_add("threads", channel)
    errors: list[BaseException] = []

    queueing = keeps(make_layer, "queueing")

    def worker(n: int) -> None:
        try:
            for i in range(10 if queueing else 0):
                async_to_sync(layer.send)("sync-jobs", {"type": "job", "n": n, "i": i})
            async_to_sync(layer.group_send)("threads", {"type": "done", "n": n})
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    await asyncio.get_running_loop().run_in_executor(None, lambda: [t.join() for t in threads])
    assert not errors
    done = sorted([(await recv(layer, channel))["n"] for _ in range(4)])
    assert done == [0, 1, 2, 3]
    jobs = [await recv(layer, "sync-jobs") for _ in range(40 if queueing else 0)]
    for n in range(4 if queueing else 0):
        assert [j["i"] for j in jobs if j["n"] == n] == list(range(10))


def test_fully_sync_round_trip(layer_path: str, topology: list[object], prefix: str) -> None:
    """A management command: every call on its own fresh event loop."""
    from .layers import layer_class

    requires(layer_path, "loop_crossing")
    layer = layer_class(layer_path)(hosts=topology, prefix=prefix)
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)("sync-group", channel)
    async_to_sync(layer.send)(channel, {"type": "a"})
    async_to_sync(layer.group_send)("sync-group", {"type": "b"})
    assert async_to_sync(layer.receive)(channel) == {"type": "a"}
    assert async_to_sync(layer.receive)(channel) == {"type": "b"}
    async_to_sync(layer.send)("sync-normal", {"type": "c"})
    assert async_to_sync(layer.receive)("sync-normal") == {"type": "c"}
    async_to_sync(layer.flush)()
    assert layer.connections.open_loops() == 0
