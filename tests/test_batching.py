"""Automatic pipelining (:mod:`streamlayer.batching`) against a real redis-server:
concurrent sends share round trips, yet each caller keeps its own result, its own
ChannelFull, its own retry, and a cancelled caller's message never leaves."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from streamlayer import ChannelFull, StreamsChannelLayer
from streamlayer.batching import LONE_CONNECTIONS, ShardBatcher
from streamlayer.keys import stream_inbox_key
from streamlayer.scripts import STREAM_INBOX_ADVANCE, LuaScript
from streamlayer.testing import RedisServer

from .layers import ping_pong


@pytest.fixture
async def layer(fresh_server: RedisServer) -> AsyncIterator[StreamsChannelLayer]:
    made = StreamsChannelLayer(hosts=[fresh_server.url], prefix="batch", capacity=10_000)
    yield made
    if fresh_server.process is not None:
        await made.flush()
    await made.close()


def batcher_of(layer: StreamsChannelLayer) -> ShardBatcher:
    return layer.connections.batcher(0)


async def test_a_lone_send_goes_straight_out(layer: StreamsChannelLayer) -> None:
    channel = await layer.new_channel()
    for i in range(5):
        await layer.send(channel, {"type": "m", "i": i})
    assert batcher_of(layer).pipelines == 0
    assert [(await layer.receive(channel))["i"] for _ in range(5)] == list(range(5))


async def test_a_reply_within_one_process_goes_alone(layer: StreamsChannelLayer) -> None:
    """A request/reply exchange between two channels of one process: the request's
    reply and the inbox read that carries it arrive in the same instant, and the
    receiver may reply before the requester has read its own reply. The reply still
    goes straight out, on the second lone-call connection, never as a pipeline of one
    (a task and a lent connection; with one lone-call connection, 40-70% of the rounds
    of the latency benchmark did that)."""
    await ping_pong(layer, 300)
    assert batcher_of(layer).pipelines == 0


async def test_concurrent_sends_share_round_trips(layer: StreamsChannelLayer) -> None:
    channels = [await layer.new_channel() for _ in range(40)]

    async def sender(channel: str) -> None:
        for i in range(25):
            await layer.send(channel, {"type": "m", "i": i})

    await asyncio.wait_for(asyncio.gather(*(sender(c) for c in channels)), 30)
    batcher = batcher_of(layer)
    # 1,000 sends; nearly all of them left in pipelines of many calls each.
    assert batcher.pipelined_calls > 900
    assert batcher.pipelined_calls / batcher.pipelines > 10
    for channel in channels:
        got = [(await asyncio.wait_for(layer.receive(channel), 10))["i"] for _ in range(25)]
        assert got == list(range(25))


async def test_each_caller_gets_its_own_channel_full(fresh_server: RedisServer) -> None:
    layer = StreamsChannelLayer(hosts=[fresh_server.url], prefix="full", capacity=5)
    try:
        channel = "jobs"
        results = await asyncio.gather(
            *(layer.send(channel, {"type": "m", "i": i}) for i in range(12)),
            return_exceptions=True,
        )
        # The first sends went straight out, each on a lone-call connection of its
        # own, the others together in one pipeline on another: the server may run the
        # lone ones before, inside or after the pipeline. Whatever the order, exactly
        # five fit, every other caller gets its own ChannelFull, and the pipeline's
        # calls keep their order (its first ones fit, then the channel stays full).
        alone = LONE_CONNECTIONS
        accepted = [i for i, result in enumerate(results) if result is None]
        assert len(accepted) == 5, results
        refused = [r for i, r in enumerate(results) if i not in accepted]
        assert all(isinstance(r, ChannelFull) for r in refused), results
        pipelined = [i for i in accepted if i >= alone]
        assert pipelined == list(range(alone, alone + len(pipelined))), results
        assert batcher_of(layer).pipelines >= 1
        # The pipeline's sends to the channel went as one merged script call, whose
        # reply answered each caller on its own.
        assert batcher_of(layer).merged_calls == 12 - alone - 1
        got = [(await asyncio.wait_for(layer.receive(channel), 10))["i"] for _ in range(5)]
        assert sorted(got) == accepted
        assert [i for i in got if i >= alone] == pipelined
    finally:
        await layer.flush()
        await layer.close()


async def test_concurrent_sends_to_one_inbox_go_as_one_script_call(
    layer: StreamsChannelLayer, fresh_server: RedisServer
) -> None:
    """Fifty consumers of one process sending at once append to one inbox: the
    pipeline carries one merged script call for them, not fifty (Redis' per-call cost
    is most of a small append's), and every message arrives once, in order per sender."""
    channels = [await layer.new_channel() for _ in range(50)]
    with fresh_server.client() as client:
        client.config_resetstat()

    async def sender(channel: str) -> None:
        for i in range(20):
            await layer.send(channel, {"type": "m", "i": i})

    await asyncio.wait_for(asyncio.gather(*(sender(c) for c in channels)), 30)
    batcher = batcher_of(layer)
    with fresh_server.client() as client:
        script_calls = client.info("commandstats")["cmdstat_evalsha"]["calls"]
    assert batcher.merged_calls > 500, (batcher.merged_calls, batcher.pipelined_calls)
    assert script_calls < 1000 - batcher.merged_calls + 50, script_calls  # + the reader's
    for channel in channels:
        got = [(await asyncio.wait_for(layer.receive(channel), 10))["i"] for _ in range(20)]
        assert got == list(range(20))


async def test_a_merged_call_stays_behind_another_script_on_its_keys() -> None:
    """What merge() may reorder: calls of one script to the same keys join the first of
    them, but not past a call of another script that touched those keys in between
    (that one's effect stays before theirs); calls to other keys are not held back."""
    from streamlayer.batching import PendingCall, merge
    from streamlayer.scripts import STREAM_APPEND, STREAM_GROUP_SEND_KNOWN

    loop = asyncio.get_running_loop()

    def call(script: LuaScript, *keys: str) -> PendingCall:
        return PendingCall(script, list(keys), [], loop.create_future())

    a1, b1 = call(STREAM_APPEND, "in:a", "st:a"), call(STREAM_APPEND, "in:b", "st:b")
    group = call(STREAM_GROUP_SEND_KNOWN, "members", "digest", "in:a", "st:a")
    a2, b2 = call(STREAM_APPEND, "in:a", "st:a"), call(STREAM_APPEND, "in:b", "st:b")
    a3 = call(STREAM_APPEND, "in:a", "st:a")
    units = merge([a1, b1, group, a2, b2, a3])
    assert [unit.calls for unit in units] == [[a1], [b1, b2], [group], [a2, a3]]
    script, keys, args = units[3].command()
    assert script is STREAM_APPEND.each and keys == ["in:a", "st:a"] and args == [0, 0]


async def test_a_caller_cancelled_before_its_pipeline_left_sends_nothing(
    layer: StreamsChannelLayer, fresh_server: RedisServer
) -> None:
    channel = await layer.new_channel()
    sends = [asyncio.ensure_future(layer.send(channel, {"type": "m", "i": i})) for i in range(10)]
    await asyncio.sleep(0)  # every send has run up to its wait; the pipeline has not left
    for task in sends[5:]:
        task.cancel()
    results = await asyncio.gather(*sends, return_exceptions=True)
    assert results[:5] == [None] * 5
    assert all(isinstance(r, asyncio.CancelledError) for r in results[5:])
    with fresh_server.client() as client:
        assert client.xlen(stream_inbox_key("batch", layer.process_id)) == 5
    got = [(await asyncio.wait_for(layer.receive(channel), 10))["i"] for _ in range(5)]
    # Concurrent sends have no order among themselves: the first went straight out,
    # each on a lone-call connection of its own, the others together in a pipeline.
    assert LONE_CONNECTIONS < 5
    assert sorted(got) == list(range(5))


async def test_a_flushed_script_cache_is_reloaded_for_a_pipeline(
    layer: StreamsChannelLayer, fresh_server: RedisServer
) -> None:
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "m", "i": -1})  # the script is loaded now
    with fresh_server.client() as client:
        client.script_flush()
    await asyncio.gather(*(layer.send(channel, {"type": "m", "i": i}) for i in range(50)))
    assert batcher_of(layer).pipelines >= 1
    got = [(await asyncio.wait_for(layer.receive(channel), 10))["i"] for _ in range(51)]
    # Each message once; the one sent before first. The concurrent ones have no order
    # among themselves (the first went alone, each on a connection of its own, and
    # met the empty cache there), except that the pipeline's calls, reloaded and run
    # again together, keep theirs.
    assert sorted(got) == list(range(-1, 50)) and got[0] == -1
    assert [i for i in got if i >= LONE_CONNECTIONS] == list(range(LONE_CONNECTIONS, 50))
    with fresh_server.client() as client:
        assert client.xlen(stream_inbox_key("batch", layer.process_id)) == 0


