"""Automatic pipelining: script calls made together travel together.

Most of the cost of one Redis command issued from Python is Python's: building
the command, taking a connection from the pool, parsing the reply. Fifty
consumers sending at once pay that fifty times and wait for fifty round trips.
A :class:`ShardBatcher` (one per shard and event loop) lets a call go straight
out when nothing is queued and one of its two lone-call connections is free, so
a lone send costs one round trip and nothing more; calls made while both are on
their way are queued, and every call queued in the same event-loop turn leaves
as one pipeline. The lone-call connections are borrowed from the pool and kept,
written and read by :func:`~streamlayer.redispy.exchange`: no lending per call,
no redis-py command machinery, the cheapest round trip there is for a
request/reply exchange. Two, not one: in a request/reply exchange within one
process the reply is sent while the request's own reply is still unread in its
socket (both arrived in the same instant, and the receiver ran first), and with
one connection that reply went as a pipeline of one, a task and a connection
lent by the pool: in 40-70% of the rounds of the latency benchmark, for 18% of
its median (docs/performance.rst). Each caller still awaits its own result: a
script's reply, or its own error (a ``ChannelFull`` decision is just a reply, so
it stays per caller).

Calls of one script to the same keys in one pipeline go as one script call
when the script has an ``each`` form (STREAM_APPEND: fifty consumers of one
process sending at once append to one inbox): Redis' per-call cost of a script
is most of what a small append costs it, and the client reads one reply
instead of fifty. The merged call runs the calls one after another, exactly as
the pipeline would, and answers each caller with its own reply (see
:func:`merge` for what may and may not move).

What a pipeline changes and what it does not:

* a script runs exactly as it would alone (Redis runs each script atomically;
  pipelining only saves round trips), so a retried call keeps its meaning;
* a caller cancelled before its turn leaves is dropped from the pipeline (it
  never reached Redis); one cancelled later may or may not have landed, as a
  cancelled direct call may;
* a connection error fails every call of the pipeline, and each caller retries
  on its own under the retry policy (:mod:`streamlayer.retry`); so does an
  error reply to a merged call, some of whose calls may have run: the retry
  flag and the dedup tags find what landed, as after any lost reply;
* NOSCRIPT (a server that restarted or flushed its script cache) is answered
  by loading the script and running again only the calls that failed with it:
  they did not run.

A lone call may also *ride*: while this loop's inbox reader lets the receivers
it just woke run before it writes its next read, the first lone call made (a
receiver's reply, typically) is written together with that read, on the
reader's connection, in one write (:class:`Rider`). Redis runs the reader's
trim, then the call, then the read, which finds the call's entry at once
when it went to this process; the caller gets its reply as soon as it is read,
without waiting for the blocking read behind it. A request/reply exchange then
makes one write a hop instead of two: the Streams layer's ping-pong took 10% less
client CPU and 5-6% less time a round (docs/performance.rst, "A ninth run"). A ride
changes nothing else: the call is the same EVALSHA, a failure is a connection
error the caller retries, NOSCRIPT sends it again the usual way (it did not run).

On a Redis Cluster calls are not pipelined: a cluster client routes each call
to the node owning its keys, and one pipeline would have to be split by node.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis import asyncio as aioredis
from redis.exceptions import NoScriptError

from .exceptions import LayerClosed
from .redispy import KeptConnection, give_back, lend_connection
from .scripts import LuaScript, run_scripts

__all__ = ["PendingCall", "Rider", "ShardBatcher"]

#: At most this many calls leave in one pipeline; more wait for the next one.
MAX_BATCH = 512
#: Connections kept for lone calls (see the module docstring: why two).
LONE_CONNECTIONS = 2


@dataclass
class PendingCall:
    """A script call waiting for its reply (in a queue, a pipeline, or riding)."""

    script: LuaScript
    keys: Sequence[Any]
    args: Sequence[Any]
    future: asyncio.Future[Any]


class Rider(Protocol):
    """A reader about to write its next read, which a lone call may ride with."""

    def ride(self, call: PendingCall) -> bool:
        """Write ``call`` with the next read, at once, and settle its future when its
        reply comes; False, writing nothing, when it cannot be written at once."""
        ...


class ShardBatcher:
    """Script calls to one shard from one event loop, coalesced per loop turn."""

    def __init__(self, client: aioredis.Redis, *, pipelining: bool = True) -> None:
        self._client = client
        self._pipelining = pipelining
        self._loop = asyncio.get_running_loop()
        self._queue: list[PendingCall] = []
        self._tasks: set[asyncio.Task[None]] = set()
        #: The connections lone calls go on, borrowed (see the module docstring), and
        #: those of them not in use now.
        self._own = [KeptConnection(lambda: client) for _ in range(LONE_CONNECTIONS)]
        self._free = list(self._own)
        #: How many pipelines left, and how many calls they carried (for stats and tests).
        self.pipelines = 0
        self.pipelined_calls = 0
        #: Calls that went merged into another's script call (see :func:`merge`).
        self.merged_calls = 0
        #: The reader the next lone call may ride with (see the module docstring), set
        #: by the reader while it lets its receivers run; taken by the call that rides.
        self.rider: Rider | None = None
        #: How many calls rode with a reader's read (for stats and tests).
        self.rides = 0

    async def call(
        self,
        script: LuaScript,
        keys: Sequence[Any],
        args: Sequence[Any],
        *,
        together: bool = False,
    ) -> Any:
        """Run ``script``: at once on a free lone-call connection when nothing is
        queued, else in the next pipeline. ``together``: always in the next pipeline,
        for a caller issuing several calls in one turn that should share one round
        trip (the first would otherwise go alone)."""
        if not self._pipelining:  # a cluster client routes each call itself
            return await script(self._client, keys, args)
        if not together and not self._queue and self.rider is not None:
            rider, self.rider = self.rider, None
            riding = PendingCall(script, keys, args, self._loop.create_future())
            if rider.ride(riding):
                self.rides += 1
                try:
                    return await riding.future
                except NoScriptError:
                    pass  # it did not run: below, the usual way loads the script
        if not together and not self._queue and self._free:
            own = self._free.pop()
            try:
                return await self._call_alone(own, script, keys, args)
            finally:
                self._free.append(own)
        future: asyncio.Future[Any] = self._loop.create_future()
        if not self._queue:
            # The task's first step runs after every callback already due in this
            # turn, so everything queued meanwhile leaves with this pipeline.
            task = self._loop.create_task(self._send_queued())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._queue.append(PendingCall(script, keys, args, future))
        return await future

    async def _call_alone(
        self, own: KeptConnection, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        """One call on a lone calls' kept connection."""
        connection = own.ready() or await own.get()
        (reply,) = await run_scripts(connection, [(script, keys, args)])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def close(self) -> None:
        """Hand the lone calls' connections back (its loop's clients are closing)."""
        for own in self._own:
            await own.give_back()

    async def _send_queued(self) -> None:
        queue, self._queue = self._queue, []
        if len(queue) > MAX_BATCH:
            self._queue = queue[MAX_BATCH:]
            task = self._loop.create_task(self._send_queued())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            queue = queue[:MAX_BATCH]
        calls = [call for call in queue if not call.future.done()]  # drop cancelled callers
        if not calls:
            return
        try:
            await self._run(calls)
        except BaseException as exc:
            error: BaseException = exc
            if isinstance(exc, asyncio.CancelledError):  # the event loop winds down
                error = LayerClosed("the event loop of this connection is shutting down")
            for call in calls:
                if not call.future.done():
                    call.future.set_exception(error)
            if not isinstance(exc, Exception):
                raise

    async def _run(self, calls: list[PendingCall]) -> None:
        """One pipeline of EVALSHAs, written at once to a connection lent by the pool
        and read back (an error reply as its exception): a pipeline without redis-py's
        pipeline object. Calls of a mergeable script to the same keys go as one call
        (see :func:`merge`)."""
        self.pipelines += 1
        self.pipelined_calls += len(calls)
        units = merge(calls)
        self.merged_calls += len(calls) - len(units)
        pool = self._client.connection_pool
        connection = await lend_connection(pool)
        try:
            results = await run_scripts(connection, [unit.command() for unit in units])
        finally:
            await give_back(pool, connection)
        for unit, result in zip(units, results, strict=True):
            unit.settle(result)


