"""What every streamlayer layer shares: config, serializer, connections,
validation and the retry boundary.

Name validation and the capacity lookup are Channels' own
(:class:`channels.layers.BaseChannelLayer`); this class only turns the spec's
rules into clear exceptions and wires the shared pieces together.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, ClassVar, TypeVar

from channels.layers import BaseChannelLayer

from .config import ConfigError, LayerConfig
from .connections import ConnectionManager
from .exceptions import ChannelFull
from .history import HistoryPage, Position
from .local import LocalChannels
from .retry import retry_transient
from .scripts import GROUP_MEMBERS
from .serializers import MessageSerializer, registry
from .sync import sync_aware, sync_aware_on_loop

__all__ = ["RESERVED_KEY", "LayerStats", "StreamlayerLayer"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_SCAN_COUNT = 1000
#: How many validated channel names (and capacities) a layer remembers before starting afresh.
_NAME_CACHE = 100_000
#: How many groups' members a layer remembers for one-trip group sends before starting afresh.
_KNOWN_GROUPS = 10_000

#: The key under which a message carries its process-specific destination(s).
#: Shared with channels_redis; a message from a caller must not contain it.
RESERVED_KEY = "__asgi_channel__"


class KnownMembers(list[str]):
    """A group's members as last read, with the form a script compares them in."""

    def __init__(self, members: list[str]) -> None:
        super().__init__(members)
        #: SHA-1 of the names sorted and joined by newlines (no channel name contains
        #: one): 40 bytes on the wire whatever the group's size; the script hashes the
        #: members it finds the same way (redis.sha1hex).
        self.digest = hashlib.sha1("\n".join(sorted(members)).encode()).hexdigest()


def decode_members(raw: list[Any]) -> list[str]:
    return [m.decode("utf8") if isinstance(m, bytes) else str(m) for m in raw]


def known_send_outcome(reply: list[Any]) -> int | list[str]:
    """A one-trip group send script's reply: how many members were full, or (-1 first)
    the group's members now, when they were not the ones the send was planned for."""
    return decode_members(reply[1:]) if reply[0] == -1 else int(reply[0])


@dataclass
class LayerStats:
    """Counters of one layer instance (process-local), only ever increasing.

    sent / received: messages; full: sends refused (ChannelFull) and group members
    skipped at capacity; expired: messages dropped unread after ``expiry``; dropped:
    messages that reached this process and were thrown away unread because their
    channel's consumer was gone for good (a Pub/Sub channel released after its
    consumer left; never a message of a live channel, which no queue limit drops);
    decode_errors: corrupt or undecryptable
    entries skipped; retries: Redis operations retried after a transient error;
    duplicates: copies a retried send made, dropped; redelivered: normal-channel
    entries taken over from a crashed worker; reconnects: inbox readers that lost
    Redis.
    """

    sent: int = 0
    received: int = 0
    full: int = 0
    expired: int = 0
    dropped: int = 0
    decode_errors: int = 0
    retries: int = 0
    duplicates: int = 0
    redelivered: int = 0
    reconnects: int = 0
    #: Counts come from the event loops' threads and from sync callers' threads at once.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``, exactly, whichever thread counts."""
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name[0] != "_"}

    def __call__(self) -> dict[str, int]:
        """``layer.stats()``: a snapshot of every counter, for a metrics exporter
        (``layer.stats.sent`` reads one); see :mod:`streamlayer.metrics`."""
        return self.as_dict()