async def test_a_flushed_script_cache_is_reloaded_for_lone_calls_and_the_reader(
    layer: StreamsChannelLayer, fresh_server: RedisServer
) -> None:
    """A lone send goes on the batcher's own connection, and the inbox reader's
    bookkeeping script rides with its XREAD on the reader's: after a restart's empty
    script cache both get NOSCRIPT back and load the script; the XREAD after the failed
    bookkeeping is read all the same, so neither connection falls out of step. Two
    sends before each two receives: the second waits in the process's queue, so the
    reader reports a backlog (the script, not a bare trim)."""
    channel = await layer.new_channel()
    for i in range(0, 6, 2):
        await layer.send(channel, {"type": "m", "i": i})
        await layer.send(channel, {"type": "m", "i": i + 1})
        for n in (i, i + 1):
            assert (await asyncio.wait_for(layer.receive(channel), 10))["i"] == n
        with fresh_server.client() as client:
            client.script_flush()
    pipelines = batcher_of(layer).pipelines
    for i in range(6, 20, 2):  # one at a time: each goes alone
        await layer.send(channel, {"type": "m", "i": i})
        await layer.send(channel, {"type": "m", "i": i + 1})
        for n in (i, i + 1):
            assert (await asyncio.wait_for(layer.receive(channel), 10))["i"] == n
    assert batcher_of(layer).pipelines == pipelines, "the sends went alone"
    assert layer.stats.retries == 0
    with fresh_server.client() as client:
        assert client.script_exists(STREAM_INBOX_ADVANCE.sha) == [True], "loaded again"
    with fresh_server.client() as client:
        for _ in range(100):  # the reader's bookkeeping trims what it handed on (bounded)
            if client.xlen(stream_inbox_key("batch", layer.process_id)) == 0:
                break
            await asyncio.sleep(0.05)
        assert client.xlen(stream_inbox_key("batch", layer.process_id)) == 0


