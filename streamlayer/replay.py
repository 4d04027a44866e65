"""Group history and replay for :class:`~streamlayer.streams.StreamsChannelLayer`.

A group configured with ``group_history`` keeps its recent messages in a capped
stream on its own hash slot. Three atomic steps (Lua, one round trip each) make
replay exact:

* **publish** (``group_send``): record the message in the history and read the
  members, together; the message then goes to those members carrying its
  position;
* **join** (``group_add(..., since=position)``): add the member and read the
  history after ``position``, together. A concurrent publish either ran before
  the join (its message is in what the join read, and the new member was not
  among its recipients) or after (the member receives it live, and the join did
  not read it): no gap, no duplicate;
* **read** (``group_history``): a backlog, for example on page load.

For a channel of this process the replayed messages go straight into its local
queue, and live messages of that group reaching the channel while the join is
in flight wait behind them, so the channel sees the replay, in order, then the
live messages. For any other channel the replay is appended to its stream right
after the join; a live message sent in that short window can arrive before the
replayed ones (each carries its position, so a receiver can order them).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from .entries import Batch
from .history import POSITION_KEY, HistoryPage, Position, position_tag
from .host import LayerHost
from .keys import process_id_of, stream_history_key, stream_history_meta_key
from .local import LocalChannels
from .scripts import STREAM_GROUP_JOIN, STREAM_GROUP_PUBLISH, STREAM_HISTORY

__all__ = ["GroupHistory", "Published"]

Message = dict[str, Any]
T = TypeVar("T")
#: A live message held back while its channel's join is in flight (counted against the
#: channel's capacity, as every inbox message is).
_Held = tuple[tuple[int, int], Message, float]


@dataclass
class _Join:
    """A join with replay in flight for one (channel, group) of this process."""

    #: Live messages of the group that reached the channel meanwhile, held back.
    held: list[_Held] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class Published:
    """What a publish returns: the messages' positions and the group's members then."""

    positions: list[str]
    members: list[str]


@dataclass(frozen=True)
class _Read:
    """A history read: epoch, completeness, the newest id, and (id, fields) entries."""

    epoch: str
    complete: bool
    newest: str
    entries: list[tuple[str, dict[bytes, bytes]]]

    def position_of(self, entry_id: str) -> str:
        return f"{self.epoch}:{entry_id}"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_read(reply: list[Any]) -> _Read:
    epoch, complete, newest, raw = reply
    entries = []
    for entry_id, flat in raw:
        fields = {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}
        entries.append((_text(entry_id), fields))
    return _Read(_text(epoch), bool(int(complete)), _text(newest), entries)


class HistoryHost(LayerHost, Protocol):
    """What the history needs of its layer beyond any helper's: group naming,
    encoding, the local queues a replay for this process goes to, and where a replay
    for another channel is appended."""

    group_expiry: int
    local: LocalChannels

    def membership_keys(self, group: str) -> list[str]: ...

    def new_tag(self) -> str: ...

    def get_capacity(self, channel: str) -> int: ...

    async def append_to(self, what: str, channel: str, batch: Batch, group: str = "") -> int: ...


class GroupHistory:
    """The history side of one layer: its scripts' arguments and the join guards."""

    def __init__(self, layer: HistoryHost) -> None:
        self.layer = layer
        #: (channel, group) pairs joining with a replay, and the live messages held back.
        self._joining: dict[tuple[str, str], _Join] = {}
        #: Live messages that reached a channel while its replay was in flight.
        self.held_back = 0

    def length_for(self, group: str) -> int:
        return self.layer.config.history_for(group)

    # --- the arguments every history script shares ----------------------------------

    def _keys(self, group: str) -> list[str]:
        prefix = self.layer.prefix
        return [stream_history_key(prefix, group), stream_history_meta_key(prefix, group)]

    def _keys_with_members(self, group: str) -> list[str]:
        """KEYS of the history scripts that read or change the members: the group's
        members, its history keys, the members' digest."""
        members, digest = self.layer.membership_keys(group)
        return [members, *self._keys(group), digest]

    def _retention(self, length: int) -> list[Any]:
        """Length, MINID (older entries are past ``group_history_expiry``), TTL in ms,
        and an epoch for a stream that has none."""
        expiry = self.layer.config.group_history_expiry
        min_ms = max(1, int((time.time() - expiry) * 1000))
        ttl_ms = max(1000, math.ceil(expiry * 1000))
        return [length, f"{min_ms}-0", ttl_ms, secrets.token_hex(4)]

    def _shard(self, group: str) -> int:
        return self.layer.connections.shard_for(group)

    # --- publish ---------------------------------------------------------------------

    async def publish(self, group: str, batch: Batch, length: int) -> Published:
        """Record ``batch``'s messages in ``group``'s history; their positions and the
        members."""
        layer = self.layer
        keys = self._keys_with_members(group)
        tag = layer.new_tag()

        def args() -> list[Any]:
            cutoff = time.time() - layer.group_expiry
            return [cutoff, tag, *self._retention(length), *batch.payloads]

        reply = await layer.call_script(
            f"group_send to {group!r}",
            STREAM_GROUP_PUBLISH,
            self._shard(group),
            keys,
            args,
            idempotent=True,
        )
        epoch, n = _text(reply[0]), int(reply[1])
        ids = [_text(v) for v in reply[2 : 2 + n]]
        members = [_text(v) for v in reply[2 + n :]]
        return Published([f"{epoch}:{i}" if i else "" for i in ids], members)

    # --- join from a position --------------------------------------------------------

    async def join(self, group: str, channel: str, since: Position) -> bool:
        """Add ``channel`` to ``group`` and replay what it missed after ``since``;
        True when nothing after ``since`` was lost."""
        length = self.length_for(group)
        if not ("!" in channel and process_id_of(channel) == self.layer.process_id):
            read = await self._join(group, channel, since, length)
            replayed = await self._replay_remotely(group, channel, read)
            return read.complete and replayed
        guard = (channel, group)
        while (other := self._joining.get(guard)) is not None:
            await other.done.wait()  # the same join is in flight: let it finish first
        self._joining[guard] = _Join()
        last_replayed = None
        try:
            read = await self._join(group, channel, since, length)
            replayed = self._replay_locally(group, channel, read)
            if read.entries:
                last_replayed = read.entries[-1][0]
        finally:
            self._release(guard, last_replayed)
        return read.complete and replayed

    async def _join(self, group: str, channel: str, since: Position, length: int) -> _Read:
        layer = self.layer
        keys = self._keys_with_members(group)

        def args() -> list[Any]:
            join = [channel, time.time(), layer.group_expiry, since.epoch, since.entry_id]
            return join + self._retention(length)

        what, shard = f"group_add to {group!r}", self._shard(group)
        return _parse_read(await layer.call_script(what, STREAM_GROUP_JOIN, shard, keys, args))

    def _replay_locally(self, group: str, channel: str, read: _Read) -> bool:
        """Queue the replay on a channel of this process; False if it did not all fit."""
        layer = self.layer
        deadline = time.time() + layer.get_expiry(channel)
        for entry_id, fields in read.entries:
            message = layer.try_deserialize(fields.get(b"d", b""), f"history of {group!r}")
            if message is not None:
                message[POSITION_KEY] = position_tag(group, read.position_of(entry_id))
                layer.local.deliver(channel, message, deadline)
        capacity: int = layer.get_capacity(channel)
        return len(read.entries) <= capacity

    async def _replay_remotely(self, group: str, channel: str, read: _Read) -> bool:
        """Append the replay to another process's inbox or a normal channel's stream."""
        if not read.entries:
            return True
        layer = self.layer
        payloads = [fields.get(b"d", b"") for _, fields in read.entries]
        positions = [read.position_of(entry_id) for entry_id, _ in read.entries]
        batch = Batch(payloads, positions)
        full = await layer.append_to(f"replay to {channel!r}", channel, batch, group)
        if full:
            layer.count("full", full)
        return not full

    # --- live messages meeting a join ---------------------------------------------------

    def hold(
        self,
        channel: str,
        group: str,
        position: str,
        message: Message,
        deadline: float,
    ) -> bool:
        """Hold back a live inbox message (counted against its channel's capacity) for
        a channel whose replay is in flight (True: held)."""
        join = self._joining.get((channel, group))
        if join is None:
            return False
        join.held.append((_id_key(position.rpartition(":")[2]), message, deadline))
        self.held_back += 1
        return True

    def _release(self, guard: tuple[str, str], last_replayed: str | None) -> None:
        """Deliver the live messages held back during a join, skipping any the replay
        already delivered (none, given the atomic join; a safeguard)."""
        channel, _ = guard
        join = self._joining.pop(guard)
        join.done.set()
        floor = _id_key(last_replayed) if last_replayed else (-1, -1)
        local = self.layer.local
        for entry_id, message, deadline in join.held:
            if entry_id > floor:
                local.deliver(channel, message, deadline, counted=True)

    # --- reading a backlog -----------------------------------------------------------

    async def read(self, group: str, since: Position | None, limit: int) -> HistoryPage:
        length = self.length_for(group)
        layer = self.layer
        keys = self._keys(group)

        epoch, entry_id = (since.epoch, since.entry_id) if since else ("", "0-0")

        def args() -> list[Any]:
            return [epoch, entry_id, limit, *self._retention(length)]

        what, shard = f"group_history of {group!r}", self._shard(group)
        read = _parse_read(await layer.call_script(what, STREAM_HISTORY, shard, keys, args))
        page = HistoryPage(complete=read.complete, position=read.position_of(read.newest))
        for entry_id, fields in read.entries:
            message = layer.try_deserialize(fields.get(b"d", b""), f"history of {group!r}")
            if message is not None:
                message[POSITION_KEY] = position_tag(group, read.position_of(entry_id))
                page.messages.append(message)
        if read.entries:
            page.position = read.position_of(read.entries[-1][0])
        return page
