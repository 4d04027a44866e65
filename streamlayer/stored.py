"""What the two layers that keep messages in Redis share: Streams and compat.core.

Each keeps a group as a sorted set of member channels scored by join time, and
delivers a process's own channels through an inbox its reader drains into
:class:`~streamlayer.local.LocalChannels`. So they share, here: receive
(process-specific channels from the local queues, normal channels by the
layer's own read), group membership and its healing after Redis lost its data
(the groups this process's channels joined are added again before the
``recovered: False`` notice), the notices of a reader that lost Redis, and the
group send that takes one round trip for a steady group. Each layer provides
its storage: the hooks raising NotImplementedError below.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterable, Mapping
from functools import partial, reduce
from operator import xor
from typing import Any, Generic, TypeVar

from .base import NAME_CACHE, StreamlayerLayer
from .local import LocalChannels
from .memo import Memo
from .presence import PresenceBook
from .scripts import GROUP_ADD, GROUP_MEMBERS
from .sync import sync_aware

__all__ = [
    "KnownMembers",
    "StoredLayer",
    "decode_members",
    "known_send_outcome",
    "sorted_digest",
    "xor_digest",
]

logger = logging.getLogger(__name__)

_SCAN_COUNT = 1000
#: How many groups' members a layer remembers for one-trip group sends before starting afresh.
_KNOWN_GROUPS = 10_000

#: A layer's plan of where a send to a group's members goes (its own form).
PlanT = TypeVar("PlanT")


def sorted_digest(members: Iterable[str]) -> str:
    """SHA-1 of the names sorted and joined by newlines (no channel name contains one):
    what compat.core's one-trip group send compares, hashing the members it reads the
    same way (channels_redis processes change its groups, so nothing can be kept)."""
    return hashlib.sha1("\n".join(sorted(members)).encode()).hexdigest()


def xor_digest(members: Iterable[str]) -> str:
    """The count of ``members``, ':', and the XOR of their SHA-1s in 40 hex digits: the
    digest the Streams layer keeps beside each group in Redis, changed at every join
    and leave without reading the other members (``_MEMBERSHIP`` in
    :mod:`streamlayer.scripts`)."""
    names = list(members)
    hashes = (int.from_bytes(hashlib.sha1(name.encode()).digest(), "big") for name in names)
    return f"{len(names)}:{reduce(xor, hashes, 0):040x}"


class KnownMembers(list[str], Generic[PlanT]):
    """A group's members as last read, with the form a script compares them in."""

    def __init__(self, members: list[str], digest: str) -> None:
        super().__init__(members)
        #: The members' digest as the layer's script compares it (``members_digest``):
        #: a few dozen bytes on the wire whatever the group's size.
        self.digest = digest
        #: The layer's plan of where a send to these members goes, made at the first
        #: send to them and kept while they are the members (see StoredLayer.known_plan).
        self.plan: PlanT | None = None


def decode_members(raw: list[Any]) -> list[str]:
    return [m.decode("utf8") if isinstance(m, bytes) else str(m) for m in raw]


def known_send_outcome(reply: list[Any]) -> int | list[str]:
    """A one-trip group send script's reply: how many members were full, or (-1 first)
    the group's members now, when they were not the ones the send was planned for."""
    return decode_members(reply[1:]) if reply[0] == -1 else int(reply[0])