class StreamlayerLayer(BaseChannelLayer):  # type: ignore[misc]
    """Base class of the three streamlayer backends."""

    extensions: ClassVar[list[str]] = ["groups", "flush"]
    #: Channels' own name patterns end in ``$``, which also matches before a final
    #: newline ("chan\n" passed); ``\Z`` ends at the end. The rules are otherwise
    #: Channels', and so are the errors (TypeError, Channels' message).
    channel_name_regex: ClassVar[re.Pattern[str]] = re.compile(
        r"^[a-zA-Z\d\-_.]+(\![\d\w\-_.]*)?\Z"
    )
    group_name_regex: ClassVar[re.Pattern[str]] = re.compile(r"^[a-zA-Z\d\-_.]+\Z")
    #: Random bytes put before each serialized message unless the config says otherwise.
    default_random_prefix_length: ClassVar[int] = 0
    #: Whether ``hosts`` may name a Redis Cluster (the classic layouts shard client-side).
    supports_cluster: ClassVar[bool] = False
    #: ``capacity`` when the config gives none (channels_redis' 100 for the compat layers).
    default_capacity: ClassVar[int] = 100
    #: Messages of this process's process-specific channels (layers that have an inbox).
    local: LocalChannels

    def __init__(self, **options: Any) -> None:
        options.setdefault("capacity", self.default_capacity)
        self.config = LayerConfig.from_options(options)
        if not self.supports_cluster and any(h.is_cluster for h in self.config.hosts):
            raise ConfigError(
                f"{type(self).__name__} cannot use a Redis Cluster: use "
                "streamlayer.StreamsChannelLayer, or list the servers in hosts to shard "
                "over them client-side"
            )
        super().__init__(expiry=self.config.expiry, capacity=self.config.capacity)
        # BaseChannelLayer.get_capacity() reads this compiled list.
        self.channel_capacity = list(self.config.channel_capacity)
        self.prefix = self.config.prefix
        self.group_expiry = self.config.group_expiry
        prefix_length = self.config.random_prefix_length
        self._serializer: MessageSerializer = registry.get_serializer(
            self.config.serializer_format,
            symmetric_encryption_keys=list(self.config.symmetric_encryption_keys),
            random_prefix_length=(
                self.default_random_prefix_length if prefix_length is None else prefix_length
            ),
            expiry=self.config.expiry,
        )
        self.connections = ConnectionManager(self.config.hosts)
        self.stats = LayerStats()
        _LAYERS.add(self)
        #: Channel names already validated, for any use and for receive() (bounded).
        self._valid_channels: set[str] = set()
        self._receivable: set[str] = set()
        self._capacities: dict[str, int] = {}
        #: Each group's members as this layer last read them (bounded; group_send).
        self._known_members: dict[str, KnownMembers] = {}
        #: Every key on one server (no shards, no Cluster): a group send may be one trip.
        self._one_server = self.connections.ring_size == 1 and not self.connections.is_cluster
        #: The groups this layer's own channels joined: what it adds again when Redis
        #: comes back without them (see restore_memberships).
        self._joined: dict[str, set[str]] = {}
        #: Whether the log said that a notice skipped channels that did not ask for it.
        self._said_unasked = False
        #: Groups a replay was asked of though they keep no history (logged once each).
        self._said_no_history: set[str] = set()

    def count(self, name: str, n: int = 1) -> None:
        """Add to one of :attr:`stats`' counters (the sink local queues count into; it
        follows ``stats`` when a forked child starts afresh)."""
        self.stats.count(name, n)

    def __repr__(self) -> str:
        hosts = ", ".join(h.describe() for h in self.config.hosts)
        return f"<{type(self).__name__} prefix={self.prefix!r} hosts=[{hosts}]>"

    # --- serialization ---------------------------------------------------------

    def serialize(self, message: dict[str, Any]) -> bytes:
        return self._serializer.serialize(message)

    def deserialize(self, data: bytes) -> dict[str, Any]:
        return self._serializer.deserialize(data)

    def try_deserialize(self, data: bytes, where: str) -> dict[str, Any] | None:
        """Decode ``data``; a corrupt or undecryptable entry is logged, counted and skipped."""
        try:
            message: Any = self.deserialize(data)
        except Exception as exc:
            self.stats.count("decode_errors")
            logger.warning("skipped an undecodable message on %s: %r", where, exc)
            return None
        if not isinstance(message, dict):
            self.stats.count("decode_errors")
            logger.warning("skipped a message on %s that is not a dict", where)
            return None
        return message

    # --- validation: clear exceptions, never asserts ---------------------------

    def check_channel(self, channel: Any) -> str:
        """Channels' own name rules, checked once per name (a busy channel is sent to
        and received from thousands of times a second; the regex need not run each time)."""
        if type(channel) is str and channel in self._valid_channels:
            return channel
        self.require_valid_channel_name(channel)
        if len(self._valid_channels) >= _NAME_CACHE:
            self._valid_channels.clear()
        self._valid_channels.add(channel)
        return str(channel)

    def get_capacity(self, channel: str) -> int:
        """The capacity of ``channel`` (``channel_capacity`` patterns first), remembered."""
        capacity = self._capacities.get(channel)
        if capacity is None:
            if len(self._capacities) >= _NAME_CACHE:
                self._capacities.clear()
            capacity = self._capacities[channel] = int(super().get_capacity(channel))
        return capacity

    def check_group(self, group: Any) -> str:
        self.require_valid_group_name(group)
        return str(group)

    def check_message(self, message: Any) -> dict[str, Any]:
        if not isinstance(message, dict):
            raise TypeError(f"message must be a dict, got {type(message).__name__}")
        if RESERVED_KEY in message:
            raise ValueError(f"message must not contain the reserved key {RESERVED_KEY!r}")
        return message

    # --- send and receive: what every layer does around its own storage ---------

    def count_send(self, channel: str, stored: bool, capacity: int) -> None:
        """Count a send; one the destination had no room for raises ChannelFull."""
        if not stored:
            self.stats.count("full")
            raise ChannelFull(f"channel {channel!r} is at its capacity of {capacity} messages")
        self.stats.count("sent")

    # Not sync_aware: a receive blocks in Redis, and a sync client's blocking read
    # would hold the loop's thread, so no timeout or cancellation around it could act.
    async def receive(self, channel: str) -> dict[str, Any]:
        """The next message on ``channel``. Cancelling it loses and duplicates nothing."""
        if channel not in self._receivable:
            self._admit(channel)
        if "!" in channel:
            # Kept flat on purpose: every await level costs a frame resumption per
            # message, and a fan-out to hundreds of local channels pays it hundreds
            # of times per group_send.
            self._prepare_local(channel)
            message = await self.local.get(channel)
        else:
            message = await self._receive_normal(channel)
        self.stats.count("received")
        return message

    def _admit(self, channel: str) -> None:
        """Validate a channel name once; later receives on it skip the checks."""
        self.check_channel(channel)
        if "!" in channel:
            self._check_local(channel)
        if len(self._receivable) >= _NAME_CACHE:
            self._receivable.clear()
        self._receivable.add(channel)

    def owns(self, channel: str) -> bool:
        """Whether ``channel`` was made by this layer's new_channel() (each layer's own)."""
        raise NotImplementedError

    def _check_local(self, channel: str) -> None:
        """Raise ValueError unless ``channel`` was made by this layer's new_channel()."""
        if not self.owns(channel):
            raise ValueError(
                f"cannot receive on {channel!r}: it was not made by this layer's new_channel()"
            )

    def _prepare_local(self, channel: str) -> None:
        """Make sure this loop's reader serves ``channel`` (each layer's own)."""
        raise NotImplementedError

    async def _receive_normal(self, channel: str) -> dict[str, Any]:
        """A normal channel's next message (each layer's own)."""
        raise NotImplementedError

    # --- the retry boundary ------------------------------------------------------

    async def with_retry(
        self,
        what: str,
        call: Callable[[], Awaitable[T]],
        on_error: Callable[[BaseException], None] | None = None,
    ) -> T:
        """Run one Redis operation under the shared retry policy (see :mod:`streamlayer.retry`).

        ``on_error`` hears of every transient error (a reader uses it to notice disconnects).
        """

        def count(error: BaseException) -> None:
            self.stats.count("retries")
            if on_error is not None:
                on_error(error)

        return await retry_transient(
            call, give_up_after=self.config.retry_timeout, what=what, on_retry=count
        )

    async def with_retry_flag(
        self,
        what: str,
        call: Callable[[bool], Awaitable[T]],
        *,
        maybe_landed: bool = False,
    ) -> T:
        """:meth:`with_retry` for a script that must know whether an earlier attempt
        may have landed without its reply: ``call`` is told so (True) on every attempt
        after the first, or on every attempt when ``maybe_landed``."""
        attempts = 1 if maybe_landed else 0

        async def attempt() -> T:
            nonlocal attempts
            retrying = attempts > 0
            attempts += 1
            return await call(retrying)

        return await self.with_retry(what, attempt)

    # --- groups and keys: the parts every Redis layer shares ---------------------------

    def group_key(self, group: str) -> str:
        """The sorted set holding ``group``'s members (each layer names its own)."""
        raise NotImplementedError

    @sync_aware
    async def group_add(
        self, group: str, channel: str, since: str | Position | None = None
    ) -> bool | None:
        """Add ``channel`` to ``group`` (membership lasts ``group_expiry`` seconds).

        ``since`` asks for a replay from a position of the group's history (see
        :meth:`StreamsChannelLayer.group_add`). A layer or group that keeps no history
        joins all the same and answers False, incomplete, as it cannot replay: the
        documented replay recipe runs unchanged on every backend. Without ``since``
        the answer is None."""
        self.check_group(group)
        self.check_channel(channel)
        if since is not None:
            Position.parse(since)  # a malformed one is refused on every backend alike
        await self.join_group(group, channel)
        if since is None:
            return None
        self.say_no_history(group)
        return False

    @sync_aware
    async def group_history(
        self, group: str, since: str | Position | None = None, limit: int = 100
    ) -> HistoryPage:
        """Retained messages of ``group`` (see :meth:`StreamsChannelLayer.group_history`).
        A layer or group that keeps no history answers an empty, incomplete page."""
        self.check_history_read(group, since, limit)
        self.say_no_history(group)
        return HistoryPage(complete=False)

    def check_history_read(
        self, group: str, since: str | Position | None, limit: int
    ) -> Position | None:
        """Validate a history read's arguments; the parsed ``since``."""
        self.check_group(group)
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise TypeError(f"limit must be a whole number of messages, got {limit!r}")
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit!r}")
        return None if since is None else Position.parse(since)

    def say_no_history(self, group: str) -> None:
        """Log, once per group, that a replay of ``group`` asked for cannot be (a
        pattern typo in ``group_history``, or a backend without history)."""
        if group in self._said_no_history:
            return
        if len(self._said_no_history) >= _NAME_CACHE:
            self._said_no_history.clear()
        self._said_no_history.add(group)
        logger.warning(
            "%s: group %r keeps no history, so its replay is reported incomplete (%s)",
            type(self).__name__,
            group,
            self.why_no_history(group),
        )

    def why_no_history(self, group: str) -> str:
        return "replay needs streamlayer.StreamsChannelLayer with group_history"

    async def join_group(self, group: str, channel: str) -> None:
        """The plain join (each layer's own; this is the sorted-set one)."""
        key, shard = self.group_key(group), self.connections.shard_for(group)
        await self.with_retry(
            f"group_add to {group!r}", partial(self._add_all, shard, [(key, [channel])])
        )
        self.note_membership(group, channel, joined=True)

    @sync_aware
    async def group_discard(self, group: str, channel: str) -> None:
        """Remove ``channel`` from ``group``; a channel that is not a member is ignored."""
        self.check_group(group)
        self.check_channel(channel)
        key, shard = self.group_key(group), self.connections.shard_for(group)
        await self.with_retry(
            f"group_discard from {group!r}",
            lambda: self.connections.client(shard).zrem(key, channel),
        )
        self.note_membership(group, channel, joined=False)

    # --- healing: what the layer restores when Redis comes back without its data ----

    def note_membership(self, group: str, channel: str, *, joined: bool) -> None:
        """Remember (or forget) that a channel of this layer is in ``group``."""
        if "!" not in channel or not self.owns(channel):
            return
        if joined:
            self._joined.setdefault(group, set()).add(channel)
            return
        members = self._joined.get(group)
        if members is not None:
            members.discard(channel)
            if not members:
                del self._joined[group]

    async def restore_memberships(self) -> int:
        """Add this layer's live channels to the groups they joined, again.

        Called when Redis came back without its data (a restart without persistence,
        a failover to an empty replica, FLUSHALL): the consumers are still connected
        and still think they are members, so every group_send would otherwise reach
        nobody until each of them reconnects. A channel is live while a receive()
        waits on it or one came within ``group_expiry`` (its membership would have
        expired anyway). One pipeline per shard; returns how many memberships."""
        live = self.local.live_channels(self.group_expiry)
        by_shard: dict[int, list[tuple[str, list[str]]]] = {}
        for group, channels in list(self._joined.items()):
            keep = channels & live
            if not keep:
                del self._joined[group]
                continue
            self._joined[group] = keep
            entry = (self.group_key(group), sorted(keep))
            by_shard.setdefault(self.connections.shard_for(group), []).append(entry)
        for shard, entries in by_shard.items():
            await self.with_retry(
                "restore group memberships", partial(self._add_all, shard, entries)
            )
        return sum(len(channels) for entries in by_shard.values() for _, channels in entries)

    async def _add_all(self, shard: int, entries: list[tuple[str, list[str]]]) -> None:
        """Add ``channels`` to each group key of ``entries`` and refresh its TTL, in one
        pipeline on ``shard`` (group_add, and restoring memberships)."""
        pipe = self.connections.client(shard).pipeline(transaction=False)
        now = time.time()
        for key, channels in entries:
            pipe.zadd(key, dict.fromkeys(channels, now))
            pipe.expire(key, self.group_expiry)
        await pipe.execute()

    def want_notices(self, channel: str) -> None:
        """Deliver the ``on_disconnect`` / ``on_reconnect`` notices to ``channel`` (one
        of this process's, usually a consumer's ``self.channel_name``).

        Only channels that asked get them: Channels closes a consumer that receives a
        message type it has no handler for, so a notice sent to every channel would
        close every ordinary consumer on the first blip.
        :class:`~streamlayer.consumers.NoticesMixin` (and the replay mixin) ask for you.
        """
        self.check_channel(channel)
        if "!" in channel:
            self._check_local(channel)
        self.local.want_notices(channel)

    def tell(
        self, local: LocalChannels, kind: str, candidates: Iterable[str], **extra: Any
    ) -> None:
        """Send the notice ``kind`` to those ``candidates`` that asked for notices; say
        once in the log that others did not (a project moving from channels_redis,
        which tells every channel, learns why its handlers stay silent)."""
        message = {"type": kind, **extra}
        unasked = local.tell(message, candidates, time.time() + self.config.expiry)
        if unasked and not self._said_unasked:
            self._said_unasked = True
            logger.info(
                "%s: %r not sent to %d channel(s) that did not ask for notices "
                "(layer.want_notices(channel), or streamlayer.consumers.NoticesMixin)",
                type(self).__name__,
                kind,
                unasked,
            )

    def connection_lost(self) -> None:
        """This process's reader lost Redis: tell the live local channels that asked."""
        self.stats.count("reconnects")
        if self.config.on_disconnect:
            self.tell(self.local, self.config.on_disconnect, self._live())

    async def connection_back(self, recovered: bool, data_lost: bool | None = None) -> None:
        """This process's reader is back; ``recovered`` says whether nothing can have
        been lost, ``data_lost`` whether Redis lost its data (by default: not
        ``recovered``). Then the memberships come back first, so an app resyncing on
        the notice misses nothing sent after it."""
        if data_lost is None:
            data_lost = not recovered
        if data_lost:
            restored = await self.restore_memberships()
            logger.warning(
                "%s: Redis lost its data; %d group membership(s) of this process restored",
                type(self).__name__,
                restored,
            )
        else:
            logger.warning("%s: reconnected (recovered=%s)", type(self).__name__, recovered)
        if self.config.on_reconnect:
            self.tell(self.local, self.config.on_reconnect, self._live(), recovered=recovered)

    def _live(self) -> set[str]:
        return self.local.live_channels(self.config.expiry)

    @sync_aware
    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Send ``message`` to every member of ``group``; full members are skipped and
        counted (the spec lets a group send drop rather than raise).

        On a single server the send is planned for the members this layer last read
        and made by one script that first checks they are still the members
        (:meth:`send_to_known`): one round trip for a steady group. A group that
        changed answers with its members, and a second trip sends to them."""
        self.check_group(group)
        self.check_message(message)
        known = self._known_members.get(group) if self._one_server else None
        if known is not None:
            outcome = await self.send_to_known(group, known, message)
            if isinstance(outcome, int):
                self.count_group_send(group, len(known), outcome)
                return
            members = outcome  # the group changed: these are its members now
        else:
            members = await self.group_members(group)
        if self._one_server:
            self._remember_members(group, members)
        full_count = await self.send_to_members(group, members, message) if members else 0
        self.count_group_send(group, len(members), full_count)

    def _remember_members(self, group: str, members: list[str]) -> None:
        if len(self._known_members) >= _KNOWN_GROUPS:
            self._known_members.clear()
        self._known_members[group] = KnownMembers(members)

    async def send_to_known(
        self, group: str, known: KnownMembers, message: dict[str, Any]
    ) -> int | list[str]:
        """Deliver ``message`` to ``known`` members if they are still ``group``'s, in one
        script call: how many were full, or the group's members now when they differ
        (nothing sent). Each layer's own."""
        raise NotImplementedError

    def count_group_send(self, group: str, members: int, full: int) -> None:
        """Count a group send to ``members`` channels of which ``full`` had no room."""
        self.stats.count("sent", members - full)
        if full:
            self.stats.count("full", full)
            logger.info("%d of %d channels over capacity in group %s", full, members, group)

    async def group_members(self, group: str) -> list[str]:
        """The live members of ``group``; members older than ``group_expiry`` are dropped."""
        key, shard = self.group_key(group), self.connections.shard_for(group)
        cutoff = time.time() - self.group_expiry
        raw = await self.with_retry(
            f"group_send to {group!r}",
            lambda: GROUP_MEMBERS(self.connections.client(shard), [key], [cutoff]),
        )
        return decode_members(raw)

    async def send_to_members(
        self, group: str, members: list[str], message: dict[str, Any]
    ) -> int:
        """Deliver ``message`` to ``members``; returns how many were full (each layer's own)."""
        raise NotImplementedError

    async def delete_matching(self, pattern: str) -> None:
        """UNLINK every key matching the SCAN ``pattern`` on every shard (for flush())."""
        for shard in range(self.connections.ring_size):
            await self.with_retry("flush", partial(self._delete_on_shard, shard, pattern))

    async def _delete_on_shard(self, shard: int, pattern: str) -> None:
        client = self.connections.client(shard)
        batch: list[bytes] = []
        async for key in client.scan_iter(match=pattern, count=_SCAN_COUNT):
            batch.append(key)
            if len(batch) >= _SCAN_COUNT:
                await client.unlink(*batch)
                batch = []
        if batch:
            await client.unlink(*batch)

    # --- lifecycle -----------------------------------------------------------------

    def after_fork(self) -> None:
        """In a forked child (Celery's prefork pool, gunicorn ``--preload``): forget the
        parent's connections without touching their sockets, and count afresh. Layers
        with an identity of their own (an inbox, dedup tags) take a new one here, or
        parent and child would read each other's messages and drop each other's sends
        as duplicates."""
        self.connections.forget_after_fork()
        self.stats = LayerStats()
        self._known_members = {}
        self._joined = {}

    @sync_aware_on_loop
    async def close(self) -> None:
        """Stop background work and close this event loop's connections, and those
        sync callers' calls share (see :mod:`streamlayer.sync`)."""
        await self.connections.close()

    async def close_pools(self) -> None:
        """channels_redis' name for :meth:`close`."""
        await self.close()


#: Every layer of this process, renewed in a forked child (see after_fork()).
_LAYERS: weakref.WeakSet[StreamlayerLayer] = weakref.WeakSet()


def _renew_layers_after_fork() -> None:
    for layer in list(_LAYERS):
        layer.after_fork()


os.register_at_fork(after_in_child=_renew_layers_after_fork)
