"""Redis key names, as pure functions: tests assert them and the docs show them.

The classic layout is channels_redis 4.x's, byte for byte, so that processes
running it and processes running :mod:`streamlayer.compat.core` share one
Redis during a migration:

* a channel's messages: ``<prefix><channel>`` (no separator!), a sorted set of
  serialized messages scored by send time. Every process-specific channel of
  one process shares the key of its non-local part, ``<prefix><name>!``;
* the in-flight backup of a channel: ``<channel key>$inflight``;
* a group: ``<prefix>:group:<group>``, a sorted set of channel names scored by
  join time.

Beside it, streamlayer's own (channels_redis reads neither): a group's presence,
``<prefix>:presence:<group>`` (a hash: member channel -> its info and join time)
and ``<prefix>:plive:<group>`` (a sorted set: member channel -> the time its
presence ends unless its process refreshes it).
"""

from __future__ import annotations

#: What each Streams key kind is (the part between ``:s:`` and the braces).
STREAM_KEY_KINDS = (
    "inbox",
    "state",
    "chan",
    "done",
    "group",
    "gdigest",
    "history",
    "hmeta",
    "presence",
    "plive",
)

__all__ = [
    "classic_alive_key",
    "classic_backup_key",
    "classic_channel_key",
    "classic_group_key",
    "classic_presence_key",
    "classic_presence_live_key",
    "non_local_name",
    "parse_stream_key",
    "process_id_of",
    "scan_pattern",
    "stream_channel_key",
    "stream_delivered_key",
    "stream_group_digest_key",
    "stream_group_key",
    "stream_history_key",
    "stream_history_meta_key",
    "stream_inbox_key",
    "stream_inbox_state_key",
    "stream_presence_key",
    "stream_presence_live_key",
]


def non_local_name(channel: str) -> str:
    """The part of a channel name up to and including ``!`` (the whole name if none)."""
    bang = channel.find("!")
    return channel if bang < 0 else channel[: bang + 1]


def classic_channel_key(prefix: str, channel: str) -> str:
    """Sorted set holding the messages of ``channel`` (of its process, if it has ``!``)."""
    return prefix + non_local_name(channel)


def classic_backup_key(channel_key: str) -> str:
    """Where channels_redis parks a message between popping and handing it over."""
    return channel_key + "$inflight"


def classic_alive_key(prefix: str, inbox: str) -> str:
    """A mark of streamlayer's own beside the classic layout (no channel name holds a
    colon, so it names no channel): set by a process's inbox reader, its absence after
    a reconnect says Redis lost its data."""
    return f"{prefix}:alive:{inbox}"


def classic_group_key(prefix: str, group: str) -> str:
    """Sorted set of a group's member channels, scored by the time they joined."""
    return f"{prefix}:group:{group}"


def classic_presence_key(prefix: str, group: str) -> str:
    """Hash of a group's members with presence: channel -> its info and join time."""
    return f"{prefix}:presence:{group}"


def classic_presence_live_key(prefix: str, group: str) -> str:
    """Sorted set: a member with presence -> when its presence ends unless refreshed
    (a negative score: when a sweep ended it, kept so its process can tell on return)."""
    return f"{prefix}:plive:{group}"


def scan_pattern(prefix: str) -> str:
    """A SCAN MATCH pattern for every key starting with ``prefix`` (glob characters escaped)."""
    escaped = "".join("\\" + c if c in "*?[]\\" else c for c in prefix)
    return escaped + "*"


# --- the Streams layout ------------------------------------------------------------
#
# Every key carries a hash tag ({...}) naming what decides its shard and its Redis
# Cluster slot: the process id for an inbox, the channel for a normal channel, the
# group for a group's membership and its history, so scripts only ever
# touch keys of one slot.


def process_id_of(channel: str) -> str:
    """The process part of a process-specific channel ``<name>.<process id>!<local>``."""
    bang = channel.find("!")
    if bang < 0:
        raise ValueError(f"{channel!r} is not a process-specific channel (no '!')")
    return channel[:bang].rsplit(".", 1)[-1]


def stream_inbox_key(prefix: str, process_id: str) -> str:
    """Stream holding every message for one process's channels."""
    return f"{prefix}:s:inbox:{{{process_id}}}"


def stream_inbox_state_key(prefix: str, process_id: str) -> str:
    """Hash beside a process's inbox (same slot): field ``@`` is the id of the last
    entry its reader handed on, every other field one of its channels' count of
    accepted, unreceived messages (what capacity is checked against)."""
    return f"{prefix}:s:state:{{{process_id}}}"


def stream_channel_key(prefix: str, channel: str) -> str:
    """Stream of a normal channel, read through one consumer group."""
    return f"{prefix}:s:chan:{{{channel}}}"


def stream_delivered_key(prefix: str, channel: str) -> str:
    """Sorted set of the dedup tags of a normal channel's recently delivered entries
    (same slot as its stream), so a retried send finds what was already delivered."""
    return f"{prefix}:s:done:{{{channel}}}"


def stream_group_key(prefix: str, group: str) -> str:
    """Sorted set of a group's member channels, scored by the time they joined."""
    return f"{prefix}:s:group:{{{group}}}"


def stream_group_digest_key(prefix: str, group: str) -> str:
    """String beside a group's members (same slot): their count and the XOR of their
    SHA-1s, kept by every script that changes them, so a group send checks its plan
    without reading the members (see ``_MEMBERSHIP`` in :mod:`streamlayer.scripts`)."""
    return f"{prefix}:s:gdigest:{{{group}}}"


def stream_history_key(prefix: str, group: str) -> str:
    """The capped stream of a group's recent messages (for replay)."""
    return f"{prefix}:s:history:{{{group}}}"


def stream_history_meta_key(prefix: str, group: str) -> str:
    """Hash of a group's history: its epoch and the newest entry id ever trimmed."""
    return f"{prefix}:s:hmeta:{{{group}}}"


def stream_presence_key(prefix: str, group: str) -> str:
    """Hash of a group's members with presence (same slot as its membership)."""
    return f"{prefix}:s:presence:{{{group}}}"


def stream_presence_live_key(prefix: str, group: str) -> str:
    """Sorted set of when each member's presence ends unless refreshed (same slot)."""
    return f"{prefix}:s:plive:{{{group}}}"


def parse_stream_key(prefix: str, key: str) -> tuple[str, str] | None:
    """The kind (one of :data:`STREAM_KEY_KINDS`) and the name (a process id, channel
    or group) of a Streams key under ``prefix``; None for any other key. The inverse
    of the ``stream_*_key`` functions above."""
    head = f"{prefix}:s:"
    if not key.startswith(head) or not key.endswith("}"):
        return None
    kind, brace, rest = key[len(head) :].partition(":{")
    if not brace or kind not in STREAM_KEY_KINDS:
        return None
    return kind, rest[:-1]
