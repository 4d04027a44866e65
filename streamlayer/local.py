"""Per-process delivery of messages to local channels.

A background reader fetches messages for many process-specific channels at
once; this object holds them until ``receive()`` asks. It is deliberately
dumb: per-channel queues plus a list of waiting receivers, so that a
``receive()`` is nothing but an await on a future and can be cancelled at any
moment without losing or duplicating a message.

The queues have no capacity of their own. A message that reached them was
accepted by a send, and accepted means delivered: capacity is enforced where
the sender sees it (``ChannelFull``, a skipped group member), never by
throwing away what already arrived. What bounds a queue is the layer's send
side (the Streams layer counts each channel's unreceived messages in Redis,
these queues included) and ``expiry`` (a message nobody received in time is
dropped, counted as expired).

For the Streams layer every message that came through its process inbox is
*counted*: a sender checks a channel's capacity against what its process
reported it holds for the channel (see ``_STREAM_APPEND`` in
:mod:`streamlayer.scripts`). :meth:`reports` hands the reader the channels
whose counted backlog changed since it last reported, and the largest one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["LocalChannels"]

Message = dict[str, Any]
#: A queued message: the wall-clock time after which it must not be delivered, the
#: message, whether its channel's count in Redis includes it, and whether the message
#: is shared by several channels (a group's local members): then one entry serves
#: them all and each receiver takes a copy of its own when it takes the message.
_Entry = tuple[float, Message, bool, bool]


def _no_count(name: str, n: int) -> None:
    """A counter sink for LocalChannels built without one (tests, tools)."""


class LocalChannels:
    """Queues of delivered-but-not-received messages, one per local channel."""

    def __init__(self, count: Callable[[str, int], None] = _no_count) -> None:
        #: The layer's counters (``stats.count``): expired and dropped messages.
        self._count = count
        self._queues: dict[str, deque[_Entry]] = {}
        self._waiters: dict[str, deque[asyncio.Future[_Entry]]] = {}
        self._waiting = 0
        #: Messages in all queues (O(1): the reader asks every round).
        self._queued = 0
        self._next_sweep = 0.0
        #: When each channel last had a receive(): who to tell about disconnects.
        self._touched: dict[str, float] = {}
        #: Counted messages queued per channel (only channels with some).
        self._counted: dict[str, int] = {}
        #: What the reader last reported per channel (absent: 0), and channels whose
        #: count may differ from it now.
        self._reported: dict[str, int] = {}
        self._dirty: set[str] = set()
        #: The largest counted backlog at the last report.
        self._busiest = 0
        #: Channels whose consumer asked for the layer's connection notices.
        self._noticed: set[str] = set()

    def waiting(self) -> int:
        """How many receivers wait without a message yet (O(1): the reader asks every batch)."""
        return self._waiting

    def queued(self) -> int:
        """How many messages wait in queues for a receive() (O(1))."""
        return self._queued

    def touch(self, channel: str) -> None:
        """Note that ``channel`` is being received from (it has a live consumer)."""
        self._touched[channel] = time.monotonic()

    def active_channels(self, window: float) -> list[str]:
        """Channels received from within the last ``window`` seconds."""
        since = time.monotonic() - window
        return [c for c, at in self._touched.items() if at >= since]

    def live_channels(self, window: float) -> set[str]:
        """Channels a receive() waits on now or came to within ``window`` seconds: the
        ones with a consumer (a WebSocket consumer waits in receive() all the time)."""
        live = set(self.active_channels(window))
        live.update(channel for channel, waiters in self._waiters.items() if waiters)
        return live

    def want_notices(self, channel: str) -> None:
        """``channel``'s consumer handles the layer's connection notices (it asked)."""
        self._noticed.add(channel)
        self.touch(channel)

    def tell(self, message: Message, candidates: Iterable[str], deadline: float) -> int:
        """Deliver a copy of the notice ``message`` to each of ``candidates`` that asked
        for notices; returns how many candidates did not ask (they get nothing: a
        consumer without a handler for the notice's type would be closed by it)."""
        unasked = 0
        for channel in sorted(candidates):
            if channel in self._noticed:
                self.deliver(channel, dict(message), deadline)
            else:
                unasked += 1
        return unasked

    def has_waiters(self, channel: str) -> bool:
        return bool(self._waiters.get(channel))

    def has_queued(self, channel: str) -> bool:
        return bool(self._queues.get(channel))

    def has_reports(self) -> bool:
        """Whether some channel's counted backlog may differ from what was reported."""
        return bool(self._dirty)

    def reports(self) -> tuple[dict[str, int], int]:
        """The channels whose counted backlog changed since the last call, with their
        backlog now (0: gone), and the largest backlog of any channel. Reported to
        Redis, they are what senders check capacity against."""
        if not self._dirty:  # nothing moved: the largest is what it was
            return {}, self._busiest
        changed: dict[str, int] = {}
        for channel in self._dirty:
            now = self._counted.get(channel, 0)
            if now != self._reported.get(channel, 0):
                changed[channel] = now
                if now:
                    self._reported[channel] = now
                else:
                    del self._reported[channel]
        self._dirty.clear()
        self._busiest = max(self._counted.values(), default=0)
        return changed, self._busiest

    def report_all(self) -> None:
        """Report every backlog again at the next call (Redis lost what was reported)."""
        self._reported.clear()
        self._dirty.update(self._counted)

    def _add_counted(self, channel: str, n: int) -> None:
        left = self._counted.get(channel, 0) + n
        if left > 0:
            self._counted[channel] = left
        else:
            self._counted.pop(channel, None)
        self._dirty.add(channel)

    def deliver(
        self, channel: str, message: Message, deadline: float, *, counted: bool = False
    ) -> None:
        """Hand ``message`` to a waiting receiver of ``channel``, or queue it."""
        self._hand(channel, (deadline, message, counted, False))

    def _hand(self, channel: str, entry: _Entry) -> None:
        if self._wake_one(channel, entry):
            return
        queue = self._queues.get(channel)
        if queue is None:
            queue = self._queues[channel] = deque()
        queue.append(entry)
        self._queued += 1
        if entry[2]:
            self._add_counted(channel, 1)

    def deliver_to(
        self, channels: Sequence[str], message: Message, deadline: float, *, counted: bool = False
    ) -> None:
        """Deliver one decoded message to each of ``channels`` (a group's local
        members): each gets its own copy when there are several, as a consumer may
        change what it received.

        The copy is made when a receiver takes the message, not here: one entry is
        handed to every member, so a group send to thousands of local members
        allocates nothing per member in the burst. Copies made here all at once
        outlived the garbage collector's young generation (their receivers had not
        run yet), and promoting them cost a group of 2,500 members per process 1.6
        µs per delivery, a third of the total (docs/performance.rst, "A fifth run")."""
        if len(channels) == 1:
            self.deliver(channels[0], message, deadline, counted=counted)
            return
        entry = (deadline, message, counted, True)
        for channel in channels:
            self._hand(channel, entry)

    async def get(self, channel: str, loop: asyncio.AbstractEventLoop | None = None) -> Message:
        """The next message of ``channel``, waiting for one if needed (the channel is
        touched: it has a live consumer). Cancellation-safe.

        Awaits its future itself (no helper coroutine): this is the innermost frame of
        every receive(), resumed once per message, so the common path calls no other
        function of ours. ``loop``: the running loop, if the caller has it at hand."""
        self._touched[channel] = time.monotonic()
        if channel in self._queues:
            message = self._pop_live(channel)
            if message is not None:
                return message
        if loop is None:
            loop = asyncio.get_running_loop()
        while True:
            future: asyncio.Future[_Entry] = loop.create_future()
            waiters = self._waiters.get(channel)
            if waiters is None:
                waiters = self._waiters[channel] = deque()
            waiters.append(future)
            self._waiting += 1
            try:
                deadline, message, _, shared = await future
            except BaseException:
                # Cancelled (or failed by fail(), whose future is gone already).
                if future.done() and not future.cancelled() and future.exception() is None:
                    # The message arrived in the same instant we were cancelled:
                    # give it to the next receiver instead of losing it.
                    self._requeue(channel, future.result())
                self._forget_waiter(channel, future)
                raise
            # Woken with a message: _wake_one took the future off the queue already.
            if deadline >= time.time():
                return dict(message) if shared else message
            self._count("expired", 1)

    def fail(self, error: BaseException) -> None:
        """Wake every waiting receiver with ``error`` (the reader gave up, or the layer closed)."""
        waiters, self._waiters = self._waiters, {}
        self._waiting = 0
        for queue in waiters.values():
            for future in queue:
                if not future.done():
                    future.set_exception(error)

    def forget(self, channel: str) -> None:
        """Drop ``channel``'s queue: its consumer is gone for good (counted as dropped)."""
        queue = self._queues.pop(channel, None)
        self._touched.pop(channel, None)
        self._noticed.discard(channel)
        if queue:
            self._leave(channel, queue)
            self._count("dropped", len(queue))

    def clear(self) -> None:
        """Forget everything (the layer was flushed: Redis forgot it too)."""
        self._queues.clear()
        self._touched.clear()
        self._noticed.clear()
        self._counted.clear()
        self._reported.clear()
        self._dirty.clear()
        self._busiest = 0
        self._queued = 0

    def sweep(self, now: float) -> None:
        """Forget queues whose messages have all expired (their consumer is gone).

        Cheap to call often: it does the work at most once a second."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        idle_since = time.monotonic() - 600
        for channel in [c for c, at in self._touched.items() if at < idle_since]:
            del self._touched[channel]
        for channel in [c for c, waiters in self._waiters.items() if not waiters]:
            del self._waiters[channel]
        for channel in [c for c in self._noticed if c not in self._touched]:
            if not self._waiters.get(channel):
                self._noticed.discard(channel)
        for channel in [c for c, q in self._queues.items() if q and q[-1][0] < now]:
            queue = self._queues.pop(channel)
            self._leave(channel, queue)
            self._count("expired", len(queue))

    def _leave(self, channel: str, entries: deque[_Entry]) -> None:
        """``entries`` left ``channel``'s queue without a receive()."""
        self._queued -= len(entries)
        counted = sum(1 for entry in entries if entry[2])
        if counted:
            self._add_counted(channel, -counted)

    def _pop_live(self, channel: str) -> Message | None:
        queue = self._queues.get(channel)
        now = time.time()
        while queue:
            deadline, message, counted, shared = queue.popleft()
            self._queued -= 1
            if not queue:
                del self._queues[channel]
            if counted:
                self._add_counted(channel, -1)
            if deadline >= now:
                return dict(message) if shared else message
            self._count("expired", 1)
        return None

    def _forget_waiter(self, channel: str, future: asyncio.Future[_Entry]) -> None:
        """Drop a cancelled receiver's future (a woken one is gone already). The empty
        queue of waiters stays for the channel's next receive (a consumer receives
        again at once); :meth:`sweep` drops those of channels nobody receives from."""
        if future.done() and not future.cancelled():
            return
        current = self._waiters.get(channel)
        if current is not None:
            with contextlib.suppress(ValueError):
                current.remove(future)
                self._waiting -= 1

    def _requeue(self, channel: str, entry: _Entry) -> None:
        if not self._wake_one(channel, entry):
            self._queues.setdefault(channel, deque()).appendleft(entry)
            self._queued += 1
            if entry[2]:
                self._add_counted(channel, 1)

    def _wake_one(self, channel: str, entry: _Entry) -> bool:
        waiters = self._waiters.get(channel)
        while waiters:
            future = waiters.popleft()
            self._waiting -= 1
            if not future.done():
                future.set_result(entry)
                return True
        return False
