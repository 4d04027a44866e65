"""Accepted means delivered: a message ``send()`` / ``group_send()`` accepted reaches
its receiver (unless it expires), whatever the load. Capacity refuses at send time,
visibly and counted; nothing that arrived in a process is thrown away later.

The loads are the ones a real app puts on a layer: a consumer slower than its
sender, a full channel beside a live one in the same process, and a burst of
queued sends landing at once after Redis stalled for two seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from streamlayer import BulkChannelFull, ChannelFull, StreamsChannelLayer
from streamlayer.base import StreamlayerLayer
from streamlayer.compat import pubsub
from streamlayer.testing import RedisServer
from streamlayer.tools.bench.scenarios import Metrics, Sizes, stall_burst

from .layers import LAYERS, PUBSUB, layer_class

_WAIT = 20.0


@pytest.fixture
async def layers(redis_server: RedisServer, prefix: str) -> AsyncIterator[Any]:
    """Build layers of any class on the shared server; flushed and closed after."""
    made: list[StreamlayerLayer] = []

    def make(path: str, **options: Any) -> StreamlayerLayer:
        layer = layer_class(path)(hosts=[redis_server.url], prefix=prefix, **options)
        made.append(layer)
        return layer

    yield make
    for layer in made:
        await layer.flush()
        await layer.close()


async def _ready_channel(layer: StreamlayerLayer) -> str:
    """A channel of ``layer`` whose reader is running (a first message went through)."""
    channel = await layer.new_channel()
    receiving = asyncio.ensure_future(layer.receive(channel))
    await layer.send(channel, {"type": "ready"})
    assert (await asyncio.wait_for(receiving, _WAIT))["type"] == "ready"
    return channel


@pytest.mark.parametrize("path", LAYERS)
async def test_a_slow_consumer_receives_exactly_what_was_accepted(layers: Any, path: str) -> None:
    """One consumer always waiting in receive() but slower than its sender (200
    messages/s), 250 sends as fast as they go: every send either returns (and its
    message arrives, in order, no gap) or raises ChannelFull (and is counted)."""
    layer = layers(path, capacity=100)
    channel = await _ready_channel(layer)
    received: list[int] = []
    accepted: list[int] = []
    sent_all, got_all = asyncio.Event(), asyncio.Event()

    async def consume() -> None:
        while True:
            received.append((await layer.receive(channel))["n"])
            if sent_all.is_set() and len(received) >= len(accepted):
                got_all.set()
            await asyncio.sleep(0.005)  # the consumer's own work: 200 messages/s

    consumer = asyncio.ensure_future(consume())
    refused = 0
    for n in range(250):
        try:
            await layer.send(channel, {"type": "m", "n": n})
        except ChannelFull:
            refused += 1
        else:
            accepted.append(n)
    sent_all.set()
    if len(received) < len(accepted):
        await asyncio.wait_for(got_all.wait(), _WAIT)
    await asyncio.sleep(0.1)  # nothing beyond what was accepted shows up
    consumer.cancel()
    assert received == accepted
    stats = layer.stats()
    assert stats["full"] == refused
    assert stats["dropped"] == 0 and stats["expired"] == 0
    if isinstance(layer, StreamsChannelLayer):
        # The backlog reached capacity: the sender heard so, no message was lost.
        assert refused > 0
    if path == PUBSUB:
        assert refused == 0  # Pub/Sub keeps no backlog to bound


class _Tally:
    """What each consumer received; ``done`` is set once they hold ``expected`` in all."""

    def __init__(self, *names: str) -> None:
        self.got: dict[str, list[int]] = {name: [] for name in names}
        self.expected: int | None = None
        self.done = asyncio.Event()

    def add(self, name: str, n: int) -> None:
        self.got[name].append(n)
        self._check()

    def expect(self, total: int) -> None:
        self.expected = total
        self._check()

    def reset(self) -> None:
        for got in self.got.values():
            got.clear()
        self.expected = None
        self.done.clear()

    def _check(self) -> None:
        if self.expected is not None and sum(map(len, self.got.values())) >= self.expected:
            self.done.set()


async def _consume(
    layer: StreamlayerLayer, channel: str, tally: _Tally, name: str, pace: float
) -> None:
    """Receive for ever, ``pace`` seconds of work per message."""
    while True:
        tally.add(name, (await layer.receive(channel))["n"])
        await asyncio.sleep(pace)


def _prefixes(received: list[int], batch: int) -> bool:
    """Whether ``received`` holds, for each batch of ``batch`` numbers, a prefix of it
    (a full channel refuses a bulk send's tail, never a message in its middle)."""
    by_batch: dict[int, list[int]] = {}
    for n in received:
        by_batch.setdefault(n // batch, []).append(n)
    return all(got == list(range(b * batch, b * batch + len(got))) for b, got in by_batch.items())


@pytest.mark.parametrize("path", LAYERS)
async def test_bulk_sends_from_another_process_reach_slow_consumers_exactly(
    layers: Any, path: str
) -> None:
    """Bulk sends as a real app makes them, from another process, to consumers slower
    than the sender: 30 ``send_bulk`` of 10 at once to one consumer (200 messages/s),
    then 30 ``group_send_bulk`` of 10, one every 20 ms, to a group of that consumer
    and one that does no work of its own (in one event loop with the sender, it still
    takes a loop turn per message: slower than bulk sends too), each layer a process
    of its own, capacity 100. Every batch delivers a prefix of itself to each, in
    order; what was refused is exactly what the sender was told
    (``BulkChannelFull``) or counted (``full``)."""
    size, batches = 10, 30
    sender = layers(path, capacity=100)
    slow_layer, fast_layer = layers(path, capacity=100), layers(path, capacity=100)
    slow = await _ready_channel(slow_layer)
    fast = await _ready_channel(fast_layer)
    await slow_layer.group_add("room", slow)
    await fast_layer.group_add("room", fast)
    tally = _Tally("slow", "fast")
    consumers = [
        asyncio.ensure_future(_consume(slow_layer, slow, tally, "slow", 0.005)),
        asyncio.ensure_future(_consume(fast_layer, fast, tally, "fast", 0)),
    ]
    try:
        accepted: list[int] = []
        for b in range(batches):
            numbers = range(b * size, (b + 1) * size)
            try:
                await sender.send_bulk(slow, [{"type": "m", "n": n} for n in numbers])
            except BulkChannelFull as full:
                accepted += numbers[: full.accepted]
                assert full.accepted + full.refused == size
            else:
                accepted += numbers
        tally.expect(len(accepted))
        await asyncio.wait_for(tally.done.wait(), _WAIT)
        await asyncio.sleep(0.1)  # nothing beyond what was accepted shows up
        assert tally.got["slow"] == accepted, "send_bulk: the accepted, in order, no more"
        point_to_point_full = sender.stats()["full"]
        assert point_to_point_full == batches * size - len(accepted)

        tally.reset()
        for b in range(batches):
            numbers = range(b * size, (b + 1) * size)
            await sender.group_send_bulk("room", [{"type": "m", "n": n} for n in numbers])
            await asyncio.sleep(0.02)  # the app's next burst (the slow member drains 4)
        group_full = sender.stats()["full"] - point_to_point_full
        tally.expect(2 * batches * size - group_full)
        await asyncio.wait_for(tally.done.wait(), _WAIT)
        await asyncio.sleep(0.1)
        assert sum(map(len, tally.got.values())) == 2 * batches * size - group_full
        for got in tally.got.values():
            assert got == sorted(set(got)), "in order, no duplicates"
            assert _prefixes(got, size)
        # A member refused early takes messages again once it drained: room comes
        # back while the sends go on.
        assert max(tally.got["slow"]) >= (batches - 10) * size
    finally:
        for consumer in consumers:
            consumer.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
    if isinstance(sender, StreamsChannelLayer):
        assert len(accepted) < batches * size, "the slow consumer's backlog filled up"
        assert group_full > 0
    if path == PUBSUB:
        assert len(accepted) == batches * size and group_full == 0  # no backlog to bound


async def test_each_member_has_its_own_capacity(layers: Any) -> None:
    """Two channels of one process in a group, capacity 3, one of them full: a group
    send still reaches the other, and the full one is counted, not lost."""
    layer = layers("streamlayer.StreamsChannelLayer", capacity=3)
    full, roomy = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("room", full)
    await layer.group_add("room", roomy)
    for n in range(3):
        await layer.send(full, {"type": "direct", "n": n})
    with pytest.raises(ChannelFull, match="capacity of 3"):
        await layer.send(full, {"type": "direct", "n": 3})
    await layer.group_send("room", {"type": "group"})
    assert (await asyncio.wait_for(layer.receive(roomy), _WAIT))["type"] == "group"
    got = [await asyncio.wait_for(layer.receive(full), _WAIT) for _ in range(3)]
    assert [m["n"] for m in got] == [0, 1, 2]
    assert layer.stats()["full"] == 2  # the refused send and the skipped member
    # Received: the full channel has room again (within a read of the inbox).
    await _until_room(layer, full)
    await layer.group_send("room", {"type": "group", "n": 2})
    assert (await asyncio.wait_for(layer.receive(full), _WAIT))["n"] == 2
    assert (await asyncio.wait_for(layer.receive(roomy), _WAIT))["n"] == 2


async def _until_room(layer: StreamlayerLayer, channel: str) -> None:
    """Send probes until ``channel`` takes one (its receives' counts reached Redis),
    within a second, and receive the probe."""
    async with asyncio.timeout(1):
        while True:
            try:
                await layer.send(channel, {"type": "probe"})
                break
            except ChannelFull:
                await asyncio.sleep(0.01)
    assert (await layer.receive(channel))["type"] == "probe"


async def test_capacity_patterns_apply_per_channel_of_one_process(layers: Any) -> None:
    """channel_capacity gives two channels of one inbox different capacities."""
    layer = layers("streamlayer.StreamsChannelLayer", capacity=5, channel_capacity={"tiny.*": 1})
    tiny, big = await layer.new_channel("tiny"), await layer.new_channel("big")
    for channel in (tiny, big):
        await layer.group_add("g", channel)
    for n in range(3):
        await layer.group_send("g", {"type": "g", "n": n})
    assert [(await layer.receive(big))["n"] for _ in range(3)] == [0, 1, 2]
    assert (await layer.receive(tiny))["n"] == 0
    assert layer.stats()["full"] == 2
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(tiny), 0.3)


async def test_a_full_channel_does_not_hold_up_the_others(layers: Any) -> None:
    """A channel nobody receives from fills up; the other channels of its process keep
    getting every message at once (the shared inbox has no head-of-line blocking)."""
    layer = layers("streamlayer.StreamsChannelLayer", capacity=10)
    stuck, live = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("both", stuck)
    await layer.group_add("both", live)
    for n in range(30):
        await layer.group_send("both", {"type": "g", "n": n})
        message = await asyncio.wait_for(layer.receive(live), _WAIT)
        assert message["n"] == n
    assert layer.stats()["full"] == 20  # the stuck channel took 10, then was skipped
    assert [(await layer.receive(stuck))["n"] for _ in range(10)] == list(range(10))
    assert layer.stats()["dropped"] == 0


async def test_receives_give_the_room_back_promptly(layers: Any) -> None:
    """A channel filled to capacity and then drained takes new sends again at once:
    the receives' counts reach Redis without waiting for a new message."""
    layer = layers("streamlayer.StreamsChannelLayer", capacity=20)
    channel = await _ready_channel(layer)
    for _ in range(3):
        for n in range(20):
            await layer.send(channel, {"type": "m", "n": n})
        with pytest.raises(ChannelFull):
            await layer.send(channel, {"type": "m", "n": 20})
        for n in range(20):
            assert (await layer.receive(channel))["n"] == n
        await _until_room(layer, channel)


async def test_a_released_pubsub_channel_counts_what_it_dropped(
    layers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Pub/Sub channel whose consumer left is unsubscribed a moment later; what
    reached it meanwhile is counted as dropped (the only messages any layer throws
    away unread: nobody is left to receive them)."""
    monkeypatch.setattr(pubsub, "RELEASE_AFTER", 0.5)
    layer = layers(PUBSUB)
    channel = await _ready_channel(layer)
    leaving = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0.01)
    leaving.cancel()  # the consumer exits (Channels cancels its receive)
    for n in range(2):
        await layer.send(channel, {"type": "m", "n": n})
    for _ in range(500):  # the release is a timer: poll the counter, bounded
        if layer.stats()["dropped"] >= 2:
            break
        await asyncio.sleep(0.02)
    assert layer.stats()["dropped"] == 2


# --- a stall, then the backlog (the bench's burst scenario, at its full size) ---------


async def _burst_after_pause(
    layer: StreamlayerLayer, server: RedisServer, settle: bool = False
) -> Metrics:
    """20 members each spending 3 ms on a message, 40 senders queueing 4 messages/s
    each, Redis paused 2 s: about 320 messages per member land as one burst, faster
    than a member gets through them. Duplicates or reordering raise BenchError."""
    return await stall_burst(layer, Sizes(), server.pause, settle=settle)


@pytest.mark.faults
@pytest.mark.parametrize("path", ["streamlayer.StreamsChannelLayer", PUBSUB])
async def test_a_two_second_stall_loses_nothing_with_the_defaults(
    fresh_server: RedisServer, path: str
) -> None:
    layer = layer_class(path)(hosts=[fresh_server.url], prefix="burst")
    try:
        outcome = await _burst_after_pause(layer, fresh_server)
        assert outcome["lost"] == 0 and outcome["duplicated"] == 0, outcome
        stats = layer.stats()
        assert stats["full"] == 0 and stats["dropped"] == 0, stats
    finally:
        await layer.flush()
        await layer.close()


@pytest.mark.faults
async def test_a_burst_beyond_capacity_is_refused_visibly(fresh_server: RedisServer) -> None:
    """The same stall with channels_redis' capacity of 100: the burst does not fit, and
    every message a member misses is one its group_send was told about and counted (a
    member skipped at capacity), never one dropped after it was accepted."""
    layer = StreamsChannelLayer(hosts=[fresh_server.url], prefix="burst", capacity=100)
    try:
        outcome = await _burst_after_pause(layer, fresh_server, settle=True)
        stats = layer.stats()
        assert stats["full"] > 0, "the burst was expected to exceed capacity"
        assert outcome["lost"] == stats["full"] and outcome["duplicated"] == 0, (outcome, stats)
        assert stats["dropped"] == 0
    finally:
        await layer.flush()
        await layer.close()
