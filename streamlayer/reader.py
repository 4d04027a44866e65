"""The skeleton of a background inbox reader, shared by the layers.

A layer with process-specific channels runs one reader task per inbox and
event loop while local receivers wait. What differs between layers is one
step of reading (a sorted-set pop, a stream read); what is shared lives here:
which event loop owns the task, how it stops, how it notices a swallowed
cancellation, and how a failure reaches the waiting receivers instead of
vanishing in a task nobody awaits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Sized
from typing import Any, Protocol

from .cancellation import CancelGuard
from .exceptions import LayerClosed
from .sync import background_context

__all__ = [
    "BLOCK_SECONDS",
    "WOKEN_TURNS",
    "BackgroundReader",
    "let_woken_run",
    "ready_queue",
    "reusable_task",
]

logger = logging.getLogger(__name__)

#: Longest blocking read of any reader; also bounded by half the socket timeout (see
#: ConnectionManager.block_timeout), so an idle wait never looks like a dead socket.
BLOCK_SECONDS = 5.0
#: Most event-loop turns a reader lets the receivers it woke run before its next read
#: (see let_woken_run). A Channels consumer's receive is three turns from its
#: handler: the receive task, ``asyncio.wait``'s callback, the consumer task.
WOKEN_TURNS = 6


class _Failable(Protocol):
    def fail(self, error: BaseException) -> None: ...


class _ReaderOwner(Protocol):
    """What a reader needs of its layer: the local queues it feeds, and where a lost
    connection is reported (the layer tells its channels)."""

    @property
    def local(self) -> _Failable: ...

    def connection_lost(self) -> None: ...


def reusable_task(
    task: asyncio.Future[Any] | None, what: str, running: asyncio.AbstractEventLoop
) -> bool:
    """Whether ``task`` can serve the ``running`` event loop.

    False when there is none, it has finished, or its loop has closed (an
    ``async_to_sync`` call that ended): the caller starts a new one. A task still
    running on another live loop cannot be shared, so that raises RuntimeError.
    The caller passes the running loop it already has: every receive() asks, and on
    Python 3.11 each ``asyncio.get_running_loop()`` is a ``getpid`` system call.
    """
    if task is None or task.done():
        return False
    loop = task.get_loop()
    if loop is running:
        return True
    if loop.is_closed():
        return False
    raise RuntimeError(f"{what} from two event loops at once: use one layer per event loop")


def ready_queue(loop: asyncio.AbstractEventLoop) -> Sized | None:
    """``loop``'s queue of callbacks ready to run: asyncio's own event loops keep one
    (a private attribute, there since Python 3.4); None for a loop without (uvloop)."""
    ready = getattr(loop, "_ready", None)
    return ready if isinstance(ready, collections.deque) else None


async def let_woken_run(ready: Sized | None) -> None:
    """Yield to the receivers a read just woke until the event loop has nothing else
    ready to run (at most WOKEN_TURNS turns): a reader calls it before writing its
    next read. ``ready``: the loop's :func:`ready_queue`; without one, one turn.

    Why: a receiver that replies sends at the end of its chain of callbacks, several
    turns away. A read written before that send puts a write, and the reply to the
    read's pipelined bookkeeping, on the reply's way; written after it, the read
    finds the reply's entry at once when it came to this process, and the send's
    and the read's replies wake the process once. A ping-pong's median fell by 15%
    (docs/performance.rst, "A sixth run")."""
    await asyncio.sleep(0)
    if ready is None:
        return
    for _ in range(WOKEN_TURNS - 1):
        if not ready:
            return
        await asyncio.sleep(0)


class BackgroundReader(ABC):
    """One task that calls :meth:`step` until it returns False, is cancelled or fails.

    A read that fails is retried by the layer's retry policy, which tells
    :meth:`lost_connection`: the first failure of a spell is reported to the layer
    once, and the reader checks at its next round that Redis still holds what it
    was reading (``check_redis``); the subclass reports the way back.
    """

    def __init__(self, owner: _ReaderOwner, name: str) -> None:
        self._owner = owner
        self._local = owner.local
        self.name = name
        #: A read failed and the way back has not been reported yet.
        self.disconnected = False
        #: Check at the next round that Redis still holds what this reader reads.
        self.check_redis = True
        self.loop = asyncio.get_running_loop()
        #: What let_woken_run looks at: the loop's callbacks ready to run.
        self.loop_ready = ready_queue(self.loop)
        self.task = self.loop.create_task(
            self._run(), name=f"streamlayer-inbox-{name}", context=background_context()
        )

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    def lost_connection(self, error: BaseException) -> None:
        """``on_error`` of the reader's retried reads."""
        self.check_redis = True
        if not self.disconnected:
            self.disconnected = True
            logger.warning("inbox %s lost its connection: %s", self.name, error)
            self._owner.connection_lost()

    @abstractmethod
    async def step(self) -> bool:
        """Read and dispatch one batch; False when nobody waits any more."""

    async def release(self) -> None:
        """Hand back what the reader holds for its life (a borrowed connection)."""
        return None

    async def _run(self) -> None:
        guard = CancelGuard()
        try:
            while await self.step():
                guard.check()
        except asyncio.CancelledError:
            raise
        except LayerClosed as exc:  # its event loop is winding down
            self._local.fail(exc)
        except Exception as exc:
            logger.error("inbox reader for %s stopped: %r", self.name, exc)
            self._local.fail(exc)
        finally:
            await self.release()
