"""channels_redis.core and streamlayer.compat.core on one Redis and prefix:
same keys, same bytes, messages and groups in both directions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
from channels_redis.core import RedisChannelLayer as IncumbentLayer
from channels_redis.serializers import registry as incumbent_registry

from streamlayer.compat.core import RedisChannelLayer
from streamlayer.serializers import registry
from streamlayer.testing import RedisServer

from .layers import side_by_side

pytestmark = pytest.mark.compat

KEYS = ["a-key-at-least-32-bytes-long-0123456789", "an-older-key-still-accepted-0123456"]


@pytest.fixture(params=[None, KEYS], ids=["plain", "encrypted"])
def encryption(request: pytest.FixtureRequest) -> list[str] | None:
    keys: list[str] | None = request.param
    return keys


@pytest.fixture
async def pair(
    redis_server: RedisServer, prefix: str, encryption: list[str] | None
) -> AsyncIterator[tuple[RedisChannelLayer, Any]]:
    """(ours, theirs) on the same server and prefix."""
    layers = side_by_side(
        RedisChannelLayer, IncumbentLayer, [redis_server.url], prefix, encryption
    )
    async with layers as pair:
        yield pair


async def recv(layer: Any, channel: str) -> dict[str, Any]:
    message: dict[str, Any] = await asyncio.wait_for(layer.receive(channel), 10)
    return message


@pytest.mark.parametrize("direction", ["ours->theirs", "theirs->ours"])
async def test_normal_channel(pair: tuple[RedisChannelLayer, Any], direction: str) -> None:
    ours, theirs = pair
    sender, receiver = (ours, theirs) if direction == "ours->theirs" else (theirs, ours)
    for i in range(5):
        await sender.send("compat.normal", {"type": "m", "i": i, "raw": b"\x01"})
    assert [(await recv(receiver, "compat.normal"))["i"] for _ in range(5)] == list(range(5))


@pytest.mark.parametrize("direction", ["ours->theirs", "theirs->ours"])
async def test_process_specific_channel(
    pair: tuple[RedisChannelLayer, Any], direction: str
) -> None:
    ours, theirs = pair
    sender, receiver = (ours, theirs) if direction == "ours->theirs" else (theirs, ours)
    channel = await receiver.new_channel()
    for i in range(5):
        await sender.send(channel, {"type": "m", "i": i})
    assert [(await recv(receiver, channel))["i"] for _ in range(5)] == list(range(5))


@pytest.mark.parametrize("sender_side", ["ours", "theirs"])
async def test_shared_group(pair: tuple[RedisChannelLayer, Any], sender_side: str) -> None:
    """Members joined by either side, a group_send from either side reaches all."""
    ours, theirs = pair
    our_a, our_b = await ours.new_channel(), await ours.new_channel()
    their_a = await theirs.new_channel()
    await ours.group_add("mixed", our_a)
    await theirs.group_add("mixed", our_b)
    await ours.group_add("mixed", their_a)
    await theirs.group_add("mixed", "compat.worker")
    sender = ours if sender_side == "ours" else theirs
    await sender.group_send("mixed", {"type": "chat", "text": "hello"})
    expected = {"type": "chat", "text": "hello"}
    assert await recv(ours, our_a) == expected
    assert await recv(ours, our_b) == expected
    assert await recv(theirs, their_a) == expected
    assert await recv(theirs, "compat.worker") == expected
    await theirs.group_discard("mixed", our_a)
    await sender.group_send("mixed", {"type": "chat", "text": "again"})
    assert (await recv(ours, our_b))["text"] == "again"
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(ours.receive(our_a), 0.3)


async def test_bulk_sends_and_short_expiries_reach_channels_redis(
    redis_server: RedisServer, prefix: str, encryption: list[str] | None
) -> None:
    """Our bulk sends (a batch's messages get rising scores) and a channel_expiry
    (a shorter TTL and trim on its sorted set) write channels_redis' format: it
    receives every message, in order, on each channel kind and from a group."""
    options: dict[str, Any] = {"hosts": [redis_server.url], "prefix": prefix}
    if encryption:
        options["symmetric_encryption_keys"] = encryption
    ours = RedisChannelLayer(channel_expiry={"compat.short*": 5}, **options)
    theirs = IncumbentLayer(**options)
    try:
        specific = await theirs.new_channel()
        await ours.group_add("bulk", specific)
        await ours.group_add("bulk", "compat.short-worker")
        batch = [{"type": "m", "i": i} for i in range(20)]
        for channel in (specific, "compat.short-jobs", "compat.long-jobs"):
            await ours.send_bulk(channel, batch)
            assert [(await recv(theirs, channel))["i"] for _ in range(20)] == list(range(20))
        await ours.group_send_bulk("bulk", batch)
        for channel in (specific, "compat.short-worker"):
            assert [(await recv(theirs, channel))["i"] for _ in range(20)] == list(range(20))
    finally:
        await ours.flush()
        await ours.close()
        await theirs.flush()


async def test_same_keys(pair: tuple[RedisChannelLayer, Any], redis_server: RedisServer) -> None:
    ours, theirs = pair
    ours_channel, theirs_channel = await ours.new_channel(), await theirs.new_channel()
    await ours.send("keys.normal", {"type": "x"})
    await ours.send(theirs_channel, {"type": "x"})
    await ours.group_add("keys-group", ours_channel)
    with redis_server.client() as client:
        ours_keys = sorted(k.decode() for k in client.keys(f"{ours.prefix}*"))
        for key in ours_keys:
            client.delete(key)
    await theirs.send("keys.normal", {"type": "x"})
    await theirs.send(theirs_channel, {"type": "x"})
    await theirs.group_add("keys-group", ours_channel)
    with redis_server.client() as client:
        theirs_keys = sorted(k.decode() for k in client.keys(f"{ours.prefix}*"))
        ttls = {k: client.ttl(k) for k in theirs_keys}
    assert ours_keys == theirs_keys
    prefix = ours.prefix
    inbox = theirs_channel[: theirs_channel.index("!") + 1]
    assert ours_keys == sorted(
        [f"{prefix}:group:keys-group", f"{prefix}keys.normal", prefix + inbox]
    )
    assert all(ttl > 0 for ttl in ttls.values())


async def test_same_bytes_without_encryption(
    pair: tuple[RedisChannelLayer, Any], encryption: list[str] | None
) -> None:
    ours, theirs = pair
    message = {"type": "x", "n": 1, "b": b"\x00", "l": [1, "two"]}
    ours_bytes, theirs_bytes = ours.serialize(message), theirs.serialize(message)
    assert len(ours_bytes) == len(theirs_bytes)
    if not encryption:
        # Past the 12 random bytes that make sorted-set members unique: identical.
        assert ours_bytes[12:] == theirs_bytes[12:] == msgpack.packb(message)
    assert theirs.deserialize(ours_bytes) == message
    assert ours.deserialize(theirs_bytes) == message


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_serializers_interoperate(fmt: str) -> None:
    kwargs = {"symmetric_encryption_keys": KEYS, "random_prefix_length": 0, "expiry": 60}
    ours = registry.get_serializer(fmt, **kwargs)
    theirs = incumbent_registry.get_serializer(fmt, **kwargs)
    message = {"type": "x", "text": "héllo", "n": [1, 2]}
    assert theirs.deserialize(ours.serialize(message)) == message
    assert ours.deserialize(theirs.serialize(message)) == message
    # Key rotation across implementations: an old key still decrypts.
    rotated = incumbent_registry.get_serializer(
        fmt, symmetric_encryption_keys=KEYS[1:], random_prefix_length=0, expiry=60
    )
    assert ours.deserialize(rotated.serialize(message)) == message


async def test_messages_from_a_crashed_incumbent_receiver_are_restored(
    pair: tuple[RedisChannelLayer, Any], redis_server: RedisServer
) -> None:
    """channels_redis parks a popped message in ``<key>$inflight``; if its process dies
    there, our receiver puts the message back and delivers it."""
    ours, theirs = pair
    data = theirs.serialize({"type": "stranded"})
    with redis_server.client() as client:
        client.zadd(f"{ours.prefix}compat.crashed$inflight", {data: time.time()})
    assert await recv(ours, "compat.crashed") == {"type": "stranded"}
