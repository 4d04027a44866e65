"""Group membership and presence (streamlayer.presence) on the two stored layers:
listing and sizes on every topology, presence info, the three ways of leaving
(group_discard, group_expiry, a SIGKILLed process in another OS process), join and
leave events, a process coming back after it was swept, Redis restarting empty,
a 10,000-member group, and the Pub/Sub layer saying why it has none of it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from redis.asyncio import Redis

from streamlayer.base import StreamlayerLayer
from streamlayer.compat.pubsub import RedisPubSubChannelLayer
from streamlayer.presence import by_info
from streamlayer.testing import RedisServer
from streamlayer.tools.demo import CountingConnection

from .layers import layer_class, layer_factory

STORED = ["streamlayer.StreamsChannelLayer", "streamlayer.compat.core.RedisChannelLayer"]

Make = Callable[..., Any]


@pytest.fixture(params=STORED)
def layer_path(request: pytest.FixtureRequest) -> str:
    """Presence is the stored layers' (the Pub/Sub layer's refusal is tested apart)."""
    path: str = request.param
    return path


async def recv(layer: Any, channel: str, within: float = 10) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), within)  # type: ignore[no-any-return]


class Inbox:
    """A consumer receiving on ``channel`` all the time, as a WebSocket consumer does
    (what keeps its presence live), its messages queued for the test."""

    def __init__(self, layer: Any, channel: str) -> None:
        self.messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._receive(layer, channel))

    async def _receive(self, layer: Any, channel: str) -> None:
        while True:
            self.messages.put_nowait(await layer.receive(channel))

    async def next(self, within: float = 10) -> dict[str, Any]:
        return await asyncio.wait_for(self.messages.get(), within)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def listening(layer: Any, channel: str) -> asyncio.Task[Any]:
    """A consumer waiting on ``channel``, as a WebSocket consumer always is (what makes
    its presence live); cancelled by the caller."""
    task = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0)
    return task


# --- membership: listing and sizes -----------------------------------------------------


async def test_group_channels_and_size_on_every_topology(make_layer: Make) -> None:
    layer = make_layer()
    local = await layer.new_channel()
    for channel in ("worker-a", "worker-b", local):
        await layer.group_add("room", channel)
    await layer.group_discard("room", "worker-b")
    assert sorted(await layer.group_channels("room")) == sorted(["worker-a", local])
    assert await layer.group_size("room") == 2
    assert await layer.group_channels("empty") == []
    assert await layer.group_size("empty") == 0


async def test_expired_members_are_not_listed(redis_server: RedisServer, make: Make) -> None:
    layer = make(hosts=[redis_server.url], group_expiry=60)
    await layer.group_add("room", "fresh")
    await layer.group_add("room", "stale")
    members_key = layer.presence_keys("room")[0]
    client = Redis(host="127.0.0.1", port=redis_server.port)
    await client.zadd(members_key, {"stale": time.time() - 120})  # joined 2 minutes ago
    await client.aclose()
    assert await layer.group_channels("room") == ["fresh"]
    assert await layer.group_size("room") == 1


async def test_each_read_is_one_round_trip(redis_server: RedisServer, make: Make) -> None:
    host = {"address": redis_server.url, "connection_class": CountingConnection}
    layer = make(hosts=[host])
    channels = [await layer.new_channel() for _ in range(20)]
    for n, channel in enumerate(channels):
        await layer.group_add("room", channel, presence={"n": n})
    await layer.group_size("room")  # the script's first use loads it
    for read in (layer.group_channels, layer.group_size, layer.presence):
        before = CountingConnection.writes
        await read("room")
        assert CountingConnection.writes - before == 1, read.__name__


async def test_a_refresh_round_is_one_round_trip(redis_server: RedisServer, make: Make) -> None:
    """A process with presence in five groups refreshes them all in one round trip
    (one script call per group, pipelined), whatever the number of members."""
    host = {"address": redis_server.url, "connection_class": CountingConnection}
    layer = make(hosts=[host])
    tabs = [await layer.new_channel() for _ in range(10)]
    waiting = [await listening(layer, tab) for tab in tabs]
    for n in range(5):
        for tab in tabs:
            await layer.group_add(f"room-{n}", tab, presence={"n": n})
    await layer.presence_book.refresh()  # the script's first use loads it
    before = CountingConnection.writes
    await layer.presence_book.refresh()
    assert CountingConnection.writes - before == 1
    for task in waiting:
        task.cancel()


# --- presence --------------------------------------------------------------------------


async def test_presence_lists_each_member_with_its_info(make_layer: Make) -> None:
    layer = make_layer()
    tab1, tab2, other = [await layer.new_channel() for _ in range(3)]
    started = time.time()
    await layer.group_add("room", tab1, presence={"user": 7, "device": "phone"})
    await layer.group_add("room", tab2, presence={"user": 7, "device": "laptop"})
    await layer.group_add("room", other, presence={"user": 8})
    await layer.group_add("room", "a-worker")  # a member without presence
    present = await layer.presence("room")
    assert [p["channel"] for p in present] == [tab1, tab2, other]  # oldest first
    assert [p["info"] for p in present] == [
        {"user": 7, "device": "phone"},
        {"user": 7, "device": "laptop"},
        {"user": 8},
    ]
    assert all(started - 1 <= p["joined"] <= time.time() + 1 for p in present)
    users = by_info(present, "user")
    assert [len(users[7]), len(users[8])] == [2, 1]  # two tabs, one user
    assert await layer.group_size("room") == 4


async def test_joining_again_replaces_the_info(make: Make, redis_server: RedisServer) -> None:
    layer = make(hosts=[redis_server.url])
    tab = await layer.new_channel()
    await layer.group_add("room", tab, presence={"status": "away"})
    await layer.group_add("room", tab, presence={"status": "here"})
    [entry] = await layer.presence("room")
    assert entry["info"] == {"status": "here"}


async def test_bad_presence_is_refused_and_joins_nothing(
    make: Make, redis_server: RedisServer
) -> None:
    layer = make(hosts=[redis_server.url])
    tab = await layer.new_channel()
    with pytest.raises(TypeError, match="presence must be a dict"):
        await layer.group_add("room", tab, presence=["user", 7])
    with pytest.raises(ValueError, match="consumer's own channel"):
        await layer.group_add("room", "a-worker", presence={"user": 7})
    with pytest.raises(ValueError, match="bytes serialized"):
        await layer.group_add("room", tab, presence={"bio": "x" * 5000})
    assert await layer.group_size("room") == 0


async def test_sync_code_reads_membership(make: Make, redis_server: RedisServer) -> None:
    layer = make(hosts=[redis_server.url])
    tab = await layer.new_channel()
    await layer.group_add("room", tab, presence={"user": 1})

    def from_a_view() -> tuple[list[str], int, list[dict[str, Any]]]:
        return (
            async_to_sync(layer.group_channels)("room"),
            async_to_sync(layer.group_size)("room"),
            async_to_sync(layer.presence)("room"),
        )

    channels, size, present = await asyncio.to_thread(from_a_view)
    assert channels == [tab] and size == 1 and present[0]["info"] == {"user": 1}


# --- events and the ways of leaving --------------------------------------------------


async def test_join_and_discard_are_told_to_the_group(make_layer: Make) -> None:
    layer = make_layer(presence_events={"chat-*": True})
    watcher, tab = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("chat-1", watcher)
    await layer.group_add("chat-1", tab, presence={"user": 7})
    joined = await recv(layer, watcher)
    assert joined == {
        "type": "presence.join",
        "group": "chat-1",
        "channel": tab,
        "info": {"user": 7},
    }
    assert (await recv(layer, tab))["type"] == "presence.join"  # it is a member too
    await layer.group_discard("chat-1", tab)
    left = await recv(layer, watcher)
    assert left == {
        "type": "presence.leave",
        "group": "chat-1",
        "channel": tab,
        "info": {"user": 7},
    }
    assert await layer.presence("chat-1") == []
    await layer.group_discard("chat-1", tab)  # again: nothing more to tell
    # A group the pattern does not match hears nothing.
    await layer.group_add("other", watcher)
    await layer.group_add("other", tab, presence={"user": 7})
    with pytest.raises(asyncio.TimeoutError):
        await recv(layer, watcher, within=0.3)


async def test_an_expired_membership_ends_presence(make: Make, redis_server: RedisServer) -> None:
    """group_expiry ends presence too: reads leave the member out at once, and its own
    process's next refresh tells the group it left."""
    layer = make(hosts=[redis_server.url], presence_events=True, group_expiry=60)
    watcher, tab = await layer.new_channel(), await layer.new_channel()
    await layer.group_add("room", watcher)
    await layer.group_add("room", tab, presence={"user": 7})
    assert (await recv(layer, watcher))["type"] == "presence.join"
    await recv(layer, tab)
    client = Redis(host="127.0.0.1", port=redis_server.port)
    await client.zadd(layer.presence_keys("room")[0], {tab: time.time() - 120})
    await client.aclose()
    assert await layer.presence("room") == []
    waiting = await listening(layer, tab)
    await layer.presence_book.refresh()
    left = await recv(layer, watcher)
    assert (left["type"], left["channel"]) == ("presence.leave", tab)
    assert layer.presence_book.mine == {}  # no longer refreshed
    waiting.cancel()