class StoredLayer(StreamlayerLayer, Generic[PlanT]):
    """Base of the Streams and compat.core layers: see the module docstring.
    ``PlanT``: the layer's plan of where a send to a group's members goes."""

    #: Messages of this process's process-specific channels.
    local: LocalChannels

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        #: Channel names already admitted to receive() (bounded).
        self._receivable: Memo[str, None] = Memo(NAME_CACHE)
        #: Every key on one server (no shards, no Cluster): a group send may be one trip.
        self._one_server = self.connections.ring_size == 1 and not self.connections.is_cluster

    def start_process_state(self) -> None:
        super().start_process_state()
        #: Each group's members as this layer last read them (bounded; group_send).
        self._known_members: Memo[str, KnownMembers[PlanT]] = Memo(_KNOWN_GROUPS)
        #: The groups this layer's own channels joined: what it adds again when Redis
        #: comes back without them (see restore_memberships).
        self._joined: dict[str, set[str]] = {}
        #: Presence of this process's members, and the task refreshing it.
        self.presence_book = PresenceBook(self)

    # Not sync_aware: a receive blocks in Redis, and a sync client's blocking read
    # would hold the loop's thread, so no timeout or cancellation around it could act.
    async def receive(self, channel: str) -> dict[str, Any]:
        """The next message on ``channel``. Cancelling it loses and duplicates nothing."""
        if channel not in self._receivable:
            self._admit(channel)
        if "!" in channel:
            # Kept flat on purpose: every await level costs a frame resumption per
            # message, and a fan-out to hundreds of local channels pays it hundreds
            # of times per group_send. The loop is asked for once (a system call on
            # Python 3.11).
            loop = asyncio.get_running_loop()
            self._prepare_local(channel, loop)
            message = await self.local.get(channel, loop)
        else:
            message = await self._receive_normal(channel)
        self.stats.count("received")
        return message

    def _admit(self, channel: str) -> None:
        """Validate a channel name once; later receives on it skip the checks."""
        self.check_channel(channel)
        if "!" in channel:
            self._check_local(channel)
        self._receivable.remember(channel, None)

    def owns(self, channel: str) -> bool:
        """Whether ``channel`` was made by this layer's new_channel() (each layer's own)."""
        raise NotImplementedError

    def _check_local(self, channel: str) -> None:
        """Raise ValueError unless ``channel`` was made by this layer's new_channel()."""
        if not self.owns(channel):
            raise ValueError(
                f"cannot receive on {channel!r}: it was not made by this layer's new_channel()"
            )

    def _prepare_local(self, channel: str, loop: asyncio.AbstractEventLoop) -> None:
        """Make sure the reader of ``loop`` (the running one) serves ``channel`` (each
        layer's own)."""
        raise NotImplementedError

    async def _receive_normal(self, channel: str) -> dict[str, Any]:
        """A normal channel's next message (each layer's own)."""
        raise NotImplementedError

    # --- groups: sorted sets of members -----------------------------------------------

    def group_key(self, group: str) -> str:
        """The sorted set holding ``group``'s members (each layer names its own)."""
        raise NotImplementedError

    def membership_keys(self, group: str) -> list[str]:
        """The keys a change of ``group``'s members writes (one slot): its sorted set,
        and the Streams layer's digest of it (each layer's own)."""
        raise NotImplementedError

    def members_digest(self, members: Iterable[str]) -> str:
        """``members`` in the form the layer's one-trip group send compares (each
        layer's own: :func:`xor_digest` or :func:`sorted_digest`)."""
        raise NotImplementedError

    async def join_group(self, group: str, channel: str) -> None:
        """The plain join (each layer's own; this is the sorted-set one)."""
        await self._add_members(group, [channel], f"group_add to {group!r}")
        self.note_membership(group, channel, joined=True)

    @sync_aware
    async def group_discard(self, group: str, channel: str) -> None:
        """Remove ``channel`` from ``group``; a channel that is not a member is ignored.
        Its presence in the group ends with it (``presence.leave`` when
        ``presence_events`` is on for the group)."""
        self.check_group(group)
        self.check_channel(channel)
        self.note_membership(group, channel, joined=False)
        await self.presence_book.leave(group, channel)

    # --- presence: see streamlayer.presence -----------------------------------------

    def presence_keys(self, group: str) -> list[str]:
        """The group's members, presence records and presence deadlines, and the
        Streams layer's digest of the members (each layer names its own; one slot)."""
        raise NotImplementedError

    async def join_with_presence(
        self, group: str, channel: str, presence: Mapping[str, Any]
    ) -> None:
        record = self.presence_book.record(channel, presence)
        await self.presence_book.join(group, channel, record)
        self.note_membership(group, channel, joined=True)

    async def read_group(self, group: str, what: str) -> Any:
        answer = await self.presence_book.read(group, what)
        if what == "size":
            return int(answer)
        if what == "channels":
            return decode_members(answer)
        return self.presence_book.entries(group, answer)

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
        expired anyway). A script call per group, those of one shard in one pipeline
        (the batcher's); returns how many memberships."""
        live = self.local.live_channels(self.group_expiry)
        restoring: dict[str, list[str]] = {}
        for group, channels in list(self._joined.items()):
            keep = channels & live
            if not keep:
                del self._joined[group]
                continue
            self._joined[group] = keep
            restoring[group] = sorted(keep)
        await asyncio.gather(
            *(self._add_members(g, c, f"restore members of {g!r}") for g, c in restoring.items())
        )
        return sum(len(channels) for channels in restoring.values())

    async def _add_members(self, group: str, channels: list[str], what: str) -> None:
        """Add ``channels`` to ``group`` and refresh its TTL (GROUP_ADD: with the
        Streams layer's digest), for group_add and for restoring memberships."""
        shard = self.connections.shard_for(group)
        await self.call_script(
            what,
            GROUP_ADD,
            shard,
            self.membership_keys(group),
            lambda: [time.time(), self.group_expiry, *channels],
        )

    def want_notices(self, channel: str) -> None:
        """See :meth:`StreamlayerLayer.want_notices`: one of this process's channels."""
        self.check_channel(channel)
        if "!" in channel:
            self._check_local(channel)
        self.local.want_notices(channel)

    def connection_lost(self) -> None:
        """This process's reader lost Redis: tell the live local channels that asked."""
        self.notify_lost(self.local, self._live())

    async def connection_back(self, recovered: bool, data_lost: bool | None = None) -> None:
        """This process's reader is back; ``recovered`` says whether nothing can have
        been lost, ``data_lost`` whether Redis lost its data (by default: not
        ``recovered``). Then the memberships come back first, so an app resyncing on
        the notice misses nothing sent after it."""
        if data_lost is None:
            data_lost = not recovered
        if data_lost:
            restored = await self.restore_memberships()
            await self.presence_book.refresh()  # and their presence
            logger.warning(
                "%s: Redis lost its data; %d group membership(s) of this process restored",
                type(self).__name__,
                restored,
            )
        else:
            logger.warning("%s: reconnected (recovered=%s)", type(self).__name__, recovered)
        self.notify_back(self.local, self._live(), recovered)

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
        await self.group_send_batch(group, [message])

    async def group_send_batch(self, group: str, messages: list[dict[str, Any]]) -> None:
        known = self._known_members.get(group) if self._one_server else None
        if known is not None:
            outcome = await self.send_to_known(group, known, messages)
            if isinstance(outcome, int):
                self.count_group_send(group, len(known) * len(messages), outcome)
                return
            members = outcome  # the group changed: these are its members now
        else:
            members = await self.group_members(group)
        if self._one_server:
            self._remember_members(group, members)
        full_count = await self.send_to_members(group, members, messages) if members else 0
        self.count_group_send(group, len(members) * len(messages), full_count)

    def _remember_members(self, group: str, members: list[str]) -> None:
        self._known_members.remember(group, KnownMembers(members, self.members_digest(members)))

    def known_plan(self, known: KnownMembers[PlanT]) -> PlanT:
        """Where a send to a group's known members goes, planned at its first send and
        kept with them while they are the members: a steady group's send then costs
        per destination (stream or sorted set), not per member (planning for 10,000
        members took 2-3 ms a send). A changed group is a new KnownMembers."""
        if known.plan is None:
            known.plan = self.plan_for(known)
        return known.plan

    def plan_for(self, members: Iterable[str]) -> PlanT:
        """Where a send to ``members`` goes. Each layer's own."""
        raise NotImplementedError

    async def send_to_known(
        self, group: str, known: KnownMembers[PlanT], messages: list[dict[str, Any]]
    ) -> int | list[str]:
        """Deliver ``messages`` to ``known`` members if they are still ``group``'s, in
        one script call: how many deliveries were full, or the group's members now when
        they differ (nothing sent). Each layer's own."""
        raise NotImplementedError

    def count_group_send(self, group: str, deliveries: int, full: int) -> None:
        """Count a group send of ``deliveries`` (members times messages) of which
        ``full`` found no room."""
        self.stats.count("sent", deliveries - full)
        if full:
            self.stats.count("full", full)
            logger.info(
                "%d of %d deliveries skipped in group %s: channels over capacity",
                full,
                deliveries,
                group,
            )

    async def group_members(self, group: str) -> list[str]:
        """The live members of ``group``; members older than ``group_expiry`` are dropped."""
        keys, shard = self.membership_keys(group), self.connections.shard_for(group)
        cutoff = time.time() - self.group_expiry
        raw = await self.call_script(
            f"group_send to {group!r}", GROUP_MEMBERS, shard, keys, [cutoff]
        )
        return decode_members(raw)

    async def send_to_members(
        self, group: str, members: list[str], messages: list[dict[str, Any]]
    ) -> int:
        """Deliver ``messages`` to ``members``, in order; returns how many deliveries
        found no room (each layer's own)."""
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