@dataclass
class _Unit:
    """One EVALSHA of a pipeline: one call, or several calls of a script merged."""

    calls: list[PendingCall]

    def command(self) -> tuple[LuaScript, Sequence[Any], Sequence[Any]]:
        first = self.calls[0]
        if len(self.calls) == 1 or first.script.each is None:
            return first.script, first.keys, first.args
        args: list[Any] = []
        for call in self.calls:
            args.append(len(call.args))
            args.extend(call.args)
        return first.script.each, first.keys, args

    def settle(self, result: Any) -> None:
        """Hand each caller its reply (a merged call's reply is one per call), or the
        error: a merged call that failed may have run some of its calls, which their
        retries find out as any retry after a lost reply does (the dedup tags)."""
        if len(self.calls) == 1:
            results = [result]
        elif isinstance(result, Exception):
            results = [result] * len(self.calls)
        else:
            results = list(result)
        for call, each in zip(self.calls, results, strict=True):
            if call.future.done():
                continue
            if isinstance(each, Exception):
                call.future.set_exception(each)
            else:
                call.future.set_result(each)


def merge(calls: list[PendingCall]) -> list[_Unit]:
    """The pipeline's EVALSHAs: ``calls`` in order, but a call of a script that has an
    ``each`` form joins the earlier unit of the same script and keys, unless a call
    of another script touched one of those keys in between (it stays behind it).

    Why: fifty consumers sending to one process's channels in one loop turn are fifty
    appends to one inbox; merged, Redis runs one script call instead of fifty (its
    per-call cost is most of a small append's) and the client reads one reply.
    Calls of different callers carry no order among themselves (each caller has one
    call in flight, or several it sent together), and merged calls keep theirs."""
    units: list[_Unit] = []
    open_units: dict[tuple[str, tuple[Any, ...]], _Unit] = {}
    for call in calls:
        if call.script.each is None:
            units.append(_Unit([call]))
            if open_units:
                touched = set(call.keys)
                for ident in [i for i in open_units if touched.intersection(i[1])]:
                    del open_units[ident]
            continue
        ident = (call.script.sha, tuple(call.keys))
        unit = open_units.get(ident)
        if unit is None:
            unit = open_units[ident] = _Unit([call])
            units.append(unit)
        else:
            unit.calls.append(call)
    return units
