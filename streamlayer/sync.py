"""Calls from synchronous code: ``async_to_sync(layer.group_send)(...)`` in a view,
a signal handler, a management command or a Celery task, without a new Redis
connection per call.

asgiref runs each such call on an event loop made for that call alone and
closed after it (in a thread made for it too). A redis.asyncio connection
belongs to the loop that opened it, so a layer whose connections are kept per
loop would open one per call: the TCP handshake, a HELLO, then a socket left to
the loop's teardown. The methods a sync caller uses (``send``, ``group_send``,
``group_add``, ``group_discard``) are wrapped by :func:`sync_aware`: when the
loop running the call is one asgiref made for that call (``async_to_sync`` of
the method itself, or of a function that awaits it), the call's Redis commands
go through the layer's synchronous, thread-safe redis-py clients instead
(:data:`SYNC_IO` tells :class:`~streamlayer.connections.ConnectionManager`), one
per host, shared by every thread. Blocking on their sockets holds nothing up:
that loop serves this one call. A thread holds a connection only while a call
of its is in flight, so the connections open are bounded by the threads calling
at the same moment, whatever the number of calls.

Anywhere else nothing changes: under an outer loop (a sync view in a
``sync_to_async`` thread of an ASGI server) asgiref runs the call on that loop,
which keeps its connections; a server's or a worker's own loop uses its pools.

The synchronous clients are closed by ``close()`` and at interpreter exit, and
a forked child forgets its parent's (redis-py's pools notice a fork as well).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

from asgiref.sync import AsyncToSync, markcoroutinefunction

__all__ = ["SYNC_IO", "sync_aware"]

T = TypeVar("T")
_Method = TypeVar("_Method", bound=Callable[..., Coroutine[Any, Any, Any]])

#: True while a sync caller's call runs: its Redis commands use the synchronous pools.
SYNC_IO: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "streamlayer_sync_io", default=False
)

#: The loops asgiref's async_to_sync made for one call each, while they run: asgiref
#: keeps them there (since 3.3) to find the thread a nested sync_to_async must use.
_ONE_CALL_LOOPS: dict[Any, Any] = getattr(AsyncToSync, "loop_thread_executors", {})


def sync_aware(method: _Method) -> _Method:
    """Wrap a layer coroutine method so that calls from sync code reuse connections
    (see the module docstring)."""

    @functools.wraps(method)
    def call(self: Any, /, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        coro = method(self, *args, **kwargs)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # created in sync code (asgiref 3.9+), run on some loop later
            return _where_it_runs(coro)
        return _with_sync_io(coro) if _one_call(loop) else coro

    return cast(_Method, markcoroutinefunction(call))


def _one_call(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` serves one async_to_sync call (and no call of it set SYNC_IO yet)."""
    return loop in _ONE_CALL_LOOPS and not SYNC_IO.get()


async def _where_it_runs(coro: Coroutine[Any, Any, T]) -> T:
    """Decide once running: a loop made for this one call uses the sync clients."""
    if _one_call(asyncio.get_running_loop()):
        return await _with_sync_io(coro)
    return await coro


async def _with_sync_io(coro: Coroutine[Any, Any, T]) -> T:
    token = SYNC_IO.set(True)
    try:
        return await coro
    finally:
        SYNC_IO.reset(token)
