"""``streamlayer.StreamsChannelLayer``: the channel layer on Redis Streams.

* A **process-specific channel** (``<name>.<process id>!<local id>``) is served
  by its process's inbox stream (:class:`~streamlayer.inbox.Inbox`).
* A **normal channel** is a stream read through one consumer group; each
  receiving process is a consumer (:class:`~streamlayer.normal.NormalChannels`).
* A **group** is a sorted set of member channels scored by join time;
  ``group_send`` reads it (one round trip) and writes the payload once per
  destination stream, one script per shard.

A send is one script call: trim expired entries, check capacity, append (with
a dedup tag so a retry after a lost reply does not deliver twice), refresh the
TTL. Group history and replay are :class:`~streamlayer.replay.GroupHistory`. See
``docs/architecture.rst`` for the full picture.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

from .entries import Batch
from .exceptions import LayerClosed
from .history import POSITION_KEY, HistoryPage, Position
from .inbox import Inbox
from .keys import (
    process_id_of,
    scan_pattern,
    stream_channel_key,
    stream_delivered_key,
    stream_group_digest_key,
    stream_group_key,
    stream_inbox_key,
    stream_inbox_state_key,
    stream_presence_key,
    stream_presence_live_key,
)
from .local import LocalChannels
from .memo import Memo
from .normal import NormalChannels
from .replay import GroupHistory
from .scripts import STREAM_APPEND, STREAM_GROUP_SEND_KNOWN, LuaScript
from .stored import KnownMembers, StoredLayer, known_send_outcome, xor_digest
from .sync import sync_aware, sync_aware_on_loop

__all__ = ["StreamsChannelLayer"]

logger = logging.getLogger(__name__)

#: Seconds beyond retry_timeout a delivered tag is kept (a retry's last attempt in flight).
_RETRY_SLACK = 5.0
#: How many channel -> process id lookups group_send remembers.
_PROCESS_MEMO = 100_000


#: A plan's destinations on one shard and slot: the shard, each destination's stream
#: and side key, and each destination's record without its dedup tag.
_Scope = tuple[int, list[str], list[list[Any]]]


class StreamsChannelLayer(StoredLayer[list[_Scope]]):
    """Channel layer on Redis Streams: nothing lost on a reconnect, one round trip per send."""

    supports_cluster = True
    #: A channel's unreceived messages are counted where the sender sees them, and a
    #: stall of a few seconds (a fork for BGSAVE, an fsync, a failover) lands as one
    #: burst: 1,000 absorbs a 6 s stall at 160 deliveries/s per channel (see
    #: docs/operations.rst for the bound and its memory cost).
    default_capacity = 1000

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        #: How long STREAM_ACK keeps a delivered tag: a retried send's window, within expiry.
        window = min(self.config.retry_timeout + _RETRY_SLACK, self.config.expiry)
        self.delivered_keep_ms = max(1000, math.ceil(window * 1000))
        self._inbox_expiry_ms = math.ceil(self.config.longest_expiry * 1000)

    def start_process_state(self) -> None:
        """A new identity (a forked child's too): inbox, consumer name, channel names,
        dedup tags; and the process's queues, readers and history guards."""
        super().start_process_state()
        #: 64 random bits name this layer instance: its inbox, its consumer name on
        #: normal channels, the middle of its channel names. Short on purpose: a
        #: group_send to local members carries every member's name.
        self.process_id = secrets.token_hex(8)
        self._tag_numbers = itertools.count()
        self._channel_numbers = itertools.count(1)
        #: Destination of each process-specific channel seen in a group (bounded memo).
        self._process_of: Memo[str, str] = Memo(_PROCESS_MEMO)
        self.local = LocalChannels(self.count)
        self.inbox = Inbox(self)
        self.normal = NormalChannels(self)
        self.history = GroupHistory(self)

    def new_tag(self) -> str:
        """A dedup tag no other send of any process uses: this layer's random id and a
        counter (cheaper than fresh random bytes per message)."""
        return f"{self.process_id}{next(self._tag_numbers):x}"

    @property
    def key_ttl_ms(self) -> int:
        """TTL of a process inbox (ms): a stream idle for the longest expiry holds only
        expired entries, whichever of the process's channels they name."""
        return self._inbox_expiry_ms

    def expiry_ms(self, channel: str) -> int:
        """``channel``'s expiry in ms, as the appending script takes it: its stream's
        TTL, and how far back its entries are kept (a process-specific channel's
        inbox keeps the longest)."""
        if "!" in channel:
            return self._inbox_expiry_ms
        return math.ceil(self.get_expiry(channel) * 1000)

    # --- channel layer API --------------------------------------------------------

    @sync_aware
    async def new_channel(self, prefix: str = "specific") -> str:
        """A new process-specific channel name, served by this process's inbox."""
        return f"{prefix}.{self.process_id}!{next(self._channel_numbers):x}"

    @sync_aware
    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Send ``message`` to ``channel``; raises ChannelFull when its backlog is at capacity."""
        self.check_message(message)
        self.check_channel(channel)
        refused = await self.append_to(
            f"send to {channel!r}", channel, Batch([self.serialize(message)])
        )
        self.count_send(channel, not refused, self.get_capacity(channel))

    async def send_batch(self, channel: str, messages: list[dict[str, Any]]) -> int:
        batch = Batch([self.serialize(message) for message in messages])
        return len(batch) - await self.append_to(f"send_bulk to {channel!r}", channel, batch)

    async def append_to(self, what: str, channel: str, batch: Batch, group: str = "") -> int:
        """STREAM_APPEND of ``batch`` to ``channel``'s stream (its process's inbox, or
        its own): how many messages it refused, the last ones (no room)."""
        key, side, shard = self.destination(channel)
        local = channel if "!" in channel else ""
        record = [self.new_tag(), local, self.get_capacity(channel), self.expiry_ms(channel)]
        args = [*batch.args(), *record, group]
        return int(await self.append(what, STREAM_APPEND, shard, [key, side], args))

    def _shard(self, name: str) -> int:
        return self.connections.shard_for(name)

    def destination(self, channel: str) -> tuple[str, str, int]:
        """The stream a message for ``channel`` goes to, the key an append consults
        beside it, and their shard: the inbox of the channel's process and its state
        (each channel's reported backlog), or the channel's own stream and its
        delivered tags (see STREAM_ACK)."""
        if "!" in channel:
            process_id = process_id_of(channel)
            inbox = stream_inbox_key(self.prefix, process_id)
            return inbox, stream_inbox_state_key(self.prefix, process_id), self._shard(process_id)
        stream = stream_channel_key(self.prefix, channel)
        return stream, stream_delivered_key(self.prefix, channel), self._shard(channel)

    async def append(
        self,
        what: str,
        script: LuaScript,
        shard: int,
        keys: list[str],
        args: list[Any],
        *,
        maybe_landed: bool = False,
    ) -> Any:
        """Call an appending script (STREAM_APPEND, STREAM_GROUP_SEND_KNOWN)."""
        return await self.call_script(
            what,
            script,
            shard,
            keys,
            self._appending(args),
            idempotent=True,
            maybe_landed=maybe_landed,
        )

    def _appending(self, args: list[Any]) -> Callable[[], list[Any]]:
        """An appending script's arguments end with the time of each attempt (in ms:
        expiry cutoffs are counted back from it)."""
        return lambda: [*args, int(time.time() * 1000)]

    # --- process-specific channels ------------------------------------------------------

    def owns(self, channel: str) -> bool:
        return process_id_of(channel) == self.process_id

    def _prepare_local(self, channel: str, loop: asyncio.AbstractEventLoop) -> None:
        self.inbox.serve(channel, loop)

    def _receive_normal(self, channel: str) -> Coroutine[Any, Any, dict[str, Any]]:
        # The normal channels' own coroutine, not one awaiting it: a worker's receive
        # resumes one frame fewer per message.
        return self.normal.receive(channel)

    # --- groups ---------------------------------------------------------------------------

    def group_key(self, group: str) -> str:
        return stream_group_key(self.prefix, group)

    def membership_keys(self, group: str) -> list[str]:
        return [stream_group_key(self.prefix, group), stream_group_digest_key(self.prefix, group)]

    def members_digest(self, members: Iterable[str]) -> str:
        return xor_digest(members)

    def presence_keys(self, group: str) -> list[str]:
        members, digest = self.membership_keys(group)
        prefix = self.prefix
        live = stream_presence_live_key(prefix, group)
        return [members, stream_presence_key(prefix, group), live, digest]

    @sync_aware
    async def group_add(
        self,
        group: str,
        channel: str,
        since: str | Position | None = None,
        presence: Mapping[str, Any] | None = None,
    ) -> bool | None:
        """Add ``channel`` to ``group``. With ``since`` (a position a message of the
        group carried under ``"__position__"``), first replay to ``channel`` every
        retained message after it, in order, then live ones: returns True when the
        replay is complete, False when some messages after ``since`` are gone.
        ``presence``: see :meth:`StreamlayerLayer.group_add`."""
        if since is None or not self.history.length_for(self.check_group(group)):
            # No replay asked, or nothing retained to replay (answered incomplete).
            return await super().group_add(group, channel, since, presence)
        position = Position.parse(since)
        self.check_channel(channel)
        record = None if presence is None else self.presence_book.record(channel, presence)
        complete = await self.history.join(group, channel, position)
        self.note_membership(group, channel, joined=True)
        if record is not None:
            await self.presence_book.join(group, channel, record)
        return complete

    @sync_aware
    async def group_history(
        self, group: str, since: str | Position | None = None, limit: int = 100
    ) -> HistoryPage:
        """Retained messages of ``group``: the latest ``limit`` ones, or with ``since``
        the first ``limit`` after that position; oldest first, each with its position.
        A group matching no ``group_history`` pattern answers an empty, incomplete
        page (logged once per group: a pattern typo shows)."""
        if not self.history.length_for(self.check_group(group)):
            return await super().group_history(group, since, limit)
        position = self.check_history_read(group, since, limit)
        return await self.history.read(group, position, limit)

    def why_no_history(self, group: str) -> str:
        if not any(length for _, length in self.config.group_history):
            return "group_history is not set in the layer's config"
        return "its name matches no pattern of group_history in the layer's config"

    async def group_send_batch(self, group: str, messages: list[dict[str, Any]]) -> None:
        """A group with history first records the messages there (in the same round
        trip that reads the members), and the members receive each with its position."""
        length = self.history.length_for(group)
        if not length:
            await super().group_send_batch(group, messages)
            return
        messages = [{k: v for k, v in m.items() if k != POSITION_KEY} for m in messages]
        batch = Batch([self.serialize(message) for message in messages])
        published = await self.history.publish(group, batch, length)
        members = published.members
        batch.positions = published.positions
        full = await self.append_to_members(group, members, batch) if members else 0
        self.count_group_send(group, len(members) * len(batch), full)

    async def send_to_known(
        self, group: str, known: KnownMembers[list[_Scope]], messages: list[dict[str, Any]]
    ) -> int | list[str]:
        """STREAM_GROUP_SEND_KNOWN: check ``known`` are the members and append to their
        streams in one script (one server: the plan has one scope at most).

        Every attempt checks the members, a retry too: when a first attempt whose
        reply was lost did not land, the members may have changed since (Redis came
        back without a member that left). Members that changed after an attempt that
        may have landed are answered with a :class:`_Replan` carrying that attempt's
        dedup tags and serialized batch, so the second trip finds what it appended
        instead of appending it twice."""
        batch = Batch([self.serialize(message) for message in messages])
        keys = self.membership_keys(group)
        args: list[Any] = [time.time() - self.group_expiry, known.digest, *batch.args()]
        tags: dict[str, str] = {}
        for _shard, destinations, records in self._tagged(self.known_plan(known), tags):
            keys += destinations
            args += records
        args.append(group)
        shard = self.connections.shard_for(group)
        what = f"group_send to {group!r}"
        call = self.script_call(
            STREAM_GROUP_SEND_KNOWN, shard, keys, self._appending(args), idempotent=True
        )
        outcome = known_send_outcome(await self.with_retry(what, call))
        if isinstance(outcome, list):
            # The second trip sends the batch serialized here (not again: encryption
            # is the costly part), with this attempt's tags only if it may have landed.
            return _Replan(outcome, tags if call.attempts > 1 else None, batch)
        return outcome

    async def send_to_members(
        self, group: str, members: list[str], messages: list[dict[str, Any]]
    ) -> int:
        batch = members.batch if isinstance(members, _Replan) else None
        if batch is None:
            batch = Batch([self.serialize(message) for message in messages])
        return await self.append_to_members(group, members, batch)

    async def append_to_members(self, group: str, members: list[str], batch: Batch) -> int:
        """One STREAM_APPEND per shard (per slot on a Redis Cluster), each stream
        taking the batch once; returns how many (member, message) pairs were full."""
        what = f"group_send to {group!r}"
        tags = members.tags if isinstance(members, _Replan) else None
        head = batch.args()
        calls = [
            self.append(
                what, STREAM_APPEND, shard, keys, [*head, *records, group],
                maybe_landed=tags is not None,
            )
            for shard, keys, records in self._plan_group_send(members, tags)
        ]  # fmt: skip
        # One shard (the usual case) needs no task of its own: gather would make one.
        results = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
        return sum(int(r) for r in results)

    def _plan_group_send(
        self, members: Iterable[str], tags: dict[str, str] | None = None
    ) -> list[tuple[int, list[str], list[Any]]]:
        """Per shard (and per hash slot on a Redis Cluster): the destination keys (each
        stream and its side key) and the script's records for them (see ``append_all``
        in :mod:`streamlayer.scripts`). Local channels of one process share one entry
        per message in its inbox, which names those with room. ``tags``: the dedup tag
        of each destination stream, kept (and reused) there."""
        return self._tagged(self.plan_for(members), tags)

    def plan_for(self, members: Iterable[str]) -> list[_Scope]:
        """``members`` sorted into destinations, per shard and slot: each stream and its
        side key, and its record without the dedup tag (channels, capacity, expiry)."""
        inboxes: dict[str, list[str]] = {}
        by_scope: dict[tuple[int, int], _Scope] = {}

        def add(shard: int, key: str, side: str, record: list[Any]) -> None:
            _, keys, records = by_scope.setdefault(
                self.connections.script_scope(shard, key), (shard, [], [])
            )
            keys += (key, side)
            records.append(record)

        process_of = self._process_of
        for channel in members:
            if "!" in channel:
                process_id = process_of.get(channel)
                if process_id is None:
                    process_id = process_of.remember(channel, process_id_of(channel))
                inboxes.setdefault(process_id, []).append(channel)
            else:
                key = stream_channel_key(self.prefix, channel)
                side = stream_delivered_key(self.prefix, channel)
                capacity, expiry = self.get_capacity(channel), self.expiry_ms(channel)
                add(self._shard(channel), key, side, ["", capacity, expiry])
        for process_id, channels in inboxes.items():
            # Comma-joined, not one argument each: a process with hundreds of members
            # would otherwise cost the client hundreds of arguments to encode per send.
            capacities = {self.get_capacity(channel) for channel in channels}
            if len(capacities) == 1:
                caps = str(capacities.pop())
            else:
                caps = ",".join(str(self.get_capacity(channel)) for channel in channels)
            key = stream_inbox_key(self.prefix, process_id)
            record = [",".join(channels), caps, self._inbox_expiry_ms]
            side = stream_inbox_state_key(self.prefix, process_id)
            add(self._shard(process_id), key, side, record)
        return list(by_scope.values())

    def _tagged(
        self, plan: list[_Scope], tags: dict[str, str] | None
    ) -> list[tuple[int, list[str], list[Any]]]:
        """``plan`` with a dedup tag before each destination's record: a new one, or
        the one ``tags`` keeps for its stream (kept there when new)."""
        tagged = []
        for shard, keys, records in plan:
            flat: list[Any] = []
            for key, record in zip(keys[::2], records, strict=True):
                tag = None if tags is None else tags.get(key)
                if tag is None:
                    tag = self.new_tag()
                    if tags is not None:
                        tags[key] = tag
                flat += (tag, *record)
            tagged.append((shard, keys, flat))
        return tagged

    # --- flush and close ------------------------------------------------------------------

    @sync_aware_on_loop
    async def flush(self) -> None:
        """Delete every key of this layer's prefix on every shard, and drop local state."""
        await self._stop_reader(LayerClosed("the channel layer was flushed"))
        self.local.clear()
        self.normal.clear()
        self.inbox.reset()
        self.presence_book.clear()
        await self.delete_matching(scan_pattern(f"{self.prefix}:s:"))
        await self.connections.close(sync_clients=False)

    @sync_aware_on_loop
    async def close(self) -> None:
        """Stop the inbox reader and close this event loop's connections.

        Nothing is lost: unread inbox entries stay in Redis (until they expire), and
        unacknowledged normal-channel entries go to another consumer after ``claim_after``.
        """
        await self._stop_reader(LayerClosed("the channel layer was closed"))
        await super().close()

    async def _stop_reader(self, error: BaseException) -> None:
        """Stop this event loop's inbox reader and normal-channel fetches.

        Entries a stopped fetch already holds stay held (a later receive hands
        them out); those it read without a reply are found again in Redis.
        """
        self.local.fail(error)
        loop = asyncio.get_running_loop()
        await self.inbox.stop(loop)
        await self.normal.stop_fetches(loop)
        await self.presence_book.stop(loop)


class _Replan(list[str]):
    """A group's members now, answered to a one-trip group send whose members changed,
    with its serialized batch and, when its attempt may have landed before they
    changed, that attempt's dedup tag per destination stream: the second trip reuses
    them, so it finds what the attempt appended (the same bytes under the same tags)."""

    def __init__(self, members: list[str], tags: dict[str, str] | None, batch: Batch) -> None:
        super().__init__(members)
        self.tags = tags
        self.batch = batch
