"""Presence: who is in a group, with a little info each, and who just left.

A member joins with presence (``group_add(group, channel, presence={...})``): its
record (the info and the join time, serialized like a message, so encrypted when
the layer encrypts) sits beside the group's membership in Redis, with a deadline.
The member's process moves the deadline on while the channel lives (a receive
waits on it): :class:`PresenceKeeper`, one background task per process, refreshes
every group it has members with presence in, every third of ``presence_timeout``,
in one script call per group (the calls of one round share a pipeline per shard).
A process that died, or lost Redis for longer than ``presence_timeout``, stops
refreshing: its members' presence ends when the deadline passes. Reads leave them
out at once; the next refresh of any other process with presence in the group
sweeps them and tells the group (``presence.leave``) when ``presence_events`` is on
for it. A process that comes back finds its members swept and restores them
(``presence.join`` again). The scripts and the states a member can be in are in
:mod:`streamlayer.scripts` (``PRESENCE_*``).

Presence is the stored layers' (Streams, compat.core): Redis Pub/Sub knows no
members.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

from .base import ScriptCall
from .exceptions import LayerClosed, RedisAccessDenied, RedisUnavailable
from .host import ScriptHost
from .local import LocalChannels
from .scripts import (
    PRESENCE_JOIN,
    PRESENCE_LEAVE,
    PRESENCE_READ,
    PRESENCE_REFRESH,
)
from .sync import background_context

__all__ = ["MAX_INFO_BYTES", "PresenceBook", "PresenceHost", "PresenceKeeper", "by_info"]

logger = logging.getLogger(__name__)

#: The largest presence record (info and join time, serialized) a member may have:
#: every presence read and event carries it.
MAX_INFO_BYTES = 2048

JOIN, LEAVE = "presence.join", "presence.leave"


class PresenceHost(ScriptHost, Protocol):
    """What presence needs of its layer (Streams or compat.core) beyond script calls."""

    local: LocalChannels

    @property
    def group_expiry(self) -> int: ...

    def presence_keys(self, group: str) -> list[str]:
        """The group's members, presence records and deadlines, and (Streams) the
        members' digest: KEYS of the presence scripts (one slot)."""
        ...

    def owns(self, channel: str) -> bool: ...

    def serialize(self, message: dict[str, Any]) -> bytes: ...

    async def group_send(self, group: str, message: dict[str, Any]) -> None: ...