async def test_a_process_swept_while_away_comes_back(
    make: Make, redis_server: RedisServer
) -> None:
    """A process that lost Redis for longer than presence_timeout: another process's
    refresh sweeps its member (and tells the group); its own next refresh restores it
    (and tells the group again)."""
    away = make(hosts=[redis_server.url], presence_events=True, presence_timeout=60)
    other = make(hosts=[redis_server.url], presence_events=True, presence_timeout=60)
    tab, watcher = await away.new_channel(), await other.new_channel()
    heard, waiting = Inbox(other, watcher), Inbox(away, tab)
    await other.group_add("room", watcher, presence={"user": "w"})
    await away.group_add("room", tab, presence={"user": "t"})
    client = Redis(host="127.0.0.1", port=redis_server.port)
    await client.zadd(away.presence_keys("room")[2], {tab: time.time() - 1})  # not refreshed
    assert [p["channel"] for p in await other.presence("room")] == [watcher]
    await other.presence_book.refresh()
    assert await client.zscore(away.presence_keys("room")[0], tab) is None  # swept
    await away.presence_book.refresh()
    assert [p["channel"] for p in await other.presence("room")] == [watcher, tab]
    await client.aclose()
    events = []
    for _ in range(4):  # watcher's own join, tab's join, tab's sweep, tab back
        message = await heard.next()
        events.append((message["type"], message["channel"]))
    assert events == [
        ("presence.join", watcher),
        ("presence.join", tab),
        ("presence.leave", tab),
        ("presence.join", tab),
    ]
    await heard.stop()
    await waiting.stop()


