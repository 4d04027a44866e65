"""One validated, immutable configuration for every streamlayer backend.

Every layer class takes the same keyword arguments (the ``CONFIG`` dict of a
``CHANNEL_LAYERS`` entry) and hands them to :meth:`LayerConfig.from_options`.
Validation happens here, once, so a typo or a wrong type fails when Django
builds the layer, with a message naming the key, instead of deep inside a
send. Keys that a given backend does not use are still accepted and
validated: switching ``BACKEND`` must be the only edit a user makes.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

__all__ = ["DEFAULT_HOST", "ConfigError", "HostSpec", "LayerConfig"]

DEFAULT_HOST = "redis://localhost:6379"

_URL_SCHEMES = ("redis", "rediss", "unix")


class ConfigError(ValueError):
    """A configuration key has a value of the right type but a wrong value."""


@dataclass(frozen=True)
class HostSpec:
    """One entry of ``hosts``: a plain server, a URL, a Sentinel-monitored master, or a
    Redis Cluster (named by some of its nodes; it must then be the only entry).

    ``kwargs`` are passed to redis-py's connection pool; they are stored as a
    read-only mapping so a config can be shared between layers and threads.
    """

    url: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    master_name: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_kwargs: Mapping[str, Any] | None = None
    cluster_nodes: tuple[tuple[str, int], ...] = ()

    @property
    def is_sentinel(self) -> bool:
        return self.master_name is not None

    @property
    def is_cluster(self) -> bool:
        return bool(self.cluster_nodes)

    def describe(self) -> str:
        """A log-safe name for this host: never includes a password."""
        if self.is_sentinel:
            nodes = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"sentinel://{nodes}/{self.master_name}"
        if self.is_cluster:
            return "cluster://" + ",".join(f"{h}:{p}" for h, p in self.cluster_nodes)
        if self.url is not None:
            parts = urlsplit(self.url)
            if parts.scheme == "unix":
                return f"unix://{parts.path}"
            return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}"
        if "unix_socket_path" in self.kwargs:
            return f"unix://{self.kwargs['unix_socket_path']}"
        host = self.kwargs.get("host", "localhost")
        return f"redis://{host}:{self.kwargs.get('port', 6379)}"


@dataclass(frozen=True)
class LayerConfig:
    """Everything a layer needs to know, validated. Build it with :meth:`from_options`."""

    hosts: tuple[HostSpec, ...] = (HostSpec(url=DEFAULT_HOST),)
    prefix: str = "asgi"
    expiry: float = 60
    group_expiry: int = 86400
    capacity: int = 100
    channel_capacity: tuple[tuple[re.Pattern[str], int], ...] = ()
    #: Seconds a message lasts per channel: (pattern, seconds) pairs, first match wins,
    #: else ``expiry``.
    channel_expiry: tuple[tuple[re.Pattern[str], float], ...] = ()
    symmetric_encryption_keys: tuple[str | bytes, ...] = ()
    serializer_format: str = "msgpack"
    random_prefix_length: int | None = None
    on_disconnect: str | None = None
    on_reconnect: str | None = None
    retry_timeout: float = 10.0
    claim_after: float | None = None
    #: Retained messages per group: (pattern, count) pairs, first match wins, else 0.
    group_history: tuple[tuple[re.Pattern[str], int], ...] = ()
    group_history_expiry: float = 86400
    #: Seconds a member's presence outlives its process's last refresh (a process
    #: refreshes its members' presence every third of it).
    presence_timeout: float = 30
    #: Whether a group's members hear presence.join / presence.leave: (pattern, on)
    #: pairs, first match wins, else off.
    presence_events: tuple[tuple[re.Pattern[str], bool], ...] = ()

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> LayerConfig:
        """Validate the ``CONFIG`` keyword arguments of a layer.

        Raises TypeError for a value of the wrong type and :class:`ConfigError`
        (a ValueError) for a value out of range or an unknown key; the message
        names the key and what was expected.
        """
        unknown = sorted(set(options) - set(_VALIDATORS))
        if unknown:
            raise ConfigError(_unknown_keys_message(unknown))
        values = {key: _VALIDATORS[key](value) for key, value in options.items()}
        return cls(**values)

    @property
    def effective_claim_after(self) -> float:
        """Seconds before another process takes over a normal-channel entry left pending
        by a crashed or cancelled reader: ``claim_after``, or by default 10 s, but never
        so late that the entry has expired by then."""
        if self.claim_after is not None:
            return self.claim_after
        return min(10.0, self.expiry / 2)

    def capacity_for(self, channel: str) -> int:
        """The capacity of ``channel``: the first matching pattern wins, else ``capacity``."""
        for pattern, capacity in self.channel_capacity:
            if pattern.match(channel):
                return capacity
        return self.capacity

    def expiry_for(self, channel: str) -> float:
        """How long a message for ``channel`` lasts unreceived: the first matching
        ``channel_expiry`` pattern wins, else ``expiry``."""
        for pattern, expiry in self.channel_expiry:
            if pattern.match(channel):
                return expiry
        return self.expiry

    @property
    def longest_expiry(self) -> float:
        """The longest a message of any channel lasts: what a key shared by channels
        of different expiries (a process inbox) must outlive, and how old an
        encrypted message may be when it is decrypted."""
        return max([self.expiry, *(expiry for _, expiry in self.channel_expiry)])

    def claim_after_for(self, channel: str) -> float:
        """Seconds before another process takes over an entry of the normal channel
        ``channel`` left pending by a crashed reader: ``claim_after``, or by default
        10 s, but never so late that the entry has expired by then."""
        if self.claim_after is not None:
            return self.claim_after
        return min(10.0, self.expiry_for(channel) / 2)

    def presence_events_for(self, group: str) -> bool:
        """Whether ``group``'s members are told when a member with presence joins or
        leaves (``presence_events``)."""
        for pattern, on in self.presence_events:
            if pattern.match(group):
                return on
        return False

    def history_for(self, group: str) -> int:
        """How many recent messages ``group`` retains for replay (0: no history)."""
        for pattern, count in self.group_history:
            if pattern.match(group):
                return count
        return 0


# --- validators: one per key, each returns the normalised value ---------------


def _hosts(value: Any) -> tuple[HostSpec, ...]:
    if value is None:
        return (HostSpec(url=DEFAULT_HOST),)
    if isinstance(value, (str, bytes)):
        raise TypeError(
            "hosts must be a list of servers, even for one server: "
            f"hosts=[{value!r}], not hosts={value!r}"
        )
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"hosts must be a list of servers, got {type(value).__name__}")
    if _looks_like_one_pair(value):
        raise TypeError(
            "hosts must be a list of servers, even for one server: "
            f"hosts=[{tuple(value)!r}], not hosts={value!r}"
        )
    if not value:
        raise ConfigError("hosts is empty: name at least one server, or leave it out")
    hosts = tuple(_host(entry, index) for index, entry in enumerate(value))
    if len(hosts) > 1 and any(h.is_cluster for h in hosts):
        raise ConfigError(
            "a Redis Cluster entry must be the only one in hosts: the cluster spreads "
            "keys over its nodes itself (name more nodes inside its 'cluster' list)"
        )
    return hosts


def _host(entry: Any, index: int) -> HostSpec:
    where = f"hosts[{index}]"
    if isinstance(entry, str):
        return HostSpec(url=_url(entry, where))
    if isinstance(entry, (tuple, list)):
        if len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], str):
            raise TypeError(
                f"{where} must be a (host, port) pair, and the port must be a number: "
                f"({entry[0]!r}, {entry[1]}), not {tuple(entry)!r}"
            )
        if len(entry) != 2 or not isinstance(entry[0], str) or not _is_int(entry[1]):
            raise TypeError(f"{where} must be a (host, port) pair, got {entry!r}")
        return HostSpec(kwargs=MappingProxyType({"host": entry[0], "port": entry[1]}))
    if isinstance(entry, Mapping):
        return _host_dict(dict(entry), where)
    raise TypeError(
        f"{where} must be a URL string, a (host, port) tuple or a dict, got {type(entry).__name__}"
    )


def _host_dict(entry: dict[str, Any], where: str) -> HostSpec:
    if "cluster" in entry:
        return _cluster(entry, where)
    if "sentinels" in entry or "master_name" in entry:
        master_name = entry.pop("master_name", None)
        sentinels = entry.pop("sentinels", None)
        if not isinstance(master_name, str) or not master_name:
            raise TypeError(f"{where}: a Sentinel entry needs 'master_name' (a string)")
        if not isinstance(sentinels, (list, tuple)) or not sentinels:
            raise TypeError(f"{where}: a Sentinel entry needs 'sentinels', a list of pairs")
        nodes = []
        for node in sentinels:
            if not isinstance(node, (tuple, list)) or len(node) != 2 or not _is_int(node[1]):
                raise TypeError(
                    f"{where}: each sentinel must be a (host, port) pair, got {node!r}"
                )
            nodes.append((str(node[0]), int(node[1])))
        sentinel_kwargs = entry.pop("sentinel_kwargs", None)
        if sentinel_kwargs is not None and not isinstance(sentinel_kwargs, Mapping):
            raise TypeError(f"{where}: 'sentinel_kwargs' must be a dict")
        return HostSpec(
            kwargs=MappingProxyType(entry),
            master_name=master_name,
            sentinels=tuple(nodes),
            sentinel_kwargs=None
            if sentinel_kwargs is None
            else MappingProxyType(dict(sentinel_kwargs)),
        )
    if "address" in entry:
        address = entry.pop("address")
        if not isinstance(address, str):
            raise TypeError(f"{where}: 'address' must be a URL string")
        return HostSpec(url=_url(address, where), kwargs=MappingProxyType(entry))
    return HostSpec(kwargs=MappingProxyType(entry))


def _cluster(entry: dict[str, Any], where: str) -> HostSpec:
    """``{"cluster": [("127.0.0.1", 7000), "redis://127.0.0.1:7001"], **client_kwargs}``."""
    nodes = entry.pop("cluster")
    if isinstance(nodes, (str, bytes)) or not isinstance(nodes, (list, tuple)) or not nodes:
        raise TypeError(
            f"{where}: 'cluster' must be a list of some of the cluster's nodes, "
            "as (host, port) pairs or redis:// URLs"
        )
    parsed = []
    for node in nodes:
        if isinstance(node, str) and urlsplit(node).scheme in ("redis", "rediss"):
            parts = urlsplit(node)
            parsed.append((parts.hostname or "localhost", parts.port or 6379))
        elif isinstance(node, (tuple, list)) and len(node) == 2 and _is_int(node[1]):
            parsed.append((str(node[0]), int(node[1])))
        else:
            raise TypeError(
                f"{where}: each cluster node must be a (host, port) pair or a redis:// URL, "
                f"got {node!r}"
            )
    for key in ("db", "unix_socket_path", "path"):
        if entry.get(key):
            raise ConfigError(f"{where}: a Redis Cluster has no {key!r}")
    return HostSpec(kwargs=MappingProxyType(entry), cluster_nodes=tuple(parsed))


def _url(value: str, where: str) -> str:
    scheme = urlsplit(value).scheme if "://" in value else ""
    if scheme not in _URL_SCHEMES:
        hint = f" (did you mean 'redis://{value}'?)" if "://" not in value else ""
        raise ConfigError(
            f"{where} must be a redis://, rediss:// or unix:// URL, got {value!r}{hint}"
        )
    return value


def _looks_like_one_pair(value: Sequence[Any]) -> bool:
    """``hosts=("localhost", 6379)``: one (host, port) pair where the list of them goes."""
    return len(value) == 2 and isinstance(value[0], str) and _is_int(value[1])


def _prefix(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"prefix must be a string, got {type(value).__name__}")
    return value


def _positive_number(key: str) -> Any:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{key} must be a number of seconds, got {value!r}")
        if not value > 0:
            raise ConfigError(f"{key} must be greater than 0 seconds, got {value!r}")
        return value

    return check


def _positive_int(key: str, what: str) -> Any:
    def check(value: Any) -> int:
        if not _is_int(value):
            raise TypeError(f"{key} must be a whole number of {what}, got {value!r}")
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value!r}")
        return int(value)

    return check


_V = TypeVar("_V")


def _patterns(
    key: str, value: Any, check: Callable[[Any], _V], what: str
) -> tuple[tuple[re.Pattern[str], _V], ...]:
    """A dict of glob string (or compiled regex) -> value, in its order."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{key} must be a dict of pattern -> {what}, got {type(value).__name__}")
    compiled = []
    for pattern, count in value.items():
        if isinstance(pattern, str):
            regex = re.compile(fnmatch.translate(pattern))
        elif isinstance(pattern, re.Pattern):
            regex = pattern
        else:
            raise TypeError(
                f"{key} keys must be glob strings or compiled regexes, got {pattern!r}"
            )
        try:
            compiled.append((regex, check(count)))
        except (TypeError, ConfigError) as exc:
            raise type(exc)(f"{key}[{pattern!r}]: {exc}") from None
    return tuple(compiled)


