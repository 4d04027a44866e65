"""Honouring a cancellation that a library swallowed.

On Python 3.11, ``asyncio.wait_for`` returns the inner result instead of
raising when a cancellation arrives just as the inner awaitable finishes
(python/cpython#86296, fixed in 3.12). redis-py wraps every command it sends in
``wait_for(..., socket_timeout)``, so a cancelled ``receive()`` can carry on as
if nothing happened and block on its next read: with Channels cancelling
``receive()`` on every consumer exit, that stalls a channel. Loops that issue
Redis commands on behalf of a cancellable task check a :class:`CancelGuard`
after each command and raise the cancellation themselves.
"""

from __future__ import annotations

import asyncio

__all__ = ["CancelGuard"]


class CancelGuard:
    """Remembers how many cancellations the current task had when it was made."""

    def __init__(self) -> None:
        self._task = asyncio.current_task()
        self._baseline = self._task.cancelling() if self._task is not None else 0

    @property
    def requested(self) -> bool:
        """True if the task was asked to cancel since, even if the request was swallowed."""
        return self._task is not None and self._task.cancelling() > self._baseline

    def check(self) -> None:
        """Raise the cancellation a library swallowed."""
        if self.requested:
            raise asyncio.CancelledError
