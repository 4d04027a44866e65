"""After Redis loses its data (a restart without persistence, FLUSHALL, a failover to
an empty replica) the layers heal by themselves: the groups their live channels had
joined are joined again before the reconnect notice (``recovered=False``) goes out,
and normal channels find their consumer group again on every read path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from streamlayer import ChannelFull, StreamsChannelLayer
from streamlayer.base import StreamlayerLayer
from streamlayer.reader import BLOCK_SECONDS
from streamlayer.testing import RedisServer

from .layers import LAYERS, PUBSUB, layer_class
from .test_streams import wait_until_blocked

pytestmark = pytest.mark.faults

STORED = ["streamlayer.StreamsChannelLayer", "streamlayer.compat.core.RedisChannelLayer"]
_WAIT = 20.0
_NOTICES = {"on_disconnect": "redis.disconnect", "on_reconnect": "redis.reconnect"}


@pytest.fixture(params=STORED)
async def layer(request: pytest.FixtureRequest, fresh_server: RedisServer) -> AsyncIterator[Any]:
    made = layer_class(request.param)(hosts=[fresh_server.url], prefix="heal", **_NOTICES)
    yield made
    await made.flush()
    await made.close()


async def until_type(layer: StreamlayerLayer, channel: str, kind: str) -> dict[str, Any]:
    """Receive on ``channel`` until a message of type ``kind`` (other notices pass)."""
    async with asyncio.timeout(_WAIT):
        while True:
            message = await layer.receive(channel)
            if message["type"] == kind:
                return message


async def _joined(layer: StreamlayerLayer, count: int) -> list[str]:
    """``count`` channels of ``layer`` in group "room", each receiving."""
    channels = [await layer.new_channel() for _ in range(count)]
    for channel in channels:
        layer.want_notices(channel)
        await layer.group_add("room", channel)
    await layer.group_send("room", {"type": "hello"})
    for channel in channels:
        assert (await until_type(layer, channel, "hello"))["type"] == "hello"
    return channels


@pytest.mark.parametrize("path", LAYERS)
async def test_notices_reach_only_the_channels_that_asked(
    path: str, fresh_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Channels closes a consumer that gets a message type it has no handler for: a
    channel that did not ask for notices gets none, and the log says so once."""
    layer = layer_class(path)(hosts=[fresh_server.url], prefix="ask", **_NOTICES)
    try:
        asked, plain = await layer.new_channel(), await layer.new_channel()
        layer.want_notices(asked)
        for channel in (asked, plain):
            await layer.group_add("room", channel)
        await layer.group_send("room", {"type": "hello"})
        for channel in (asked, plain):
            assert (await until_type(layer, channel, "hello"))["type"] == "hello"
        waiting = {c: asyncio.ensure_future(layer.receive(c)) for c in (asked, plain)}
        if path != PUBSUB:
            await wait_until_blocked(fresh_server)  # the reader waits in its blocking read
        with caplog.at_level("INFO", logger="streamlayer"):
            assert fresh_server.kill_clients() >= 1
            assert (await asyncio.wait_for(waiting[asked], _WAIT))["type"] == "redis.disconnect"
            assert (await until_type(layer, asked, "redis.reconnect"))["type"] == "redis.reconnect"
        await layer.group_send("room", {"type": "after"})
        assert await asyncio.wait_for(waiting[plain], _WAIT) == {"type": "after"}
        assert await until_type(layer, asked, "after") == {"type": "after"}
        told = [r for r in caplog.records if "did not ask for notices" in r.getMessage()]
        assert len(told) == 1, told
    finally:
        await layer.flush()
        await layer.close()


