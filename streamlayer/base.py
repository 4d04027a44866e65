"""What every streamlayer layer shares: config, serializer, connections,
validation, counters, the retry boundary, replay's answer where there is no
history, connection notices, and the lifecycle (close, fork).

The two layers that keep messages in Redis (Streams and compat.core) build on
:class:`~streamlayer.stored.StoredLayer`; the Pub/Sub layer on this class
directly. What each layer must provide is declared below as "the contract".

Name validation and the capacity lookup are Channels' own
(:class:`channels.layers.BaseChannelLayer`); this class only turns the spec's
rules into clear exceptions and wires the shared pieces together.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from channels.layers import BaseChannelLayer

from .config import ConfigError, LayerConfig
from .connections import ConnectionManager
from .exceptions import BulkChannelFull, ChannelFull
from .history import HistoryPage, Position
from .local import LocalChannels
from .memo import Memo
from .retry import DEFAULT_MAX_WAIT, READER_MAX_WAIT, retry_after
from .scripts import LuaScript
from .serializers import MessageSerializer, registry
from .sync import sync_aware, sync_aware_on_loop

__all__ = ["RESERVED_KEY", "LayerStats", "StreamlayerLayer"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How many validated channel names (and capacities) a layer remembers before starting afresh.
NAME_CACHE = 100_000

#: The key under which a message carries its process-specific destination(s).
#: Shared with channels_redis; a message from a caller must not contain it.
RESERVED_KEY = "__asgi_channel__"


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
    duplicates: copies a retried send made, and normal-channel messages given out again
    after a failover forgot their delivery, dropped; redelivered: normal-channel
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
        """Add ``n`` to counter ``name``, exactly, whichever thread counts.

        The lock is taken by hand, not with ``with``: every send and every receive
        counts, and the context manager's protocol cost a fan-out 4% of its
        instructions per delivery (callgrind)."""
        lock = self._lock
        lock.acquire()
        try:
            self.__dict__[name] += n
        finally:
            lock.release()

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name[0] != "_"}

    def __call__(self) -> dict[str, int]:
        """``layer.stats()``: a snapshot of every counter, for a metrics exporter
        (``layer.stats.sent`` reads one); see :mod:`streamlayer.metrics`."""
        return self.as_dict()


class ScriptCall:
    """One script call, attempted as often as the retry policy says.

    ``args`` may be a function, to compute them afresh at each attempt (expiry
    cutoffs, TTLs). An ``idempotent`` script takes the retry flag as its last
    argument (see :mod:`streamlayer.scripts`): '1' on every attempt after the first,
    or on every attempt when ``maybe_landed`` (an earlier call may have landed), so a
    retried send is stored once and a retried acknowledgement counts once.
    :attr:`attempts` tells a caller whether its reply followed an attempt that may
    have landed (the one-trip group send needs to know).
    """

    __slots__ = (
        "_args",
        "_connections",
        "_idempotent",
        "_keys",
        "_maybe_landed",
        "_script",
        "_shard",
        "attempts",
    )

    def __init__(
        self,
        connections: ConnectionManager,
        shard: int,
        script: LuaScript,
        keys: Sequence[Any],
        args: Sequence[Any] | Callable[[], Sequence[Any]],
        idempotent: bool,
        maybe_landed: bool,
    ) -> None:
        self._connections = connections
        self._shard = shard
        self._script = script
        self._keys = keys
        self._args = args
        self._idempotent = idempotent
        self._maybe_landed = maybe_landed
        #: Attempts made so far.
        self.attempts = 0

    async def __call__(self) -> Any:
        args = self._args
        values = list(args() if callable(args) else args)
        if self._idempotent:
            values.append("1" if self.attempts or self._maybe_landed else "0")
        self.attempts += 1
        # The shard's batcher of this attempt's loop turn (a retry may find a new one).
        batcher = self._connections.batcher(self._shard)
        return await batcher.call(self._script, self._keys, values)


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
    #: Whether ``hosts`` may name a Redis Cluster (the classic layout shards client-side).
    supports_cluster: ClassVar[bool] = False
    #: ``capacity`` when the config gives none (channels_redis' 100 for the compat layers).
    default_capacity: ClassVar[int] = 100

    def __init__(self, **options: Any) -> None:
        options.setdefault("capacity", self.default_capacity)
        self.config = LayerConfig.from_options(options)
        no_cluster = self.why_no_cluster()
        if no_cluster and any(h.is_cluster for h in self.config.hosts):
            raise ConfigError(no_cluster)
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
            # The longest a message may wait: an encrypted one older is refused.
            expiry=self.config.longest_expiry,
        )
        self.connections = ConnectionManager(self.config.hosts)
        _LAYERS.add(self)
        #: Channel names already validated, for any use and for receive() (bounded).
        self._valid_channels: Memo[str, None] = Memo(NAME_CACHE)
        self._capacities: Memo[str, int] = Memo(NAME_CACHE)
        self._expiries: Memo[str, float] = Memo(NAME_CACHE)
        #: Whether the log said that a notice skipped channels that did not ask for it.
        self._said_unasked = False
        #: Groups a replay was asked of though they keep no history (logged once each).
        self._said_no_history: Memo[str, None] = Memo(NAME_CACHE)
        self.start_process_state()

    @classmethod
    def why_no_cluster(cls) -> str | None:
        """Why this layer cannot run on a Redis Cluster here (None: it can)."""
        if cls.supports_cluster:
            return None
        return (
            f"{cls.__name__} cannot use a Redis Cluster: use "
            "streamlayer.StreamsChannelLayer, or list the servers in hosts to shard "
            "over them client-side"
        )

    def start_process_state(self) -> None:
        """Set up what belongs to this process alone: its counters here, and in each
        layer its identity (inbox, consumer name, dedup tags), its local queues and
        readers. Called by ``__init__`` and again in a forked child, so the two can
        never disagree (each layer extends it, calling this first)."""
        self.stats = LayerStats()

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
        self._valid_channels.remember(channel, None)
        return str(channel)

    def get_capacity(self, channel: str) -> int:
        """The capacity of ``channel`` (``channel_capacity`` patterns first), remembered."""
        capacity = self._capacities.get(channel)
        if capacity is None:
            capacity = self._capacities.remember(channel, int(super().get_capacity(channel)))
        return capacity

    def get_expiry(self, channel: str) -> float:
        """How long a message for ``channel`` lasts unreceived (``channel_expiry``
        patterns first, else ``expiry``), remembered."""
        expiry = self._expiries.get(channel)
        if expiry is None:
            expiry = self._expiries.remember(channel, self.config.expiry_for(channel))
        return expiry

    def check_group(self, group: Any) -> str:
        self.require_valid_group_name(group)
        return str(group)

    def check_message(self, message: Any) -> dict[str, Any]:
        if not isinstance(message, dict):
            raise TypeError(f"message must be a dict, got {type(message).__name__}")
        if RESERVED_KEY in message:
            raise ValueError(f"message must not contain the reserved key {RESERVED_KEY!r}")
        return message

    def check_messages(self, messages: Any) -> list[dict[str, Any]]:
        """A bulk send's messages, every one checked before any is sent."""
        if isinstance(messages, (dict, str, bytes)) or not isinstance(messages, Iterable):
            raise TypeError(
                f"messages must be a list of message dicts, got {type(messages).__name__}"
            )
        batch = list(messages)
        for index, message in enumerate(batch):
            try:
                self.check_message(message)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"messages[{index}]: {exc}") from None
        return batch

    # --- send and receive: what every layer does around its own storage ---------

    def count_send(self, channel: str, stored: bool, capacity: int) -> None:
        """Count a send; one the destination had no room for raises ChannelFull."""
        if not stored:
            self.stats.count("full")
            raise ChannelFull(f"channel {channel!r} is at its capacity of {capacity} messages")
        self.stats.count("sent")

    @sync_aware
    async def send_bulk(self, channel: str, messages: Iterable[dict[str, Any]]) -> None:
        """Send ``messages`` to ``channel``, in order, in one round trip.

        Each is stored as :meth:`send` would store it (serializer, encryption,
        capacity). When the channel fills up part-way, the messages before that point
        are stored and the rest are not, and :class:`~streamlayer.exceptions.
        BulkChannelFull` (a ChannelFull) says how many were accepted. Every message is
        checked before any is sent: a bad one sends nothing."""
        batch = self.check_messages(messages)
        self.check_channel(channel)
        if not batch:
            return
        accepted = await self.send_batch(channel, batch)
        self.stats.count("sent", accepted)
        refused = len(batch) - accepted
        if refused:
            self.stats.count("full", refused)
            raise BulkChannelFull(channel, accepted, refused, self.get_capacity(channel))

    @sync_aware
    async def group_send_bulk(self, group: str, messages: Iterable[dict[str, Any]]) -> None:
        """Send ``messages`` to every member of ``group``, in order, in one round trip
        per shard (one script call on a single server for a group whose members did
        not change). A member that fills up part-way receives the messages before that
        point; the ones it had no room for are skipped and counted as ``full``, as
        :meth:`group_send` skips a full member."""
        batch = self.check_messages(messages)
        self.check_group(group)
        if batch:
            await self.group_send_batch(group, batch)

    # --- the contract: what each layer provides -----------------------------------
    # Channels' API (new_channel, send, receive, group_discard, group_send, flush)
    # and the hooks below; group_add, group_history, close and the rest are here.

    async def join_group(self, group: str, channel: str) -> None:
        """Make ``channel`` a member of ``group`` (the plain join of group_add)."""
        raise NotImplementedError

    async def send_batch(self, channel: str, messages: list[dict[str, Any]]) -> int:
        """Store checked ``messages`` for ``channel`` while it has room, in one round
        trip; how many were stored (the first ones)."""
        raise NotImplementedError

    async def group_send_batch(self, group: str, messages: list[dict[str, Any]]) -> None:
        """Send checked ``messages`` to ``group``'s members, counting what was sent and
        what did not fit."""
        raise NotImplementedError

    def want_notices(self, channel: str) -> None:
        """Deliver the ``on_disconnect`` / ``on_reconnect`` notices to ``channel`` (one
        of this process's, usually a consumer's ``self.channel_name``).

        Only channels that asked get them: Channels closes a consumer that receives a
        message type it has no handler for, so a notice sent to every channel would
        close every ordinary consumer on the first blip.
        :class:`~streamlayer.consumers.NoticesMixin` (and the replay mixin) ask for you.
        """
        raise NotImplementedError

    # --- the retry boundary ------------------------------------------------------

    async def with_retry(
        self,
        what: str,
        call: Callable[[], Awaitable[T]],
        on_error: Callable[[BaseException], None] | None = None,
        *,
        reader: bool = False,
    ) -> T:
        """Run one Redis operation under the shared retry policy (see :mod:`streamlayer.retry`).

        ``on_error`` hears of every transient error (a reader uses it to notice disconnects).
        A ``reader`` (an inbox reader) retries sooner (``READER_MAX_WAIT``).
        The first attempt is a plain await: every send and every read passes here.
        """
        try:
            return await call()
        except Exception as first:

            def count(error: BaseException) -> None:
                self.stats.count("retries")
                if on_error is not None:
                    on_error(error)

            max_wait = READER_MAX_WAIT if reader else DEFAULT_MAX_WAIT
            give_up_after = self.config.retry_timeout
            return await retry_after(first, call, give_up_after, what, count, max_wait)

    def script_call(
        self,
        script: LuaScript,
        shard: int,
        keys: Sequence[Any],
        args: Sequence[Any] | Callable[[], Sequence[Any]],
        *,
        idempotent: bool = False,
        maybe_landed: bool = False,
    ) -> ScriptCall:
        """One call of ``script`` on ``shard``, to run under :meth:`with_retry`; it
        counts its attempts (see :class:`ScriptCall`)."""
        return ScriptCall(self.connections, shard, script, keys, args, idempotent, maybe_landed)

    async def call_script(
        self,
        what: str,
        script: LuaScript,
        shard: int,
        keys: Sequence[Any],
        args: Sequence[Any] | Callable[[], Sequence[Any]],
        *,
        idempotent: bool = False,
        maybe_landed: bool = False,
    ) -> Any:
        """Call ``script`` on ``shard`` under the retry policy, through the shard's
        batcher (calls made together travel in one pipeline); see :class:`ScriptCall`."""
        call = self.script_call(
            script, shard, keys, args, idempotent=idempotent, maybe_landed=maybe_landed
        )
        return await self.with_retry(what, call)

    @sync_aware
    async def group_add(
        self,
        group: str,
        channel: str,
        since: str | Position | None = None,
        presence: Mapping[str, Any] | None = None,
    ) -> bool | None:
        """Add ``channel`` to ``group`` (membership lasts ``group_expiry`` seconds).

        ``since`` asks for a replay from a position of the group's history (see
        :meth:`StreamsChannelLayer.group_add`). A layer or group that keeps no history
        joins all the same and answers False, incomplete, as it cannot replay: the
        documented replay recipe runs unchanged on every backend. Without ``since``
        the answer is None.

        ``presence`` (a small dict: user id, name, device) joins with presence, which
        :meth:`presence` lists until the channel leaves the group, its membership
        expires or its process stops refreshing it (``presence_timeout``); see
        :mod:`streamlayer.presence`."""
        self.check_group(group)
        self.check_channel(channel)
        if since is not None:
            Position.parse(since)  # a malformed one is refused on every backend alike
        if presence is None:
            await self.join_group(group, channel)
        else:
            await self.join_with_presence(group, channel, presence)
        if since is None:
            return None
        self.say_no_history(group)
        return False

    async def join_with_presence(
        self, group: str, channel: str, presence: Mapping[str, Any]
    ) -> None:
        """Join ``group`` with presence (the stored layers'; see :meth:`read_group`)."""
        raise NotImplementedError(self.why_no_members("keep presence"))

    @sync_aware
    async def group_channels(self, group: str) -> list[str]:
        """The live member channels of ``group``: joined within ``group_expiry``, and
        for members with presence, still refreshed by their process. One round trip."""
        self.check_group(group)
        return await self.read_group(group, "channels")  # type: ignore[no-any-return]

    @sync_aware
    async def group_size(self, group: str) -> int:
        """How many members :meth:`group_channels` would list, without reading them."""
        self.check_group(group)
        return int(await self.read_group(group, "size"))

    @sync_aware
    async def presence(self, group: str) -> list[dict[str, Any]]:
        """The members of ``group`` present with info, oldest first: each
        ``{"channel": ..., "info": {...}, "joined": <unix time>}``. A user with two tabs
        is two entries (:func:`streamlayer.presence.by_info` groups them)."""
        self.check_group(group)
        return await self.read_group(group, "presence")  # type: ignore[no-any-return]

    async def read_group(self, group: str, what: str) -> Any:
        """``group``'s 'size', 'channels' or 'presence' (the stored layers'): a layer
        that knows no members raises NotImplementedError saying why."""
        raise NotImplementedError(self.why_no_members(f"tell a group's {what}"))

    def why_no_members(self, what: str) -> str:
        return (
            f"{type(self).__name__} cannot {what}: Redis Pub/Sub knows subscribers, not "
            "group members; use streamlayer.StreamsChannelLayer or "
            "streamlayer.compat.core.RedisChannelLayer"
        )

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
        self._said_no_history.remember(group, None)
        logger.warning(
            "%s: group %r keeps no history, so its replay is reported incomplete (%s)",
            type(self).__name__,
            group,
            self.why_no_history(group),
        )

    def why_no_history(self, group: str) -> str:
        return "replay needs streamlayer.StreamsChannelLayer with group_history"

    def notify_lost(self, local: LocalChannels, channels: Iterable[str]) -> None:
        """A reader of this process lost Redis: count it, and send ``on_disconnect`` to
        those of ``channels`` (live channels of ``local``) that asked for notices."""
        self.stats.count("reconnects")
        if self.config.on_disconnect:
            self._tell(local, self.config.on_disconnect, channels)

    def notify_back(self, local: LocalChannels, channels: Iterable[str], recovered: bool) -> None:
        """The reader is back: ``on_reconnect`` with ``recovered`` (whether nothing can
        have been lost) to those of ``channels`` that asked."""
        if self.config.on_reconnect:
            self._tell(local, self.config.on_reconnect, channels, recovered=recovered)

    def _tell(
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

    # --- lifecycle -----------------------------------------------------------------

    def after_fork(self) -> None:
        """In a forked child (Celery's prefork pool, gunicorn ``--preload``): forget the
        parent's connections without touching their sockets, and count afresh. Layers
        with an identity of their own (an inbox, dedup tags) take a new one here, or
        parent and child would read each other's messages and drop each other's sends
        as duplicates."""
        self.connections.forget_after_fork()
        self.start_process_state()

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
