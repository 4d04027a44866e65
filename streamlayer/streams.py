"""``streamlayer.StreamsChannelLayer``: the channel layer on Redis Streams.

* A **process-specific channel** (``<name>.<process id>!<local id>``) is served
  by its process's inbox stream and :class:`~streamlayer.inbox.InboxReader`.
* A **normal channel** is a stream read through one consumer group; each
  receiving process is a consumer. An entry is acknowledged and deleted when
  ``receive()`` hands it over; entries left pending by a crashed or cancelled
  reader are taken over with XAUTOCLAIM after ``claim_after`` seconds.
* A **group** is a sorted set of member channels scored by join time;
  ``group_send`` reads it (one round trip) and writes the payload once per
  destination stream, one script per shard.

A send is one script call: trim expired entries, check capacity, append (with
a dedup tag so a retry after a lost reply does not deliver twice), refresh the
TTL. See ``docs/architecture.rst`` for the full picture.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from redis.exceptions import ResponseError

from .base import RESERVED_KEY, KnownMembers, StreamlayerLayer, known_send_outcome
from .cancellation import CancelGuard
from .exceptions import LayerClosed
from .history import POSITION_KEY, HistoryPage, Position, position_tag
from .inbox import BLOCK_SECONDS, Entry, InboxReader, RecentTags, stream_entries
from .keys import (
    process_id_of,
    scan_pattern,
    stream_channel_key,
    stream_delivered_key,
    stream_group_key,
    stream_inbox_key,
    stream_inbox_state_key,
)
from .local import LocalChannels
from .reader import reusable_task
from .replay import GroupHistory
from .scripts import (
    STREAM_ACK,
    STREAM_FORGET_CONSUMER,
    STREAM_GROUP_SEND,
    STREAM_GROUP_SEND_KNOWN,
    STREAM_JOIN_CONSUMERS,
    STREAM_SEND,
    LuaScript,
)
from .sync import sync_aware, sync_aware_on_loop

__all__ = ["StreamsChannelLayer"]

logger = logging.getLogger(__name__)

#: The consumer group every process joins on a normal channel's stream.
CONSUMER_GROUP = "streamlayer"
_CLAIM_BATCH = 16
#: Seconds beyond retry_timeout a delivered tag is kept (a retry's last attempt in flight).
_RETRY_SLACK = 5.0
#: How many channel -> process id lookups group_send remembers.
_PROCESS_MEMO = 100_000


@dataclass
class InboxPosition:
    """Where this process is in its inbox; outlives any one reader task."""

    last_id: str = "0-0"
    written_cursor: str | None = None
    #: The last value sent to the cursor, landed or not (its reply may be lost).
    attempted_cursor: str | None = None
    cursor_written_at: float = 0.0
    trimmed_to: str | None = None


@dataclass
class _NormalChannel:
    """This process's bookkeeping for one normal channel it receives from."""

    key: str
    shard: int
    group_ready: bool = False
    #: Entries read from Redis but not yet acknowledged (skipped when re-reading pending ones).
    in_flight: set[bytes] = field(default_factory=set)
    #: Entries taken over or found pending, to hand out before reading new ones.
    held: deque[Entry] = field(default_factory=deque)
    #: Set when a read lost its reply: our consumer may own entries nobody received.
    check_pending: bool = True
    next_claim: float = 0.0
    #: The one read in progress for this channel; receives await it through a shield.
    fetch: asyncio.Future[None] | None = None
    #: Acknowledgements still in flight after their receive was cancelled, by entry id.
    acks: dict[bytes, asyncio.Future[bool]] = field(default_factory=dict)
    #: Entries whose last acknowledgement failed: it may have landed without a reply.
    unsure_acks: set[bytes] = field(default_factory=set)


