"""The process inbox reader of :class:`~streamlayer.streams.StreamsChannelLayer`.

Every message for any process-specific channel of one process is appended to
that process's inbox, a capped Redis Stream. One reader per process (and event
loop) reads it in batches with a blocking XREAD resuming from the last entry id
it handed on, demultiplexes entries into per-channel local queues, trims what
it consumed and records that id in a cursor key next to the inbox.

XREAD does not remove anything, so the reader can be cancelled or lose its
connection at any point: it resumes from its last id and nothing accepted by
Redis is lost. After a reconnect the cursor tells whether Redis still holds
the same inbox (``recovered=True``) or came back without it (``False``).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from .keys import stream_cursor_key, stream_inbox_key
from .reader import BackgroundReader

if TYPE_CHECKING:
    from .streams import StreamsChannelLayer

__all__ = ["InboxReader", "RecentTags", "next_stream_id", "stream_entries"]

logger = logging.getLogger(__name__)

#: Entries read per round trip when the inbox is busy.
READ_BATCH = 512
#: Longest blocking read; also bounded by half the socket timeout.
BLOCK_SECONDS = 5.0

Entry = tuple[bytes, dict[bytes, bytes]]


def next_stream_id(entry_id: str) -> str:
    """The smallest id greater than ``entry_id`` (for an exclusive XTRIM MINID)."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def stream_entries(response: Any) -> list[Entry]:
    """The entries of the one stream in an XREAD / XREADGROUP reply, whatever its shape
    (RESP2 list of [key, entries], RESP3 dict); deleted entries come back as (id, {})."""
    if not response:
        return []
    streams = list(response.values()) if isinstance(response, dict) else [r[1] for r in response]
    entries: list[Any] = streams[0] if streams else []
    if len(entries) == 1 and isinstance(entries[0], list):  # RESP3 legacy wrapping
        entries = entries[0]
    result: list[Entry] = []
    for entry_id, fields in entries:
        if entry_id is not None:
            result.append((_as_bytes(entry_id), fields or {}))
    return result


def _as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class RecentTags:
    """The dedup tags of the last ``size`` entries: drops the copy a retried send made."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._tags: OrderedDict[bytes, None] = OrderedDict()

    def seen(self, tag: bytes) -> bool:
        """True if ``tag`` was seen before; remembers it otherwise."""
        if tag in self._tags:
            return True
        self._tags[tag] = None
        if len(self._tags) > self._size:
            self._tags.popitem(last=False)
        return False


class InboxReader(BackgroundReader):
    """Reads one process inbox while receivers wait; owned and restarted by its layer."""

    def __init__(self, layer: StreamsChannelLayer) -> None:
        self.layer = layer
        self.key = stream_inbox_key(layer.prefix, layer.process_id)
        self.cursor_key = stream_cursor_key(layer.prefix, layer.process_id)
        self.shard = layer.connections.shard_for(layer.process_id)
        self._disconnected = False
        super().__init__(layer.local, self.key)

    async def step(self) -> bool:
        layer = self.layer
        if not layer.local.waiting():
            # Nobody waits: trim what we consumed now, not at the next read, so
            # senders see the true backlog; stop unless someone came meanwhile.
            await layer.with_retry(f"trim inbox {self.key!r}", self._settle)
            if not layer.local.waiting():
                return False
        entries = await layer.with_retry(
            f"read inbox {self.key!r}", self._read, on_error=self._lost_connection
        )
        for entry_id, fields in entries:
            layer.position.last_id = entry_id.decode()
            layer.dispatch_inbox(entry_id, fields)
        layer.local.sweep(time.time())
        return True

    def _lost_connection(self, error: BaseException) -> None:
        if not self._disconnected:
            self._disconnected = True
            logger.warning("inbox %s lost its connection: %s", self.key, error)
            self.layer.connection_lost()

    def _queue_bookkeeping(self, pipe: Any) -> None:
        """Check and record our position in the cursor key, and trim the entries handed
        on. The GET comes first, so every write also tells whether Redis lost the inbox."""
        position = self.layer.position
        pipe.get(self.cursor_key)
        pipe.set(self.cursor_key, position.last_id, px=self.layer.key_ttl_ms)
        if position.trimmed_to != position.last_id:
            pipe.xtrim(self.key, minid=next_stream_id(position.last_id), approximate=False)

    def _bookkeeping_done(self, stored: Any) -> None:
        """Tell receivers about a reconnect, or about a reset seen without one."""
        layer, position = self.layer, self.layer.position
        intact = self._cursor_intact(stored)
        position.written_cursor = position.trimmed_to = position.last_id
        position.cursor_written_at = time.monotonic()
        if self._disconnected:
            self._disconnected = False
            layer.connection_back(intact)
        elif not intact:
            # Redis came back empty while this reader was not reading (between two
            # receives): no read failed, but what was in the inbox is gone.
            logger.warning("inbox %s was reset while idle", self.key)
            layer.connection_lost()
            layer.connection_back(False)

    def _cursor_intact(self, stored: Any) -> bool:
        """Is the cursor key still the one we wrote, so the inbox is the one we read?"""
        position = self.layer.position
        if position.written_cursor is None:
            return True  # nothing written yet: nothing to lose
        if stored is not None:
            return _as_bytes(stored) == position.written_cursor.encode()
        # Missing. After an idle spell longer than its TTL that is just the TTL.
        idle = time.monotonic() - position.cursor_written_at
        return not self._disconnected and idle * 1000 >= self.layer.key_ttl_ms

    async def _settle(self) -> None:
        position = self.layer.position
        if position.trimmed_to == position.last_id:
            return
        pipe = self.layer.connections.client(self.shard).pipeline(transaction=False)
        self._queue_bookkeeping(pipe)
        results = await pipe.execute()
        self._bookkeeping_done(results[0])

    async def _read(self) -> list[Entry]:
        layer, position = self.layer, self.layer.position
        pipe = layer.connections.client(self.shard).pipeline(transaction=False)
        self._queue_bookkeeping(pipe)
        block = layer.connections.block_timeout(self.shard, BLOCK_SECONDS)
        pipe.xread({self.key: position.last_id}, count=READ_BATCH, block=int(block * 1000))
        results = await pipe.execute()
        self._bookkeeping_done(results[0])
        return stream_entries(results[-1])
