"""The shared config surface: accepted forms, defaults, and errors that name the key."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from streamlayer.compat.core import RedisChannelLayer
from streamlayer.config import DEFAULT_HOST, ConfigError, HostSpec, LayerConfig

from .layers import LAYERS, layer_class


def build(**options: Any) -> LayerConfig:
    return LayerConfig.from_options(options)


def test_defaults_match_the_incumbent() -> None:
    config = build()
    assert config.hosts == (HostSpec(url=DEFAULT_HOST),)
    assert (config.prefix, config.expiry, config.group_expiry) == ("asgi", 60, 86400)
    assert (config.capacity, config.channel_capacity) == (100, ())
    assert config.serializer_format == "msgpack"
    assert config.symmetric_encryption_keys == ()


def test_config_is_immutable() -> None:
    config = build()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.prefix = "other"  # type: ignore[misc]
    spec = build(hosts=[{"address": "redis://h:1", "socket_timeout": 3}]).hosts[0]
    with pytest.raises(TypeError):
        spec.kwargs["socket_timeout"] = 4  # type: ignore[index]


def test_every_host_form() -> None:
    config = build(
        hosts=[
            "redis://:secret@127.0.0.1:6379/0",
            "rediss://cache.example:6380",
            "unix:///var/run/redis.sock",
            ("127.0.0.1", 6381),
            {"address": "rediss://h:6379", "ssl_cert_reqs": None},
            {"host": "127.0.0.1", "port": 6382, "db": 2},
            {
                "sentinels": [("127.0.0.1", 26379)],
                "master_name": "mymaster",
                "sentinel_kwargs": {"password": "s"},
                "db": 1,
            },
        ]
    )
    url, tls, unix, pair, tls_dict, params, sentinel = config.hosts
    assert url.url == "redis://:secret@127.0.0.1:6379/0"
    assert url.describe() == "redis://127.0.0.1:6379"  # never the password
    assert tls.describe() == "rediss://cache.example:6380"
    assert unix.describe() == "unix:///var/run/redis.sock"
    assert dict(pair.kwargs) == {"host": "127.0.0.1", "port": 6381}
    assert tls_dict.url == "rediss://h:6379" and dict(tls_dict.kwargs) == {"ssl_cert_reqs": None}
    assert dict(params.kwargs) == {"host": "127.0.0.1", "port": 6382, "db": 2}
    assert sentinel.is_sentinel and sentinel.master_name == "mymaster"
    assert sentinel.sentinels == (("127.0.0.1", 26379),)
    assert dict(sentinel.kwargs) == {"db": 1}
    assert dict(sentinel.sentinel_kwargs or {}) == {"password": "s"}
    assert sentinel.describe() == "sentinel://127.0.0.1:26379/mymaster"


def test_channel_capacity_keeps_order_and_compiles_globs() -> None:
    config = build(
        capacity=5,
        channel_capacity={"http.request": 200, "http.response!*": 10, re.compile(r"^ws\..+"): 20},
    )
    assert config.capacity_for("http.request") == 200
    assert config.capacity_for("http.response!abc") == 10
    assert config.capacity_for("ws.send") == 20
    assert config.capacity_for("other") == 5


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"hosts": "redis://localhost:6379"}, TypeError, r"hosts=\['redis://localhost:6379'\]"),
        ({"hosts": []}, ConfigError, "hosts is empty"),
        ({"hosts": [42]}, TypeError, r"hosts\[0\] must be a URL"),
        ({"hosts": ["http://x"]}, ConfigError, r"hosts\[0\] must be a redis://"),
        ({"hosts": [("h", "6379")]}, TypeError, r"hosts\[0\] must be a \(host, port\) pair"),
        ({"hosts": [{"sentinels": [("h", 1)]}]}, TypeError, "master_name"),
        ({"hosts": [{"master_name": "m"}]}, TypeError, "'sentinels'"),
        ({"hosts": [{"master_name": "m", "sentinels": ["h"]}]}, TypeError, "each sentinel"),
        ({"expiry": -1}, ConfigError, "expiry must be greater than 0"),
        ({"expiry": "60"}, TypeError, "expiry must be a number"),
        ({"expiry": True}, TypeError, "expiry must be a number"),
        ({"group_expiry": 0}, ConfigError, "group_expiry must be at least 1"),
        ({"group_expiry": 1.5}, TypeError, "group_expiry must be a whole number"),
        ({"capacity": 0}, ConfigError, "capacity must be at least 1"),
        ({"channel_capacity": [("a", 1)]}, TypeError, "channel_capacity must be a dict"),
        ({"channel_capacity": {"a": -1}}, ConfigError, r"channel_capacity\['a'\]"),
        ({"channel_capacity": {1: 1}}, TypeError, "glob strings or compiled regexes"),
        ({"symmetric_encryption_keys": "secret"}, TypeError, r"\[SECRET_KEY\]"),
        ({"symmetric_encryption_keys": [""]}, TypeError, "non-empty strings"),
        ({"serializer_format": 3}, TypeError, "serializer_format"),
        ({"prefix": b"asgi"}, TypeError, "prefix must be a string"),
        # channels_redis' README writes hosts as a list of pairs; one bare pair is a
        # list of two servers to the layer and deserves the real diagnosis.
        ({"hosts": ("localhost", 6379)}, TypeError, r"hosts=\[\('localhost', 6379\)\]"),
        ({"hosts": ["localhost:6379"]}, ConfigError, "did you mean 'redis://localhost:6379'"),
        ({"hosts": [("localhost", "6379")]}, TypeError, "the port must be a number"),
        ({"random_prefix_length": -2}, TypeError, "random_prefix_length"),
        ({"on_disconnect": 1}, TypeError, "on_disconnect must be a message type"),
        ({"retry_timeout": 0}, ConfigError, "retry_timeout must be greater than 0"),
        ({"hosts": [{"cluster": "redis://h:1"}]}, TypeError, "'cluster' must be a list"),
        ({"hosts": [{"cluster": [("h", "1")]}]}, TypeError, "each cluster node"),
        ({"hosts": [{"cluster": [("h", 1)], "db": 2}]}, ConfigError, "has no 'db'"),
        (
            {"hosts": [{"cluster": [("h", 1)]}, "redis://x"]},
            ConfigError,
            "must be the only one in hosts",
        ),
        ({"group_history": -1}, ConfigError, "group_history must be 0 \\(off\\) or more"),
        ({"group_history": "10"}, TypeError, "group_history must be a whole number"),
        ({"group_history": True}, TypeError, "group_history must be a whole number"),
        ({"group_history": {"chat-*": 1.5}}, TypeError, r"group_history\['chat-\*'\]"),
        ({"group_history": [10]}, TypeError, "group_history must be a dict"),
        ({"group_history_expiry": 0}, ConfigError, "group_history_expiry must be greater"),
        ({"presence_timeout": 0}, ConfigError, "presence_timeout must be greater"),
        ({"presence_timeout": "30"}, TypeError, "presence_timeout must be a number"),
        ({"presence_events": 1}, TypeError, "presence_events must be True or False"),
        ({"presence_events": {"chat-*": "yes"}}, TypeError, r"presence_events\['chat-\*'\]"),
        ({"expirey": 10}, ConfigError, "'expirey' \\(did you mean 'expiry'\\?\\)"),
    ],
)
def test_bad_values_name_the_key(options: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        build(**options)


def test_cluster_forms() -> None:
    (spec,) = build(
        hosts=[{"cluster": [("127.0.0.1", 7000), "redis://127.0.0.1:7001"], "password": "pw"}]
    ).hosts
    assert spec.is_cluster and not spec.is_sentinel
    assert spec.cluster_nodes == (("127.0.0.1", 7000), ("127.0.0.1", 7001))
    assert spec.kwargs == {"password": "pw"}
    assert spec.describe() == "cluster://127.0.0.1:7000,127.0.0.1:7001"


def test_group_history_forms() -> None:
    assert build().history_for("any") == 0
    assert build(group_history=25).history_for("any") == 25
    assert build(group_history=0).history_for("any") == 0
    patterns = build(group_history={"chat-*": 100, "news": 10})
    assert patterns.history_for("chat-42") == 100
    assert patterns.history_for("news") == 10
    assert patterns.history_for("other") == 0
    assert build().group_history_expiry == 86400


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("layer_path", LAYERS)
def test_every_layer_accepts_every_key(layer_path: str) -> None:
    """Switching BACKEND is the only edit: keys a backend does not use are accepted."""
    layer = layer_class(layer_path)(
        hosts=[("127.0.0.1", 1)],
        prefix="p",
        expiry=30,
        group_expiry=600,
        capacity=10,
        channel_capacity={"a*": 5},
        symmetric_encryption_keys=["k" * 32],
        serializer_format="json",
        random_prefix_length=12,
        on_disconnect="redis.disconnect",
        on_reconnect="redis.reconnect",
        retry_timeout=3,
        group_history={"chat-*": 10},
        group_history_expiry=3600,
    )
    assert layer.get_capacity("abc") == 5
    assert layer.config.on_reconnect == "redis.reconnect"


def test_unknown_serializer_format_is_clear() -> None:
    from streamlayer.serializers import SerializerDoesNotExist

    with pytest.raises(SerializerDoesNotExist, match="'yaml'"):
        RedisChannelLayer(serializer_format="yaml")


def test_presence_events_forms() -> None:
    assert build().presence_events_for("any") is False
    assert build(presence_events=True).presence_events_for("any") is True
    assert build(presence_events=False).presence_events_for("any") is False
    patterns = build(presence_events={"chat-*": True, "*": False})
    assert patterns.presence_events_for("chat-1") is True
    assert patterns.presence_events_for("news") is False
    assert build().presence_timeout == 30
