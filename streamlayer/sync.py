"""Calls from synchronous code: ``async_to_sync(layer.group_send)(...)`` in a view,
a signal handler, a management command or a Celery task, without a new Redis
connection per call.

asgiref runs each such call on an event loop made for that call alone and
closed after it. A redis.asyncio connection belongs to the loop that opened it,
so a layer whose connections are kept per loop would open one per call (the TCP
handshake, a HELLO, then a socket left to the loop's teardown). The methods a
sync caller uses (``send``, ``group_send``, ``group_add``, ``group_discard``)
are wrapped by :func:`sync_aware`, which looks at where it is called from:

* **no running loop in this thread** (asgiref 3.9+ calls the method in the
  calling thread before it makes its loop; so does ``asyncio.run(layer.send(...))``):
  the call runs there and then, to completion, on a loop this thread keeps for
  such calls. The coroutine returned only hands the result over (or raises the
  error), so asgiref's loop has nothing left to do. Where asgiref will run the
  call on an outer loop instead (a sync view under an ASGI server, in a thread
  of ``sync_to_async``), the plain coroutine is returned: that loop keeps its
  connections anyway.
* **on a loop asgiref made for one call** (``async_to_sync(a_function)`` whose
  coroutine awaits the layer; asgiref before 3.9): the call runs where it is.
* **anywhere else** (a server's loop, a worker's own ``asyncio.run``): untouched.

In the first two cases the call's Redis commands go through the layer's
thread-safe, synchronous redis-py pools (:data:`SYNC_IO` tells
:class:`~streamlayer.connections.ConnectionManager` so), shared by every thread:
a thread holds one connection per shard only while a call of it is in flight,
so the connections open are bounded by the threads calling at the same moment.
Blocking on a socket is harmless there: the loop serves that one call only.

A thread's loop holds no connection, only its selector; it is closed when the
thread has ended (noticed when the next new thread calls), and every one of
them at interpreter exit. A forked child forgets its parent's loops, and
redis-py's synchronous pools notice the fork and open fresh connections.
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import functools
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

from asgiref.sync import AsyncToSync, SyncToAsync, markcoroutinefunction

__all__ = ["SYNC_IO", "sync_aware", "threads_with_loops"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_Method = TypeVar("_Method", bound=Callable[..., Coroutine[Any, Any, Any]])

#: True while a sync caller's call runs: its Redis commands use the synchronous pools.
SYNC_IO: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "streamlayer_sync_io", default=False
)

#: The loops asgiref's async_to_sync made for one call each (keyed by loop while it runs).
_ONE_CALL_LOOPS: dict[Any, Any] = getattr(AsyncToSync, "loop_thread_executors", {})


def sync_aware(method: _Method) -> _Method:
    """Wrap a layer coroutine method so that calls from sync code reuse connections
    (see the module docstring)."""

    @functools.wraps(method)
    def call(self: Any, /, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if _outer_loop() is not None:
                return method(self, *args, **kwargs)
            return _run_now(method(self, *args, **kwargs))
        if loop in _ONE_CALL_LOOPS and not SYNC_IO.get():
            return _with_sync_io(method(self, *args, **kwargs))
        return method(self, *args, **kwargs)

    return cast(_Method, markcoroutinefunction(call))


def _outer_loop() -> asyncio.AbstractEventLoop | None:
    """The loop asgiref's async_to_sync would run a call of this thread on (a sync
    view's server loop), found as asgiref finds it; None for a plain thread."""
    local = SyncToAsync.threadlocal
    if getattr(local, "main_event_loop_pid", None) != os.getpid():
        return None
    loop: asyncio.AbstractEventLoop | None = getattr(local, "main_event_loop", None)
    return loop if loop is not None and loop.is_running() else None


async def _with_sync_io(coro: Coroutine[Any, Any, T]) -> T:
    token = SYNC_IO.set(True)
    try:
        return await coro
    finally:
        SYNC_IO.reset(token)


def _run_now(coro: Coroutine[Any, Any, T]) -> Coroutine[Any, Any, T]:
    """Run a call to completion on this thread's loop; what it returns or raises is
    handed over by the coroutine returned."""
    loop = _thread_loop()
    try:
        result = loop.run_until_complete(_with_sync_io(coro))
    except Exception as error:
        return _raise(error)
    except BaseException:  # KeyboardInterrupt mid-call: the next call starts afresh
        _discard_thread_loop()
        raise
    return _return(result)


async def _return(value: T) -> T:
    return value


async def _raise(error: Exception) -> Any:
    raise error


# --- one loop per calling thread ---------------------------------------------------------

_lock = threading.Lock()
#: thread id -> (thread, its loop). Only that thread runs the loop.
_thread_loops: dict[int, tuple[threading.Thread, asyncio.AbstractEventLoop]] = {}
#: A forked child's copies of the parent's loops: kept so that nothing closes them.
_abandoned: list[Any] = []


def _thread_loop() -> asyncio.AbstractEventLoop:
    found = _thread_loops.get(threading.get_ident())
    current = threading.current_thread()
    if found is not None and found[0] is current and not found[1].is_closed():
        return found[1]
    loop = asyncio.new_event_loop()
    with _lock:
        ended = [(t, lp) for t, lp in _thread_loops.values() if not t.is_alive()]
        for thread, _ in ended:
            _thread_loops.pop(thread.ident or 0, None)
        _thread_loops[threading.get_ident()] = (current, loop)
    for _, old in ended:  # threads that ended since a new one last came: close their loops
        _close(old)
    return loop


def _discard_thread_loop() -> None:
    with _lock:
        found = _thread_loops.pop(threading.get_ident(), None)
    if found is not None:
        _close(found[1])


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """Close a loop no thread runs: cancel what a call left behind, then close it."""
    if loop.is_closed() or loop.is_running():
        return
    try:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    except Exception:
        logger.debug("error closing a sync caller's loop", exc_info=True)
    finally:
        loop.close()


def threads_with_loops() -> list[threading.Thread]:
    """The threads whose loops are open (for tests and diagnostics)."""
    with _lock:
        return [thread for thread, loop in _thread_loops.values() if not loop.is_closed()]


@atexit.register
def _close_all() -> None:
    """At interpreter exit: close every loop whose thread is not running it."""
    with _lock:
        loops = [loop for _, loop in _thread_loops.values()]
        _thread_loops.clear()
    for loop in loops:
        _close(loop)


def _forget_after_fork() -> None:
    global _lock
    _abandoned.extend(_thread_loops.values())
    _thread_loops.clear()
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
