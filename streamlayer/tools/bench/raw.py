"""The floor: the same workloads with bare redis-py stream commands, no layer.

What a Redis-backed layer in Python cannot beat on this machine: XADD and a
batched blocking XREAD, unpipelined (one round trip per send), pipelined by
100 (the practical ceiling for many concurrent senders), and awaited one by one
but pipelined across the senders (the ceiling for sends awaited each, as a
channel layer's are).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from redis import asyncio as aioredis

from .scenarios import BODY, BenchError, Metrics, Sizes, _percentiles

__all__ = ["RAW_SCENARIOS"]

_BLOCK_MS = 1000


def _key(name: str) -> str:
    return f"bench-raw:{name}:{uuid.uuid4().hex[:8]}"


async def _read_all(
    client: aioredis.Redis, keys: list[str], count: int, deadline: float
) -> dict[str, list[int]]:
    """Read ``count`` entries of each stream with batched blocking XREADs."""
    last = dict.fromkeys(keys, "0-0")
    got: dict[str, list[int]] = {k: [] for k in keys}
    while any(len(got[k]) < count for k in keys):
        if time.monotonic() > deadline:
            raise BenchError("raw: timed out reading")
        wanted: dict[Any, Any] = {k: last[k] for k in keys if len(got[k]) < count}
        response: Any = await client.xread(wanted, count=512, block=_BLOCK_MS)
        for key, entries in response or []:
            name = key.decode()
            for entry_id, fields in entries:
                last[name] = entry_id.decode()
                got[name].append(int(fields[b"i"]))
    return got


async def raw_sequential(url: str, sizes: Sizes) -> Metrics:
    """XADD awaited one by one; one reader with batched blocking XREAD."""
    sender, reader = aioredis.Redis.from_url(url), aioredis.Redis.from_url(url)
    key, count = _key("seq"), sizes.sequential
    try:
        await sender.ping()
        reading = asyncio.ensure_future(_read_all(reader, [key], count, time.monotonic() + 60))
        started = time.perf_counter()
        for i in range(count):
            await sender.xadd(key, {"i": i, "d": BODY})
        got = await reading
        elapsed = time.perf_counter() - started
        if got[key] != list(range(count)):
            raise BenchError("raw sequential: lost or reordered")
        return {"per_second": count / elapsed}
    finally:
        await sender.delete(key)
        await sender.aclose()
        await reader.aclose()


async def raw_concurrent(url: str, sizes: Sizes) -> Metrics:
    """Each sender writes its messages as one pipeline of XADDs (the ceiling)."""

    def sender(client: aioredis.Redis) -> Callable[[str], Awaitable[None]]:
        async def send(key: str) -> None:
            pipe = client.pipeline(transaction=False)
            for i in range(sizes.per_sender):
                pipe.xadd(key, {"i": i, "d": BODY})
            await pipe.execute()

        return send

    return await _concurrent(url, sizes, "raw concurrent", sender)


async def raw_concurrent_awaited(url: str, sizes: Sizes) -> Metrics:
    """Each sender awaits each of its XADDs, as a channel layer's caller awaits each
    send; the XADDs all senders issue in one event-loop turn leave as one pipeline
    (what automatic pipelining can do with awaited sends)."""

    def sender(client: aioredis.Redis) -> Callable[[str], Awaitable[None]]:
        batcher = _XaddBatcher(client)

        async def send(key: str) -> None:
            for i in range(sizes.per_sender):
                await batcher.xadd(key, i)

        return send

    return await _concurrent(url, sizes, "raw concurrent, awaited", sender)


async def _concurrent(
    url: str,
    sizes: Sizes,
    what: str,
    make_sender: Callable[[aioredis.Redis], Callable[[str], Awaitable[None]]],
) -> Metrics:
    """``senders`` streams, each written by the sender ``make_sender`` makes, all
    read by one reader with batched blocking XREADs; msg/s until the last is read."""
    client, reader = aioredis.Redis.from_url(url), aioredis.Redis.from_url(url)
    keys = [_key(f"c{n}") for n in range(sizes.senders)]
    count = sizes.per_sender
    try:
        await client.ping()
        reading = asyncio.ensure_future(_read_all(reader, keys, count, time.monotonic() + 60))
        send = make_sender(client)
        started = time.perf_counter()
        await asyncio.gather(*(send(k) for k in keys))
        got = await reading
        elapsed = time.perf_counter() - started
        if any(got[k] != list(range(count)) for k in keys):
            raise BenchError(f"{what}: lost or reordered")
        return {"per_second": len(keys) * count / elapsed}
    finally:
        await client.delete(*keys)
        await client.aclose()
        await reader.aclose()


class _XaddBatcher:
    """XADDs queued in one loop turn leave as one pipeline; each caller awaits its own."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._queue: list[tuple[str, int, asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def xadd(self, key: str, i: int) -> None:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self._queue:
            asyncio.get_running_loop().call_soon(self._flush)
        self._queue.append((key, i, future))
        await future

    def _flush(self) -> None:
        queue, self._queue = self._queue, []
        task = asyncio.ensure_future(self._send(queue))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, queue: list[tuple[str, int, asyncio.Future[Any]]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key, i, _ in queue:
            pipe.xadd(key, {"i": i, "d": BODY})
        try:
            await pipe.execute()
        except Exception as exc:
            for _, _, future in queue:
                future.set_exception(exc)
            return
        for _, _, future in queue:
            future.set_result(None)


async def raw_latency(url: str, sizes: Sizes) -> Metrics:
    """Ping-pong with XADD + blocking XREAD on each side; one way is half a round."""
    clients = [aioredis.Redis.from_url(url) for _ in range(4)]
    ping, pong = _key("ping"), _key("pong")
    rounds = sizes.latency_rounds
    try:
        for client in clients:
            await client.ping()

        async def next_entry(client: aioredis.Redis, key: str, last: str) -> tuple[str, int]:
            while True:
                wanted: dict[Any, Any] = {key: last}
                response: Any = await client.xread(wanted, count=1, block=_BLOCK_MS)
                if response:
                    entry_id, fields = response[0][1][0]
                    return entry_id.decode(), int(fields[b"i"])

        async def echo() -> None:
            last = "0-0"
            for _ in range(rounds):
                last, i = await next_entry(clients[0], ping, last)
                await clients[1].xadd(pong, {"i": i, "d": BODY})

        echoing = asyncio.ensure_future(echo())
        samples, last = [], "0-0"
        for i in range(rounds):
            started = time.perf_counter()
            await clients[2].xadd(ping, {"i": i, "d": BODY})
            last, answer = await next_entry(clients[3], pong, last)
            samples.append((time.perf_counter() - started) / 2)
            if answer != i:
                raise BenchError("raw latency: answers out of step")
        await echoing
        return _percentiles(samples[rounds // 10 :])
    finally:
        await clients[0].delete(ping, pong)
        for client in clients:
            await client.aclose()


RAW_SCENARIOS: dict[str, Callable[[str, Sizes], Awaitable[Metrics]]] = {
    "p2p_sequential": raw_sequential,
    "p2p_concurrent": raw_concurrent,
    "p2p_concurrent_awaited": raw_concurrent_awaited,
    "latency": raw_latency,
}


def describe() -> dict[str, Any]:
    return {name: fn.__doc__ for name, fn in RAW_SCENARIOS.items()}