@pytest.mark.faults
@pytest.mark.parametrize("kind", ["specific", "normal"])
async def test_pipelined_sends_survive_killed_connections(
    layer: StreamsChannelLayer, fresh_server: RedisServer, kind: str
) -> None:
    """Connections die under pipelines in flight: every caller retries on its own, the
    retry flag finds what landed, and each sender's messages arrive once, in order."""
    senders, per_sender = 20, 60
    if kind == "specific":
        channels = [await layer.new_channel() for _ in range(senders)]
    else:
        channels = [f"work-{n}" for n in range(senders)]
    stop = threading.Event()

    def killer() -> None:
        for _ in range(200):  # bounded
            if stop.wait(0.02):
                return
            fresh_server.kill_clients()

    async def sender(channel: str) -> None:
        for i in range(per_sender):
            await layer.send(channel, {"type": "m", "i": i})

    async def receiver(channel: str) -> list[int]:
        return [(await layer.receive(channel))["i"] for _ in range(per_sender)]

    receiving = [asyncio.ensure_future(receiver(c)) for c in channels]
    killing = asyncio.ensure_future(asyncio.to_thread(killer))
    try:
        await asyncio.wait_for(asyncio.gather(*(sender(c) for c in channels)), 60)
    finally:
        stop.set()
        await killing
    results = await asyncio.wait_for(asyncio.gather(*receiving), 60)
    wrong = {
        c: got for c, got in zip(channels, results, strict=True) if got != list(range(per_sender))
    }
    assert not wrong, f"lost, duplicated or reordered: {wrong}"
    assert batcher_of(layer).pipelines > 0
    if kind == "specific":  # one process's channels: one inbox, so sends went merged
        assert batcher_of(layer).merged_calls > 0
    assert layer.stats.retries > 0, "no connection was killed under load: the test proves nothing"
