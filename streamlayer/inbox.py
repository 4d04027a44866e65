"""The process inbox of :class:`~streamlayer.streams.StreamsChannelLayer`.

Every message for any process-specific channel of one process is appended to
that process's inbox, a capped Redis Stream. :class:`Inbox` is all of it on the
process's side: where the process is in the stream, the dedup tags of recent
entries, and the reader task. One reader per process (and event loop) reads it
in batches with a blocking XREAD resuming from the last entry id it handed on,
the inbox demultiplexes the entries into per-channel local queues, and the
reader trims what it consumed and records that id in a cursor key next to the
inbox (while what it reads goes straight to waiting receivers, it only trims, and
records the id once a blocking read's length).

XREAD does not remove anything, so the reader can be cancelled or lose its
connection at any point: it resumes from its last id and nothing accepted by
Redis is lost. After a reconnect the cursor tells whether Redis still holds
the same inbox (``recovered=True``) or came back without it (``False``).

The reader also reports, with every trim, what the process's queues hold for
each channel whose backlog changed (see ``_STREAM_APPEND`` in
:mod:`streamlayer.scripts`): a sender checks a channel's capacity against that
report plus the inbox entries naming it. After Redis lost the reports it
reports every backlog again.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from .batching import PendingCall, ShardBatcher
from .entries import (
    Entry,
    RecentTags,
    as_bytes,
    group_position,
    next_stream_id,
    raw_stream_entries,
    sent_ms,
    stream_entries,
)
from .history import POSITION_KEY, position_tag
from .host import LayerHost
from .keys import stream_inbox_key, stream_inbox_state_key
from .local import LocalChannels
from .reader import BLOCK_SECONDS, BackgroundReader, let_woken_run, reusable_task
from .redispy import KeptConnection, evalsha, exchange, read_replies, write_now
from .scripts import STREAM_INBOX_ADVANCE

__all__ = ["Inbox", "InboxPosition"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Entries read per round trip when the inbox is busy.
READ_BATCH = 512
#: How long the reader reads on after the last receiver stopped waiting.
LINGER_SECONDS = 0.5
#: Longest blocking read while local queues hold messages or nobody waits: receives
#: taking from the queues meanwhile give their channels' room back (in Redis) at the
#: next round trip, so a drained channel takes sends again within this time.
SHORT_BLOCK_SECONDS = 0.05


class Bookkeeping(enum.Enum):
    """What a read's round trip carries besides the XREAD (see
    InboxReader._bookkeeping_due)."""

    ADVANCE = "advance"
    TRIM = "trim"


class _Holder(Protocol):
    def hold(
        self, channel: str, group: str, position: str, message: dict[str, Any], deadline: float
    ) -> bool: ...


class InboxHost(LayerHost, Protocol):
    """What the inbox needs of its layer beyond any helper's: the local queues it
    feeds, the history that holds back messages of a join in flight, and where a
    reconnect is reported."""

    local: LocalChannels

    @property
    def history(self) -> _Holder: ...

    @property
    def key_ttl_ms(self) -> int: ...

    def connection_lost(self) -> None: ...

    async def connection_back(self, recovered: bool, data_lost: bool | None = None) -> None: ...


@dataclass
class InboxPosition:
    """Where this process is in its inbox; outlives any one reader task."""

    last_id: str = "0-0"
    written_cursor: str | None = None
    #: The last value sent to the cursor, landed or not (its reply may be lost).
    attempted_cursor: str | None = None
    cursor_written_at: float = 0.0
    trimmed_to: str | None = None


class Inbox:
    """One process's inbox: where it is in it, the reader task that reads it while
    receivers wait, and the demultiplexing of its entries into local channels."""

    def __init__(self, layer: InboxHost) -> None:
        self.layer = layer
        self.key = stream_inbox_key(layer.prefix, layer.process_id)
        self.state_key = stream_inbox_state_key(layer.prefix, layer.process_id)
        self.shard = layer.connections.shard_for(layer.process_id)
        self.position = InboxPosition()
        self.reader: InboxReader | None = None
        self._recent = RecentTags()

    def serve(self, channel: str, loop: asyncio.AbstractEventLoop) -> None:
        """Make sure a reader runs in ``loop`` (the running one) for a receive on
        ``channel``."""
        reader = self.reader
        running = reusable_task(
            reader.task if reader else None, "receive() on process-specific channels", loop
        )
        if not running and not self.layer.local.has_queued(channel):
            # The task first runs after local.get() has registered this receiver.
            self.reader = InboxReader(self)

    async def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop the reader if it runs in ``loop`` (a reader of a closed loop is dropped)."""
        reader, self.reader = self.reader, None
        if reader is not None and reader.loop is loop:
            await reader.stop()

    def reset(self) -> None:
        """Start over at the beginning of a (flushed) inbox."""
        self.position = InboxPosition()

    def dispatch(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Decode one inbox entry and hand it to the local channels it names (counted:
        their backlogs are reported to senders)."""
        layer = self.layer
        listed = fields.get(b"c")
        channels = listed.decode().split(",") if listed else []
        if not channels:
            layer.count("decode_errors")
            logger.warning("skipped an inbox entry that names no channel: %r", entry_id)
            return
        sent = sent_ms(entry_id) / 1000
        varied = bool(layer.config.channel_expiry)
        channels = self._unexpired(channels, sent, varied)
        if not channels:
            return
        if self._recent.seen(fields.get(b"i", entry_id)):
            layer.count("duplicates")
            return
        message = layer.try_deserialize(fields.get(b"d", b""), "the process inbox")
        if message is None:
            return
        deadline = sent + layer.config.expiry
        group, position = group_position(fields)
        if group is None and not varied:
            layer.local.deliver_to(channels, message, deadline, counted=True)
            return
        for channel in channels:
            copy = dict(message) if len(channels) > 1 else message
            if varied:
                deadline = sent + layer.get_expiry(channel)
            if group is not None:
                copy[POSITION_KEY] = position_tag(group, position)
                if layer.history.hold(channel, group, position, copy, deadline):
                    continue
            layer.local.deliver(channel, copy, deadline, counted=True)

    def _unexpired(self, channels: list[str], sent: float, varied: bool) -> list[str]:
        """Those of ``channels`` whose message sent at ``sent`` has not expired (each
        its own expiry when ``channel_expiry`` varies it); the others are counted."""
        layer = self.layer
        if varied:
            live = [c for c in channels if sent + layer.get_expiry(c) >= time.time()]
        else:
            live = channels if sent + layer.config.expiry >= time.time() else []
        if len(live) < len(channels):
            layer.count("expired", len(channels) - len(live))
        return live


class InboxReader(BackgroundReader):
    """Reads one process inbox while receivers wait; owned and restarted by its
    :class:`Inbox`."""

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox
        self.layer = inbox.layer
        self.key, self.state_key, self.shard = inbox.key, inbox.state_key, inbox.shard
        #: A reconnect to report (recovered or not) once the bookkeeping that found it
        #: is done: the layer restores what Redis lost before delivering anything newer.
        self._back: bool | None = None
        #: When a receiver last waited (the reader stops after LINGER_SECONDS without).
        self._wanted_at = time.monotonic()
        #: The connection this reader's reads go on, borrowed for the reader's life.
        self._connection = KeptConnection(partial(self.layer.connections.client, self.shard))
        #: What a failed read is called in the retry policy's messages.
        self._what = f"read inbox {self.key!r}"
        #: Each blocking read's length in ms, bounded by the socket timeout, and its
        #: XREAD (less the id to read after); made once, not per read.
        timeout = self.layer.connections.block_timeout
        self._block_ms = {
            block: int(timeout(self.shard, block) * 1000)
            for block in (BLOCK_SECONDS, SHORT_BLOCK_SECONDS)
        }
        self._xreads = {
            block: ("XREAD", "COUNT", READ_BATCH, "BLOCK", ms, "STREAMS", self.key)
            for block, ms in self._block_ms.items()
        }
        self._xread_now = ("XREAD", "COUNT", READ_BATCH, "STREAMS", self.key)
        #: The next read, written with a script call that rode with it and not read
        #: yet (see ride): the next _read reads its replies instead of writing.
        self._riding: _Ride | None = None
        #: The shard's batcher in this reader's loop, which calls ride with its reads.
        self._batcher: ShardBatcher | None = None
        super().__init__(self.layer, self.key)

    async def step(self) -> bool:
        layer, local = self.layer, self.layer.local
        now = time.monotonic()
        if local.waiting() or local.queued() or self._riding is not None:
            self._wanted_at = now
        elif now - self._wanted_at >= LINGER_SECONDS:
            # Nobody has waited for a while: record and trim what we consumed and
            # report the backlogs now rather than at the next read, so senders see the
            # true backlog; stop unless someone came.
            await layer.with_retry(f"trim inbox {self.key!r}", self._settle)
            await self._report_back()
            if not (local.waiting() or local.queued()):
                return False
        entries = await layer.with_retry(
            self._what,
            partial(self._read, self._block_seconds()),
            on_error=self.lost_connection,
            reader=True,
        )
        if self._back is not None:
            await self._report_back()
        position, dispatch = self.inbox.position, self.inbox.dispatch
        for entry_id, fields in entries:
            position.last_id = entry_id.decode()
            dispatch(entry_id, fields)
        local.sweep(time.time())
        if entries:
            # Let the receivers just woken run first: what they send in reply leaves
            # before our next read, which then finds it at once (a request/reply
            # round trip does not wait behind our read and its bookkeeping). While a
            # queue's backlog is to be reported, one turn only: the report gives
            # room back to senders, and goes before the consumers' own sends.
            if local.has_reports():
                await asyncio.sleep(0)
            else:
                await self._let_woken_run()
        return True

    def _block_seconds(self) -> float:
        """How long the next read may block. Between a receive() that returned and the
        next one of the same consumer nobody waits for a moment; reading on (briefly
        blocking) costs less than stopping and starting over, which a request/reply
        exchange would do for every message. While a consumer works through its
        queue, or may come back for more, short reads carry the shrinking backlog to
        Redis."""
        local = self.layer.local
        return BLOCK_SECONDS if local.waiting() and not local.queued() else SHORT_BLOCK_SECONDS

    async def _let_woken_run(self) -> None:
        """let_woken_run, offering this reader's next read to the first lone script
        call the receivers make meanwhile (see :meth:`ride`)."""
        if self.layer.connections.is_cluster:  # a cluster's reads go through its client
            await let_woken_run(self.loop_ready)
            return
        batcher = self._batcher
        if batcher is None:
            # Looked up once: the reader lives in one loop, whose batcher for the shard
            # stays while the reader does (finding it asks for the running loop, a
            # system call on Python 3.11, once a hop otherwise).
            batcher = self._batcher = self.layer.connections.batcher(self.shard)
        batcher.rider = self
        try:
            await let_woken_run(self.loop_ready)
        finally:
            if batcher.rider is self:
                batcher.rider = None

    def ride(self, call: PendingCall) -> bool:
        """Write this reader's next read now, with ``call`` (a lone script call from
        one of the receivers it woke) between the read's bare trim and its XREAD,
        in one write on the reader's connection; the next _read reads the replies
        and settles the call's future with its own. One write a hop instead of two
        in a request/reply exchange, and the XREAD finds the call's entry at once
        when it came to this process (streamlayer.batching). False, writing
        nothing, when the bookkeeping script is due or the write could wait (the
        call then goes the usual way)."""
        connection = self._connection.ready()
        if connection is None or self._riding is not None:
            return False
        checking, due = self._due()
        if due is Bookkeeping.ADVANCE:
            # Its arguments take the queues' reports, which must reach Redis; and a
            # report goes before the consumers' sends anyway (see step).
            return False
        read = self._commands(self._block_seconds(), checking, due)
        at = len(read.commands) - 1  # the call goes right before the XREAD
        commands = list(read.commands)
        commands.insert(at, evalsha(call.script.sha, call.keys, call.args))
        if not write_now(connection, commands):
            return False
        self._riding = _Ride(read, commands, call, at)
        return True

    def _bookkeeping_due(self, checking: bool, since_write: float) -> Bookkeeping | None:
        """What the next round trip must also do besides reading.

        ``ADVANCE`` (the bookkeeping script: record our position, trim, report the
        backlogs) when the cursor must be checked (see _cursor_check_due), when a
        queue's backlog changed, and when the state's TTL wants refreshing.

        ``TRIM`` (a bare XTRIM) when entries were handed on and nothing else is due:
        every one of them went straight to a waiting receiver, so no backlog moved
        and the reports stand as they are. Senders' capacity checks count what is left
        in the inbox, so a drained channel must take new messages at once; the bare
        trim does that for 4-8 us less of Redis' time per request/reply round than the
        script (docs/performance.rst). The cursor then lags our position, by a
        blocking read's length at most; it stays one we wrote.

        ``None``: an idle blocking read is a bare XREAD. ``since_write``: seconds since
        the cursor was last written."""
        position = self.inbox.position
        if (
            checking
            or self.layer.local.has_reports()
            or since_write * 2000 > self.layer.key_ttl_ms
        ):
            return Bookkeeping.ADVANCE
        if position.trimmed_to != position.last_id:
            return Bookkeeping.TRIM
        return None

    def _cursor_check_due(self, since_write: float) -> bool:
        """Whether the next round trip must find out if Redis lost the inbox: a new
        reader, one back from a disconnect, and every blocking read's length at least
        (a FLUSHALL or a failover to an empty replica breaks no connection, and only
        the cursor tells). Such a round trip reads without blocking: what it finds is
        acted on before anything waits, because a Redis that lost its data lost this
        process's group memberships too, and until they are restored nothing is sent
        to this inbox that could end a blocking read."""
        return self.check_redis or since_write >= BLOCK_SECONDS

    def _advance_args(self) -> list[Any]:
        """STREAM_INBOX_ADVANCE's arguments: record our position, trim the entries
        handed on and report the backlogs (the script returns the cursor's previous
        value: did Redis lose the inbox?)."""
        position = self.inbox.position
        # If the reply is lost, Redis may hold this value or the previous one: both
        # are ours (see _cursor_intact).
        position.attempted_cursor = position.last_id
        trim = next_stream_id(position.last_id) if position.trimmed_to != position.last_id else ""
        changed, busiest = self.layer.local.reports()
        reports = ",".join(f"{channel},{backlog}" for channel, backlog in changed.items())
        return [position.last_id, self.layer.key_ttl_ms, trim, busiest, reports]

    async def _bookkeeping_result(self, stored: Any) -> None:
        """Act on the cursor's previous value. A server that lost its script cache (a
        restart) gets the script again (LuaScript loads it), and the bookkeeping runs
        at once: what it finds must reach receivers before the entries just read."""
        if isinstance(stored, NoScriptError):
            await self._advance()
            return
        if isinstance(stored, Exception):
            raise stored
        self._bookkeeping_done(stored)

    def _bookkeeping_done(self, stored: Any) -> None:
        """Tell receivers about a reconnect, or about a reset seen without one."""
        layer, position = self.layer, self.inbox.position
        intact = self._cursor_intact(stored)
        if stored is None and position.written_cursor is not None:
            # The state hash is gone with the reports (lost with the inbox, or expired):
            # report every backlog our queues hold again.
            layer.local.report_all()
        position.written_cursor = position.trimmed_to = position.last_id
        position.cursor_written_at = time.monotonic()
        self.check_redis = False
        if self.disconnected:
            self.disconnected = False
            self._back = intact
        elif not intact:
            # Redis came back empty while this reader was not reading (between two
            # receives): no read failed, but what was in the inbox is gone.
            logger.warning("inbox %s was reset while idle", self.key)
            layer.connection_lost()
            self._back = False

    async def _report_back(self) -> None:
        """Tell the layer about a reconnect the last bookkeeping found: it restores the
        group memberships Redis lost, then notifies the local channels."""
        back, self._back = self._back, None
        if back is not None:
            await self.layer.connection_back(back)

    def _cursor_intact(self, stored: Any) -> bool:
        """Is the cursor key still the one we wrote, so the inbox is the one we read?"""
        position = self.inbox.position
        if position.written_cursor is None:
            return True  # nothing written yet: nothing to lose
        if stored is not None:
            ours = {position.written_cursor, position.attempted_cursor}
            return as_bytes(stored).decode() in ours
        # Missing. After an idle spell longer than its TTL that is just the TTL.
        idle = time.monotonic() - position.cursor_written_at
        return not self.disconnected and idle * 1000 >= self.layer.key_ttl_ms

    async def _settle(self) -> None:
        """Record and trim everything handed on (the reader is about to stop)."""
        position = self.inbox.position
        if position.trimmed_to != position.last_id or self.layer.local.has_reports():
            await self._advance()

    async def _advance(self) -> None:
        """The bookkeeping as a round trip of its own."""
        client = self.layer.connections.client(self.shard)
        keys = [self.state_key, self.key]
        self._bookkeeping_done(await STREAM_INBOX_ADVANCE(client, keys, self._advance_args()))

    def _trim_command(self, upto: str) -> tuple[Any, ...]:
        """XTRIM of every entry up to ``upto`` (exact: MINID without '~')."""
        return ("XTRIM", self.key, "MINID", next_stream_id(upto))

    def _trimmed(self, reply: Any, trimmed_to: str) -> None:
        """Note a bare trim's outcome (a failed one is tried again at the next read)."""
        if isinstance(reply, Exception):
            raise reply
        self.inbox.position.trimmed_to = trimmed_to

    def _due(self) -> tuple[bool, Bookkeeping | None]:
        """Whether the next read checks the cursor, and the bookkeeping due with it."""
        since_write = time.monotonic() - self.inbox.position.cursor_written_at
        checking = self._cursor_check_due(since_write)
        return checking, self._bookkeeping_due(checking, since_write)

    def _commands(self, block_seconds: float, checking: bool, due: Bookkeeping | None) -> _Read:
        """The next read's commands: the bookkeeping due, if any, then the XREAD (the
        bookkeeping script's arguments take the queues' reports: build it to send it)."""
        position = self.inbox.position
        xread = self._xread_now if checking else self._xreads[block_seconds]
        commands: list[tuple[Any, ...]] = [(*xread, position.last_id)]
        if due is Bookkeeping.ADVANCE:
            keys = [self.state_key, self.key]
            commands.insert(0, evalsha(STREAM_INBOX_ADVANCE.sha, keys, self._advance_args()))
        elif due is Bookkeeping.TRIM:
            commands.insert(0, self._trim_command(position.last_id))
        return _Read(commands, due, position.last_id)

    async def _read(self, block_seconds: float) -> list[Entry]:
        """Bookkeeping (when due) and the blocking XREAD in one round trip, on the
        reader's own connection (or the replies of the read a call rode with); on a
        Redis Cluster, whose pipelines refuse scripts, in two, through the cluster
        client."""
        layer, position = self.layer, self.inbox.position
        if layer.connections.is_cluster:
            checking, due = self._due()
            trimmed_to = position.last_id
            client = layer.connections.client(self.shard)
            if due is Bookkeeping.ADVANCE:
                await self._advance()
            elif due is Bookkeeping.TRIM:
                minid = next_stream_id(trimmed_to)
                self._trimmed(
                    await client.xtrim(self.key, minid=minid, approximate=False), trimmed_to
                )
            block = None if checking else self._block_ms[block_seconds]  # see _cursor_check_due
            streams: dict[Any, Any] = {self.key: position.last_id}
            return stream_entries(await client.xread(streams, count=READ_BATCH, block=block))
        riding, self._riding = self._riding, None
        if riding is not None:
            read = riding.read
            replies = await self._read_ridden(riding)
        else:
            read = self._commands(block_seconds, *self._due())
            connection = self._connection.ready() or await self._connection.get()
            replies = await exchange(connection, read.commands)
        if isinstance(replies[-1], Exception):
            raise replies[-1]
        if read.due is Bookkeeping.ADVANCE:
            await self._bookkeeping_result(replies[0])
        elif read.due is Bookkeeping.TRIM:
            self._trimmed(replies[0], read.trimmed_to)
        return raw_stream_entries(replies[-1])

    async def _read_ridden(self, riding: _Ride) -> list[Any]:
        """The replies of a read a call rode with, less the call's, which settles the
        call as soon as it is read. A failure fails the call too: the caller retries
        it, as after any lost reply."""
        connection = self._connection.ready()
        call = riding.call

        def settle(index: int, reply: Any) -> None:
            if index == riding.at and not call.future.done():
                if isinstance(reply, Exception):
                    call.future.set_exception(reply)
                else:
                    call.future.set_result(reply)

        try:
            if connection is None:
                raise RedisConnectionError("the reader's connection closed under a ride")
            replies = await read_replies(connection, len(riding.commands), settle)
        except BaseException as exc:
            riding.fail(exc)
            raise
        del replies[riding.at]
        return replies

    async def release(self) -> None:
        riding, self._riding = self._riding, None
        if riding is not None:  # written, never read: its replies would come to the next user
            riding.fail(RedisConnectionError("the inbox reader stopped before its reply"))
            connection = self._connection.ready()
            if connection is not None:
                await connection.disconnect(nowait=True)
        await self._connection.give_back()


@dataclass
class _Read:
    """A reader's next read: its commands (the bookkeeping due, then the XREAD)."""

    commands: list[tuple[Any, ...]]
    due: Bookkeeping | None
    #: The id up to which its bare trim, if any, trims.
    trimmed_to: str


@dataclass
class _Ride:
    """A read written with a script call that rode with it (InboxReader.ride)."""

    read: _Read
    #: What was written: the read's commands with the call's EVALSHA at ``at``.
    commands: list[tuple[Any, ...]]
    call: PendingCall
    at: int

    def fail(self, error: BaseException) -> None:
        """The call's reply is lost with the connection: the caller retries."""
        if not self.call.future.done():
            if not isinstance(error, Exception):  # cancelled: the reader is stopping
                error = RedisConnectionError("the inbox reader stopped before its reply")
            self.call.future.set_exception(error)
