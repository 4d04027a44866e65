"""The sync callers' scenario: ``async_to_sync(layer.group_send)`` from a plain
thread, as a Django view, a management command or a Celery task calls it, in a
process of its own (``worker sync``).

Measured outside any event loop (each call makes its own, as asgiref does): calls
per second, and how many new connections Redis accepted during the calls
(``INFO stats``: ``total_connections_received``). The group's member lives in
another OS process (the spread fan-out's member worker), as a consumer in a
server process would, and must receive every message, once and in order. The
same loop is then timed again with no receiving process on the machine (the
member a normal channel nobody reads), as the sync callers' issue measured it:
on two cores the receiving process takes CPU from the caller. The
floor, ``async_to_sync`` of a coroutine that does nothing, is what no layer can
beat: asgiref's own loop per call, in the one thread kept for the calling thread
(the layers' calls run there, see :mod:`streamlayer.sync`); the same with a thread
per call, as asgiref runs any other coroutine, is reported beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asgiref.sync
import redis
from asgiref.sync import async_to_sync

from .commands import worker_command
from .probe import PROBE, probing
from .scenarios import BODY, BenchError, Metrics, close_layer

__all__ = ["sync_calls", "sync_floor"]

_WAIT = 60.0


def sync_calls(
    make: Callable[[], Any], path: str, url: str, count: int, broadcast: bool
) -> Metrics:
    """``count`` calls of ``async_to_sync(layer.group_send)`` from this thread; the
    first opens what the others reuse and is not timed."""
    group = f"bench-sync-{time.monotonic_ns()}"
    member = subprocess.Popen(
        worker_command("members", path, url, group, "1", str(count)),
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    try:
        if _line(member) != "joined":
            raise BenchError("sync calls: the member process failed to start")
        layer = make()
        _until_member_heard(layer, group, member)
        send = async_to_sync(layer.group_send)
        send(group, {"type": "bench.sync", "n": 0, "body": BODY})
        with redis.Redis.from_url(url) as client:
            before = int(client.info("stats")["total_connections_received"])
            per_second = _timed_calls(send, group, count)
            after = int(client.info("stats")["total_connections_received"])
        report = json.loads(_line(member))
        if not report["ok"]:
            raise BenchError("sync calls: the member lost, duplicated or reordered messages")
        alone = _calls_alone(layer, count, broadcast)
        async_to_sync(close_layer)(layer, flush=False)
        return {
            "per_second": per_second,
            "alone_per_second": alone,
            "new_connections": after - before,
        }
    finally:
        if member.poll() is None:
            member.kill()
        member.wait()
        if member.stdout is not None:
            member.stdout.close()


def _until_member_heard(layer: Any, group: str, member: subprocess.Popen[str]) -> None:
    """Probe the group until the member process says it heard (see probe.py). Its
    answer is read in a thread the probing loop does not wait for at its end: were
    the member never to answer, the loop would otherwise wait on that read."""
    reading = ThreadPoolExecutor(max_workers=1)
    answer = reading.submit(_line, member)

    async def probe_until_answered() -> None:
        await probing(
            functools.partial(layer.group_send, group, PROBE), [asyncio.wrap_future(answer)]
        )

    try:
        async_to_sync(probe_until_answered)()
    finally:
        reading.shutdown(wait=False)
    if answer.result() != "heard":
        raise BenchError(f"sync calls: the member said {answer.result()!r}, not 'heard'")


def _calls_alone(layer: Any, count: int, broadcast: bool) -> float:
    """The same loop with no receiving process on the machine, as the sync callers'
    issue measured it: the group's one member is a normal channel nobody reads (on
    Pub/Sub nobody subscribes; a publish costs the same)."""
    group = f"bench-sync-alone-{time.monotonic_ns()}"
    send = async_to_sync(layer.group_send)
    if not broadcast:
        async_to_sync(layer.group_add)(group, "bench.nobody")
    send(group, {"type": "bench.sync", "n": 0, "body": BODY})
    per_second = _timed_calls(send, group, count)
    if not broadcast:
        async_to_sync(layer.group_discard)(group, "bench.nobody")
    return per_second


def sync_floor(count: int) -> Metrics:
    """``async_to_sync`` of a coroutine that does nothing: asgiref's cost per call, in
    the one kept thread the layers' calls use (asgiref 3.10+, see streamlayer.sync)
    and with a thread per call, as asgiref runs any other coroutine."""

    async def nothing(group: str, message: dict[str, Any]) -> None:
        return None

    def calls_per_second() -> float:
        call = async_to_sync(nothing)
        call("bench-sync", {})
        return _timed_calls(call, "bench-sync", count)

    per_call = calls_per_second()
    single_thread = getattr(asgiref.sync, "AsyncSingleThreadContext", contextlib.nullcontext)
    with single_thread():
        kept = calls_per_second()
    return {
        "per_second": kept,
        "alone_per_second": kept,
        "thread_per_call_per_second": per_call,
        "new_connections": 0,
    }


def _timed_calls(send: Callable[[str, dict[str, Any]], Any], group: str, count: int) -> float:
    """Calls per second of messages 1 to ``count`` - 1 (message 0, the first call,
    opened what these reuse and is not timed)."""
    started = time.perf_counter()
    for n in range(1, count):
        send(group, {"type": "bench.sync", "n": n, "body": BODY})
    return (count - 1) / (time.perf_counter() - started)


def _line(process: subprocess.Popen[str]) -> str:
    if process.stdout is None:
        raise BenchError("the member process has no stdout")
    return process.stdout.readline().strip()
