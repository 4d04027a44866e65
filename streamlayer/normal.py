"""Normal channels of :class:`~streamlayer.streams.StreamsChannelLayer`.

A normal channel (a name without ``!``, such as a worker's ``"thumbnails"``) is
a stream read through one consumer group, ``streamlayer``; each receiving
process is a consumer named by its process id. So several workers share a
channel's messages, each message going to one of them.

An entry is acknowledged and deleted only when ``receive()`` hands it over
(``STREAM_ACK``, which also remembers the entry's dedup tag so a retried send
cannot deliver it twice). What a receive read and could not hand over (it was
cancelled, the connection broke mid-read) stays pending for our consumer and is
read again first; what a crashed worker left pending is taken over with
XAUTOCLAIM after ``claim_after`` seconds. A stream that vanished with its group
(expired, flushed, Redis restarted empty) is joined again on every read path.

Each channel has one fetch at a time, a task of its own that receives await
through a shield: cancelling a receive never interrupts a Redis read halfway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

from redis.exceptions import ResponseError

from .base import RESERVED_KEY
from .cancellation import CancelGuard
from .entries import Entry, RecentTags, as_bytes, group_position, sent_ms, stream_entries
from .history import POSITION_KEY, position_tag
from .host import LayerHost
from .keys import stream_channel_key, stream_delivered_key
from .reader import BLOCK_SECONDS, reusable_task
from .scripts import STREAM_ACK, STREAM_FORGET_CONSUMER, STREAM_JOIN_CONSUMERS

__all__ = ["CONSUMER_GROUP", "NormalChannels"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The consumer group every process joins on a normal channel's stream.
CONSUMER_GROUP = "streamlayer"
_CLAIM_BATCH = 16
#: How many handed-over entries each normal channel remembers; a failover forgets at
#: most what the last replication lag held, far fewer than this.
_DELIVERED_MEMORY = 4096


class NormalHost(LayerHost, Protocol):
    """What the normal channels need of their layer beyond any helper's."""

    @property
    def key_ttl_ms(self) -> int: ...

    @property
    def delivered_keep_ms(self) -> int: ...


@dataclass
class _Channel:
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
    #: Dedup tags of the entries this process handed over lately. Redis replicates
    #: asynchronously, so a failover can forget what this process did in the master's
    #: last milliseconds: an acknowledgement (the entry comes back, unread or pending to
    #: us) or a send whose first attempt we delivered (the sender's retry, not finding
    #: it, appends it again). Either copy carries the tag of the one delivered, and
    #: only this process still knows it was.
    delivered: RecentTags = field(default_factory=lambda: RecentTags(_DELIVERED_MEMORY))


