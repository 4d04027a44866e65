"""ReplayConsumerMixin as an app uses it: a real Channels WebSocket consumer, a client
that goes away and comes back with its last position, trimmed history, and Redis
restarting empty mid-conversation."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import django
import pytest
from django.conf import settings

from streamlayer import StreamsChannelLayer
from streamlayer.consumers import PresenceConsumerMixin, ReplayConsumerMixin
from streamlayer.testing import RedisServer

from .layers import LAYERS, layer_class

if not settings.configured:
    settings.configure(CHANNEL_LAYERS={}, INSTALLED_APPS=["channels"])
    django.setup()

from channels.generic.websocket import AsyncJsonWebsocketConsumer, AsyncWebsocketConsumer
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator

ALIAS = "streamlayer-replay"


def _joined(scope: dict[str, Any]) -> None:
    """Tell the test the consumer has joined its groups: the handshake is accepted
    before the join, and a message sent in between would reach no member."""
    event = scope.get("test.joined")
    if event is not None:
        event.set()


class RoomConsumer(ReplayConsumerMixin, AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    channel_layer_alias = ALIAS
    replay_groups = ["room"]

    async def connect(self) -> None:
        await self.accept()
        await self.join_replay_groups()
        _joined(self.scope)

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"text": event["text"], "position": self.position_of(event)})

    async def replay_incomplete(self, group: str) -> None:
        page = await self.load_history(group)
        await self.send_json({"reload": [m["text"] for m in page.messages]})


class PlainRoomConsumer(ReplayConsumerMixin, AsyncWebsocketConsumer):  # type: ignore[misc]
    """The same with text frames: ``<position> <text>``."""

    channel_layer_alias = ALIAS
    replay_groups = ["room"]

    async def connect(self) -> None:
        await self.accept()
        await self.join_replay_groups()
        _joined(self.scope)

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send(text_data=f"{self.position_of(event)} {event['text']}")


Say = Callable[[str], Any]


@pytest.fixture
async def app(fresh_server: RedisServer) -> AsyncIterator[tuple[StreamsChannelLayer, Say]]:
    """The consumers' server process (a layer), and another process that talks."""
    options: dict[str, Any] = {
        "hosts": [fresh_server.url],
        "prefix": "replay",
        "group_history": 5,
        "on_disconnect": "redis.disconnect",
        "on_reconnect": "redis.reconnect",
    }
    layer, other = StreamsChannelLayer(**options), StreamsChannelLayer(**options)
    channel_layers.set(ALIAS, layer)

    async def say(text: str) -> None:
        await other.group_send("room", {"type": "chat.message", "text": text})

    yield layer, say
    await layer.close()
    await other.close()
    channel_layers.backends.pop(ALIAS, None)


async def connect(
    since: str | None = None, consumer: type = RoomConsumer
) -> WebsocketCommunicator:
    """A tab connected and its consumer joined (see _joined)."""
    # The consumer is the application itself (no routing): the path only carries the
    # query string the mixin reads.
    path = "/ws/room/" + (f"?since={since}" if since else "")
    communicator = WebsocketCommunicator(consumer.as_asgi(), path)
    joined = communicator.scope["test.joined"] = asyncio.Event()
    connected, _ = await communicator.connect()
    assert connected
    await asyncio.wait_for(joined.wait(), 15)
    return communicator


async def texts(communicator: WebsocketCommunicator, count: int) -> list[dict[str, Any]]:
    return [await communicator.receive_json_from(timeout=15) for _ in range(count)]


async def test_a_client_coming_back_gets_what_it_missed_in_order(app: Any) -> None:
    _layer, say = app
    tab = await connect()
    await say("one")
    await say("two")
    got = await texts(tab, 2)
    assert [m["text"] for m in got] == ["one", "two"]
    await tab.disconnect()

    await say("three")  # the tab is asleep
    await say("four")
    tab = await connect(since=got[-1]["position"])
    await say("five")
    assert [m["text"] for m in await texts(tab, 3)] == ["three", "four", "five"]
    assert await tab.receive_nothing(timeout=0.2)
    await tab.disconnect()


async def test_a_client_away_too_long_is_told_to_reload(app: Any) -> None:
    _layer, say = app
    tab = await connect()
    await say("first")
    (first,) = await texts(tab, 1)
    await tab.disconnect()
    for n in range(7):  # more than the 5 the group retains
        await say(f"m{n}")
    tab = await connect(since=first["position"])
    # The backlog replaces the client's view; the replayed copies are not sent again.
    assert await tab.receive_json_from(timeout=15) == {"reload": ["m2", "m3", "m4", "m5", "m6"]}
    await say("live")
    assert (await tab.receive_json_from(timeout=15))["text"] == "live"
    await tab.disconnect()


async def test_a_malformed_position_joins_and_asks_for_a_reload(app: Any) -> None:
    _layer, say = app
    await say("earlier")
    tab = await connect(since="not-a-position")
    assert await tab.receive_json_from(timeout=15) == {"reload": ["earlier"]}
    await say("live")
    assert (await tab.receive_json_from(timeout=15))["text"] == "live"
    await tab.disconnect()


