"""Serializers: formats, the registry, encryption with key rotation."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from streamlayer import StreamsChannelLayer
from streamlayer.compat.core import RedisChannelLayer
from streamlayer.keys import stream_channel_key, stream_inbox_key
from streamlayer.serializers import (
    BaseMessageSerializer,
    JSONSerializer,
    MsgPackSerializer,
    SerializerDoesNotExist,
    SerializersRegistry,
    registry,
)
from streamlayer.testing import RedisServer

MESSAGE = {"type": "chat.message", "text": "héllo", "n": [1, 2, 3], "ok": True}


@pytest.mark.parametrize("cls", [JSONSerializer, MsgPackSerializer])
@pytest.mark.parametrize("prefix_length", [0, 12])
@pytest.mark.parametrize("keys", [None, ["first-key-0123456789abcdef0123456789"]])
def test_round_trip(cls: type, prefix_length: int, keys: list[str] | None) -> None:
    serializer = cls(symmetric_encryption_keys=keys, random_prefix_length=prefix_length, expiry=60)
    data = serializer.serialize(MESSAGE)
    assert isinstance(data, bytes)
    assert serializer.deserialize(data) == MESSAGE
    if keys:
        assert b"chat.message" not in data  # encrypted at rest


def test_random_prefix_makes_equal_messages_distinct() -> None:
    serializer = MsgPackSerializer(random_prefix_length=12)
    assert serializer.serialize(MESSAGE) != serializer.serialize(MESSAGE)


def test_key_rotation() -> None:
    old = MsgPackSerializer(symmetric_encryption_keys=["old-key"])
    rotated = MsgPackSerializer(symmetric_encryption_keys=["new-key", "old-key"])
    new_only = MsgPackSerializer(symmetric_encryption_keys=["new-key"])
    assert rotated.deserialize(old.serialize(MESSAGE)) == MESSAGE  # old keys still decrypt
    assert new_only.deserialize(rotated.serialize(MESSAGE)) == MESSAGE  # first key encrypts
    from cryptography.fernet import InvalidToken

    with pytest.raises(InvalidToken):
        new_only.deserialize(old.serialize(MESSAGE))


def test_bare_string_keys_are_refused() -> None:
    with pytest.raises(TypeError, match="list of keys"):
        MsgPackSerializer(symmetric_encryption_keys="secret")


class UpperJSON:
    """A serializer that is not a BaseMessageSerializer: any class with the two methods."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def serialize(self, message: dict[str, Any]) -> bytes:
        import json

        return json.dumps(message).upper().encode()

    def deserialize(self, message: bytes) -> dict[str, Any]:
        import json

        result: dict[str, Any] = json.loads(message.decode().lower())
        return result


class Reversed(BaseMessageSerializer):
    def as_bytes(self, message: Any) -> bytes:
        return MsgPackSerializer().as_bytes(message)[::-1]

    def from_bytes(self, data: bytes) -> Any:
        return MsgPackSerializer().from_bytes(data[::-1])


@pytest.fixture
def clean_registry() -> Iterator[None]:
    saved = dict(registry._registry)
    yield
    registry._registry.clear()
    registry._registry.update(saved)


def test_registry_accepts_both_kinds(clean_registry: None) -> None:
    registry.register_serializer("upper", UpperJSON)
    registry.register_serializer("reversed", Reversed)
    upper = registry.get_serializer("upper", random_prefix_length=0)
    assert upper.deserialize(upper.serialize({"type": "x"})) == {"type": "x"}
    rev = registry.get_serializer("reversed", symmetric_encryption_keys=["k"])
    assert rev.deserialize(rev.serialize(MESSAGE)) == MESSAGE
    assert "upper" in registry.formats()


@pytest.mark.parametrize("bad", [object(), "json", type("NoMethods", (), {}), UpperJSON()])
def test_registry_refuses_non_serializers(bad: Any) -> None:
    with pytest.raises(TypeError, match="serializer_class must be"):
        SerializersRegistry().register_serializer("bad", bad)


def test_unknown_format() -> None:
    with pytest.raises(SerializerDoesNotExist) as info:
        registry.get_serializer("nope")
    assert isinstance(info.value, KeyError)
    assert "nope" in str(info.value)


async def test_custom_serializer_in_a_layer(
    clean_registry: None, redis_server: RedisServer, prefix: str
) -> None:
    registry.register_serializer("upper", UpperJSON)
    layer = RedisChannelLayer(hosts=[redis_server.url], prefix=prefix, serializer_format="upper")
    await layer.send("custom", {"type": "x"})
    assert await layer.receive("custom") == {"type": "x"}
    await layer.flush()


def plant_classic_garbage(client: Any, layer: Any, channel: str, prefix: str) -> int:
    client.zadd(f"{prefix}skip", {b"garbage-not-a-message": time.time()})
    return 1


def plant_stream_garbage(client: Any, layer: Any, channel: str, prefix: str) -> int:
    client.xadd(stream_inbox_key(prefix, layer.process_id), {"d": b"garbage", "i": "t1"})
    client.xadd(stream_channel_key(prefix, "skip"), {"d": b"garbage", "i": "t2"})
    return 2


@pytest.mark.parametrize(
    ("layer_cls", "plant_garbage"),
    [(RedisChannelLayer, plant_classic_garbage), (StreamsChannelLayer, plant_stream_garbage)],
    ids=["compat.core", "streams"],
)
async def test_undecryptable_and_corrupt_entries_are_skipped_and_counted(
    redis_server: RedisServer, prefix: str, layer_cls: Any, plant_garbage: Any
) -> None:
    """A message encrypted with a key we do not have, or not a message at all, is
    logged, counted and skipped, on process and normal channels; the reader lives on."""
    stranger = layer_cls(
        hosts=[redis_server.url], prefix=prefix, symmetric_encryption_keys=["unknown-key"]
    )
    layer = layer_cls(
        hosts=[redis_server.url], prefix=prefix, symmetric_encryption_keys=["our-key"]
    )
    channel = await layer.new_channel()
    await stranger.send(channel, {"type": "bad"})
    await stranger.send("skip", {"type": "bad"})
    with redis_server.client() as client:
        planted = plant_garbage(client, layer, channel, prefix)
    await layer.send(channel, {"type": "good"})
    await layer.send("skip", {"type": "good"})
    assert await layer.receive(channel) == {"type": "good"}
    assert await layer.receive("skip") == {"type": "good"}
    assert layer.stats.decode_errors == 2 + planted
    await layer.send(channel, {"type": "still alive"})
    assert await layer.receive(channel) == {"type": "still alive"}
    await layer.flush()
    await layer.close()
    await stranger.close()


def test_missing_cryptography_names_the_extra(tmp_path: Any) -> None:
    """Without the optional package, asking for encryption says which extra to install."""
    blocker = tmp_path / "cryptography"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('blocked for the test')\n")
    code = (
        "from streamlayer.serializers import MsgPackSerializer\n"
        "try:\n"
        "    MsgPackSerializer(symmetric_encryption_keys=['k'])\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert "pip install 'streamlayer[cryptography]'" in out.stdout