def _channel_capacity(value: Any) -> tuple[tuple[re.Pattern[str], int], ...]:
    if value is None:
        return ()
    check = _positive_int("channel_capacity", "messages")
    return _patterns("channel_capacity", value, check, "capacity")


def _channel_expiry(value: Any) -> tuple[tuple[re.Pattern[str], float], ...]:
    if value is None:
        return ()
    check = _positive_number("channel_expiry")
    return _patterns("channel_expiry", value, check, "seconds")


def _group_history(value: Any) -> tuple[tuple[re.Pattern[str], int], ...]:
    """An int applies to every group; a dict maps group name patterns to counts."""

    def check(count: Any) -> int:
        if not _is_int(count):
            raise TypeError(f"group_history must be a whole number of messages, got {count!r}")
        if count < 0:
            raise ConfigError(f"group_history must be 0 (off) or more, got {count!r}")
        return int(count)

    if value is None:
        return ()
    if _is_int(value) or isinstance(value, (bool, float, str)):
        count = check(value)
        return ((re.compile(".*", re.DOTALL), count),) if count else ()
    return _patterns("group_history", value, check, "message count")


def _presence_events(value: Any) -> tuple[tuple[re.Pattern[str], bool], ...]:
    """A bool applies to every group; a dict maps group name patterns to bools."""

    def check(on: Any) -> bool:
        if not isinstance(on, bool):
            raise TypeError(f"presence_events must be True or False, got {on!r}")
        return on

    if value is None:
        return ()
    if not isinstance(value, Mapping):
        on = check(value)
        return ((re.compile(".*", re.DOTALL), True),) if on else ()
    return _patterns("presence_events", value, check, "True or False")


