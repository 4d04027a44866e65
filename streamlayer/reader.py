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
import contextlib
import logging
from abc import ABC, abstractmethod
from typing import Any, Protocol

from .cancellation import CancelGuard
from .exceptions import LayerClosed

__all__ = ["BackgroundReader", "reusable_task"]

logger = logging.getLogger(__name__)


class _Failable(Protocol):
    def fail(self, error: BaseException) -> None: ...


def reusable_task(task: asyncio.Future[Any] | None, what: str) -> bool:
    """Whether ``task`` can serve the running event loop.

    False when there is none, it has finished, or its loop has closed (an
    ``async_to_sync`` call that ended): the caller starts a new one. A task still
    running on another live loop cannot be shared, so that raises RuntimeError.
    """
    if task is None or task.done():
        return False
    loop = task.get_loop()
    if loop is asyncio.get_running_loop():
        return True
    if loop.is_closed():
        return False
    raise RuntimeError(f"{what} from two event loops at once: use one layer per event loop")


class BackgroundReader(ABC):
    """One task that calls :meth:`step` until it returns False, is cancelled or fails."""

    def __init__(self, local: _Failable, name: str) -> None:
        self._local = local
        self.name = name
        self.loop = asyncio.get_running_loop()
        self.task = self.loop.create_task(self._run(), name=f"streamlayer-inbox-{name}")

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    @abstractmethod
    async def step(self) -> bool:
        """Read and dispatch one batch; False when nobody waits any more."""

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