class StreamsChannelLayer(StreamlayerLayer):
    """Channel layer on Redis Streams: nothing lost on a reconnect, one round trip per send."""

    supports_cluster = True
    #: A channel's unreceived messages are counted where the sender sees them, and a
    #: stall of a few seconds (a fork for BGSAVE, an fsync, a failover) lands as one
    #: burst: 1,000 absorbs a 6 s stall at 160 deliveries/s per channel (see
    #: docs/operations.rst for the bound and its memory cost).
    default_capacity = 1000

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        #: 64 random bits name this layer instance: its inbox, its consumer name on
        #: normal channels, the middle of its channel names. Short on purpose: a
        #: group_send to local members carries every member's name.
        self.process_id = secrets.token_hex(8)
        self._tag_numbers = itertools.count()
        self._channel_numbers = itertools.count(1)
        #: Destination of each process-specific channel seen in a group (bounded memo).
        self._process_of: dict[str, str] = {}
        self.position = InboxPosition()
        self.local = LocalChannels(self.count)
        self._reader: InboxReader | None = None
        self._normal: dict[str, _NormalChannel] = {}
        self._recent = RecentTags()
        self.history = GroupHistory(self)
        #: How long STREAM_ACK keeps a delivered tag: a retried send's window, within expiry.
        window = min(self.config.retry_timeout + _RETRY_SLACK, self.config.expiry)
        self._delivered_keep_ms = max(1000, math.ceil(window * 1000))

    def after_fork(self) -> None:
        """A new identity for the child: inbox, consumer name, channel names, dedup tags."""
        super().after_fork()
        self.process_id = secrets.token_hex(8)
        self._tag_numbers = itertools.count()
        self._channel_numbers = itertools.count(1)
        self._process_of = {}
        self.position = InboxPosition()
        self.local = LocalChannels(self.count)
        self._reader = None
        self._normal = {}
        self._recent = RecentTags()
        self.history = GroupHistory(self)

    def new_tag(self) -> str:
        """A dedup tag no other send of any process uses: this layer's random id and a
        counter (cheaper than fresh random bytes per message)."""
        return f"{self.process_id}{next(self._tag_numbers):x}"

    @property
    def key_ttl_ms(self) -> int:
        """TTL of every stream key: a stream idle for ``expiry`` holds only expired entries."""
        return max(1000, math.ceil(self.config.expiry * 1000))

    @property
    def claim_after(self) -> float:
        return self.config.effective_claim_after

    def _min_id(self) -> str:
        """Entries older than this have expired (stream ids start with milliseconds)."""
        return f"{max(0, int((time.time() - self.config.expiry) * 1000))}-0"

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
        key, side, shard = self.destination(channel)
        keys = [key, side]
        capacity = self.get_capacity(channel)
        local = channel if "!" in channel else ""
        args = [self.serialize(message), self.new_tag(), capacity, local]
        stored = await self.append(f"send to {channel!r}", STREAM_SEND, shard, keys, args)
        self.count_send(channel, stored is not None, capacity)

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
        attempts: list[int] | None = None,
    ) -> Any:
        """Call an appending script (STREAM_SEND, STREAM_GROUP_SEND): its arguments end
        with the expiry cutoff and key TTL of the moment of each attempt. ``attempts``
        (a one-item list) is told how many attempts it took."""

        def tail() -> list[Any]:
            if attempts is not None:
                attempts[0] += 1
            return [*args, self._min_id(), self.key_ttl_ms]

        return await self.idempotent(what, script, shard, keys, tail, maybe_landed=maybe_landed)

    async def idempotent(
        self,
        what: str,
        script: LuaScript,
        shard: int,
        keys: list[str],
        args: Callable[[], list[Any]],
        *,
        maybe_landed: bool = False,
        extra: Callable[[], list[Any]] | None = None,
    ) -> Any:
        """Call a script whose last argument says whether an earlier attempt may have
        landed without its reply ('1'): attempts after the first, or every attempt when
        ``maybe_landed``. The script then looks for that attempt's effect instead of
        repeating it, so a retried send is stored once and a retried ack counts once."""

        async def call(retrying: bool) -> Any:
            tail = extra() if extra is not None else []
            return await self.connections.batcher(shard).call(
                script, keys, [*args(), "1" if retrying else "0", *tail]
            )

        return await self.with_retry_flag(what, call, maybe_landed=maybe_landed)

    # --- process-specific channels ------------------------------------------------------

    def owns(self, channel: str) -> bool:
        return process_id_of(channel) == self.process_id

    def _prepare_local(self, channel: str) -> None:
        self.local.touch(channel)
        reader = self._reader
        running = reusable_task(
            reader.task if reader else None, "receive() on process-specific channels"
        )
        if not running and not self.local.has_queued(channel):
            # The task first runs after local.get() has registered this receiver.
            self._reader = InboxReader(self)

    def dispatch_inbox(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Decode one inbox entry and hand it to the local channels it names (counted:
        their backlogs are reported to senders)."""
        listed = fields.get(b"c")
        channels = listed.decode().split(",") if listed else []
        if not channels:
            self.stats.count("decode_errors")
            logger.warning("skipped an inbox entry that names no channel: %r", entry_id)
            return
        sent_ms = int(entry_id.split(b"-", 1)[0])
        if sent_ms < (time.time() - self.config.expiry) * 1000:
            self.stats.count("expired", len(channels))
            return
        if self._recent.seen(fields.get(b"i", entry_id)):
            self.stats.count("duplicates")
            return
        message = self.try_deserialize(fields.get(b"d", b""), "the process inbox")
        if message is None:
            return
        deadline = sent_ms / 1000 + self.config.expiry
        group, position = _group_position(fields)
        for channel in channels:
            copy = dict(message) if len(channels) > 1 else message
            if group is None:
                self.local.deliver(channel, copy, deadline, counted=True)
                continue
            copy[POSITION_KEY] = position_tag(group, position)
            if not self.history.hold(channel, group, position, copy, deadline):
                self.local.deliver(channel, copy, deadline, counted=True)

    # --- normal channels ------------------------------------------------------------------

    async def _receive_normal(self, channel: str) -> dict[str, Any]:
        """Hand over a held entry, or wait for the channel's one fetch to hold some.

        The fetch is a task of its own, awaited through a shield: cancelling a
        receive never interrupts a Redis read halfway, and what the fetch reads
        after the cancel is held for the next receive, in order.
        """
        state = self._normal_state(channel)
        while True:
            if state.held:
                message = await self._hand_over(channel, state, state.held.popleft())
                if message is not None:
                    return message
                continue
            fetch = state.fetch
            if fetch is None or not reusable_task(fetch, f"receive() on {channel!r}"):
                if fetch is not None and not fetch.done():
                    state.check_pending = True  # abandoned with its loop: it may hold entries
                fetch = state.fetch = asyncio.ensure_future(self._fetch(channel, state))
                fetch.add_done_callback(_retrieve_exception)
            await asyncio.shield(fetch)

    def _normal_state(self, channel: str) -> _NormalChannel:
        state = self._normal.get(channel)
        if state is None:
            key = stream_channel_key(self.prefix, channel)
            state = self._normal[channel] = _NormalChannel(key, self._shard(channel))
        return state

    async def _fetch(self, channel: str, state: _NormalChannel) -> None:
        """Read until at least one entry of ``channel`` is held."""
        guard = CancelGuard()
        while not state.held:
            try:
                await self._ensure_group(channel, state)
                if state.check_pending or time.monotonic() >= state.next_claim:
                    await self._collect_stragglers(channel, state)
                if not state.held:
                    await self._read_new(channel, state)
            except ResponseError as exc:
                if not _group_gone(exc):
                    raise
                # The stream vanished with its consumer group (it expired, was flushed,
                # Redis came back empty): on any read path, join again and read on.
                logger.warning("%s: the consumer group of %r is gone; joining again",
                               self.process_id, channel)  # fmt: skip
                state.group_ready = False
                state.check_pending = False
            guard.check()

    async def _ensure_group(self, channel: str, state: _NormalChannel) -> None:
        if state.group_ready:
            return

        async def create() -> None:
            client = self.connections.client(state.shard)
            await STREAM_JOIN_CONSUMERS(client, [state.key], [CONSUMER_GROUP, self.key_ttl_ms])

        await self.with_retry(f"join the consumers of {channel!r}", create)
        state.group_ready = True

    async def _read_new(self, channel: str, state: _NormalChannel) -> None:
        """Wait (bounded) for one new entry and hold it; our consumer now owns it."""
        block = self.connections.block_timeout(state.shard, BLOCK_SECONDS)

        def lost_reply(error: BaseException) -> None:
            # The server may have delivered an entry whose reply never reached us: it
            # sits in our pending list, and goes out first, before anything newer.
            state.check_pending = True

        async def read() -> list[Entry]:
            if state.check_pending:
                await self._collect_own_pending(state)
                if state.held:
                    return []
            client = self.connections.client(state.shard)
            response = await client.xreadgroup(
                CONSUMER_GROUP,
                self.process_id,
                {state.key: ">"},
                count=1,
                block=int(block * 1000),
            )
            return stream_entries(response)

        try:
            entries = await self.with_retry(f"receive on {channel!r}", read, on_error=lost_reply)
        except asyncio.CancelledError:
            lost_reply(asyncio.CancelledError())
            raise
        self._hold(state, entries)

    async def _collect_own_pending(self, state: _NormalChannel) -> None:
        """Move entries our consumer owns but nobody received into ``held``, oldest first."""
        client = self.connections.client(state.shard)
        response = await client.xreadgroup(
            CONSUMER_GROUP, self.process_id, {state.key: "0"}, count=_CLAIM_BATCH
        )
        self._hold(state, stream_entries(response))
        state.check_pending = False

    def _hold(self, state: _NormalChannel, entries: list[Entry]) -> int:
        """Queue entries not already on their way to a receive; returns how many."""
        known = state.in_flight | {entry_id for entry_id, _ in state.held}
        added = 0
        for entry_id, fields in entries:
            if entry_id not in known:
                known.add(entry_id)
                state.in_flight.add(entry_id)
                state.held.append((entry_id, fields))
                added += 1
        return added

    async def _collect_stragglers(self, channel: str, state: _NormalChannel) -> None:
        """Entries our consumer owns but nobody received (a receive cancelled mid-read),
        and, every ``claim_after / 2`` seconds, entries other consumers left pending for
        longer than ``claim_after`` (a crashed worker): both go to ``held``."""
        if state.check_pending:
            await self.with_retry(
                f"pending entries of {channel!r}", partial(self._collect_own_pending, state)
            )
        if time.monotonic() < state.next_claim:
            return

        async def take_over() -> list[Entry]:
            response = await self.connections.client(state.shard).xautoclaim(
                state.key,
                CONSUMER_GROUP,
                self.process_id,
                min_idle_time=int(self.claim_after * 1000),
                start_id="0-0",
                count=_CLAIM_BATCH,
            )
            return [(_bytes(i), f or {}) for i, f in (response[1] or []) if i is not None]

        claimed = await self.with_retry(f"claim stale entries of {channel!r}", take_over)
        self.stats.count("redelivered", self._hold(state, claimed))
        state.next_claim = time.monotonic() + self.claim_after / 2
        await self.with_retry(
            f"prune consumers of {channel!r}", partial(self._prune_consumers, state)
        )

    async def _prune_consumers(self, state: _NormalChannel) -> None:
        """Forget consumers (processes) that are idle, own nothing, and are long gone."""
        client = self.connections.client(state.shard)
        try:
            consumers = await client.xinfo_consumers(state.key, CONSUMER_GROUP)
        except ResponseError:
            return  # the stream or group vanished: nothing to prune
        # A live consumer reads at least once per blocking read, which resets its idle
        # time; one that owns nothing can be forgotten safely (a later read recreates it).
        block = self.connections.block_timeout(state.shard, BLOCK_SECONDS)
        gone_after_ms = int(max(6 * self.claim_after, 4 * block) * 1000)
        for consumer in consumers:
            name = consumer["name"]
            name = name.decode() if isinstance(name, bytes) else name
            if (
                name != self.process_id
                and int(consumer["pending"]) == 0
                and int(consumer["idle"]) > gone_after_ms
            ):
                await STREAM_FORGET_CONSUMER(client, [state.key], [CONSUMER_GROUP, name])

    async def _hand_over(
        self, channel: str, state: _NormalChannel, entry: Entry
    ) -> dict[str, Any] | None:
        """Acknowledge and delete ``entry``, then return its message (None: skip it).

        The acknowledgement runs shielded: a receive cancelled meanwhile puts the
        entry back at the head of ``held``, and the next receive awaits the same
        acknowledgement instead of sending another.
        """
        entry_id, fields = entry
        ack = state.acks.get(entry_id)
        if ack is None:
            tag = fields.get(b"i", b"")
            ack = asyncio.ensure_future(self._acknowledge(channel, state, entry_id, tag))
            state.acks[entry_id] = ack
        try:
            ours = await asyncio.shield(ack)
        except asyncio.CancelledError:
            state.held.appendleft(entry)  # its acknowledgement stays in state.acks
            raise
        except Exception:
            # Redis stayed away: the entry goes back, and the next attempt allows for
            # this one having landed without its reply.
            del state.acks[entry_id]
            state.held.appendleft(entry)
            state.unsure_acks.add(entry_id)
            raise
        del state.acks[entry_id]
        state.unsure_acks.discard(entry_id)
        state.in_flight.discard(entry_id)
        if not ours:
            self.stats.count("duplicates")  # another consumer took it over and delivers it
            return None
        if not fields:
            return None  # deleted while pending (trimmed as expired)
        if int(entry_id.split(b"-", 1)[0]) < (time.time() - self.config.expiry) * 1000:
            self.stats.count("expired")
            return None
        message = self.try_deserialize(fields.get(b"d", b""), f"channel {channel!r}")
        if message is not None:
            message.pop(RESERVED_KEY, None)
            group, position = _group_position(fields)
            if group is not None:
                message[POSITION_KEY] = position_tag(group, position)
        return message

    async def _acknowledge(
        self, channel: str, state: _NormalChannel, entry_id: bytes, tag: bytes
    ) -> bool:
        """STREAM_ACK, retried; True when this process still owned the entry. The
        entry's tag is remembered for as long as a retried send of it may come, but
        no longer than ``expiry`` (every key of the layer vanishes within it)."""
        keep_ms = self._delivered_keep_ms
        ours = await self.idempotent(
            f"acknowledge on {channel!r}",
            STREAM_ACK,
            state.shard,
            [state.key, stream_delivered_key(self.prefix, channel)],
            lambda: [CONSUMER_GROUP, self.process_id, entry_id],
            maybe_landed=entry_id in state.unsure_acks,
            extra=lambda: [tag, int(time.time() * 1000), keep_ms],
        )
        return bool(ours)

    # --- groups ---------------------------------------------------------------------------

    def group_key(self, group: str) -> str:
        return stream_group_key(self.prefix, group)

    @sync_aware
    async def group_add(
        self, group: str, channel: str, since: str | Position | None = None
    ) -> bool | None:
        """Add ``channel`` to ``group``. With ``since`` (a position a message of the
        group carried under ``"__position__"``), first replay to ``channel`` every
        retained message after it, in order, then live ones: returns True when the
        replay is complete, False when some messages after ``since`` are gone."""
        if since is None or not self.history.length_for(self.check_group(group)):
            # No replay asked, or nothing retained to replay (answered incomplete).
            return await super().group_add(group, channel, since)
        position = Position.parse(since)
        self.check_channel(channel)
        complete = await self.history.join(group, channel, position)
        self.note_membership(group, channel, joined=True)
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

    @sync_aware
    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Send ``message`` to every member of ``group``. A group with history first
        records it there (in the same round trip that reads the members) and the
        members receive it with its position."""
        length = self.history.length_for(self.check_group(group))
        if not length:
            await super().group_send(group, message)
            return
        self.check_message(message)
        message = {k: v for k, v in message.items() if k != POSITION_KEY}
        published = await self.history.publish(group, message, length)
        members = published.members
        full = (
            await self.send_to_members(group, members, message, published.position)
            if members
            else 0
        )
        self.count_group_send(group, len(members), full)

    async def send_to_known(
        self, group: str, known: KnownMembers, message: dict[str, Any]
    ) -> int | list[str]:
        """STREAM_GROUP_SEND_KNOWN: check ``known`` are the members and append to their
        streams in one script (one server: the plan has one scope at most).

        Every attempt checks the members, a retry too: when a first attempt whose
        reply was lost did not land, the members may have changed since (Redis came
        back without a member that left). Members that changed after an attempt that
        may have landed are answered with a :class:`_Replan` carrying that attempt's
        dedup tags, so the second trip finds what it appended instead of appending
        it twice."""
        keys: list[str] = [self.group_key(group)]
        args: list[Any] = [time.time() - self.group_expiry, known.digest]
        tags: dict[str, str] = {}
        for _shard, destinations, records in self._plan_group_send(known, message, tags):
            keys += destinations
            args += records
        args += [group, ""]
        shard = self.connections.shard_for(group)
        what = f"group_send to {group!r}"
        attempts = [0]
        reply = await self.append(
            what, STREAM_GROUP_SEND_KNOWN, shard, keys, args, attempts=attempts
        )
        outcome = known_send_outcome(reply)
        if isinstance(outcome, list) and attempts[0] > 1:
            return _Replan(outcome, tags)
        return outcome

    async def send_to_members(
        self, group: str, members: list[str], message: dict[str, Any], position: str = ""
    ) -> int:
        """One entry per destination stream, one STREAM_GROUP_SEND per shard (per slot
        on a Redis Cluster); returns how many member channels were full."""
        what = f"group_send to {group!r}"
        tags = members.tags if isinstance(members, _Replan) else None
        calls = [
            self.append(
                what,
                STREAM_GROUP_SEND,
                shard,
                keys,
                [*args, group, position],
                maybe_landed=tags is not None,
            )
            for shard, keys, args in self._plan_group_send(members, message, tags)
        ]
        # One shard (the usual case) needs no task of its own: gather would make one.
        results = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
        return sum(int(r) for r in results)

    def _plan_group_send(
        self,
        members: Iterable[str],
        message: dict[str, Any],
        tags: dict[str, str] | None = None,
    ) -> list[tuple[int, list[str], list[Any]]]:
        """Per shard (and per hash slot on a Redis Cluster): the destination keys (each
        stream and its side key) and the script's records (see ``append_all`` in
        :mod:`streamlayer.scripts`). The message is serialized once for every
        destination; local channels of one process share one entry in its inbox, which
        names those with room. ``tags``: the dedup tag of each destination stream, kept
        (and reused) there."""
        inboxes: dict[str, list[str]] = {}

        def tag_for(key: str) -> str:
            if tags is None:
                return self.new_tag()
            tag = tags.get(key)
            if tag is None:
                tag = tags[key] = self.new_tag()
            return tag

        by_scope: dict[tuple[int, int], tuple[list[str], list[Any]]] = {}
        data = self.serialize(message)

        def add(shard: int, key: str, side: str, record: list[Any]) -> None:
            keys, records = by_scope.setdefault(
                self.connections.script_scope(shard, key), ([], [])
            )
            keys += (key, side)
            records += record

        process_of = self._process_of
        if len(process_of) > _PROCESS_MEMO:
            process_of.clear()
        for channel in members:
            if "!" in channel:
                process_id = process_of.get(channel)
                if process_id is None:
                    process_id = process_of[channel] = process_id_of(channel)
                inboxes.setdefault(process_id, []).append(channel)
            else:
                key = stream_channel_key(self.prefix, channel)
                side = stream_delivered_key(self.prefix, channel)
                record = [data, tag_for(key), "", self.get_capacity(channel)]
                add(self._shard(channel), key, side, record)
        for process_id, channels in inboxes.items():
            # Comma-joined, not one argument each: a process with hundreds of members
            # would otherwise cost the client hundreds of arguments to encode per send.
            capacities = {self.get_capacity(channel) for channel in channels}
            if len(capacities) == 1:
                caps = str(capacities.pop())
            else:
                caps = ",".join(str(self.get_capacity(channel)) for channel in channels)
            key = stream_inbox_key(self.prefix, process_id)
            record = [data, tag_for(key), ",".join(channels), caps]
            side = stream_inbox_state_key(self.prefix, process_id)
            add(self._shard(process_id), key, side, record)
        return [(shard, keys, records) for (shard, _slot), (keys, records) in by_scope.items()]

    # --- flush and close ------------------------------------------------------------------

    @sync_aware_on_loop
    async def flush(self) -> None:
        """Delete every key of this layer's prefix on every shard, and drop local state."""
        await self._stop_reader(LayerClosed("the channel layer was flushed"))
        self.local.clear()
        self._normal.clear()
        self.position = InboxPosition()
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
        reader, self._reader = self._reader, None
        if reader is not None and reader.loop is loop:
            await reader.stop()
        fetches = [
            s.fetch for s in self._normal.values() if s.fetch and s.fetch.get_loop() is loop
        ]
        for fetch in fetches:
            fetch.cancel()
        await asyncio.gather(*fetches, return_exceptions=True)


class _Replan(list[str]):
    """A group's members now, answered to a one-trip group send whose attempt may
    have landed before they changed, with that attempt's dedup tag per destination
    stream: the second trip reuses them, so it finds what the attempt appended."""

    def __init__(self, members: list[str], tags: dict[str, str]) -> None:
        super().__init__(members)
        self.tags = tags


def _retrieve_exception(fetch: asyncio.Future[None]) -> None:
    """A fetch whose receive was cancelled fails unobserved; its error is logged here,
    and the next receive starts a new fetch."""
    if not fetch.cancelled() and fetch.exception() is not None:
        logger.info("a normal-channel read failed: %r", fetch.exception())


def _group_gone(error: ResponseError) -> bool:
    """Whether a read failed because the stream or its consumer group no longer exists."""
    text = str(error)
    return "NOGROUP" in text or "no longer exists" in text


def _group_position(fields: dict[bytes, bytes]) -> tuple[str | None, str]:
    """The group and position an entry's fields carry (None: not a group message with
    history)."""
    group = fields.get(b"g")
    if group is None:
        return None, ""
    return group.decode(), fields.get(b"p", b"").decode()


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