async def test_memberships_come_back_after_an_empty_restart(
    layer: StreamlayerLayer, fresh_server: RedisServer
) -> None:
    """Nothing is sent to a process whose memberships Redis lost, so nothing ends its
    reader's blocking read early: the reader restores them on its way back, well
    before a blocking read's length (every group send of that spell reaches nobody)."""
    channels = await _joined(layer, 3)
    waiting = [asyncio.ensure_future(until_type(layer, c, "redis.reconnect")) for c in channels]
    await wait_until_blocked(fresh_server)  # the receives wait in the reader's blocking read
    await asyncio.to_thread(fresh_server.restart)  # no persistence: it comes back empty
    back = time.monotonic()
    notices = await asyncio.wait_for(asyncio.gather(*waiting), _WAIT)
    took = time.monotonic() - back
    assert all(n["recovered"] is False for n in notices)
    assert took < BLOCK_SECONDS / 2, f"memberships restored {took:.2f} s after Redis was back"
    # The notice comes after the memberships are back: a send now reaches everyone.
    await layer.group_send("room", {"type": "after"})
    for channel in channels:
        assert (await until_type(layer, channel, "after"))["type"] == "after"
    assert layer.stats()["full"] == 0


async def test_a_flush_while_idle_is_noticed_and_healed(
    layer: StreamlayerLayer, fresh_server: RedisServer
) -> None:
    """FLUSHALL breaks no connection: the reader finds its mark gone at its next idle
    check (within a blocking read's timeout) and heals all the same."""
    [channel] = await _joined(layer, 1)
    other = type(layer)(hosts=[fresh_server.url], prefix="heal")  # another process
    try:
        notice = asyncio.ensure_future(until_type(layer, channel, "redis.reconnect"))
        await asyncio.sleep(0.2)
        with fresh_server.client() as client:
            client.flushall()
        assert (await asyncio.wait_for(notice, _WAIT))["recovered"] is False
        await other.group_send("room", {"type": "after"})
        assert (await until_type(layer, channel, "after"))["type"] == "after"
    finally:
        await other.close()


async def test_channels_of_two_prefixes_are_no_reset(layer: StreamlayerLayer) -> None:
    """A process whose channels have two prefixes (compat.core gives each its own
    inbox, each with its own reader and mark) reports no loss where there was none."""
    one, two = await layer.new_channel("progress"), await layer.new_channel("chat")
    for channel in (one, two):
        layer.want_notices(channel)
        await layer.send(channel, {"type": "first"})
        assert (await until_type(layer, channel, "first"))["type"] == "first"
    for channel in (one, two):  # a second round: each reader checks its mark again
        await layer.send(channel, {"type": "second"})
        assert (await until_type(layer, channel, "second"))["type"] == "second"
    assert layer.stats.reconnects == 0


async def test_a_discarded_membership_stays_discarded(
    layer: StreamlayerLayer, fresh_server: RedisServer
) -> None:
    kept, left = await _joined(layer, 2)
    await layer.group_discard("room", left)
    notice = asyncio.ensure_future(until_type(layer, kept, "redis.reconnect"))
    busy = asyncio.ensure_future(layer.receive(left))
    await asyncio.sleep(0.2)
    await asyncio.to_thread(fresh_server.restart)
    await asyncio.wait_for(notice, _WAIT)
    other = type(layer)(hosts=[fresh_server.url], prefix="heal")  # another process
    await other.group_send("room", {"type": "after"})
    await other.close()
    assert (await until_type(layer, kept, "after"))["type"] == "after"
    # The discarded channel only hears the notices, not the group.
    for _ in range(2):
        message = await asyncio.wait_for(busy, _WAIT)
        assert message["type"].startswith("redis."), message
        busy = asyncio.ensure_future(layer.receive(left))
    done, _ = await asyncio.wait([busy], timeout=0.3)
    assert not done, busy.result()
    busy.cancel()


# --- normal channels: the consumer group comes back on every read path -----------------


@pytest.fixture
async def worker(fresh_server: RedisServer) -> AsyncIterator[StreamsChannelLayer]:
    made = StreamsChannelLayer(hosts=[fresh_server.url], prefix="heal", claim_after=0.2)
    yield made
    await made.flush()
    await made.close()


