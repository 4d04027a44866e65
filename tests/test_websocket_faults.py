"""As a user would: real Channels WebSocket consumers in one group, their layer's
Redis connections killed and the server paused, and not one socket closed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import django
import pytest
from django.conf import settings

from streamlayer.testing import RedisServer

from .layers import layer_class

if not settings.configured:
    settings.configure(CHANNEL_LAYERS={}, INSTALLED_APPS=["channels"])
    django.setup()

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator

pytestmark = pytest.mark.faults

CLIENTS = 20
ALIAS = "streamlayer-consumers"


class ChatConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    channel_layer_alias = ALIAS
    groups = ["lobby"]

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json({"text": event["text"]})


@pytest.fixture
def fresh_server() -> Iterator[RedisServer]:
    """With an append-only file, so group membership survives a restart."""
    server = RedisServer(persistence=True).start()
    yield server
    server.cleanup()


@pytest.fixture(
    params=["streamlayer.compat.core.RedisChannelLayer", "streamlayer.StreamsChannelLayer"]
)
def layer_cls(request: pytest.FixtureRequest) -> Any:
    return layer_class(request.param)


@pytest.fixture
async def sockets(
    fresh_server: RedisServer, layer_cls: Any
) -> AsyncIterator[list[WebsocketCommunicator]]:
    """One 'server process' (a layer) with CLIENTS connected WebSockets."""
    layer = layer_cls(hosts=[fresh_server.url], prefix="consumers")
    channel_layers.set(ALIAS, layer)
    communicators = [WebsocketCommunicator(ChatConsumer.as_asgi(), "/ws/") for _ in range(CLIENTS)]
    for communicator in communicators:
        connected, _ = await communicator.connect()
        assert connected
    yield communicators
    for communicator in communicators:
        await communicator.disconnect()
    await layer.flush()
    await layer.close()
    channel_layers.backends.pop(ALIAS, None)


async def everyone_gets(sockets: list[WebsocketCommunicator], text: str) -> None:
    for communicator in sockets:
        assert await communicator.receive_json_from(timeout=15) == {"text": text}


@pytest.fixture
async def chat(
    sockets: list[WebsocketCommunicator], fresh_server: RedisServer, layer_cls: Any
) -> AsyncIterator[Callable[[str], Awaitable[None]]]:
    """Another server process saying something to the lobby; checked once it works."""
    other_process = layer_cls(hosts=[fresh_server.url], prefix="consumers")

    async def say(text: str) -> None:
        await other_process.group_send("lobby", {"type": "chat.message", "text": text})

    await say("before")
    await everyone_gets(sockets, "before")
    yield say
    await other_process.close()


async def test_killed_connections_close_no_socket(
    sockets: list[WebsocketCommunicator], fresh_server: RedisServer, chat: Any
) -> None:
    for round_ in range(3):
        assert fresh_server.kill_clients() >= 1
        await chat(f"after {round_}")
        await everyone_gets(sockets, f"after {round_}")


async def test_paused_server_closes_no_socket(
    sockets: list[WebsocketCommunicator], fresh_server: RedisServer, chat: Any
) -> None:
    fresh_server.pause(2000)
    await chat("paused")
    await everyone_gets(sockets, "paused")


async def test_restarted_server_closes_no_socket(
    sockets: list[WebsocketCommunicator], fresh_server: RedisServer, chat: Any
) -> None:
    fresh_server.stop()
    sending = asyncio.ensure_future(chat("across"))
    await asyncio.to_thread(fresh_server.start)
    await asyncio.wait_for(sending, 15)
    await everyone_gets(sockets, "across")