async def test_redis_restarting_empty_mid_conversation(
    app: Any, fresh_server: RedisServer
) -> None:
    """Redis comes back without data: the membership, the inbox and the history are
    gone. The consumer hears recovered=False, re-joins from its last position, and
    the client gets what was sent meanwhile exactly once."""
    _layer, say = app
    tab = await connect()
    await say("before")
    assert (await tab.receive_json_from(timeout=15))["text"] == "before"

    await asyncio.to_thread(fresh_server.restart)
    await say("meanwhile")  # nobody is a member now: it lives in the new history only
    received: list[dict[str, Any]] = []
    while not any("meanwhile" in (m.get("text"), *m.get("reload", ())) for m in received):
        received.append(await tab.receive_json_from(timeout=15))  # bounded by its timeout
    await say("after")
    received.append(await tab.receive_json_from(timeout=15))
    chat = [m["text"] for m in received if "text" in m]
    # "meanwhile" reaches the client once: replayed, or inside a reload.
    reloads = [m["reload"] for m in received if "reload" in m]
    assert chat + [t for r in reloads for t in r] in (
        ["meanwhile", "after"],
        ["after", "meanwhile"],
    )
    assert await tab.receive_nothing(timeout=0.2)
    await tab.disconnect()


async def test_plain_websocket_consumer(app: Any) -> None:
    _layer, say = app
    tab = await connect(consumer=PlainRoomConsumer)
    await say("one")
    position, text = (await tab.receive_from(timeout=15)).split(" ", 1)
    assert text == "one"
    await tab.disconnect()
    await say("two")
    tab = await connect(since=position, consumer=PlainRoomConsumer)
    assert (await tab.receive_from(timeout=15)).split(" ", 1)[1] == "two"
    await tab.disconnect()


def _quickstart_consumer() -> type:
    """The docs' replay consumer (examples/quickstart/mysite/consumers.py), on ALIAS."""
    path = Path(__file__).resolve().parent.parent / "examples/quickstart/mysite/consumers.py"
    spec = importlib.util.spec_from_file_location("quickstart_consumers", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return type("QuickstartReplay", (module.ReplayChatConsumer,), {"channel_layer_alias": ALIAS})


@pytest.mark.parametrize("path", LAYERS)
@pytest.mark.parametrize("group_history", [{"room-*": 5}, {"chat-*": 5}])
async def test_the_docs_recipe_runs_unchanged_on_every_backend(
    fresh_server: RedisServer, path: str, group_history: dict[str, int]
) -> None:
    """A tab coming back with a position its group cannot replay from (a backend
    without history, or a group no pattern matches): the recipe answers "reload
    nothing" instead of raising, the socket stays open, live messages flow."""
    layer = layer_class(path)(hosts=[fresh_server.url], prefix="docs", group_history=group_history)
    channel_layers.set(ALIAS, layer)
    consumer = _quickstart_consumer()
    try:
        route = {"url_route": {"kwargs": {"room_name": "lobby"}}}
        tab = WebsocketCommunicator(consumer.as_asgi(), "/ws/replay/lobby/?since=abc:1-0")
        tab.scope.update(route)
        assert (await tab.connect())[0]
        # Nothing retained to show instead (no history here, or a foreign epoch).
        assert await tab.receive_json_from(timeout=15) == {"reload": []}
        await tab.send_json_to({"text": "live"})  # the sending side of the recipe
        assert (await tab.receive_json_from(timeout=15))["text"] == "live"
        await tab.disconnect()
    finally:
        await layer.flush()
        await layer.close()
        channel_layers.backends.pop(ALIAS, None)


# --- PresenceConsumerMixin -------------------------------------------------------------

PRESENCE_ALIAS = "streamlayer-presence"


class PresentConsumer(PresenceConsumerMixin, AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    channel_layer_alias = PRESENCE_ALIAS
    presence_groups = ["lobby"]

    def get_presence_info(self) -> dict[str, Any]:
        return {"name": self.scope["path"].rsplit("/", 2)[-2]}

    async def connect(self) -> None:
        await self.accept()
        await self.join_presence_groups()

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if await self.answer_presence_request(content):
            return
        await self.send_json({"echo": content})


@pytest.mark.parametrize("path", [p for p in LAYERS if "pubsub" not in p])
async def test_presence_mixin_answers_who_and_forwards_comings_and_goings(
    redis_server: RedisServer, path: str, prefix: str
) -> None:
    layer = layer_class(path)(hosts=[redis_server.url], prefix=prefix, presence_events=True)
    channel_layers.set(PRESENCE_ALIAS, layer)
    tabs: list[WebsocketCommunicator] = []
    try:

        async def tab(name: str) -> WebsocketCommunicator:
            communicator = WebsocketCommunicator(PresentConsumer.as_asgi(), f"/ws/{name}/")
            assert (await communicator.connect())[0]
            tabs.append(communicator)
            return communicator

        ann = await tab("ann")
        await ann.send_json_to({"presence": "who"})
        here = await ann.receive_json_from(timeout=10)
        assert (here["presence"], here["group"]) == ("here", "lobby")
        assert [m["info"] for m in here["members"]] == [{"name": "ann"}]
        bob = await tab("bob")
        # Ann's own join may come first: she watches from her question on.
        joined = await ann.receive_json_from(timeout=10)
        if joined["info"] == {"name": "ann"}:
            joined = await ann.receive_json_from(timeout=10)
        assert (joined["presence"], joined["info"]) == ("join", {"name": "bob"})
        # Bob never asked: he gets no presence frames, only what he asks for.
        await bob.send_json_to({"hello": 1})
        assert await bob.receive_json_from(timeout=10) == {"echo": {"hello": 1}}
        await bob.disconnect()
        left = await ann.receive_json_from(timeout=10)
        assert (left["presence"], left["info"]) == ("leave", {"name": "bob"})
        assert [p["info"] for p in await layer.presence("lobby")] == [{"name": "ann"}]
    finally:
        for communicator in tabs:
            await communicator.disconnect()
        await layer.flush()
        await layer.close()
        channel_layers.backends.pop(PRESENCE_ALIAS, None)
