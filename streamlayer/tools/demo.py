"""A short, honest demo: our layers and channels_redis side by side on one Redis.

``python -m streamlayer demo`` starts a throwaway redis-server (or uses
``--hosts``), runs the same small workloads through each layer, checks that
every message arrived exactly once and in order, and prints what it measured:
Redis commands per send (counted by the server), messages per second, and
ratios against channels_redis when it is installed. The full benchmark suite
is a later addition; this is the smoke run a newcomer can read in a minute.
"""

from __future__ import annotations

import asyncio
import importlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.asyncio.connection import Connection as AsyncConnection

from ..backends import BACKENDS
from ..testing import RedisServer
from .bench.errors import BenchError
from .bench.scenarios import Sizes, fanout, normal_channel, p2p_sequential

#: name -> (class path, the row its ratios are against). The incumbents come last.
LAYERS = {
    **{
        f"streamlayer {b.name}": (
            b.path,
            "channels_redis pubsub" if b.pubsub else "channels_redis core",
        )
        for b in BACKENDS
    },
    "channels_redis core": ("channels_redis.core.RedisChannelLayer", ""),
    "channels_redis pubsub": ("channels_redis.pubsub.RedisPubSubChannelLayer", ""),
}

#: Pub/Sub gives every subscriber a copy: no one-of-N worker channel to measure.
_BROADCAST = ("pubsub",)


@dataclass
class Result:
    name: str
    baseline: str
    commands_per_send: float
    commands_per_group_send: float
    p2p_per_second: float
    worker_per_second: float
    fanout_per_second: float
    #: What a scenario's own check found (a lost, duplicated or reordered message).
    failure: str = ""


def _load(path: str) -> type | None:
    module, _, name = path.rpartition(".")
    try:
        cls: type = getattr(importlib.import_module(module), name)
    except ImportError:
        return None
    return cls


class CountingConnection(AsyncConnection):
    """A redis-py connection that counts writes: one write is one round trip
    (a pipeline is written at once). Both layers use redis-py, so both are
    measured the same way; the server's own counter would also count the
    commands that run inside a Lua script."""

    writes = 0

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        CountingConnection.writes += 1
        await super().send_packed_command(command, check_health)


async def _round_trips(layer: Any, url: str) -> tuple[float, float]:
    """Round trips per send and per group_send (a group of 10 channels in 2 processes)."""
    parts = urlsplit(url)
    broadcast = any(word in layer.__class__.__module__ for word in _BROADCAST)
    counted = type(layer)(
        hosts=[
            {"host": parts.hostname, "port": parts.port, "connection_class": CountingConnection}
        ],
        prefix=layer.prefix,
        capacity=1000,
    )
    target = await layer.new_channel()
    for i in range(10):
        # A Pub/Sub group member must be a channel of the process that subscribes.
        maker = layer if i % 2 and not broadcast else counted
        await counted.group_add("demo-count", await maker.new_channel())
    # Warm up first: connecting and loading scripts into the server are not per-call costs.
    await counted.send(target, {"type": "warm-up"})
    await counted.group_send("demo-count", {"type": "warm-up"})
    before = CountingConnection.writes
    for i in range(100):
        await counted.send(target, {"type": "demo.count", "i": i})
    per_send = (CountingConnection.writes - before) / 100
    before = CountingConnection.writes
    for _ in range(20):
        await counted.group_send("demo-count", {"type": "demo.count"})
    per_group_send = (CountingConnection.writes - before) / 20
    await counted.flush()
    if hasattr(counted, "close"):
        await counted.close()
    return per_send, per_group_send


async def _measure(name: str, baseline: str, cls: type, url: str, count: int) -> Result:
    layer = cls(hosts=[url], prefix=f"demo{abs(hash(name)) % 10_000}", capacity=count + 10)
    per_send, per_group_send = await _round_trips(layer, url)
    # The benchmark's own scenarios, smaller: each checks every message arrived once,
    # in order (a BenchError says what went wrong otherwise).
    sizes = Sizes(
        sequential=count,
        worker_messages=count // 2,
        fanout_members=(50,),
        fanout_sends=max(20, count // 20),
    )
    broadcast = any(word in cls.__module__ for word in _BROADCAST)
    p2p = worker = fanout_rate = float("nan")
    failure = ""
    try:
        p2p = (await p2p_sequential(layer, sizes))["per_second"]
        if not broadcast:
            worker = (await normal_channel(layer, sizes))["per_second"]
        fanout_rate = (await fanout(layer, sizes))["members_50_per_second"]
    except BenchError as exc:
        failure = str(exc)
    finally:
        await layer.flush()
        if hasattr(layer, "close"):
            await layer.close()
    return Result(name, baseline, per_send, per_group_send, p2p, worker, fanout_rate, failure)


def _table(results: Sequence[Result]) -> str:
    by_name = {r.name: r for r in results}
    rows: list[tuple[str, ...]] = [
        ("layer", "round trips/send", "/group_send", "p2p msg/s", "worker msg/s", "fan-out/s"),
    ]
    for r in results:
        base = by_name.get(r.baseline)
        figures = []
        for field in ("p2p_per_second", "worker_per_second", "fanout_per_second"):
            value = getattr(r, field)
            if math.isnan(value):
                figures.append("n/a")
                continue
            cell = f"{value:,.0f}"
            if base is not None and not math.isnan(getattr(base, field)):
                cell += f" ({value / getattr(base, field):.2f}x)"
            figures.append(cell)
        rows.append(
            (r.name, f"{r.commands_per_send:g}", f"{r.commands_per_group_send:g}", *figures)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def _run_all(url: str, count: int) -> list[Result]:
    results = []
    for name, (path, baseline) in LAYERS.items():
        cls = _load(path)
        if cls is None:
            print(f"  (skipping {name}: not installed; pip install 'streamlayer[bench]')")
            continue
        print(f"  running {name} ...", flush=True)
        results.append(await _measure(name, baseline, cls, url, count))
    return results


def run_demo(hosts: str | None = None, count: int = 2000) -> int:
    """Entry point of ``python -m streamlayer demo``; returns the exit status."""
    server = None
    if hosts is None:
        server = RedisServer().start()
        url = server.url
        print(f"started a throwaway redis-server on {url} ({server.binary})")
    else:
        url = hosts
    try:
        with redis.Redis.from_url(url) as client:
            print(f"Redis {client.info('server')['redis_version']} at {url}")
        results = asyncio.run(_run_all(url, count))
    finally:
        if server is not None:
            server.cleanup()
    print()
    print(_table(results))
    print()
    print(
        "round trips = writes to the socket per call, counted in redis-py; ratios are\n"
        "against the channels_redis layer of the same kind (Pub/Sub against Pub/Sub).\n"
        "worker = one normal channel, two receiving workers (n/a on Pub/Sub: every\n"
        "subscriber gets a copy). Every message was checked: none lost, none\n"
        "duplicated, order kept per sender, unless a layer is listed below as FAILED.\n\n"
        "The full benchmark suite (latency percentiles, fan-out, memory, the raw\n"
        "redis-py floor): ./scripts/demo bench   (or --quick for a smoke run)"
    )
    return _failures(results)


def _failures(results: Sequence[Result]) -> int:
    """Prints what each layer's checks found; the exit status is 1 when one of ours
    failed. channels_redis' failures are findings about it, not about this demo:
    they are printed, and the demo goes on to compare the rest."""
    ours_failed = False
    for result in results:
        if result.failure:
            print(f"\n{result.name} FAILED a check: {result.failure}")
            ours_failed = ours_failed or result.name.startswith("streamlayer ")
    return 1 if ours_failed else 0