class NormalChannels:
    """The normal channels one layer instance receives from (one per process)."""

    def __init__(self, layer: NormalHost) -> None:
        self.layer = layer
        self._channels: dict[str, _Channel] = {}

    def __getitem__(self, channel: str) -> _Channel:
        return self._channels[channel]

    async def receive(self, channel: str) -> dict[str, Any]:
        """Hand over a held entry, or wait for the channel's one fetch to hold some.

        The fetch is a task of its own, awaited through a shield: cancelling a
        receive never interrupts a Redis read halfway, and what the fetch reads
        after the cancel is held for the next receive, in order.
        """
        state = self.state(channel)
        while True:
            if state.held:
                message = await self._hand_over(channel, state, state.held.popleft())
                if message is not None:
                    return message
                continue
            fetch = state.fetch
            if fetch is None or not reusable_task(
                fetch, f"receive() on {channel!r}", asyncio.get_running_loop()
            ):
                if fetch is not None and not fetch.done():
                    state.check_pending = True  # abandoned with its loop: it may hold entries
                fetch = state.fetch = asyncio.ensure_future(self._fetch(channel, state))
                fetch.add_done_callback(_retrieve_exception)
            await asyncio.shield(fetch)

    def state(self, channel: str) -> _Channel:
        state = self._channels.get(channel)
        if state is None:
            key = stream_channel_key(self.layer.prefix, channel)
            shard = self.layer.connections.shard_for(channel)
            state = self._channels[channel] = _Channel(key, shard)
        return state

    def clear(self) -> None:
        self._channels.clear()

    async def stop_fetches(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cancel the fetches running on ``loop``. Entries a stopped fetch already holds
        stay held (a later receive hands them out); those it read without a reply are
        found again in Redis."""
        fetches = [
            s.fetch for s in self._channels.values() if s.fetch and s.fetch.get_loop() is loop
        ]
        for fetch in fetches:
            fetch.cancel()
        await asyncio.gather(*fetches, return_exceptions=True)

    # --- reading --------------------------------------------------------------------------

    async def _fetch(self, channel: str, state: _Channel) -> None:
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
                               self.layer.process_id, channel)  # fmt: skip
                state.group_ready = False
                state.check_pending = False
            guard.check()

    async def _ensure_group(self, channel: str, state: _Channel) -> None:
        if state.group_ready:
            return
        layer = self.layer
        args = [CONSUMER_GROUP, layer.key_ttl_ms]
        what = f"join the consumers of {channel!r}"
        await layer.call_script(what, STREAM_JOIN_CONSUMERS, state.shard, [state.key], args)
        state.group_ready = True

    async def _read_new(self, channel: str, state: _Channel) -> None:
        """Wait (bounded) for one new entry and hold it; our consumer now owns it."""
        layer = self.layer
        block = layer.connections.block_timeout(state.shard, BLOCK_SECONDS)

        def lost_reply(error: BaseException) -> None:
            # The server may have delivered an entry whose reply never reached us: it
            # sits in our pending list, and goes out first, before anything newer.
            state.check_pending = True

        async def read() -> list[Entry]:
            if state.check_pending:
                await self._collect_own_pending(state)
                if state.held:
                    return []
            client = layer.connections.client(state.shard)
            response = await client.xreadgroup(
                CONSUMER_GROUP,
                layer.process_id,
                {state.key: ">"},
                count=1,
                block=int(block * 1000),
            )
            return stream_entries(response)

        try:
            entries = await layer.with_retry(f"receive on {channel!r}", read, on_error=lost_reply)
        except asyncio.CancelledError:
            lost_reply(asyncio.CancelledError())
            raise
        _hold(state, entries)

    async def _collect_own_pending(self, state: _Channel) -> None:
        """Move entries our consumer owns but nobody received into ``held``, oldest first."""
        client = self.layer.connections.client(state.shard)
        response = await client.xreadgroup(
            CONSUMER_GROUP, self.layer.process_id, {state.key: "0"}, count=_CLAIM_BATCH
        )
        _hold(state, stream_entries(response))
        state.check_pending = False

    async def _collect_stragglers(self, channel: str, state: _Channel) -> None:
        """Entries our consumer owns but nobody received (a receive cancelled mid-read),
        and, every ``claim_after / 2`` seconds, entries other consumers left pending for
        longer than ``claim_after`` (a crashed worker): both go to ``held``."""
        layer = self.layer
        claim_after = layer.config.claim_after_for(channel)
        if state.check_pending:
            await layer.with_retry(
                f"pending entries of {channel!r}", partial(self._collect_own_pending, state)
            )
        if time.monotonic() < state.next_claim:
            return

        async def take_over() -> list[Entry]:
            response = await layer.connections.client(state.shard).xautoclaim(
                state.key,
                CONSUMER_GROUP,
                layer.process_id,
                min_idle_time=int(claim_after * 1000),
                start_id="0-0",
                count=_CLAIM_BATCH,
            )
            return [(as_bytes(i), f or {}) for i, f in (response[1] or []) if i is not None]

        claimed = await layer.with_retry(f"claim stale entries of {channel!r}", take_over)
        layer.count("redelivered", _hold(state, claimed))
        state.next_claim = time.monotonic() + claim_after / 2
        await layer.with_retry(
            f"prune consumers of {channel!r}", partial(self._prune_consumers, state)
        )

    async def _prune_consumers(self, state: _Channel) -> None:
        """Forget consumers (processes) that are idle, own nothing, and are long gone."""
        layer = self.layer
        client = layer.connections.client(state.shard)
        try:
            consumers = await client.xinfo_consumers(state.key, CONSUMER_GROUP)
        except ResponseError:
            return  # the stream or group vanished: nothing to prune
        # A live consumer reads at least once per blocking read, which resets its idle
        # time; one that owns nothing can be forgotten safely (a later read recreates it).
        block = layer.connections.block_timeout(state.shard, BLOCK_SECONDS)
        gone_after_ms = int(max(6 * layer.config.effective_claim_after, 4 * block) * 1000)
        for consumer in consumers:
            name = consumer["name"]
            name = name.decode() if isinstance(name, bytes) else name
            if (
                name != layer.process_id
                and int(consumer["pending"]) == 0
                and int(consumer["idle"]) > gone_after_ms
            ):
                await STREAM_FORGET_CONSUMER(client, [state.key], [CONSUMER_GROUP, name])

    # --- handing over ---------------------------------------------------------------------

    async def _hand_over(
        self, channel: str, state: _Channel, entry: Entry
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
        if ours and state.delivered.seen(entry[1].get(b"i") or entry_id):
            self.layer.count("duplicates")  # a failover lost what we did with it
            return None
        return self._message(channel, entry, bool(ours))

    def _message(self, channel: str, entry: Entry, ours: bool) -> dict[str, Any] | None:
        """An acknowledged entry's message, or None when it is not for this receive."""
        layer = self.layer
        entry_id, fields = entry
        if not ours:
            layer.count("duplicates")  # another consumer took it over and delivers it
            return None
        if not fields:
            return None  # deleted while pending (trimmed as expired)
        if sent_ms(entry_id) < (time.time() - layer.get_expiry(channel)) * 1000:
            layer.count("expired")
            return None
        message = layer.try_deserialize(fields.get(b"d", b""), f"channel {channel!r}")
        if message is not None:
            message.pop(RESERVED_KEY, None)
            group, position = group_position(fields)
            if group is not None:
                message[POSITION_KEY] = position_tag(group, position)
        return message

    async def _acknowledge(
        self, channel: str, state: _Channel, entry_id: bytes, tag: bytes
    ) -> bool:
        """STREAM_ACK, retried; True when this process still owned the entry. The
        entry's tag is remembered for as long as a retried send of it may come, but
        no longer than ``expiry`` (every key of the layer vanishes within it)."""
        layer = self.layer
        keep_ms = layer.delivered_keep_ms
        ours = await layer.call_script(
            f"acknowledge on {channel!r}",
            STREAM_ACK,
            state.shard,
            [state.key, stream_delivered_key(layer.prefix, channel)],
            lambda: [CONSUMER_GROUP, layer.process_id, entry_id, tag, _now_ms(), keep_ms],
            idempotent=True,
            maybe_landed=entry_id in state.unsure_acks,
        )
        return bool(ours)


def _hold(state: _Channel, entries: list[Entry]) -> int:
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


def _retrieve_exception(fetch: asyncio.Future[None]) -> None:
    """A fetch whose receive was cancelled fails unobserved; its error is logged here,
    and the next receive starts a new fetch."""
    if not fetch.cancelled() and fetch.exception() is not None:
        logger.info("a normal-channel read failed: %r", fetch.exception())


def _group_gone(error: ResponseError) -> bool:
    """Whether a read failed because the stream or its consumer group no longer exists."""
    text = str(error)
    return "NOGROUP" in text or "no longer exists" in text


def _now_ms() -> int:
    return int(time.time() * 1000)
