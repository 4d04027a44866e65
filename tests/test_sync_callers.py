"""Sync callers: ``async_to_sync(layer.send / group_send / group_add / group_discard)``
from plain threads (a Celery worker, a management command), from a thread pool, from
a sync view under an ASGI server (an outer loop), from inside a one-call loop, across
a fork and at interpreter exit, for each layer, with connections counted by the
server itself (``INFO stats`` total_connections_received, ``CLIENT LIST``)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import asgiref.sync
import pytest
from asgiref.sync import async_to_sync, sync_to_async

from streamlayer.base import LayerStats, StreamlayerLayer
from streamlayer.exceptions import ChannelFull
from streamlayer.serializers import BaseMessageSerializer, MsgPackSerializer, registry
from streamlayer.testing import RedisServer

from .layers import LAYERS, PUBSUB, keeps, layer_class

_WAIT = 15.0

#: asgiref 3.9+ calls the method passed to async_to_sync in the caller's thread before
#: it makes its loop; older ones call it in the loop's thread (a thread per call).
needs_call_in_callers_thread = pytest.mark.skipif(
    tuple(int(p) for p in asgiref.__version__.split(".")[:2]) < (3, 9),
    reason="asgiref < 3.9 calls the method in its own thread: no first steps here",
)

needs_single_thread_context = pytest.mark.skipif(
    not hasattr(asgiref.sync, "AsyncSingleThreadContext"),
    reason="asgiref < 3.10 has no AsyncSingleThreadContext: a thread per call, as before",
)


class Member:
    """A group member on the test's loop, in a layer of its own (as another process
    would be), collecting what it receives."""

    def __init__(self, layer: StreamlayerLayer, group: str) -> None:
        self.layer = layer
        self.group = group
        self.channel = ""
        self.got: list[dict[str, Any]] = []

    async def join(self) -> Member:
        self.channel = await self.layer.new_channel()
        await self.layer.group_add(self.group, self.channel)
        return self

    async def take(self, count: int) -> list[dict[str, Any]]:
        while len(self.got) < count:
            message = await asyncio.wait_for(self.layer.receive(self.channel), _WAIT)
            self.got.append(message)
        return self.got[:count]


@pytest.fixture
async def server_and_layers(
    layer_path: str, fresh_server: RedisServer
) -> AsyncIterator[tuple[RedisServer, StreamlayerLayer, Member]]:
    """A server of the test's own, the layer sync code calls, and a member of group
    "news" in another layer; both layers closed after."""
    cls = layer_class(layer_path)
    layer = cls(hosts=[fresh_server.url], prefix="sync", capacity=5000)
    member_layer = cls(hosts=[fresh_server.url], prefix="sync", capacity=5000)
    member = await Member(member_layer, "news").join()
    if layer_path == PUBSUB:
        # The member's subscription is confirmed; one message proves it hears the group.
        await layer.group_send("news", {"type": "warm"})
        await member.take(1)
        member.got.clear()
    yield fresh_server, layer, member
    await layer.flush()
    await layer.close()
    await member.layer.close()


def new_connections(server: RedisServer, calls: Any) -> int:
    """How many connections the server accepted while ``calls()`` ran (minus the
    checker's own second one)."""
    before = server.total_connections()
    calls()
    return server.total_connections() - before - 1


def helper_threads() -> set[str]:
    """The threads asgiref's ``async_to_sync`` runs calls in (ThreadPoolExecutor's)."""
    return {t.name for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor")}


async def test_a_thousand_calls_from_one_thread_open_one_connection(
    server_and_layers: tuple[RedisServer, StreamlayerLayer, Member],
) -> None:
    server, layer, member = server_and_layers
    loops_before = layer.connections.open_loops()

    def calls() -> None:
        group_send, send = async_to_sync(layer.group_send), async_to_sync(layer.send)
        for i in range(500):
            group_send("news", {"type": "g", "i": i})
            send(member.channel, {"type": "s", "i": i})

    opened = await asyncio.to_thread(new_connections, server, calls)
    assert opened <= 1
    got = await member.take(1000)
    assert [(m["type"], m["i"]) for m in got] == [(t, i) for i in range(500) for t in "gs"]
    assert layer.connections.open_loops() == loops_before  # no call's loop kept a pool


async def test_group_add_and_discard_from_a_thread_reuse_one_connection(
    server_and_layers: tuple[RedisServer, StreamlayerLayer, Member],
) -> None:
    server, layer, _ = server_and_layers
    if not keeps(layer, "remote_members"):
        pytest.skip("on Pub/Sub a member must be a channel of the process that subscribes")

    def calls() -> None:
        add, discard = async_to_sync(layer.group_add), async_to_sync(layer.group_discard)
        for i in range(500):
            add("crowd", f"worker-{i}")
            discard("crowd", f"worker-{i - 1}")

    assert await asyncio.to_thread(new_connections, server, calls) <= 1
    with server.client() as client:
        assert client.zrange(layer.group_key("crowd"), 0, -1) == [b"worker-499"]


async def test_every_public_method_from_a_thread_reuses_one_connection(
    server_and_layers: tuple[RedisServer, StreamlayerLayer, Member],
) -> None:
    """What a view, a management command or a Celery task calls: each public method
    through ``async_to_sync``, 20 times, opens no connection per call. Not here: a
    Pub/Sub channel or membership lives in an event loop, and ``receive`` blocks in
    Redis, which must stay cancellable (it reads on the call's own loop)."""
    server, layer, member = server_and_layers
    stored = keeps(layer, "queueing")

    def calls() -> None:
        call = {name: async_to_sync(getattr(layer, name)) for name in PUBLIC_METHODS}
        for i in range(20):
            if stored:
                assert "!" in call["new_channel"]()
                call["send"]("jobs", {"type": "job", "i": i})
                call["group_add"]("crowd", f"worker-{i}")
                call["group_discard"]("crowd", f"worker-{i}")
            call["group_send"]("news", {"type": "g", "i": i})
            page = call["group_history"]("news")  # no history configured: empty
            assert (page.messages, page.complete) == ([], False)

    assert await asyncio.to_thread(new_connections, server, calls) <= 1
    assert [m["i"] for m in await member.take(20)] == list(range(20))

    def flushes() -> None:
        flush = async_to_sync(layer.flush)
        for _ in range(5):
            flush()

    assert await asyncio.to_thread(new_connections, server, flushes) <= 1
    with server.client() as client:
        assert not client.keys("sync:*") and not client.keys("sync*")


PUBLIC_METHODS = ("new_channel", "send", "group_add", "group_discard", "group_send",
                  "group_history", "flush")  # fmt: skip


async def test_a_thread_pool_opens_at_most_one_connection_per_thread(
    server_and_layers: tuple[RedisServer, StreamlayerLayer, Member],
) -> None:
    """Eight Celery-style worker threads, 125 calls each: a connection is taken from
    the shared pool for a call and given back, so at most eight are ever open."""
    server, layer, member = server_and_layers

    def worker(n: int) -> None:
        send = async_to_sync(layer.group_send)
        for i in range(125):
            send("news", {"type": "g", "n": n, "i": i})

    helpers: list[int] = []

    def calls() -> None:
        before = helper_threads()
        with ThreadPoolExecutor(8, thread_name_prefix="celery") as pool:
            list(pool.map(worker, range(8)))
            helpers.append(len(helper_threads() - before))  # one kept per worker at most

    sent_before = layer.stats.sent
    assert await asyncio.to_thread(new_connections, server, calls) <= 8
    assert helpers[0] <= 8
    assert layer.stats.sent - sent_before == 1000  # counted from eight threads, none lost
    got = await member.take(1000)
    for n in range(8):  # each thread's messages in its order
        assert [m["i"] for m in got if m["n"] == n] == list(range(125))


@needs_single_thread_context
async def test_a_threads_calls_reuse_one_asgiref_thread_that_ends_with_it(
    server_and_layers: tuple[RedisServer, StreamlayerLayer, Member],
) -> None:
    """asgiref makes a thread and a loop for each call; the layer's calls from one
    thread run in one thread kept for it (a new loop each time, as before), which
    ends when the calling thread does."""
    _, layer, member = server_and_layers
    seen: list[set[str]] = []

    def calls() -> None:
        before = helper_threads()
        for i in range(50):
            async_to_sync(layer.send)(member.channel, {"type": "s", "i": i})
            seen.append(helper_threads() - before)

    thread = threading.Thread(target=calls)
    thread.start()
    await asyncio.to_thread(thread.join, _WAIT)
    assert not thread.is_alive()
    assert len(seen[0]) == 1, seen[0]
    assert all(names == seen[0] for names in seen)  # the same one thread after every call
    (name,) = seen[0]
    helper = next((t for t in threading.enumerate() if t.name == name), None)
    if helper is not None:  # it may have ended already
        await asyncio.to_thread(helper.join, _WAIT)
        assert not helper.is_alive()
    assert [m["i"] for m in await member.take(50)] == list(range(50))


@needs_single_thread_context
async def test_other_async_to_sync_calls_of_the_thread_are_left_alone(
    server_and_layers: tuple[RedisServer, StreamlayerLayer, Member],
) -> None:
    """Only the layer's own calls use the kept thread: the caller's context is as it
    was after each call, the caller's other coroutines get a thread each, and a
    caller's own ``AsyncSingleThreadContext`` is used, not replaced."""
    from asgiref.sync import AsyncSingleThreadContext, AsyncToSync

    _, layer, member = server_and_layers
    ran_in: list[str] = []

    async def where() -> None:
        ran_in.append(threading.current_thread().name)

    def calls() -> tuple[object, object]:
        async_to_sync(layer.send)(member.channel, {"type": "s", "i": 0})
        after_ours = AsyncToSync.async_single_thread_context.get("absent")
        async_to_sync(where)()
        async_to_sync(where)()
        with AsyncSingleThreadContext() as mine:
            async_to_sync(where)()
            async_to_sync(layer.send)(member.channel, {"type": "s", "i": 1})
            async_to_sync(where)()
            still_mine = AsyncToSync.async_single_thread_context.get() is mine
        return after_ours, still_mine

    after_ours, still_mine = await asyncio.to_thread(calls)
    assert after_ours == "absent"
    assert ran_in[0] != ran_in[1]  # a thread per call, as asgiref does without us
    assert ran_in[2] == ran_in[3]  # the caller's own single thread, kept through our call
    assert still_mine is True
    assert [m["i"] for m in await member.take(2)] == [0, 1]


async def test_close_lets_go_of_every_connection_sync_calls_used(
    server_and_layers: tuple[RedisServer, StreamlayerLayer, Member],
) -> None:
    server, layer, member = server_and_layers
    await layer.close()  # holds nothing now
    baseline = await asyncio.to_thread(server.connected_clients)

    def calls() -> None:
        with ThreadPoolExecutor(4) as pool:
            list(
                pool.map(lambda i: async_to_sync(layer.send)(member.channel, {"i": i}), range(40))
            )

    await asyncio.to_thread(calls)
    assert await asyncio.to_thread(server.connected_clients) > baseline
    await layer.close()
    assert await asyncio.to_thread(server.connected_clients) == baseline
    # The layer stays usable: the next sync call connects afresh.
    await asyncio.to_thread(lambda: async_to_sync(layer.send)(member.channel, {"i": 40}))
    assert sorted(m["i"] for m in await member.take(41)) == list(range(41))


async def test_bad_input_and_a_full_channel_raise_in_the_caller(
    server_and_layers: tuple[RedisServer, StreamlayerLayer, Member],
) -> None:
    server, layer, _ = server_and_layers

    def bad_calls() -> list[type[BaseException]]:
        raised = []
        for call in (
            lambda: async_to_sync(layer.send)("no spaces allowed", {"type": "x"}),
            lambda: async_to_sync(layer.group_send)("news", ["not", "a", "dict"]),
            lambda: async_to_sync(layer.group_send)("news", {"__asgi_channel__": "x"}),
        ):
            try:
                call()
            except (TypeError, ValueError) as exc:
                raised.append(type(exc))
        return raised

    assert len(await asyncio.to_thread(bad_calls)) == 3
    if keeps(layer, "capacity"):
        small = type(layer)(hosts=[server.url], prefix="sync-full", capacity=1)

        def overfill() -> None:
            async_to_sync(small.send)("jobs", {"type": "one"})
            async_to_sync(small.send)("jobs", {"type": "two"})

        with pytest.raises(ChannelFull, match="capacity of 1"):
            await asyncio.to_thread(overfill)
        await small.flush()
        await small.close()


async def test_a_sync_view_under_an_asgi_server_runs_on_the_servers_loop(
    server_and_layers: tuple[RedisServer, StreamlayerLayer, Member],
) -> None:
    """Django runs a sync view in a sync_to_async thread; async_to_sync there finds
    the server's loop and the call runs on it, with that loop's connections (on the
    Pub/Sub layer group_add works from there, as a SyncConsumer's does)."""
    server, layer, member = server_and_layers
    await layer.send(member.channel, {"type": "s", "i": -1})  # this loop's pool opens
    channel = await layer.new_channel()

    def view() -> None:
        async_to_sync(layer.group_add)("view-group", channel)
        for i in range(50):
            async_to_sync(layer.send)(member.channel, {"type": "s", "i": i})
        async_to_sync(layer.group_send)("view-group", {"type": "g"})

    before = await asyncio.to_thread(server.total_connections)
    await sync_to_async(view)()
    assert await asyncio.to_thread(server.total_connections) - before - 1 <= 1
    assert [m["i"] for m in await member.take(51)] == list(range(-1, 50))
    assert await asyncio.wait_for(layer.receive(channel), _WAIT) == {"type": "g"}


async def test_calls_inside_a_function_async_to_sync_runs_reuse_connections(
    server_and_layers: tuple[RedisServer, StreamlayerLayer, Member],
) -> None:
    """``async_to_sync(notify)()`` where notify awaits the layer: each call runs on a
    loop made for it, and the layer's calls there use the shared pool."""
    server, layer, member = server_and_layers

    async def notify(i: int) -> None:
        await layer.group_send("news", {"type": "g", "i": i})
        await layer.send(member.channel, {"type": "s", "i": i})

    def calls() -> None:
        for i in range(100):
            async_to_sync(notify)(i)

    assert await asyncio.to_thread(new_connections, server, calls) <= 1
    got = await member.take(200)
    assert [(m["type"], m["i"]) for m in got] == [(t, i) for i in range(100) for t in "gs"]


async def test_a_forked_child_opens_its_own_connections(
    server_and_layers: tuple[RedisServer, StreamlayerLayer, Member],
) -> None:
    """After a fork the child must not use its parent's sockets: it connects afresh,
    and the parent's calls keep working."""
    _, layer, member = server_and_layers

    def identity() -> str | None:  # what names this process's inbox and dedup tags
        return getattr(layer, "process_id", getattr(layer, "client_prefix", None))

    parents = identity()

    def fork_and_send() -> int:
        async_to_sync(layer.send)(member.channel, {"who": "parent", "i": 0})
        with warnings.catch_warnings():  # 3.12+ warns of fork in a threaded process
            warnings.simplefilter("ignore", DeprecationWarning)
            child = os.fork()
        if child == 0:
            code = 1
            try:
                if parents is not None and identity() == parents:
                    os._exit(3)  # would share the parent's inbox and dedup tags
                for i in range(10):
                    async_to_sync(layer.send)(member.channel, {"who": "child", "i": i})
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        async_to_sync(layer.send)(member.channel, {"who": "parent", "i": 1})
        return os.waitstatus_to_exitcode(status)

    assert await asyncio.to_thread(fork_and_send) == 0
    got = await member.take(12)
    assert [m["i"] for m in got if m["who"] == "child"] == list(range(10))
    assert [m["i"] for m in got if m["who"] == "parent"] == [0, 1]


def test_a_process_that_never_closes_the_layer_exits_cleanly(
    layer_path: str, fresh_server: RedisServer
) -> None:
    """A management command: sync calls from the main thread and another thread, no
    close(); the interpreter exits promptly, without a warning, and the server sees
    every connection go."""
    baseline = fresh_server.connected_clients()
    script = textwrap.dedent(
        f"""
        import threading
        from asgiref.sync import async_to_sync
        from tests.layers import layer_class
        layer = layer_class({layer_path!r})(hosts=[{fresh_server.url!r}], prefix="exit")
        def calls():
            for i in range(50):
                async_to_sync(layer.group_send)("g", {{"type": "x", "i": i}})
        calls()
        thread = threading.Thread(target=calls)
        thread.start()
        thread.join()
        print("sent")
        """
    )
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "sent"
    assert done.stderr == ""  # no ResourceWarning, no task destroyed pending
    assert fresh_server.connected_clients() == baseline


async def test_sync_calls_work_on_every_topology(make_layer: Any) -> None:
    """The synchronous clients take each form of ``hosts``: one server, three shards,
    a Sentinel's master, a Redis Cluster (each command to the node of its keys)."""
    layer, other = make_layer(capacity=1000), make_layer(capacity=1000)
    members = [await Member(other, f"room-{n}").join() for n in range(6)]
    if keeps(layer, "queueing") is False:  # Pub/Sub: make sure the subscriptions hear
        for member in members:
            await layer.group_send(member.group, {"type": "warm"})
            await member.take(1)
            member.got.clear()

    def calls() -> None:
        for i in range(20):
            for member in members:
                async_to_sync(layer.group_send)(member.group, {"type": "g", "i": i})
                async_to_sync(layer.send)(member.channel, {"type": "s", "i": i})

    await asyncio.to_thread(calls)
    for member in members:
        got = [(m["type"], m["i"]) for m in await member.take(40)]
        for kind in "gs":  # each kind in its order
            assert [i for t, i in got if t == kind] == list(range(20))
        if keeps(layer, "queueing"):  # both kinds land in one inbox, in call order
            assert got == [(t, i) for i in range(20) for t in "gs"]
        # (Pub/Sub over shards publishes the group's and the channel's messages on two
        # servers: the two kinds can interleave differently.)


async def test_a_sync_group_send_keeps_the_groups_history(fresh_server: RedisServer) -> None:
    """On the Streams layer a group with history records each sync caller's message
    (one script call, over the sync client) and members get it with its position."""
    from streamlayer import POSITION_KEY, StreamsChannelLayer

    layer = StreamsChannelLayer(hosts=[fresh_server.url], prefix="synch", group_history=50)
    member = await Member(
        StreamsChannelLayer(hosts=[fresh_server.url], prefix="synch", group_history=50), "room"
    ).join()

    def calls() -> None:
        for i in range(20):
            async_to_sync(layer.group_send)("room", {"type": "g", "i": i})

    await asyncio.to_thread(calls)
    got = await member.take(20)
    assert [m["i"] for m in got] == list(range(20))
    page = await layer.group_history("room", since=got[4][POSITION_KEY]["position"])
    assert [m["i"] for m in page.messages] == list(range(5, 20))
    await layer.flush()
    await layer.close()
    await member.layer.close()


class ThreadNoting(BaseMessageSerializer):
    """msgpack, noting which thread encodes each message."""

    threads: ClassVar[list[str]] = []

    def as_bytes(self, message: Any) -> bytes:
        ThreadNoting.threads.append(threading.current_thread().name)
        return MsgPackSerializer().as_bytes(message)

    def from_bytes(self, data: bytes) -> Any:
        return MsgPackSerializer().from_bytes(data)


@needs_call_in_callers_thread
async def test_a_calls_first_steps_run_in_the_callers_thread(
    layer_path: str, fresh_server: RedisServer
) -> None:
    """Validation, encoding and the first command run in the calling thread while
    asgiref makes its loop; the reply is read there (the speed of sync callers)."""
    registry.register_serializer("thread-noting", ThreadNoting)
    ThreadNoting.threads.clear()
    cls = layer_class(layer_path)
    layer = cls(hosts=[fresh_server.url], prefix="here", serializer_format="thread-noting")
    receiver = cls(hosts=[fresh_server.url], prefix="here", serializer_format="thread-noting")
    try:
        member = await Member(receiver, "news").join()
        # The layer learns the group's members (and a Pub/Sub subscription is heard):
        # a steady group's send is one command.
        await layer.group_send("news", {"type": "warm"})
        await member.take(1)
        member.got.clear()
        ThreadNoting.threads.clear()

        def calls() -> None:
            for i in range(20):
                async_to_sync(layer.group_send)("news", {"type": "g", "i": i})
                async_to_sync(layer.send)(member.channel, {"type": "s", "i": i})

        caller = threading.Thread(target=calls, name="the-caller")
        caller.start()
        await asyncio.to_thread(caller.join, _WAIT)
        assert ThreadNoting.threads == ["the-caller"] * 40
        got = await member.take(40)
        assert [(m["type"], m["i"]) for m in got if m["type"] == "g"] == [
            ("g", i) for i in range(20)
        ]
    finally:
        await layer.flush()
        await layer.close()
        await receiver.close()
        registry._registry.pop("thread-noting", None)


def test_counters_lose_nothing_when_many_threads_count() -> None:
    """Sync callers count from their own threads while a server's loop counts too."""
    stats = LayerStats()

    def count() -> None:
        for _ in range(20_000):
            stats.count("sent")
            stats.count("full", 2)

    threads = [threading.Thread(target=count) for _ in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns often: an unguarded += loses counts
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(_WAIT)
    finally:
        sys.setswitchinterval(interval)
    assert (stats.sent, stats.full) == (160_000, 320_000)
    assert stats() == {**stats(), "sent": 160_000, "full": 320_000}
    assert "_lock" not in stats()


def test_asgiref_still_names_the_loops_it_makes_for_one_call() -> None:
    """streamlayer.sync recognises those loops by asgiref's own registry of them; a
    release that renamed it would silently bring back a connection per call."""
    from asgiref.sync import AsyncToSync

    seen: list[bool] = []

    async def where() -> None:
        seen.append(asyncio.get_running_loop() in AsyncToSync.loop_thread_executors)

    async_to_sync(where)()
    assert seen == [True]


@pytest.mark.parametrize("path", LAYERS)
def test_public_coroutine_methods_look_like_coroutine_functions(path: str) -> None:
    """The sync-caller wrapper runs at call time, yet every public coroutine method
    reads as a coroutine function, as channels_redis' do: code that branches on it
    (wrappers choosing async_to_sync, test doubles) must see one."""
    import inspect

    layer = layer_class(path)()
    for name in ("send", "receive", "new_channel", "group_add", "group_discard",
                 "group_send", "flush", "close"):  # fmt: skip
        for method in (getattr(layer, name), getattr(type(layer), name)):
            assert inspect.iscoroutinefunction(method), f"{path}.{name}"
            assert asyncio.iscoroutinefunction(method), f"{path}.{name}"
    assert list(inspect.signature(layer.send).parameters) == ["channel", "message"]
