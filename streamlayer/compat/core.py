"""The classic sorted-set channel layer, wire-compatible with ``channels_redis.core`` 4.x.

Same keys, same bytes, same sharding as the incumbent (see :mod:`streamlayer.keys`),
so old and new processes can share one Redis during a migration. What changes
is everything that does not show on the wire:

* a send is one round trip (one script: trim expired, check capacity, add, set TTL)
  instead of four;
* a normal-channel receive is one blocking pop; a cancelled receive parks the
  message it was fetching for the next receive instead of losing it;
* process-specific channels are read by one background reader per inbox that
  pops in batches and hands messages to local queues, so ``receive()`` is a
  plain await;
* transient connection errors are retried (one policy, ``retry_timeout``
  seconds) inside send, receive and group_send;
* messages older than ``expiry`` are never handed out, even when read late.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from ..base import RESERVED_KEY
from ..cancellation import CancelGuard
from ..exceptions import LayerClosed
from ..keys import (
    classic_alive_key,
    classic_backup_key,
    classic_channel_key,
    classic_group_key,
    classic_presence_key,
    classic_presence_live_key,
    non_local_name,
    scan_pattern,
)
from ..local import LocalChannels
from ..reader import BLOCK_SECONDS, BackgroundReader, let_woken_run, reusable_task
from ..retry import is_out_of_memory
from ..scripts import (
    CLASSIC_GROUP_SEND,
    CLASSIC_GROUP_SEND_KNOWN,
    CLASSIC_RESTORE_BACKUP,
    CLASSIC_SEND,
)
from ..stored import KnownMembers, StoredLayer, known_send_outcome, sorted_digest
from ..sync import sync_aware, sync_aware_on_loop

__all__ = ["RedisChannelLayer"]

logger = logging.getLogger(__name__)

#: How many messages the inbox reader pops per round trip when its inbox is busy.
READ_BATCH = 256
#: Seconds between refreshes of an inbox's alive mark (its TTL is far longer).
_MARK_EVERY = 60.0


@dataclass
class _Popped:
    """A message taken off a normal channel, kept with what is needed to put it back."""

    shard: int
    key: str
    member: bytes
    score: float
    message: dict[str, Any]


@dataclass(frozen=True)
class _Destination:
    """One sorted-set key a group send adds to, and the channels it serves there (a
    process's local channels share its key)."""

    key: str
    shard: int
    capacity: int
    expiry: float
    channels: list[str]


async def _zpopmin(client: Redis, key: str, count: int) -> list[tuple[bytes, float]]:
    """ZPOPMIN, typed: (member, score) pairs, lowest score first."""
    popped = await client.zpopmin(key, count)
    return cast("list[tuple[bytes, float]]", popped)


async def _bzpopmin(client: Redis, key: str, block_seconds: float) -> tuple[bytes, float] | None:
    """BZPOPMIN on one key, typed: (member, score), or None when ``block_seconds`` passed."""
    result = await client.bzpopmin(key, timeout=block_seconds)
    if result is None:
        return None
    _key, member, score = cast("tuple[bytes, bytes, float]", result)
    return member, score


def _ttl(expiry: float) -> int:
    """A key TTL in whole seconds (EXPIRE takes integers; never 0, which deletes)."""
    return max(1, math.ceil(expiry))


def _score(now: float, index: int) -> float:
    """The score of a batch's ``index``-th message sent at ``now``: a sorted set orders
    equal scores by member, and members start with random bytes, so the messages of
    one batch get rising scores (a microsecond apart) to keep their order."""
    return now + index * 1e-6


class _InboxReader(BackgroundReader):
    """Pops one process inbox (``<prefix><name>!``) and hands messages to local channels.

    Runs in one event loop while receivers wait, and stops by itself when
    none are left; the layer starts it again on the next receive.

    A mark key of its own (:func:`~streamlayer.keys.classic_alive_key`), set at the
    start, after every lost connection and every half TTL, tells it when Redis came
    back without its data: the layer then adds its live channels to their groups
    again and says so in the reconnect notice.
    """

    def __init__(self, layer: RedisChannelLayer, inbox: str) -> None:
        self.layer = layer
        self.key = classic_channel_key(layer.prefix, inbox)
        self.alive_key = classic_alive_key(layer.prefix, inbox)
        self.shard = layer.connections.shard_for(inbox)
        #: Redis was found without our mark (sticky until reported).
        self._data_lost = False
        super().__init__(layer, inbox)

    async def step(self) -> bool:
        layer = self.layer
        if not layer.local.waiting():
            return False
        popped = await layer.with_retry(
            f"read inbox {self.key!r}", self._pop, on_error=self.lost_connection, reader=True
        )
        if self.disconnected or self._data_lost:
            if not self.disconnected:
                logger.warning("inbox %s was reset while idle", self.key)
                layer.connection_lost()
            # A pop in flight when the connection broke may have taken messages with
            # it (the classic layout has no acknowledgement): never "recovered".
            await layer.connection_back(False, data_lost=self._data_lost)
            self.disconnected = self._data_lost = False
        for member, score in popped:
            layer.dispatch_inbox(member, score)
        layer.local.sweep(time.time())
        if popped:
            await let_woken_run(self.loop_ready)
        return True

    async def _mark_alive(self, client: Redis) -> None:
        """Set our mark; a mark we set before and find missing means Redis lost its data
        (unless it simply outlived its TTL while nobody read this inbox)."""
        layer = self.layer
        ttl = layer.alive_ttl
        try:
            previous = await client.set(self.alive_key, b"1", ex=ttl, get=True)
        except ResponseError as exc:
            if not is_out_of_memory(exc):
                raise
            return  # a full Redis: popping frees memory, the mark can wait

        now = time.monotonic()
        written = layer.alive_written_at.get(self.key)
        if previous is None and written is not None and now - written < ttl:
            self._data_lost = True
        layer.alive_written_at[self.key] = now
        self.check_redis = False

    async def _pop(self) -> list[tuple[bytes, float]]:
        client = self.layer.connections.client(self.shard)
        written = self.layer.alive_written_at.get(self.key)
        if self.check_redis or written is None or time.monotonic() - written > _MARK_EVERY:
            await self._mark_alive(client)
        batch = await _zpopmin(client, self.key, READ_BATCH)
        if batch or self.disconnected or self._data_lost:
            # A way back to report returns at once: Redis may have lost this process's
            # group memberships with its data, and until step() restores them nothing
            # is sent here that could end a blocking pop.
            return batch
        timeout = self.layer.connections.block_timeout(self.shard, BLOCK_SECONDS)
        result = await _bzpopmin(client, self.key, timeout)
        if result is None:
            # An idle spell: look for our mark at the next round (a FLUSHALL or an empty
            # replica breaks no connection).
            self.check_redis = True
            return []
        return [result]


class RedisChannelLayer(StoredLayer[list[_Destination]]):
    """Sorted-set channel layer; drop-in for ``channels_redis.core.RedisChannelLayer``."""

    default_random_prefix_length = 12  # sorted-set members must be unique

    def start_process_state(self) -> None:
        """A new inbox for a forked child too (channels_redis would share the parent's)."""
        super().start_process_state()
        self.client_prefix = uuid.uuid4().hex
        #: Messages of this process's specific channels, fetched but not yet received.
        self.local = LocalChannels(self.count)
        self._readers: dict[str, _InboxReader] = {}
        #: Normal-channel messages whose receive was cancelled while they were in flight.
        self._parked: dict[str, deque[_Popped]] = {}
        self._fetches: set[asyncio.Task[_Popped]] = set()
        #: Fetches still running for receives that were cancelled, per channel.
        self._orphans: dict[str, deque[asyncio.Task[_Popped]]] = {}
        #: (shard, key) pairs whose channels_redis $inflight backup was already restored.
        self._restored: set[tuple[int, str]] = set()
        #: When each inbox's reader last set its mark (monotonic; absent: never). One
        #: per inbox: a process whose channels have two prefixes (new_channel("a"),
        #: new_channel("b")) has two inboxes, and the second's first mark is no loss.
        self.alive_written_at: dict[str, float] = {}

    @property
    def alive_ttl(self) -> int:
        """TTL of an inbox's mark (s): memberships do not outlive ``group_expiry``, so a
        mark gone after that long says nothing."""
        return max(120, int(self.group_expiry))

    # --- channel layer API --------------------------------------------------------

    @sync_aware
    async def new_channel(self, prefix: str = "specific") -> str:
        """A new process-specific channel name, received through this layer's inbox."""
        return f"{prefix}.{self.client_prefix}!{uuid.uuid4().hex}"

    @sync_aware
    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Send ``message`` to ``channel``; raises ChannelFull when it is at capacity."""
        self.check_message(message)
        self.check_channel(channel)
        stored = await self._add(f"send to {channel!r}", channel, [message])
        self.count_send(channel, bool(stored), self.get_capacity(channel))

    async def send_batch(self, channel: str, messages: list[dict[str, Any]]) -> int:
        return await self._add(f"send_bulk to {channel!r}", channel, messages)

    async def _add(self, what: str, channel: str, messages: list[dict[str, Any]]) -> int:
        """CLASSIC_SEND: add ``messages`` to ``channel``'s sorted set while it has room,
        one round trip; how many were added (the first ones). Each is serialized once:
        a retried send adds the same members, which its retry flag finds."""
        if "!" in channel:
            messages = [{**message, RESERVED_KEY: channel} for message in messages]
            shard = self.connections.shard_for(non_local_name(channel))
        else:
            shard = self.connections.shard_for(channel)
        key = classic_channel_key(self.prefix, channel)
        expiry = self.key_expiry(channel)
        now = time.time()
        args: list[Any] = [now - expiry, self.get_capacity(channel), _ttl(expiry)]
        for index, message in enumerate(messages):
            args += (_score(now, index), self.serialize(message))
        added = await self.call_script(what, CLASSIC_SEND, shard, [key], args, idempotent=True)
        return int(added)

    def key_expiry(self, channel: str) -> float:
        """How long ``channel``'s sorted set keeps a message: the channel's expiry, or
        for a process-specific channel, whose key its process's other channels share,
        the longest (each channel's own is applied when its message is read)."""
        return self.config.longest_expiry if "!" in channel else self.get_expiry(channel)

    # --- process-specific channels ------------------------------------------------------

    def owns(self, channel: str) -> bool:
        return non_local_name(channel).endswith(f".{self.client_prefix}!")

    def _prepare_local(self, channel: str, loop: asyncio.AbstractEventLoop) -> None:
        inbox = non_local_name(channel)
        reader = self._readers.get(inbox)
        running = reusable_task(
            reader.task if reader else None, "receive() on process-specific channels", loop
        )
        if not running and not self.local.has_queued(channel):
            # The task first runs after local.get() has registered this receiver.
            self._readers[inbox] = _InboxReader(self, inbox)

    def dispatch_inbox(self, member: bytes, score: float) -> None:
        """Decode one inbox entry and hand it to its local channel(s), each while its
        expiry lasts."""
        varied = bool(self.config.channel_expiry)
        if score + (self.config.longest_expiry if varied else self.expiry) < time.time():
            self.stats.count("expired")
            return
        message = self.try_deserialize(member, "the process inbox")
        if message is None:
            return
        target = message.pop(RESERVED_KEY, None)
        channels = [target] if isinstance(target, str) else list(target or ())
        if not varied:
            self.local.deliver_to(channels, message, score + self.expiry)
            return
        now = time.time()
        for channel in channels:
            deadline = score + self.get_expiry(channel)
            if deadline < now:
                self.stats.count("expired")
            else:
                copy = dict(message) if len(channels) > 1 else message
                self.local.deliver(channel, copy, deadline)

    # --- normal channels ----------------------------------------------------------------

    async def _receive_normal(self, channel: str) -> dict[str, Any]:
        parked = self._parked.get(channel)
        while parked:
            popped = parked.popleft()
            if not parked:
                del self._parked[channel]
            if popped.score >= time.time() - self.get_expiry(channel):
                return popped.message
            self.stats.count("expired")
        fetch = self._adopt_orphan(channel) or self._start_fetch(channel)
        try:
            popped = await asyncio.shield(fetch)
        except asyncio.CancelledError:
            if not fetch.cancelled():
                # The pop may already be on its way back: let it land, and leave
                # it to the next receive on this channel (adopted or parked).
                self._orphans.setdefault(channel, deque()).append(fetch)
                fetch.add_done_callback(self._park)
            raise
        return popped.message

    def _start_fetch(self, channel: str) -> asyncio.Task[_Popped]:
        fetch = asyncio.ensure_future(self._fetch_normal(channel))
        self._fetches.add(fetch)
        fetch.add_done_callback(self._fetches.discard)
        return fetch

    def _adopt_orphan(self, channel: str) -> asyncio.Task[_Popped] | None:
        """Reuse a fetch left running by a cancelled receive: keeps FIFO order."""
        orphans = self._orphans.get(channel)
        if not orphans:
            return None
        fetch = orphans.popleft()
        if not orphans:
            del self._orphans[channel]
        fetch.remove_done_callback(self._park)
        return fetch

    def _park(self, fetch: asyncio.Task[_Popped]) -> None:
        """Done-callback of an orphaned fetch: keep its message for the next receive."""
        for channel, orphans in self._orphans.items():
            if fetch in orphans:
                orphans.remove(fetch)
                if not orphans:
                    del self._orphans[channel]
                break
        else:
            return  # adopted by a receive in the meantime: it hands the message over
        if fetch.cancelled() or fetch.exception() is not None:
            return
        popped = fetch.result()
        self._parked.setdefault(channel, deque()).append(popped)

    async def _fetch_normal(self, channel: str) -> _Popped:
        key, guard = classic_channel_key(self.prefix, channel), CancelGuard()
        while True:
            popped = await self._pop_normal(channel, key)
            if guard.requested and popped is not None:
                # Cancelled by close(), though redis-py returned normally: the member
                # was popped, so it still goes back to where it came from.
                await self._unpop(_Popped(popped[0], key, popped[1], popped[2], {}))
            guard.check()
            if popped is None:
                continue
            shard, member, score = popped
            if score < time.time() - self.get_expiry(channel):
                self.stats.count("expired")
                continue
            message = self.try_deserialize(member, f"channel {channel!r}")
            if message is not None:
                message.pop(RESERVED_KEY, None)  # group_send names the channel; drop it
                return _Popped(shard, key, member, score, message)

    async def _pop_normal(self, channel: str, key: str) -> tuple[int, bytes, float] | None:
        """Block on the channel's home shard; when that times out, look at the others.

        We put a normal channel on the shard its name hashes to, so its capacity
        and order hold; channels_redis spreads sends round-robin over the shards,
        and the sweep of the other shards picks those up in a mixed fleet.
        """
        home = self.connections.shard_for(channel)
        await self._restore_backup_once(home, key)
        timeout = self.connections.block_timeout(home, BLOCK_SECONDS)
        result = await self.with_retry(
            f"receive on {channel!r}",
            lambda: _bzpopmin(self.connections.client(home), key, timeout),
        )
        if result is not None:
            return home, *result
        for shard in range(self.connections.ring_size):
            if shard == home:
                continue
            await self._restore_backup_once(shard, key)
            found = await self.with_retry(
                f"receive on {channel!r}",
                partial(self._zpopmin_one, shard, key),
            )
            if found:
                return shard, *found[0]
        return None

    async def _zpopmin_one(self, shard: int, key: str) -> list[tuple[bytes, float]]:
        return await _zpopmin(self.connections.client(shard), key, 1)

    async def _restore_backup_once(self, shard: int, key: str) -> None:
        """Return what a crashed channels_redis receiver left in flight (once per channel)."""
        if (shard, key) in self._restored:
            return
        keys = [key, classic_backup_key(key)]
        what = f"restore {classic_backup_key(key)!r}"
        moved = await self.call_script(what, CLASSIC_RESTORE_BACKUP, shard, keys, [])
        if moved:
            logger.info("restored %d in-flight message(s) into %s", moved, key)
        self._restored.add((shard, key))

    # --- groups ------------------------------------------------------------------------

    def group_key(self, group: str) -> str:
        return classic_group_key(self.prefix, group)

    def membership_keys(self, group: str) -> list[str]:
        return [classic_group_key(self.prefix, group)]  # no digest: see sorted_digest

    def members_digest(self, members: Iterable[str]) -> str:
        return sorted_digest(members)

    def presence_keys(self, group: str) -> list[str]:
        prefix = self.prefix
        return [
            classic_group_key(prefix, group),
            classic_presence_key(prefix, group),
            classic_presence_live_key(prefix, group),
        ]

    async def send_to_known(
        self, group: str, known: KnownMembers[list[_Destination]], messages: list[dict[str, Any]]
    ) -> int | list[str]:
        """CLASSIC_GROUP_SEND_KNOWN: check ``known`` are the members and add the messages
        to their sorted sets in one script (one server: one shard). A retry skips the
        check: it re-adds the same serialized messages, which changes nothing."""
        plan = self._records(self.known_plan(known), messages)
        batch = [entry for entries in plan.values() for entry in entries]
        keys = [self.group_key(group), *(key for key, _ in batch)]
        args: list[Any] = [time.time() - self.group_expiry, known.digest]
        for _, record in batch:
            args += record
        reply = await self.call_script(
            f"group_send to {group!r}",
            CLASSIC_GROUP_SEND_KNOWN,
            self.connections.shard_for(group),
            keys,
            args,
            idempotent=True,
        )
        return known_send_outcome(reply)

    async def send_to_members(
        self, group: str, members: list[str], messages: list[dict[str, Any]]
    ) -> int:
        """One CLASSIC_GROUP_SEND per shard; returns how many deliveries were full."""
        plan = self._records(self.plan_for(members), messages)
        calls = [self._group_send_shard(group, shard, batch) for shard, batch in plan.items()]
        # One shard (the usual case) needs no task of its own: gather would make one.
        results = [await calls[0]] if len(calls) == 1 else await asyncio.gather(*calls)
        return sum(results)

    def plan_for(self, members: Iterable[str]) -> list[_Destination]:
        """``members`` sorted into the sorted-set keys a send to them adds to: local
        channels of one process share their process's key, so they share one payload
        per message that names all of them (as channels_redis does)."""
        targets: dict[str, list[str]] = {}
        for channel in members:
            targets.setdefault(classic_channel_key(self.prefix, channel), []).append(channel)
        return [
            _Destination(
                key,
                self.connections.shard_for(non_local_name(channels[0])),
                self.get_capacity(channels[0]),
                self.key_expiry(channels[0]),
                channels,
            )
            for key, channels in targets.items()
        ]

    def _records(
        self, destinations: list[_Destination], messages: list[dict[str, Any]]
    ) -> dict[int, list[tuple[str, list[Any]]]]:
        """Per shard: (key, record) for each destination and message, in order; a record
        is what ``add_all`` takes (payload, capacity, expiry, score)."""
        plan: dict[int, list[tuple[str, list[Any]]]] = {}
        now = time.time()
        for target in destinations:
            entries = plan.setdefault(target.shard, [])
            for index, message in enumerate(messages):
                payload = self.serialize({**message, RESERVED_KEY: target.channels})
                record = [payload, target.capacity, target.expiry, _score(now, index)]
                entries.append((target.key, record))
        return plan

    async def _group_send_shard(
        self, group: str, shard: int, batch: list[tuple[str, list[Any]]]
    ) -> int:
        keys = [key for key, _ in batch]
        args: list[Any] = []
        for _, record in batch:
            args += record
        full = await self.call_script(
            f"group_send to {group!r}", CLASSIC_GROUP_SEND, shard, keys, args
        )
        return int(full)

    # --- flush and close -------------------------------------------------------------------

    @sync_aware_on_loop
    async def flush(self) -> None:
        """Delete every key of this prefix on every shard, and drop local state."""
        await self._stop_background(LayerClosed("the channel layer was flushed"))
        self._parked.clear()
        self.local.clear()
        self.presence_book.clear()
        await self.delete_matching(scan_pattern(self.prefix))
        await self.connections.close(sync_clients=False)

    @sync_aware_on_loop
    async def close(self) -> None:
        """Stop readers, return parked normal-channel messages to Redis, close connections."""
        await self._stop_background(LayerClosed("the channel layer was closed"))
        await self._return_parked()
        await super().close()

    async def _stop_background(self, error: BaseException) -> None:
        self.local.fail(error)
        readers, self._readers = list(self._readers.values()), {}
        loop = asyncio.get_running_loop()
        await self.presence_book.stop(loop)
        for reader in readers:
            if reader.loop is loop:
                await reader.stop()
        fetches = [f for f in self._fetches if f.get_loop() is loop]
        for fetch in fetches:
            fetch.cancel()
        self._orphans.clear()
        await asyncio.gather(*fetches, return_exceptions=True)
        self._restored.clear()

    async def _return_parked(self) -> None:
        """Put messages parked by cancelled receives back at the head of their channels."""
        parked, self._parked = self._parked, {}
        for queue in parked.values():
            for popped in queue:
                await self.with_retry("return a parked message", partial(self._unpop, popped))

    async def _unpop(self, popped: _Popped) -> None:
        client = self.connections.client(popped.shard)
        await client.zadd(popped.key, {popped.member: popped.score})
