"""Group history and replay (StreamsChannelLayer): positions on group messages,
``group_add(since=...)`` without gap or duplicate under concurrent sends, trimmed
history, a Redis reset (new epoch), ``group_history`` pages."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import pytest

from streamlayer import StreamsChannelLayer
from streamlayer.history import POSITION_KEY, Position
from streamlayer.keys import stream_history_key
from streamlayer.testing import RedisServer

from .layers import layer_factory

Factory = Callable[..., StreamsChannelLayer]


@pytest.fixture(params=["single", "cluster"])
def hosts(request: pytest.FixtureRequest) -> list[Any]:
    """Replay on one server and on a Redis Cluster (group, history and members' streams
    then live in different slots, often on different nodes)."""
    if request.param == "cluster":
        return [request.getfixturevalue("cluster_setup").host_entry()]
    return [request.getfixturevalue("redis_server").url]


@pytest.fixture
async def make(hosts: list[Any], prefix: str) -> AsyncIterator[Factory]:
    def build(**options: Any) -> StreamsChannelLayer:
        options.setdefault("hosts", hosts)
        options.setdefault("prefix", prefix)
        options.setdefault("group_history", 50)
        return StreamsChannelLayer(**options)

    async with layer_factory(build) as factory:
        yield factory


async def recv(layer: StreamsChannelLayer, channel: str) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), 10)


async def recv_n(layer: StreamsChannelLayer, channel: str, count: int) -> list[dict[str, Any]]:
    return [await recv(layer, channel) for _ in range(count)]


def nums(messages: list[dict[str, Any]]) -> list[int]:
    return [m["n"] for m in messages]


def position_of(message: dict[str, Any]) -> str:
    tag = message[POSITION_KEY]
    assert isinstance(tag["position"], str)
    return tag["position"]


def id_key(message: dict[str, Any]) -> tuple[int, int]:
    ms, seq = Position.parse(position_of(message)).entry_id.split("-")
    return int(ms), int(seq)


async def publish(layer: StreamsChannelLayer, group: str, numbers: range) -> None:
    for n in numbers:
        await layer.group_send(group, {"type": "chat.message", "n": n})


async def test_group_messages_carry_group_and_increasing_positions(make: Factory) -> None:
    layer = make()
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    await publish(layer, "room", range(5))
    got = await recv_n(layer, channel, 5)
    assert nums(got) == list(range(5))
    assert {m[POSITION_KEY]["group"] for m in got} == {"room"}
    ids = [Position.parse(position_of(m)) for m in got]
    assert len({p.epoch for p in ids}) == 1
    keys = [tuple(int(x) for x in p.entry_id.split("-")) for p in ids]
    assert keys == sorted(keys) and len(set(keys)) == 5


async def test_groups_without_history_carry_no_position(make: Factory) -> None:
    layer = make(group_history={"chat-*": 10})
    channel = await layer.new_channel()
    await layer.group_add("other", channel)
    await layer.group_send("other", {"type": "x"})
    assert POSITION_KEY not in await recv(layer, channel)


async def test_a_sent_position_key_is_replaced_by_the_real_one(make: Factory) -> None:
    layer = make()
    channel = await layer.new_channel()
    await layer.group_add("room", channel)
    fake = {"group": "elsewhere", "position": "0:1-0"}
    await layer.group_send("room", {"type": "x", POSITION_KEY: fake})
    assert (await recv(layer, channel))[POSITION_KEY]["group"] == "room"


@pytest.mark.parametrize("kind", ["local", "other process", "normal"])
async def test_join_since_replays_what_was_missed_then_live(make: Factory, kind: str) -> None:
    sender, joiner = make(), make()
    first = await joiner.new_channel()
    await joiner.group_add("room", first)
    await publish(sender, "room", range(3))
    seen = await recv_n(joiner, first, 3)
    await joiner.group_discard("room", first)
    await publish(sender, "room", range(3, 8))  # missed while "offline"

    if kind == "local":
        receiver, channel = joiner, await joiner.new_channel()
    elif kind == "other process":
        receiver, channel = make(), ""
        channel = await receiver.new_channel()
    else:
        receiver, channel = joiner, "room-worker"
    complete = await sender.group_add("room", channel, since=position_of(seen[-1]))
    assert complete is True
    await publish(sender, "room", range(8, 10))
    got = await recv_n(receiver, channel, 7)
    assert nums(got) == list(range(3, 10))
    assert all(m[POSITION_KEY]["group"] == "room" for m in got)


async def test_join_without_since_returns_none_and_replays_nothing(make: Factory) -> None:
    layer = make()
    await publish(layer, "room", range(3))
    channel = await layer.new_channel()
    assert await layer.group_add("room", channel) is None
    await publish(layer, "room", range(3, 4))
    assert nums([await recv(layer, channel)]) == [3]


@pytest.mark.parametrize("kind", ["local", "normal"])
async def test_no_gap_no_duplicate_while_others_send(make: Factory, kind: str) -> None:
    """A join from a position races a stream of group_sends from two other layers:
    the joined channel gets every message after the position exactly once."""
    senders = [make(capacity=1000), make(capacity=1000)]
    joiner = make(capacity=1000)
    rng = random.Random()
    total = 120
    for attempt in range(6):
        group = f"race{attempt}"
        watcher = await joiner.new_channel()
        await joiner.group_add(group, watcher)

        async def send_all(offset: int, layer: StreamsChannelLayer, group: str = group) -> None:
            for n in range(offset, total, 2):
                await layer.group_send(group, {"type": "m", "n": n})
                if rng.random() < 0.1:
                    await asyncio.sleep(0)

        tasks = [asyncio.create_task(send_all(i, s)) for i, s in enumerate(senders)]
        # Join from the position of whatever the watcher has seen first, mid-stream.
        start = await recv(joiner, watcher)
        for _ in range(rng.randrange(0, 5)):
            await asyncio.sleep(0)
        channel = await joiner.new_channel() if kind == "local" else f"joined-{attempt}"
        assert await joiner.group_add(group, channel, since=position_of(start)) is True
        await asyncio.gather(*tasks)
        watched = [start, *await recv_n(joiner, watcher, total - 1)]
        # Concurrent senders: the watcher may see a message recorded before `start`
        # after it; the history order (by position) decides what comes after `start`.
        after = [m for m in watched if id_key(m) > id_key(start)]
        got = await recv_n(joiner, channel, len(after))
        assert sorted(nums(got)) == sorted(nums(after)), "a gap or a duplicate"
        if kind == "local":
            # Each sender's messages arrive in the order it sent them, replayed or live.
            for parity in (0, 1):
                mine = [n for n in nums(got) if n % 2 == parity]
                assert mine == sorted(mine), "replay and live messages out of order"
        extra = asyncio.ensure_future(joiner.receive(channel))
        await joiner.group_send(group, {"type": "m", "n": -1})
        assert (await asyncio.wait_for(extra, 10))["n"] == -1, "a duplicate was queued"


async def test_trimmed_history_replays_what_is_left_and_says_incomplete(make: Factory) -> None:
    layer = make(group_history=5)
    watcher = await layer.new_channel()
    await layer.group_add("room", watcher)
    await publish(layer, "room", range(10))
    seen = await recv_n(layer, watcher, 10)

    late = await layer.new_channel()
    assert await layer.group_add("room", late, since=position_of(seen[1])) is False
    assert nums(await recv_n(layer, late, 5)) == [5, 6, 7, 8, 9]

    # From the newest trimmed entry on, nothing is missing.
    fine = await layer.new_channel()
    assert await layer.group_add("room", fine, since=position_of(seen[4])) is True
    assert nums(await recv_n(layer, fine, 5)) == [5, 6, 7, 8, 9]


async def test_expired_history_is_trimmed_and_reported(make: Factory) -> None:
    layer = make(group_history_expiry=0.3)
    watcher = await layer.new_channel()
    await layer.group_add("room", watcher)
    await publish(layer, "room", range(2))
    seen = await recv_n(layer, watcher, 2)
    await asyncio.sleep(0.4)  # the retention time passing is what is under test
    await publish(layer, "room", range(2, 3))
    await recv(layer, watcher)
    late = await layer.new_channel()
    assert await layer.group_add("room", late, since=position_of(seen[0])) is False
    assert nums(await recv_n(layer, late, 1)) == [2]
    page = await layer.group_history("room")
    assert nums(page.messages) == [2]


async def test_a_redis_reset_starts_a_new_epoch(fresh_server: RedisServer, prefix: str) -> None:
    layer = StreamsChannelLayer(hosts=[fresh_server.url], prefix=prefix, group_history=10)
    try:
        watcher = await layer.new_channel()
        await layer.group_add("room", watcher)
        await publish(layer, "room", range(3))
        seen = await recv_n(layer, watcher, 3)
        old = Position.parse(position_of(seen[-1]))

        fresh_server.restart()  # no persistence: Redis comes back empty
        await publish(layer, "room", range(3, 5))  # nobody is a member any more
        late = await layer.new_channel()
        assert await layer.group_add("room", late, since=str(old)) is False
        got = await recv_n(layer, late, 2)
        assert nums(got) == [3, 4]
        assert Position.parse(position_of(got[0])).epoch != old.epoch
    finally:
        await layer.flush()
        await layer.close()


async def test_join_since_on_a_group_without_history_is_incomplete(make: Factory) -> None:
    layer = make(group_history=0)
    channel = await layer.new_channel()
    assert await layer.group_add("room", channel, since="abcd:1-0") is False
    await layer.group_send("room", {"type": "x", "n": 1})
    assert (await recv(layer, channel))["n"] == 1


async def test_replay_to_a_full_channel_is_incomplete(make: Factory) -> None:
    layer = make(channel_capacity={"small": 3})
    watcher = await layer.new_channel()
    await layer.group_add("room", watcher)
    await publish(layer, "room", range(6))
    first = (await recv_n(layer, watcher, 6))[0]
    assert await layer.group_add("room", "small", since=position_of(first)) is False
    assert nums(await recv_n(layer, "small", 3)) == [1, 2, 3]
    assert layer.stats.full == 2


async def test_group_history_pages(make: Factory) -> None:
    layer = make(group_history=20)
    await publish(layer, "room", range(12))
    latest = await layer.group_history("room", limit=5)
    assert nums(latest.messages) == [7, 8, 9, 10, 11]
    assert latest.complete is True
    assert latest.position == position_of(latest.messages[-1])

    everything = await layer.group_history("room")
    assert nums(everything.messages) == list(range(12))
    start = everything.messages[2]
    page = await layer.group_history("room", since=position_of(start), limit=4)
    assert nums(page.messages) == [3, 4, 5, 6]
    page = await layer.group_history("room", since=page.position, limit=100)
    assert nums(page.messages) == list(range(7, 12))
    empty = await layer.group_history("room", since=page.position)
    assert empty.messages == [] and empty.complete and empty.position == page.position


async def test_group_history_of_an_empty_group_gives_a_resumable_position(make: Factory) -> None:
    layer = make()
    page = await layer.group_history("quiet")
    assert page.messages == [] and page.complete
    channel = await layer.new_channel()
    await publish(layer, "quiet", range(2))  # sent before the client joins
    assert await layer.group_add("quiet", channel, since=page.position) is True
    assert nums(await recv_n(layer, channel, 2)) == [0, 1]


async def test_group_history_skips_a_corrupt_entry(make: Factory) -> None:
    layer = make()
    await publish(layer, "room", range(1))
    key = stream_history_key(layer.prefix, "room")
    await layer.connections.client(0).xadd(key, {"d": b"\xc1garbage", "i": "x"})
    await publish(layer, "room", range(1, 2))
    page = await layer.group_history("room")
    assert nums(page.messages) == [0, 1]
    assert layer.stats.decode_errors == 1


async def test_replay_of_encrypted_messages(make: Factory) -> None:
    layer = make(symmetric_encryption_keys=["a" * 32])
    watcher = await layer.new_channel()
    await layer.group_add("room", watcher)
    await publish(layer, "room", range(3))
    first = (await recv_n(layer, watcher, 3))[0]
    late = await layer.new_channel()
    assert await layer.group_add("room", late, since=position_of(first)) is True
    assert nums(await recv_n(layer, late, 2)) == [1, 2]


@pytest.mark.parametrize(
    "since, error, text",
    [
        ("nonsense", ValueError, "not a group history position"),
        ("abc:1-0-0", ValueError, "not a group history position"),
        ("abc:99999999999999999999-0", ValueError, "not a group history position"),
        (12, TypeError, "must be a string"),
    ],
)
async def test_bad_positions_are_refused(
    make: Factory, since: Any, error: type[Exception], text: str
) -> None:
    layer = make()
    channel = await layer.new_channel()
    with pytest.raises(error, match=text):
        await layer.group_add("room", channel, since=since)
    with pytest.raises(error, match=text):
        await layer.group_history("room", since=since)


@pytest.mark.parametrize(
    "limit, error", [(0, ValueError), (-1, ValueError), ("5", TypeError), (True, TypeError)]
)
async def test_bad_limits_are_refused(make: Factory, limit: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="limit"):
        await make().group_history("room", limit=limit)


async def test_a_group_without_history_answers_incomplete_and_says_so_once(
    make: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """The Channels tutorial's ``chat_<room>`` against a ``chat-*`` pattern: the replay
    recipe answers "incomplete" instead of raising, and the log names the group once."""
    layer = make(group_history={"chat-*": 5})
    channel = await layer.new_channel()
    await layer.group_add("chat-1", channel)
    await publish(layer, "chat-1", range(1))
    tagged = (await recv_n(layer, channel, 1))[0]
    with caplog.at_level("WARNING", logger="streamlayer"):
        for _ in range(3):
            assert await layer.group_add("chat_1", channel, since=position_of(tagged)) is False
            page = await layer.group_history("chat_1")
            assert (page.messages, page.complete, page.position) == ([], False, "")
    said = [r.getMessage() for r in caplog.records if "keeps no history" in r.getMessage()]
    assert len(said) == 1 and "'chat_1'" in said[0] and "no pattern" in said[0], said
    await layer.group_send("chat_1", {"type": "n", "i": 7})  # the join itself happened
    assert (await recv_n(layer, channel, 1))[0]["i"] == 7


async def test_live_messages_during_a_slow_join_wait_behind_the_replay(
    make: Factory, hosts: list[Any], prefix: str
) -> None:
    """A big replay takes a while to read; another process keeps sending meanwhile.
    Live messages reaching the channel before the replay is queued are held back and
    delivered after it: the channel sees every message after the position, in order."""
    joiner = make(capacity=5000, group_history=300)
    sender_options = {"hosts": hosts, "prefix": prefix, "group_history": 300}
    blob = "x" * 40_000
    for attempt in range(8):
        group = f"slow{attempt}"
        watcher = await joiner.new_channel()
        await joiner.group_add(group, watcher)
        await publish_blobs(joiner, group, range(200), blob)
        start = (await recv_n(joiner, watcher, 200))[0]
        stop, started = threading.Event(), asyncio.Event()
        sent: list[int] = []
        loop = asyncio.get_running_loop()
        thread = threading.Thread(
            target=send_until,
            args=(
                sender_options,
                group,
                stop,
                sent,
                partial(loop.call_soon_threadsafe, started.set),
            ),
            daemon=True,
        )
        thread.start()
        # A receive waiting on another channel keeps the inbox reader reading, as the
        # other consumers of a busy server do.
        draining = asyncio.ensure_future(drain(joiner, watcher))
        try:
            await asyncio.wait_for(started.wait(), 10)
            channel = await joiner.new_channel()
            await joiner.group_add(group, channel, since=position_of(start))
        finally:
            stop.set()
            thread.join(10)
            draining.cancel()
        got = await recv_n(joiner, channel, 199 + len(sent))
        assert nums(got) == list(range(1, 200)) + sent[: len(got) - 199]
        assert sent == list(range(1000, 1000 + len(sent)))
        if joiner.history.held_back:
            break
    assert joiner.history.held_back, "no live message ever met a join in flight"


async def drain(layer: StreamsChannelLayer, channel: str) -> None:
    while True:
        await layer.receive(channel)


async def publish_blobs(layer: StreamsChannelLayer, group: str, numbers: range, blob: str) -> None:
    for n in numbers:
        await layer.group_send(group, {"type": "m", "n": n, "blob": blob})


def send_until(
    options: dict[str, Any],
    group: str,
    stop: threading.Event,
    sent: list[int],
    first_sent: Callable[[], object],
) -> None:
    """Another sender, in its own thread and event loop, until told to stop."""

    async def run() -> None:
        layer = StreamsChannelLayer(**options)
        try:
            for n in range(1000, 100_000):
                if stop.is_set():
                    return
                await layer.group_send(group, {"type": "m", "n": n})
                sent.append(n)
                if len(sent) == 1:
                    first_sent()
        finally:
            await layer.close()

    asyncio.run(run())


async def test_concurrent_joins_of_one_channel_both_finish(make: Factory) -> None:
    layer = make()
    watcher = await layer.new_channel()
    await layer.group_add("room", watcher)
    await publish(layer, "room", range(3))
    first = (await recv_n(layer, watcher, 3))[0]
    channel = await layer.new_channel()
    joins = [layer.group_add("room", channel, since=position_of(first)) for _ in range(2)]
    assert await asyncio.wait_for(asyncio.gather(*joins), 10) == [True, True]
    # Joined twice from one position: the replay came twice (the mixin drops repeats).
    assert nums(await recv_n(layer, channel, 4)) == [1, 2, 1, 2]
    await publish(layer, "room", range(3, 4))
    assert nums([await recv(layer, channel)]) == [3]