def _encryption_keys(value: Any) -> tuple[str | bytes, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)):
        raise TypeError(
            "symmetric_encryption_keys must be a list of keys, even for one key: "
            "[SECRET_KEY], not SECRET_KEY"
        )
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"symmetric_encryption_keys must be a list of keys, got {type(value).__name__}"
        )
    for key in value:
        if not isinstance(key, (str, bytes)) or not key:
            raise TypeError(f"symmetric_encryption_keys must hold non-empty strings, got {key!r}")
    return tuple(value)


def _serializer_format(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(
            f"serializer_format must be a format name such as 'msgpack', got {value!r}"
        )
    return value


def _random_prefix_length(value: Any) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or value < 0:
        raise TypeError(f"random_prefix_length must be a whole number >= 0, got {value!r}")
    return int(value)


def _message_type(key: str) -> Any:
    def check(value: Any) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise TypeError(f"{key} must be a message type string such as 'redis.{key[3:]}'")
        return value

    return check


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_VALIDATORS: dict[str, Any] = {
    "hosts": _hosts,
    "prefix": _prefix,
    "expiry": _positive_number("expiry"),
    "group_expiry": _positive_int("group_expiry", "seconds"),
    "capacity": _positive_int("capacity", "messages"),
    "channel_capacity": _channel_capacity,
    "channel_expiry": _channel_expiry,
    "symmetric_encryption_keys": _encryption_keys,
    "serializer_format": _serializer_format,
    "random_prefix_length": _random_prefix_length,
    "on_disconnect": _message_type("on_disconnect"),
    "on_reconnect": _message_type("on_reconnect"),
    "retry_timeout": _positive_number("retry_timeout"),
    "claim_after": lambda value: None if value is None else _positive_number("claim_after")(value),
    "group_history": _group_history,
    "group_history_expiry": _positive_number("group_history_expiry"),
    "presence_timeout": _positive_number("presence_timeout"),
    "presence_events": _presence_events,
}


def _unknown_keys_message(unknown: list[str]) -> str:
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, _VALIDATORS, n=1)
        hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    return f"unknown channel layer option(s): {', '.join(hints)}; known: {', '.join(_VALIDATORS)}"