def by_info(entries: list[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    """``presence()``'s entries grouped by one key of their info (a user with two tabs
    is two entries under one user id); entries whose info lacks it go under None."""
    grouped: dict[Any, list[dict[str, Any]]] = {}
    for entry in entries:
        grouped.setdefault(entry["info"].get(key), []).append(entry)
    return grouped


class PresenceBook:
    """A layer's presence: its own members' records (what its keeper refreshes) and the
    reads, joins and leaves of any group."""

    def __init__(self, layer: PresenceHost) -> None:
        self.layer = layer
        #: group -> {channel: serialized record} for this process's members with presence.
        self.mine: dict[str, dict[str, bytes]] = {}
        self.keeper: PresenceKeeper | None = None

    # --- checks -----------------------------------------------------------------------

    def record(self, channel: str, info: Any) -> bytes:
        """The serialized presence record of ``channel`` joining now with ``info``;
        ValueError / TypeError naming the problem."""
        if not isinstance(info, Mapping):
            raise TypeError(f"presence must be a dict of info, got {type(info).__name__}")
        if "!" not in channel or not self.layer.owns(channel):
            raise ValueError(
                f"presence is for a consumer's own channel (made by this layer's "
                f"new_channel(), which refreshes it), got {channel!r}"
            )
        record = self.layer.serialize({"info": dict(info), "joined": time.time()})
        if len(record) > MAX_INFO_BYTES:
            raise ValueError(
                f"presence info is {len(record)} bytes serialized; keep it under "
                f"{MAX_INFO_BYTES} (every presence read and event carries it)"
            )
        return record

    # --- joining and leaving -------------------------------------------------------

    def _deadline(self) -> float:
        return time.time() + self.layer.config.presence_timeout

    async def join(self, group: str, channel: str, record: bytes) -> None:
        """Join ``group`` with presence (checked ``record``), tell the group if it is new."""
        now = time.time()
        args = [channel, now, self.layer.group_expiry, record, self._deadline()]
        new = await self.layer.call_script(
            f"group_add to {group!r}",
            PRESENCE_JOIN,
            self.layer.connections.shard_for(group),
            self.layer.presence_keys(group),
            args,
        )
        self.mine.setdefault(group, {})[channel] = record
        self._keep()
        if int(new):
            await self._tell(group, JOIN, channel, record)

    async def leave(self, group: str, channel: str) -> None:
        """Remove ``channel`` from ``group`` (group_discard) and end its presence; tell
        the group if it had some."""
        record = self._drop(group, channel)
        layer = self.layer
        shard, keys = layer.connections.shard_for(group), layer.presence_keys(group)
        args = [channel, time.time()]
        call = ScriptCall(layer.connections, shard, PRESENCE_LEAVE, keys, args, False, False)
        held = await layer.with_retry(f"group_discard from {group!r}", call)
        if held is None and call.attempts > 1:
            held = record  # the first attempt may have ended it, its reply lost
        if held is not None:
            await self._tell(group, LEAVE, channel, held)

    def forget_channel(self, channel: str) -> None:
        """Stop refreshing ``channel``'s presence anywhere (its consumer is gone)."""
        for group in list(self.mine):
            self._drop(group, channel)

    async def _tell(self, group: str, kind: str, channel: str, record: bytes) -> None:
        """Send a presence event to ``group`` if its members asked for them."""
        if not self.layer.config.presence_events_for(group):
            return
        decoded = self.layer.try_deserialize(record, f"presence of group {group!r}")
        info = decoded.get("info", {}) if decoded else {}
        event = {"type": kind, "group": group, "channel": channel, "info": info}
        await self.layer.group_send(group, event)

    # --- reading --------------------------------------------------------------------

    async def read(self, group: str, what: str) -> Any:
        """One PRESENCE_READ: 'size', 'channels' or 'presence' of ``group``."""
        now = time.time()
        return await self.layer.call_script(
            f"{what} of {group!r}",
            PRESENCE_READ,
            self.layer.connections.shard_for(group),
            self.layer.presence_keys(group),
            [what, now - self.layer.group_expiry, now],
        )

    def entries(self, group: str, flat: list[Any]) -> list[dict[str, Any]]:
        """``presence()``'s answer from PRESENCE_READ's {channel, record, ...}."""
        entries = []
        for i in range(0, len(flat), 2):
            channel = _text(flat[i])
            record = self.layer.try_deserialize(flat[i + 1], f"presence of group {group!r}")
            if record is None:
                continue  # logged and counted: a corrupt or undecryptable record
            entry = {"channel": channel, "info": record.get("info", {})}
            entry["joined"] = record.get("joined")
            entries.append(entry)
        entries.sort(key=lambda e: (e["joined"] or 0, e["channel"]))
        return entries

    # --- refreshing -----------------------------------------------------------------

    def _keep(self) -> None:
        """Make sure a keeper refreshes this process's presence."""
        keeper = self.keeper
        if keeper is None or keeper.task.done() or keeper.task.get_loop().is_closed():
            self.keeper = PresenceKeeper(self)

    async def refresh(self) -> None:
        """One round: every group this process has live members with presence in."""
        live = self.layer.local.live_channels(self.layer.config.presence_timeout)
        for channel in {c for mine in self.mine.values() for c in mine} - live:
            self.forget_channel(channel)  # its consumer is gone: let its presence end
        rounds = [self._refresh_group(group, dict(mine)) for group, mine in self.mine.items()]
        for failed in await asyncio.gather(*rounds, return_exceptions=True):
            if isinstance(failed, (RedisUnavailable, RedisAccessDenied)):
                logger.warning("presence refresh failed, retried next round: %s", failed)
            elif isinstance(failed, BaseException):
                raise failed

    async def _refresh_group(self, group: str, mine: dict[str, bytes]) -> None:
        layer = self.layer
        now = time.time()
        args: list[Any] = [now, self._deadline(), now - layer.group_expiry, layer.group_expiry]
        for channel, record in mine.items():
            args += [channel, record]
        shard, keys = layer.connections.shard_for(group), layer.presence_keys(group)

        async def attempt() -> Any:
            # Together: the round's calls to one shard share one pipeline.
            batcher = layer.connections.batcher(shard)
            return await batcher.call(PRESENCE_REFRESH, keys, args, together=True)

        back, left, gone, swept = await layer.with_retry(f"presence refresh of {group!r}", attempt)
        for channel in gone:
            self._drop(group, _text(channel))
        for channel in back:
            name = _text(channel)
            logger.info("presence of %s in %r restored (it had been swept)", name, group)
            await self._tell(group, JOIN, name, mine[name])
        for flat in (left, swept):
            for i in range(0, len(flat), 2):
                await self._tell(group, LEAVE, _text(flat[i]), flat[i + 1])

    def _drop(self, group: str, channel: str) -> bytes | None:
        """Stop refreshing ``channel``'s presence in ``group``; its record, if it had one."""
        mine = self.mine.get(group)
        if mine is None:
            return None
        record = mine.pop(channel, None)
        if not mine:
            del self.mine[group]
        return record

    async def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop the keeper if it runs in ``loop``."""
        keeper = self.keeper
        if keeper is not None and keeper.task.get_loop() is loop:
            self.keeper = None
            await keeper.stop()

    def clear(self) -> None:
        self.mine.clear()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class PresenceKeeper:
    """The task refreshing one process's presence every third of ``presence_timeout``,
    while it has members with presence; cancelled by ``close()`` and ``flush()``."""

    def __init__(self, book: PresenceBook) -> None:
        self.book = book
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(
            self._run(), name="streamlayer-presence", context=background_context()
        )

    async def _run(self) -> None:
        period = self.book.layer.config.presence_timeout / 3
        while self.book.mine:
            await asyncio.sleep(period)
            try:
                await self.book.refresh()
            except LayerClosed:
                return  # its event loop is winding down
            except Exception:
                logger.exception("presence refresh failed; retried next round")

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
