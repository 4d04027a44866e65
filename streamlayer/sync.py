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

The thread asgiref starts for every call (and the GIL handoffs while the last
one winds down) costs more than the call's own work. asgiref 3.9+ calls the
method in the caller's thread before choosing where to run the coroutine, and
3.10+ can run every call of a context in one kept thread
(``AsyncSingleThreadContext``). When ``async_to_sync(layer.method)`` is called
from a plain thread, the wrapper asks for that: one kept thread per calling
thread (and process), set only for this call (undone in the caller's thread
while the call runs, so the caller's other ``async_to_sync`` calls are left as
they were), ending when the calling thread ends.

asgiref's loop is made only after the method is called, so the call's first
steps (argument checks, encoding, and its first command, sent on the sync
client) run in the caller's thread, and the call pauses there
(:func:`pause_after_send`); asgiref's loop resumes it to read the reply, which
has been on its way meanwhile. The call runs in a context of its own, driven
step by step as ``await`` would drive it. Nothing asyncio needs a loop for
happens before the pause: a failure is raised, and any other command is sent,
only once the loop has resumed the call.

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
import logging
import os
import sys
import threading
import types
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Sequence
from typing import Any, TypeVar, cast

import redis
from asgiref.sync import AsyncToSync, SyncToAsync, markcoroutinefunction
from redis import asyncio as aioredis

from .redispy import lend_sync_connection
from .scripts import LuaScript

try:  # asgiref 3.10+
    from asgiref.sync import AsyncSingleThreadContext
except ImportError:  # pragma: no cover - older asgiref: a thread per call, as before
    AsyncSingleThreadContext = object  # type: ignore[assignment,misc]

__all__ = [
    "SEND_FIRST_HERE",
    "SYNC_IO",
    "SyncCallerClient",
    "SyncCallerPipeline",
    "background_context",
    "pause_after_send",
    "sync_aware",
    "sync_aware_on_loop",
]

T = TypeVar("T")
_Method = TypeVar("_Method", bound=Callable[..., Coroutine[Any, Any, Any]])

#: True while a sync caller's call runs: its Redis commands use the synchronous pools.
SYNC_IO: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "streamlayer_sync_io", default=False
)

#: The loops asgiref's async_to_sync made for one call each, while they run: asgiref
#: keeps them there (since 3.3) to find the thread a nested sync_to_async must use.
_ONE_CALL_LOOPS: dict[Any, Any] = getattr(AsyncToSync, "loop_thread_executors", {})

logger = logging.getLogger(__name__)


def sync_aware(method: _Method) -> _Method:
    """Wrap a layer coroutine method so that calls from sync code reuse connections
    (see the module docstring)."""
    return cast(_Method, _SyncAwareMethod(method, start_here=True))


def sync_aware_on_loop(method: _Method) -> _Method:
    """:func:`sync_aware` for a method that needs a running loop before its first
    command (it starts a task, or stops this loop's reader): a sync caller's call
    runs wholly on asgiref's loop, still on the shared synchronous clients."""
    return cast(_Method, _SyncAwareMethod(method, start_here=False))


