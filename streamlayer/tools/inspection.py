"""``python -m streamlayer inspect``: what a StreamsChannelLayer keeps in Redis.

Read-only: SCAN for the prefix's keys, then per key one cheap command (XLEN,
XINFO, ZCARD, MEMORY USAGE). It answers the questions an operator has when
something is stuck: which process inbox has a backlog and when its reader last
moved, which normal channel has entries pending with which consumer, how large
each group and its history is, and how much memory the layer uses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis

from ..keys import parse_stream_key, scan_pattern, stream_group_key

__all__ = ["LayerSnapshot", "inspect_layer"]

_SCAN_COUNT = 1000


@dataclass
class LayerSnapshot:
    """Everything ``inspect`` found under one prefix."""

    prefix: str
    #: Where it was read (a URL, or the settings entry and host).
    source: str = ""
    inboxes: list[dict[str, Any]] = field(default_factory=list)
    channels: list[dict[str, Any]] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)
    keys: int = 0
    memory_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "source": self.source,
            "inboxes": self.inboxes,
            "channels": self.channels,
            "groups": self.groups,
            "totals": {"keys": self.keys, "memory_bytes": self.memory_bytes},
        }


def connect(url: str) -> redis.Redis:
    """A client for ``url``; a Redis Cluster node gives a cluster client (SCAN then
    covers every master)."""
    client = redis.Redis.from_url(url, socket_timeout=5)
    if int(client.info("cluster").get("cluster_enabled", 0)):
        client.close()
        return redis.RedisCluster.from_url(url, socket_timeout=5)  # type: ignore[return-value]
    return client


def inspect_layer(client: redis.Redis, prefix: str, source: str = "") -> LayerSnapshot:
    snapshot = LayerSnapshot(prefix, source)
    found: dict[str, dict[str, str]] = {}
    for raw in client.scan_iter(match=scan_pattern(f"{prefix}:s:"), count=_SCAN_COUNT):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        parsed = parse_stream_key(prefix, key)
        if parsed is None:
            continue
        kind, name = parsed
        found.setdefault(kind, {})[name] = key
        snapshot.keys += 1
        snapshot.memory_bytes += int(client.memory_usage(key) or 0)
    states = found.get("state", {})
    for process_id, key in sorted(found.get("inbox", {}).items()):
        snapshot.inboxes.append(_inbox(client, process_id, key, states.get(process_id)))
    for channel, key in sorted(found.get("chan", {}).items()):
        snapshot.channels.append(_channel(client, channel, key))
    histories = found.get("history", {})
    for group in sorted(set(found.get("group", {})) | set(histories)):
        snapshot.groups.append(_group(client, prefix, group, histories.get(group)))
    return snapshot


def _id_age(entry_id: Any) -> float | None:
    """Seconds since the entry with this id was added (ids start with milliseconds)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id or "")
    millis = text.split("-", 1)[0]
    if not millis.isdigit() or millis == "0":
        return None
    return max(0.0, time.time() - int(millis) / 1000)


def _inbox(
    client: redis.Redis, process_id: str, key: str, state_key: str | None
) -> dict[str, Any]:
    stream = _stream_info(client, key)
    state: dict[Any, Any] = dict(client.hgetall(state_key)) if state_key else {}
    cursor = state.pop(b"@", None)
    state.pop(b"^", None)
    return {
        "process": process_id,
        "backlog": stream.get("length", 0),
        # Read by the process, not yet received (as its reader last reported).
        "queued_in_process": sum(int(v) for v in state.values()),
        "last_message_age_s": _rounded(_id_age(stream.get("last-generated-id"))),
        "read_up_to": cursor.decode() if isinstance(cursor, bytes) else cursor,
        "reader_age_s": _rounded(_id_age(cursor)) if cursor else None,
    }


def _channel(client: redis.Redis, channel: str, key: str) -> dict[str, Any]:
    stream = _stream_info(client, key)
    consumers: list[dict[str, Any]] = []
    pending = 0
    try:
        groups: Any = client.xinfo_groups(key)
    except redis.ResponseError:
        groups = []
    for group in groups:
        pending += int(group.get("pending", 0))
        for consumer in client.xinfo_consumers(key, group["name"]):
            name = consumer["name"]
            consumers.append(
                {
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "pending": int(consumer.get("pending", 0)),
                    "idle_s": _rounded(int(consumer.get("idle", 0)) / 1000),
                }
            )
    return {
        "channel": channel,
        "backlog": stream.get("length", 0),
        "pending": pending,
        "consumers": consumers,
        "last_message_age_s": _rounded(_id_age(stream.get("last-generated-id"))),
    }


def _group(
    client: redis.Redis, prefix: str, group: str, history_key: str | None
) -> dict[str, Any]:
    members = int(client.zcard(stream_group_key(prefix, group)))
    history = int(client.xlen(history_key)) if history_key else 0
    return {"group": group, "members": members, "history": history}


def _stream_info(client: redis.Redis, key: str) -> dict[str, Any]:
    try:
        info: Any = client.xinfo_stream(key)
    except redis.ResponseError:  # gone between SCAN and now
        return {}
    return dict(info)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
