"""The Streams layer's inbox demultiplexing (streamlayer.inbox) on its own: entries as
the inbox stream holds them, handed to a real layer's local channels. No Redis is
reached: dispatching touches only the process's own queues and counters. Also how
long the reader lets the receivers it woke run before its next read (an event loop's
turns, no Redis either)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from streamlayer import StreamsChannelLayer
from streamlayer.history import POSITION_KEY
from streamlayer.inbox import RecentTags
from streamlayer.reader import WOKEN_TURNS, let_woken_run, ready_queue


@pytest.fixture
async def layer() -> AsyncIterator[StreamsChannelLayer]:
    # A port nothing listens on: these tests must not need Redis.
    made = StreamsChannelLayer(hosts=["redis://127.0.0.1:9"], expiry=60)
    yield made
    await made.close()


def entry_id(seconds_ago: float = 0, seq: int = 0) -> bytes:
    return f"{int((time.time() - seconds_ago) * 1000)}-{seq}".encode()


def fields(
    layer: StreamsChannelLayer, channels: str, tag: str, **message: object
) -> dict[bytes, bytes]:
    return {
        b"d": layer.serialize({"type": "m", **message}),
        b"i": tag.encode(),
        b"c": channels.encode(),
    }


async def test_an_entry_reaches_every_channel_it_names(layer: StreamsChannelLayer) -> None:
    a, b = "x.p!a", "x.p!b"
    layer.inbox.dispatch(entry_id(), fields(layer, f"{a},{b}", "t1", n=1))
    layer.inbox.dispatch(entry_id(seq=1), fields(layer, a, "t2", n=2))
    assert [(await layer.local.get(a))["n"] for _ in range(2)] == [1, 2]
    assert (await layer.local.get(b))["n"] == 1
    assert layer.local.queued() == 0


async def test_a_retried_copy_is_dropped_and_counted(layer: StreamsChannelLayer) -> None:
    """A send retried after a lost reply may have appended twice (the retry looks back
    only so far): the second copy's tag was seen."""
    layer.inbox.dispatch(entry_id(), fields(layer, "x.p!a", "same", n=1))
    layer.inbox.dispatch(entry_id(seq=1), fields(layer, "x.p!a", "same", n=1))
    assert layer.local.queued() == 1
    assert layer.stats()["duplicates"] == 1


async def test_an_expired_entry_is_counted_per_channel_and_dropped(
    layer: StreamsChannelLayer,
) -> None:
    layer.inbox.dispatch(entry_id(seconds_ago=120), fields(layer, "x.p!a,x.p!b", "old"))
    assert layer.local.queued() == 0
    assert layer.stats()["expired"] == 2


async def test_a_bad_entry_is_counted_and_the_next_one_delivered(
    layer: StreamsChannelLayer,
) -> None:
    """Corrupt payloads and entries naming no channel are logged, counted and skipped;
    the inbox goes on with the next entry."""
    layer.inbox.dispatch(entry_id(), {b"d": b"\xc1 not msgpack", b"i": b"t1", b"c": b"x.p!a"})
    layer.inbox.dispatch(entry_id(seq=1), {b"d": layer.serialize({"type": "m"}), b"i": b"t2"})
    layer.inbox.dispatch(entry_id(seq=2), fields(layer, "x.p!a", "t3", n=3))
    assert layer.stats()["decode_errors"] == 2
    assert (await layer.local.get("x.p!a"))["n"] == 3


async def test_a_group_message_with_history_carries_its_position(
    layer: StreamsChannelLayer,
) -> None:
    """Each channel gets its own copy, tagged with the group and its position in the
    group's history (what a replay consumer remembers)."""
    record = fields(layer, "x.p!a,x.p!b", "t1", n=1)
    record |= {b"g": b"room", b"p": b"e1:5-0"}
    layer.inbox.dispatch(entry_id(), record)
    first, second = await layer.local.get("x.p!a"), await layer.local.get("x.p!b")
    assert first[POSITION_KEY] == second[POSITION_KEY]
    assert first[POSITION_KEY]["group"] == "room"
    assert first[POSITION_KEY]["position"].endswith("e1:5-0")
    assert first is not second


def test_recent_tags_remember_a_bounded_number() -> None:
    """At least the last ``size`` tags, at most a quarter more (generations of a
    quarter: the oldest goes whole)."""
    tags = RecentTags(size=3)
    assert [tags.seen(t) for t in (b"a", b"b", b"c", b"a")] == [False, False, False, True]
    names = [f"t{n}".encode() for n in range(20)]
    remembered = RecentTags(size=8)  # generations of 2
    assert not any(remembered.seen(name) for name in names)
    assert all(remembered.seen(name) for name in names[-8:])
    forgetting = RecentTags(size=8)
    for name in names:
        forgetting.seen(name)
    assert not any(forgetting.seen(name) for name in names[:10])  # older than 8 + 2


def hops(loop: asyncio.AbstractEventLoop, count: int, done: list[int]) -> None:
    """A chain of ``count`` callbacks, each scheduling the next (a receiver's wake-up
    travelling to its handler); the last notes that it ran."""

    def hop(left: int) -> None:
        if left:
            loop.call_soon(hop, left - 1)
        else:
            done.append(count)

    loop.call_soon(hop, count - 1)


async def test_the_reader_waits_for_a_woken_chain_to_end() -> None:
    loop = asyncio.get_running_loop()
    done: list[int] = []
    hops(loop, 4, done)
    await let_woken_run(ready_queue(loop))
    assert done == [4]


async def test_the_reader_waits_a_bounded_number_of_turns() -> None:
    """A loop that is never idle (a callback that keeps rescheduling itself) holds the
    reader back for WOKEN_TURNS turns, not for ever."""
    loop = asyncio.get_running_loop()
    ticks = 0
    stop = False

    def busy() -> None:
        nonlocal ticks
        ticks += 1
        if not stop:
            loop.call_soon(busy)

    loop.call_soon(busy)
    await let_woken_run(ready_queue(loop))
    stop = True
    assert ticks == WOKEN_TURNS


async def test_without_a_ready_queue_the_reader_waits_one_turn() -> None:
    loop = asyncio.get_running_loop()
    assert ready_queue(loop) is not None  # asyncio's own loop has one
    done: list[int] = []
    hops(loop, 2, done)
    await let_woken_run(None)
    assert done == []