class _SyncAwareMethod:
    """A layer's coroutine method, called by a plain function first.

    The call must run at once in the caller's thread (asgiref calls the method
    before choosing a loop: that is when the call decides where it runs), so the
    wrapper cannot be an ``async def``. It still reads as one to whoever asks, as
    channels_redis' methods do: ``inspect.iscoroutinefunction`` (which on Python
    3.11 only trusts a code object's flags) sees the method's own code here, and
    ``asyncio.iscoroutinefunction`` asgiref's mark.
    """

    def __init__(
        self, method: Callable[..., Coroutine[Any, Any, Any]], *, start_here: bool
    ) -> None:
        functools.update_wrapper(self, method)
        self._method = method
        #: Whether a sync caller's call takes its first steps in the caller's thread.
        self._start_here = start_here
        #: What makes inspect take this for a coroutine function (see the docstring).
        self.__code__ = method.__code__
        self.__defaults__ = method.__defaults__
        self.__kwdefaults__ = method.__kwdefaults__
        markcoroutinefunction(self)

    def __get__(self, layer: Any, owner: type | None = None) -> Any:
        return self if layer is None else types.MethodType(self, layer)

    def __call__(self, layer: Any, /, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        coro = self._method(layer, *args, **kwargs)
        if SYNC_IO.get():  # a layer method called by another in a sync caller's call
            return coro
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # created in sync code (asgiref 3.9+), run on some loop later
            if (
                not self._start_here
                or sys._getframe(1).f_code is not _ASYNC_TO_SYNC_CALL
                or _outer_loop()
            ):
                return _where_it_runs(coro)
            return cast(Coroutine[Any, Any, Any], _start_here(coro, _keep_thread()))
        return _with_sync_io(coro) if _one_call(loop) else coro


async def _where_it_runs(coro: Coroutine[Any, Any, T]) -> T:
    """Decide once running: a loop made for this one call uses the sync clients."""
    if _one_call(asyncio.get_running_loop()):
        return await _with_sync_io(coro)
    return await coro


def background_context() -> contextvars.Context:
    """The context for a long-lived task (a reader) started during any call: never a
    sync caller's, whose blocking clients would hold up the task's loop after the
    call returned (and so asgiref's closing of it)."""
    context = contextvars.copy_context()
    context.run(_leave_sync_call)
    return context


def _leave_sync_call() -> None:
    SYNC_IO.set(False)
    SEND_FIRST_HERE.set(False)


def _one_call(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` serves one async_to_sync call (and no call of it set SYNC_IO yet)."""
    return loop in _ONE_CALL_LOOPS and not SYNC_IO.get()


async def _with_sync_io(coro: Coroutine[Any, Any, T]) -> T:
    token = SYNC_IO.set(True)
    try:
        return await coro
    finally:
        SYNC_IO.reset(token)


# -- one kept asgiref thread per calling thread ---------------------------------------

#: The frame that calls a method passed to async_to_sync, in the caller's thread.
_ASYNC_TO_SYNC_CALL = AsyncToSync.__call__.__code__
#: asgiref 3.10+: the context whose async_to_sync calls all run in one thread.
_SINGLE_THREAD: contextvars.ContextVar[Any] | None = getattr(
    AsyncToSync, "async_single_thread_context", None
)
#: This thread's kept-thread context (a _CallerThread), as long as the thread lives.
_callers = threading.local()


class _CallerThread(AsyncSingleThreadContext):
    """asgiref's one-thread context, kept for one calling thread of one process:
    asgiref keeps the thread as long as this object lives (a weak key), and a forked
    child must not reuse a thread that only its parent has."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.pid = os.getpid()


def _outer_loop() -> bool:
    """Whether asgiref will run this thread's call on an outer loop (a sync view under
    an ASGI server), as it decides: no new loop, no thread, nothing for us to do."""
    outer = SyncToAsync.threadlocal
    return getattr(outer, "main_event_loop", None) is not None and (
        getattr(outer, "main_event_loop_pid", None) == os.getpid()
    )


def _keep_thread() -> contextvars.Token[Any] | None:
    """In the caller's thread, inside ``AsyncToSync.__call__`` before it picks a
    thread for this call: ask for the calling thread's kept one. Returns the token
    that undoes it, or None where the caller chose a single thread of its own."""
    if _SINGLE_THREAD is None or _SINGLE_THREAD.get(None) is not None:
        return None
    kept = getattr(_callers, "context", None)
    if kept is None or kept.pid != os.getpid():
        kept = _callers.context = _CallerThread()
    return _SINGLE_THREAD.set(kept)


def _undo_in_caller(loop: asyncio.AbstractEventLoop, kept: contextvars.Token[Any]) -> None:
    """Reset the caller's context while it waits for this call: asgiref runs work
    handed to the waiting caller in its thread (and its context) before returning."""
    waiting = _ONE_CALL_LOOPS.get(loop)
    try:
        waiting.submit(_SINGLE_THREAD.reset, kept)  # type: ignore[union-attr]
    except (AttributeError, RuntimeError):  # no waiting caller: the setting stays
        logger.debug("could not undo the kept-thread setting in the calling thread")


# -- the first command leaves from the caller's thread ---------------------------------

#: Set while a call's first steps run in the caller's thread: its first command is
#: sent there, and the call waits for the reply in asgiref's loop.
SEND_FIRST_HERE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "streamlayer_send_first_here", default=False
)
_SENT = object()


@types.coroutine
def pause_after_send() -> Generator[Any, Any, None]:
    """Suspend a call whose first command has left, until asgiref's loop resumes it."""
    yield _SENT


def _start_here(coro: Coroutine[Any, Any, T], kept: contextvars.Token[Any] | None) -> Any:
    """Run ``coro`` in the caller's thread up to its first command's reply. That
    command (and everything before it: validation, encoding) runs while asgiref is
    still to make its loop; the reply travels meanwhile, and asgiref's loop picks the
    call up where it paused. The call runs in a context of its own throughout."""
    context = contextvars.copy_context()
    context.run(_mark_sync_call)
    try:
        yielded = context.run(coro.send, None)
    except StopIteration as stop:
        return _done(kept, stop.value, None)
    except Exception as exc:
        return _done(kept, None, exc)
    except BaseException:
        coro.close()
        if kept is not None and _SINGLE_THREAD is not None:
            _SINGLE_THREAD.reset(kept)
        raise
    return _resume(coro, context, yielded, kept)


def _mark_sync_call() -> None:
    SYNC_IO.set(True)
    SEND_FIRST_HERE.set(True)


async def _done(kept: contextvars.Token[Any] | None, result: Any, error: Exception | None) -> Any:
    """A call that finished in the caller's thread, handed to asgiref's loop as is."""
    if kept is not None:
        _undo_in_caller(asyncio.get_running_loop(), kept)
    if error is not None:
        raise error
    return result


@types.coroutine
def _resume(
    coro: Coroutine[Any, Any, T],
    context: contextvars.Context,
    yielded: Any,
    kept: contextvars.Token[Any] | None,
) -> Generator[Any, Any, T]:
    """Drive ``coro`` to its end in asgiref's loop, as ``await`` would (a coroutine
    another frame started cannot be awaited), each step in the call's context."""
    if kept is not None:
        _undo_in_caller(asyncio.get_running_loop(), kept)
    while True:
        value: Any = None
        error: BaseException | None = None
        if yielded is not _SENT:  # a future of asyncio's (or a bare yield): the loop's
            try:
                value = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                error = exc
        try:
            if error is None:
                yielded = context.run(coro.send, value)
            else:
                yielded = context.run(coro.throw, error)
        except StopIteration as stop:
            return cast(T, stop.value)


# -- the client a sync caller's call uses ----------------------------------------------


class SyncCallerClient:
    """The commands the layers send during a sync caller's call, done by a synchronous,
    thread-safe redis-py client: exactly these, declared one by one (a command a layer
    starts to use there must be added here, on purpose).

    Only for a sync caller's call, which runs on a loop serving that call alone:
    blocking on the socket holds up nothing else, and the connection comes from a
    pool every thread shares instead of one bound to a loop that is about to close.
    It is also the script runner :meth:`ConnectionManager.batcher` hands out there:
    one call at a time, nothing to coalesce.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        #: A plain client's pool lends connections we can send on and read from apart;
        #: a cluster client routes each command itself.
        self._pool: Any = (
            None if isinstance(client, redis.RedisCluster) else client.connection_pool
        )

    # --- what the first command of a call may be: sent from the caller's thread ------

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return await self._maybe_sent_here(
            "EVALSHA", self.client.evalsha, (sha, numkeys, *keys_and_args)
        )

    async def publish(self, channel: str, message: bytes) -> Any:
        return await self._maybe_sent_here("PUBLISH", self.client.publish, (channel, message))

    async def spublish(self, channel: str, message: bytes) -> Any:
        # Only on a cluster client, which routes each command itself (never sent here).
        return await self._maybe_sent_here("SPUBLISH", self.client.spublish, (channel, message))

    # --- the others ----------------------------------------------------------------------

    async def script_load(self, source: str) -> Any:
        await _leave_callers_thread()
        return self.client.script_load(source)

    async def info(self, section: str) -> Any:
        await _leave_callers_thread()
        return self.client.info(section)

    async def zrem(self, key: str, *members: str) -> Any:
        await _leave_callers_thread()
        return self.client.zrem(key, *members)

    async def unlink(self, *keys: Any) -> Any:
        await _leave_callers_thread()
        return self.client.unlink(*keys)

    async def scan_iter(self, **kwargs: Any) -> AsyncIterator[bytes]:
        """The keys SCAN finds, as redis.asyncio's ``scan_iter`` yields them (flush)."""
        await _leave_callers_thread()
        for key in self.client.scan_iter(**kwargs):
            yield key

    def pipeline(self, transaction: bool = True) -> SyncCallerPipeline:
        return SyncCallerPipeline(self.client.pipeline(transaction=transaction))

    async def call(
        self,
        script: LuaScript,
        keys: Sequence[Any],
        args: Sequence[Any],
        *,
        together: bool = False,
    ) -> Any:
        """Run ``script`` (the batcher's interface: here, no batching, one call at a
        time whatever ``together`` asks)."""
        return await script(cast(aioredis.Redis, self), keys, args)

    def close(self) -> None:
        self.client.close()

    async def _maybe_sent_here(
        self, command: str, method: Callable[..., Any], args: tuple[Any, ...]
    ) -> Any:
        """A sync caller's first command, if this is it, is sent from the caller's
        thread and its reply read once asgiref's loop resumes the call; both commands
        answer with plain values (no response callback to apply). Any failure waits
        for the loop too: the retries sleep there. Otherwise the command runs as any
        other."""
        if not SEND_FIRST_HERE.get() or self._pool is None:
            await _leave_callers_thread()
            return method(*args)
        SEND_FIRST_HERE.set(False)
        connection = None
        failure: Exception | None = None
        try:
            try:
                connection = lend_sync_connection(self._pool, command)
                connection.send_command(command, *args)
            except Exception as exc:
                failure = exc
            await pause_after_send()
            if failure is not None:
                raise failure
            return connection.read_response()  # type: ignore[union-attr]
        except redis.ResponseError:
            raise  # the server answered: the connection is fine
        except BaseException:
            if connection is not None:
                connection.disconnect()  # a reply may still be on its way: never reuse it
            raise
        finally:
            if connection is not None:
                self._pool.release(connection)


class SyncCallerPipeline:
    """The pipeline a sync caller's call queues (the Pub/Sub layer's bulk sends:
    PUBLISH per message), whose ``execute`` is awaited as the asyncio one's is."""

    def __init__(self, pipeline: Any) -> None:
        self._pipeline = pipeline

    def publish(self, channel: str, message: bytes) -> None:
        self._pipeline.publish(channel, message)

    def spublish(self, channel: str, message: bytes) -> None:
        self._pipeline.spublish(channel, message)

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        await _leave_callers_thread()
        try:
            return cast(list[Any], self._pipeline.execute(raise_on_error=raise_on_error))
        finally:
            self._pipeline.reset()


async def _leave_callers_thread() -> None:
    """Before any other command of a sync caller's call: if the call still runs in the
    caller's thread, let asgiref's loop take it over first."""
    if SEND_FIRST_HERE.get():
        SEND_FIRST_HERE.set(False)
        await pause_after_send()