async def test_a_channel_discarded_by_another_process_is_not_restored(
    make: Make, redis_server: RedisServer
) -> None:
    owner = make(hosts=[redis_server.url])
    admin = make(hosts=[redis_server.url])
    tab = await owner.new_channel()
    await owner.group_add("room", tab, presence={"user": 7})
    waiting = await listening(owner, tab)
    await admin.group_discard("room", tab)  # kicked from a view, say
    await owner.presence_book.refresh()
    assert await owner.group_channels("room") == []
    assert owner.presence_book.mine == {}
    waiting.cancel()


SIGKILLED = textwrap.dedent(
    """
    import asyncio, sys
    from streamlayer import StreamsChannelLayer
    from streamlayer.compat.core import RedisChannelLayer

    async def main():
        cls = {"streams": StreamsChannelLayer, "core": RedisChannelLayer}[sys.argv[2]]
        layer = cls(
            hosts=[sys.argv[1]], prefix=sys.argv[3], presence_timeout=1.5, presence_events=True
        )
        tab = await layer.new_channel()
        await layer.group_add("room", tab, presence={"user": "doomed"})
        receiving = asyncio.ensure_future(layer.receive(tab))
        print(tab, flush=True)
        await asyncio.sleep(120)  # until SIGKILLed

    asyncio.run(main())
    """
)