async def test_a_claim_round_after_the_group_vanished_joins_again(
    worker: StreamsChannelLayer, fresh_server: RedisServer
) -> None:
    """The stream and its group vanish while the worker is between receives and its
    claim round (XAUTOCLAIM) is due: the next receive joins again and gets the job."""
    await worker.send("jobs", {"type": "job", "n": 0})
    assert (await worker.receive("jobs"))["n"] == 0
    with fresh_server.client() as client:
        client.flushall()
    await asyncio.sleep(0.3)  # past claim_after / 2: the claim round is due
    for n in range(1, 4):
        await worker.send("jobs", {"type": "job", "n": n})
        assert (await asyncio.wait_for(worker.receive("jobs"), _WAIT))["n"] == n


async def test_a_pending_reread_after_the_group_vanished_joins_again(
    worker: StreamsChannelLayer, fresh_server: RedisServer
) -> None:
    """A receive cancelled mid-read makes the next one re-read our pending entries
    first; with the group gone that re-read joins again instead of failing for good."""
    await worker.send("jobs", {"type": "job", "n": 0})
    assert (await worker.receive("jobs"))["n"] == 0
    cancelled = asyncio.ensure_future(worker.receive("jobs"))
    await asyncio.sleep(0.1)
    cancelled.cancel()
    with fresh_server.client() as client:
        client.flushall()
    await worker.send("jobs", {"type": "job", "n": 1})
    assert (await asyncio.wait_for(worker.receive("jobs"), _WAIT))["n"] == 1


async def test_a_read_entry_whose_stream_vanished_is_still_delivered(
    worker: StreamsChannelLayer, fresh_server: RedisServer
) -> None:
    """An entry read, then the stream flushed before its acknowledgement: nobody else
    can have it, so it is delivered (the acknowledgement does not fail)."""
    for n in range(2):
        await worker.send("jobs", {"type": "job", "n": n})
    state = worker.normal.state("jobs")
    assert (await worker.receive("jobs"))["n"] == 0
    await worker.normal._fetch("jobs", state)  # read the next entry, not yet handed over
    with fresh_server.client() as client:
        client.flushall()
    assert (await asyncio.wait_for(worker.receive("jobs"), _WAIT))["n"] == 1


async def test_capacity_holds_after_redis_lost_the_backlog_reports(
    fresh_server: RedisServer,
) -> None:
    """A channel's queue holds its capacity's worth, unreceived, when Redis loses its
    data: the process reports that backlog again, so the channel stays full (a
    send is refused) until it is received, then takes sends again."""
    layer = StreamsChannelLayer(hosts=[fresh_server.url], prefix="heal", capacity=5, **_NOTICES)
    try:
        full, busy = await layer.new_channel(), await layer.new_channel()
        layer.want_notices(busy)
        for n in range(5):
            await layer.send(full, {"type": "m", "n": n})
        waiting = asyncio.ensure_future(layer.receive(busy))  # the reader runs
        await layer.send(busy, {"type": "m", "n": 0})
        assert (await asyncio.wait_for(waiting, _WAIT))["n"] == 0
        with pytest.raises(ChannelFull):
            await layer.send(full, {"type": "m", "n": 5})
        notice = asyncio.ensure_future(until_type(layer, busy, "redis.reconnect"))
        with fresh_server.client() as client:
            client.flushall()
        await asyncio.wait_for(notice, _WAIT)
        with pytest.raises(ChannelFull):  # the backlog was reported again
            await layer.send(full, {"type": "m", "n": 5})
        assert [(await layer.receive(full))["n"] for _ in range(5)] == list(range(5))
        for _ in range(100):  # the room comes back within a read of the inbox
            try:
                await layer.send(full, {"type": "m", "n": 6})
                break
            except ChannelFull:
                await asyncio.sleep(0.02)
        assert (await layer.receive(full))["n"] == 6
    finally:
        await layer.flush()
        await layer.close()
