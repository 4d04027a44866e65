"""The sync callers' scenario: ``async_to_sync(layer.group_send)`` from a plain
thread, as a Django view, a management command or a Celery task calls it.

Measured outside any event loop (each call makes its own, as asgiref does): calls
per second, and how many new connections Redis accepted during the calls
(``INFO stats``: ``total_connections_received``). A member of the group, a layer
of its own on a loop in another thread (like another process), must receive every
message, once and in order. The floor, ``async_to_sync`` of a coroutine that does
nothing, is what no layer can beat: asgiref's own thread and loop per call.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from asgiref.sync import async_to_sync

from .scenarios import BODY, BenchError, Metrics

__all__ = ["sync_calls", "sync_floor"]

_GROUP = "bench-sync"
_WAIT = 60.0


def sync_calls(make: Callable[[str], Any], url: str, count: int) -> Metrics:
    """``count`` calls of ``async_to_sync(layer.group_send)`` from this thread."""
    receiver = _Member(make("bench-sync"), count)
    receiver.start()
    layer = make("bench-sync")
    send = async_to_sync(layer.group_send)
    send(_GROUP, {"type": "warm", "i": -1})  # the first call opens what later ones reuse
    with redis.Redis.from_url(url) as client:
        before = int(client.info("stats")["total_connections_received"])
        started = time.perf_counter()
        for i in range(count):
            send(_GROUP, {"type": "m", "i": i, "body": BODY})
        elapsed = time.perf_counter() - started
        after = int(client.info("stats")["total_connections_received"])
    got = receiver.finish()
    async_to_sync(_close)(layer, flush=True)
    if got != list(range(count)):
        missing = len(set(range(count)) - set(got))
        raise BenchError(f"sync calls: {len(got)} received, {missing} missing or out of order")
    return {"per_second": count / elapsed, "new_connections": after - before}


def sync_floor(count: int) -> Metrics:
    """``async_to_sync`` of a coroutine that does nothing: asgiref's cost per call."""

    async def nothing(group: str, message: dict[str, Any]) -> None:
        return None

    call = async_to_sync(nothing)
    call(_GROUP, {})
    started = time.perf_counter()
    for i in range(count):
        call(_GROUP, {"type": "m", "i": i})
    return {"per_second": count / (time.perf_counter() - started), "new_connections": 0}


class _Member:
    """A group member on an event loop of its own thread, collecting ``i`` in order."""

    def __init__(self, layer: Any, count: int) -> None:
        self.layer = layer
        self.count = count
        self.ready = threading.Event()
        self.got: list[int] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bench-sync-member")

    def start(self) -> None:
        self._thread.start()
        if not self.ready.wait(_WAIT):
            raise BenchError("sync calls: the group member did not join in time")
        if self.error is not None:
            raise BenchError(f"sync calls: the group member failed: {self.error!r}")

    def finish(self) -> list[int]:
        self._thread.join(_WAIT)
        if self.error is not None:
            raise BenchError(f"sync calls: the group member failed: {self.error!r}")
        return self.got

    def _run(self) -> None:
        try:
            asyncio.run(self._receive())
        except BaseException as exc:  # reported by start() / finish()
            self.error = exc
            self.ready.set()

    async def _receive(self) -> None:
        channel = await self.layer.new_channel()
        await self.layer.group_add(_GROUP, channel)
        receiving = asyncio.ensure_future(self.layer.receive(channel))  # subscribes (Pub/Sub)
        await asyncio.sleep(0.2)  # a Pub/Sub subscription settles before the sends start
        self.ready.set()
        try:
            message = await asyncio.wait_for(receiving, _WAIT)
            while len(self.got) < self.count:
                if message["type"] == "m":
                    self.got.append(message["i"])
                if len(self.got) < self.count:
                    message = await asyncio.wait_for(self.layer.receive(channel), _WAIT)
        finally:
            await _close(self.layer)


async def _close(layer: Any, flush: bool = False) -> None:
    if flush:
        await layer.flush()
    for name in ("close", "close_pools"):
        close = getattr(layer, name, None)
        if close is not None:
            await close()
            return
