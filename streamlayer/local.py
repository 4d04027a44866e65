"""Per-process delivery of messages to local channels.

A background reader fetches messages for many process-specific channels at
once; this object holds them until ``receive()`` asks. It is deliberately
dumb: bounded per-channel queues plus a list of waiting receivers, so that a
``receive()`` is nothing but an await on a future and can be cancelled at any
moment without losing or duplicating a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["LocalChannels"]

logger = logging.getLogger(__name__)

Message = dict[str, Any]
#: A queued message with the wall-clock time after which it must not be delivered.
_Entry = tuple[float, Message]


class LocalChannels:
    """Bounded queues of delivered-but-not-received messages, one per local channel."""

    def __init__(self, capacity_for: Callable[[str], int]) -> None:
        self._capacity_for = capacity_for
        self._queues: dict[str, deque[_Entry]] = {}
        self._waiters: dict[str, deque[asyncio.Future[_Entry]]] = {}
        #: Messages thrown away because their channel's queue was full.
        self.dropped = 0
        #: Messages that reached their deadline before anyone received them.
        self.expired = 0
        self._waiting = 0
        self._next_sweep = 0.0
        #: When each channel last had a receive(): who to tell about disconnects.
        self._touched: dict[str, float] = {}

    def waiting(self) -> int:
        """How many receivers wait without a message yet (O(1): the reader asks every batch)."""
        return self._waiting

    def touch(self, channel: str) -> None:
        """Note that ``channel`` is being received from (it has a live consumer)."""
        self._touched[channel] = time.monotonic()

    def active_channels(self, window: float) -> list[str]:
        """Channels received from within the last ``window`` seconds."""
        since = time.monotonic() - window
        return [c for c, at in self._touched.items() if at >= since]

    def has_waiters(self, channel: str) -> bool:
        return bool(self._waiters.get(channel))

    def forget(self, channel: str) -> None:
        """Drop ``channel``'s queue (its consumer is gone)."""
        self._queues.pop(channel, None)
        self._touched.pop(channel, None)

    def has_queued(self, channel: str) -> bool:
        return bool(self._queues.get(channel))

    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def deliver(self, channel: str, message: Message, deadline: float) -> None:
        """Hand ``message`` to a waiting receiver of ``channel``, or queue it."""
        if self._wake_one(channel, (deadline, message)):
            return
        queue = self._queues.setdefault(channel, deque())
        if len(queue) >= self._capacity_for(channel):
            # Nobody has read this channel for a while: its consumer is gone or
            # stuck. Dropping the oldest keeps memory bounded.
            queue.popleft()
            self.dropped += 1
            logger.warning("local channel %s is full; dropped its oldest message", channel)
        queue.append((deadline, message))

    async def get(self, channel: str) -> Message:
        """The next message of ``channel``, waiting for one if needed. Cancellation-safe.

        Awaits its future itself (no helper coroutine): this is the innermost frame of
        every receive(), resumed once per message."""
        if channel in self._queues:
            message = self._pop_live(channel)
            if message is not None:
                return message
        loop = asyncio.get_running_loop()
        while True:
            future: asyncio.Future[_Entry] = loop.create_future()
            waiters = self._waiters.get(channel)
            if waiters is None:
                waiters = self._waiters[channel] = deque()
            waiters.append(future)
            self._waiting += 1
            try:
                deadline, message = await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled() and future.exception() is None:
                    # The message arrived in the same instant we were cancelled:
                    # give it to the next receiver instead of losing it.
                    self._requeue(channel, future.result())
                raise
            finally:
                self._forget_waiter(channel, future)
            if deadline >= time.time():
                return message
            self.expired += 1

    def fail(self, error: BaseException) -> None:
        """Wake every waiting receiver with ``error`` (the reader gave up, or the layer closed)."""
        waiters, self._waiters = self._waiters, {}
        self._waiting = 0
        for queue in waiters.values():
            for future in queue:
                if not future.done():
                    future.set_exception(error)

    def clear(self) -> None:
        self._queues.clear()
        self._touched.clear()

    def sweep(self, now: float) -> None:
        """Forget queues whose messages have all expired (their consumer is gone).

        Cheap to call often: it does the work at most once a second."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        idle_since = time.monotonic() - 600
        for channel in [c for c, at in self._touched.items() if at < idle_since]:
            del self._touched[channel]
        for channel in [c for c, q in self._queues.items() if q and q[-1][0] < now]:
            self.expired += len(self._queues.pop(channel))

    def _pop_live(self, channel: str) -> Message | None:
        queue = self._queues.get(channel)
        now = time.time()
        while queue:
            deadline, message = queue.popleft()
            if not queue:
                del self._queues[channel]
            if deadline >= now:
                return message
            self.expired += 1
        return None

    def _forget_waiter(self, channel: str, future: asyncio.Future[_Entry]) -> None:
        """Drop a finished or cancelled receiver's future (a woken one is gone already)."""
        current = self._waiters.get(channel)
        if current is not None:
            if not future.done() or future.cancelled():
                with contextlib.suppress(ValueError):
                    current.remove(future)
                    self._waiting -= 1
            if not current:
                del self._waiters[channel]

    def _requeue(self, channel: str, entry: _Entry) -> None:
        if not self._wake_one(channel, entry):
            self._queues.setdefault(channel, deque()).appendleft(entry)

    def _wake_one(self, channel: str, entry: _Entry) -> bool:
        waiters = self._waiters.get(channel)
        while waiters:
            future = waiters.popleft()
            self._waiting -= 1
            if not future.done():
                future.set_result(entry)
                return True
        return False
