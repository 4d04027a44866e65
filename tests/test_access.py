"""A wrong password or a missing ACL permission is a configuration error: every layer
raises RedisAccessDenied within a second, on every path (Pub/Sub subscriptions
included), instead of retrying it like a network blip for ``retry_timeout``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from streamlayer import RedisAccessDenied, StreamsChannelLayer
from streamlayer.base import StreamlayerLayer
from streamlayer.testing import RedisServer

from .layers import LAYERS, PUBSUB, layer_class

#: ACL users of the test server: one that may do everything, and one each without a
#: command a layer needs.
_USERS = {
    "app": "+@all",
    "noclaim": "+@all -xautoclaim",
    "nosub": "+@all -subscribe",
}


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        with server.client() as client:
            for user, commands in _USERS.items():
                rules = ["on", ">pw", "~*", "&*", *commands.split()]
                client.execute_command("ACL", "SETUSER", user, *rules)
        yield server
    finally:
        server.cleanup()


@pytest.fixture
async def layers(acl_server: RedisServer) -> AsyncIterator[Any]:
    made: list[StreamlayerLayer] = []

    def make(path: str, user: str, password: str = "pw") -> StreamlayerLayer:
        url = f"redis://{user}:{password}@127.0.0.1:{acl_server.port}"
        layer = layer_class(path)(hosts=[url], prefix="acl", retry_timeout=10)
        made.append(layer)
        return layer

    yield make
    for layer in made:
        await layer.close()


async def _denied_quickly(call: Any, what: str) -> RedisAccessDenied:
    """``call()`` raises RedisAccessDenied within a second (retry_timeout is 10 s)."""
    started = time.monotonic()
    with pytest.raises(RedisAccessDenied) as raised:
        await asyncio.wait_for(call(), 5)
    assert time.monotonic() - started < 1.0, f"{what} took the retry path"
    return raised.value


@pytest.mark.parametrize("path", LAYERS)
async def test_a_wrong_password_is_refused_at_once(layers: Any, path: str) -> None:
    layer = layers(path, "app", password="wrong")
    message = {"type": "m"}
    error = await _denied_quickly(lambda: layer.send("some.channel", message), "send")
    assert "WRONGPASS" in str(error) or "invalid username-password" in str(error)
    assert "send to 'some.channel'" in str(error)
    await _denied_quickly(lambda: layer.group_send("room", message), "group_send")
    await _denied_quickly(layer.new_channel if path == PUBSUB else _receive_local(layer), "rx")
    if path != PUBSUB:
        await _denied_quickly(lambda: layer.group_add("room", "some.channel"), "group_add")
        await _denied_quickly(lambda: layer.receive("jobs"), "receive")


def _receive_local(layer: StreamlayerLayer) -> Any:
    async def receive() -> Any:
        return await layer.receive(await layer.new_channel())

    return receive


@pytest.mark.parametrize("path", LAYERS)
async def test_the_right_password_works(layers: Any, path: str) -> None:
    layer = layers(path, "app")
    channel = await layer.new_channel()
    receiving = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0.05)
    await layer.send(channel, {"type": "ok"})
    assert (await asyncio.wait_for(receiving, 5))["type"] == "ok"
    await layer.flush()


async def test_a_user_without_xautoclaim_cannot_receive_on_normal_channels(
    layers: Any,
) -> None:
    layer = layers("streamlayer.StreamsChannelLayer", "noclaim")
    assert isinstance(layer, StreamsChannelLayer)
    await layer.send("jobs", {"type": "job"})  # sending needs no XAUTOCLAIM
    error = await _denied_quickly(lambda: layer.receive("jobs"), "receive")
    assert "xautoclaim" in str(error).lower()


async def test_a_user_without_subscribe_cannot_receive_on_pubsub(layers: Any) -> None:
    layer = layers(PUBSUB, "nosub")
    error = await _denied_quickly(layer.new_channel, "new_channel")
    assert "subscribe" in str(error).lower()
    await layer.send("any.channel", {"type": "m"})  # publishing is allowed


@pytest.mark.parametrize("path", LAYERS)
async def test_a_sync_caller_is_refused_at_once_too(layers: Any, path: str) -> None:
    """async_to_sync(layer.group_send) from a plain thread, with its own connections."""
    from asgiref.sync import async_to_sync

    layer = layers(path, "app", password="wrong")
    started = time.monotonic()
    with pytest.raises(RedisAccessDenied):
        await asyncio.to_thread(async_to_sync(layer.group_send), "room", {"type": "m"})
    assert time.monotonic() - started < 1.0