@pytest.mark.faults
async def test_a_sigkilled_process_leaves_within_the_timeout(
    redis_server: RedisServer, make: Make, layer_path: str, prefix: str
) -> None:
    """Another OS process joins with presence and is SIGKILLed: its member leaves the
    presence list, and the group hears presence.leave, within presence_timeout (plus
    one refresh period of this process, which sweeps it)."""
    layer = make(hosts=[redis_server.url], presence_events=True, presence_timeout=1.5)
    watcher = await layer.new_channel()
    heard = Inbox(layer, watcher)
    await layer.group_add("room", watcher, presence={"user": "watcher"})
    assert (await heard.next())["type"] == "presence.join"
    kind = "streams" if "Streams" in layer_path else "core"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SIGKILLED,
        redis_server.url,
        kind,
        prefix,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 30)
        doomed = line.decode().strip()
        joined = await heard.next()
        assert (joined["type"], joined["channel"]) == ("presence.join", doomed)
        assert len(await layer.presence("room")) == 2
        os.kill(child.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        left = await heard.next(within=1.5 + 0.5 + 5)
        took = time.monotonic() - killed_at
        assert (left["type"], left["channel"], left["info"]) == (
            "presence.leave",
            doomed,
            {"user": "doomed"},
        )
        assert took <= 1.5 + 0.5 + 2, f"left {took:.1f}s after the kill"
        assert [p["channel"] for p in await layer.presence("room")] == [watcher]
        # The watcher's own presence went on all along (its process refreshed it).
        assert heard.messages.empty()
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
        await heard.stop()


@pytest.mark.faults
async def test_presence_comes_back_after_an_empty_restart(layer_path: str) -> None:
    """Redis restarted without its data: the memberships this process restores bring
    their presence back, before the reconnect notice."""
    server = RedisServer().start()
    try:
        layer = layer_class(layer_path)(
            hosts=[server.url], on_reconnect="redis.reconnect", retry_timeout=30
        )
        tab = await layer.new_channel()
        layer.want_notices(tab)
        await layer.group_add("room", tab, presence={"user": 7})
        # A message received: the inbox reader runs and has marked its inbox, by which
        # it tells later that Redis lost it.
        await layer.send(tab, {"type": "hello"})
        assert (await recv(layer, tab))["type"] == "hello"
        waiting = await listening(layer, tab)
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.start)
        notice = await asyncio.wait_for(waiting, 30)
        assert notice == {"type": "redis.reconnect", "recovered": False}
        [entry] = await layer.presence("room")
        assert (entry["channel"], entry["info"]) == (tab, {"user": 7})
        await layer.flush()
        await layer.close()
    finally:
        server.cleanup()


async def test_close_stops_the_refreshing(make: Make, redis_server: RedisServer) -> None:
    layer = make(hosts=[redis_server.url])
    tab = await layer.new_channel()
    await layer.group_add("room", tab, presence={"user": 7})
    keeper = layer.presence_book.keeper
    assert keeper is not None and not keeper.task.done()
    await layer.close()
    assert keeper.task.done()


# --- a big group -----------------------------------------------------------------------


async def test_a_ten_thousand_member_group(make: Make, redis_server: RedisServer) -> None:
    layer = make(hosts=[redis_server.url])
    tabs = [await layer.new_channel() for _ in range(10_000)]
    for start in range(0, len(tabs), 500):
        await asyncio.gather(
            *(
                layer.group_add("big", t, presence={"n": start + i})
                for i, t in enumerate(tabs[start : start + 500])
            )
        )
    assert await layer.group_size("big") == 10_000
    assert sorted(await layer.group_channels("big")) == sorted(tabs)
    present = await layer.presence("big")
    assert len(present) == 10_000
    assert sorted(p["info"]["n"] for p in present) == list(range(10_000))


# --- the Pub/Sub layer -----------------------------------------------------------------


async def test_pubsub_says_why_it_has_no_members(redis_server: RedisServer) -> None:
    layer = RedisPubSubChannelLayer(hosts=[redis_server.url])
    try:
        tab = await layer.new_channel()
        for call in (layer.group_channels, layer.group_size, layer.presence):
            with pytest.raises(NotImplementedError, match="knows subscribers, not group members"):
                await call("room")
        with pytest.raises(NotImplementedError, match="keep presence"):
            await layer.group_add("room", tab, presence={"user": 7})
    finally:
        await layer.close()


# --- helpers ---------------------------------------------------------------------------


@pytest.fixture
async def make(layer_path: str, prefix: str) -> AsyncIterator[Make]:
    """Layers of the parametrized stored class, hosts given by the test; flushed after."""

    def build(**options: Any) -> StreamlayerLayer:
        options.setdefault("prefix", prefix)
        return layer_class(layer_path)(**options)

    async with layer_factory(build) as factory:
        yield factory
