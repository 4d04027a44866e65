"""One layer's benchmark run, in a process of its own (``python -m
streamlayer.tools.bench.worker``): the runner starts one per layer so that no layer
pays for another's garbage, imports or connections. Prints one JSON object."""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import importlib
import json
import os
import subprocess
import time
import tracemalloc
from dataclasses import asdict
from typing import Any, NamedTuple

import redis

from .commands import worker_command
from .probe import PROBE, heard, probing, receive, until_heard
from .raw import RAW_SCENARIOS
from .scenarios import (
    BODY,
    SCENARIOS,
    BenchError,
    Metrics,
    Sizes,
    close_layer,
    join_all,
    stall_burst,
    wait,
)
from .sync_calls import sync_calls, sync_floor

__all__ = ["main"]

#: How long the sync callers' process may take (two loops of calls and a member).
_SYNC_TIMEOUT = 600.0


def load_layer_class(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def make_layer(path: str, url: str, prefix: str, capacity: int) -> Any:
    return load_layer_class(path)(hosts=[url], prefix=prefix, capacity=capacity)


async def _run_layer(path: str, url: str, sizes: Sizes, broadcast: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for scenario in SCENARIOS:
        if scenario.needs_worker_channels and broadcast:
            results[scenario.name] = {"skipped": "every Pub/Sub subscriber gets a copy"}
            continue
        if scenario.needs_membership and (broadcast or path.startswith("channels_redis")):
            results[scenario.name] = {"skipped": "this layer cannot tell a group's members"}
            continue
        layer = make_layer(path, url, f"bench-{scenario.name}", capacity=100_000)
        try:
            results[scenario.name] = await scenario.run(layer, sizes)
        except BenchError as exc:
            results[scenario.name] = {"error": str(exc)}
        finally:
            await close_layer(layer)
    results["cross_process"] = await _cross_process(path, url, sizes.cross_process)
    results["fanout_spread"] = await _fanout_spread(path, url, sizes)
    results["fanout_scale"] = await _fanout_scale(path, url, sizes)
    results["burst"] = await _burst(path, url, sizes)
    return results


async def _burst(path: str, url: str, sizes: Sizes) -> Metrics | dict[str, str]:
    """The stall's burst (scenarios.stall_burst) on the layer's *default* config: what
    a user gets without tuning capacity."""
    layer = load_layer_class(path)(hosts=[url], prefix="bench-burst")

    def pause(milliseconds: int) -> None:
        with redis.Redis.from_url(url) as client:
            client.execute_command("CLIENT", "PAUSE", milliseconds, "ALL")

    try:
        return await stall_burst(layer, sizes, pause, settle=True)
    except BenchError as exc:
        return {"error": str(exc)}
    finally:
        await close_layer(layer)


async def _cross_process(path: str, url: str, count: int) -> Metrics | dict[str, str]:
    """A sender in another OS process, this one receiving; msg/s from the sender's
    first send to the last receive."""
    layer = make_layer(path, url, "bench-cross", capacity=100_000)
    try:
        channel = await layer.new_channel()
        await until_heard(layer, [channel])
        command = worker_command("send", path, url, channel, str(count))
        sender = await asyncio.create_subprocess_exec(*command)
        try:
            first = await wait(receive(layer, channel))
            got = [first["i"]]
            for _ in range(count - 1):
                got.append((await wait(receive(layer, channel)))["i"])
            finished = time.time()
        except BenchError as exc:
            return {"error": f"cross process: {exc}"}
        finally:
            await asyncio.wait_for(sender.wait(), 60)
        if got != list(range(count)):
            return {"error": "cross process: lost, duplicated or reordered"}
        return {"per_second": count / (finished - float(first["t0"]))}
    finally:
        await close_layer(layer)


#: Receiving processes of the spread fan-out and of the scale curve.
SPREAD_PROCESSES = 4


async def _fanout_spread(path: str, url: str, sizes: Sizes) -> Metrics | dict[str, str]:
    """One group whose members live in SPREAD_PROCESSES other OS processes (the size of
    the first fan-out, split evenly), ``fanout_sends`` group_sends from this one;
    deliveries per second from the first send to the last receive anywhere."""
    try:
        spread = await _spread(path, url, sizes.fanout_members[0], sizes.fanout_sends)
    except BenchError as exc:
        return {"error": str(exc)}
    return {"per_second": spread["per_second"], "processes": SPREAD_PROCESSES}


async def _fanout_scale(path: str, url: str, sizes: Sizes) -> Metrics | dict[str, str]:
    """The scale curve: a group of each size in ``scale_members``, spread over
    SPREAD_PROCESSES receiving processes, ``scale_sends`` group_sends each. Per size:
    deliveries/s, CPU microseconds per delivery on our side (the sender's and every
    receiver's, from the first send to the last receive), and Redis commands and
    network bytes (in and out) per group_send, from the server's counters."""
    metrics: Metrics = {}
    for members in sizes.scale_members:
        try:
            spread = await _spread(path, url, members, sizes.scale_sends)
        except BenchError as exc:
            return {"error": f"{members} members: {exc}"}
        for name, value in spread.items():
            metrics[f"members_{members}_{name}"] = value
    return metrics


async def _spread(path: str, url: str, members: int, sends: int) -> dict[str, float]:
    """``members`` members split over SPREAD_PROCESSES processes, ``sends`` group_sends
    from this one; raises BenchError when a member missed, doubled or reordered one."""
    per_process = max(1, members // SPREAD_PROCESSES)
    group = f"bench-spread-{time.monotonic_ns()}"
    layer = make_layer(path, url, "bench-spread", capacity=100_000)
    command = worker_command("members", path, url, group, str(per_process), str(sends))
    children = [
        await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
        for _ in range(SPREAD_PROCESSES)
    ]
    try:
        for child in children:  # each says "joined" once its members are in the group
            await _expect(child, b"joined")
        probe = functools.partial(layer.group_send, group, PROBE)
        await probing(probe, [_expect(child, b"heard") for child in children])
        with redis.Redis.from_url(url) as client:
            before = _server_counters(client)
            started, cpu_started = time.time(), time.process_time()
            for n in range(sends):
                await layer.group_send(group, {"type": "bench.fanout", "n": n, "body": BODY})
            cpu = time.process_time() - cpu_started
            reports = [json.loads(await _line_of(child)) for child in children]
            after = _server_counters(client)
        if not all(report["ok"] for report in reports):
            raise BenchError("spread fan-out: a member lost, duplicated or reordered messages")
        finished = max(float(report["done"]) for report in reports)
        delivered = per_process * SPREAD_PROCESSES * sends
        cpu += sum(float(report["cpu"]) for report in reports)
        return {
            "per_second": delivered / (finished - started),
            "cpu_us_per_delivery": cpu * 1e6 / delivered,
            "commands_per_send": (after.calls - before.calls) / sends,
            "bytes_per_send": (after.bytes - before.bytes) / sends,
            "redis_us_per_send": (after.usec - before.usec) / sends,
        }
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
            await child.wait()
        await close_layer(layer)


class _Counters(NamedTuple):
    #: Commands the server ran (every client's, INFO's own included).
    calls: int
    #: Bytes it read and wrote on the network.
    bytes: int
    #: Its CPU time in microseconds (INFO cpu: user and system), all of it: commands,
    #: scripts, network I/O. commandstats would count a script's commands twice
    #: (alone and inside the script's time).
    usec: float


def _server_counters(client: redis.Redis) -> _Counters:
    """The server's counters so far: how much it ran, moved and spent."""
    commands = client.info("commandstats")
    stats = client.info("stats")
    cpu = client.info("cpu")
    return _Counters(
        calls=sum(int(entry["calls"]) for entry in commands.values()),
        bytes=int(stats["total_net_input_bytes"]) + int(stats["total_net_output_bytes"]),
        usec=(float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])) * 1e6,
    )


async def _expect(child: asyncio.subprocess.Process, word: bytes) -> None:
    line = await _line_of(child)
    if line.strip() != word:
        raise BenchError(f"a member process said {line!r}, not {word!r}")


async def _line_of(child: asyncio.subprocess.Process) -> bytes:
    if child.stdout is None:
        raise BenchError("a member process has no stdout")
    return await asyncio.wait_for(child.stdout.readline(), _CHILD_WAIT)


#: How long a member process may take to get ready, or to receive everything.
_CHILD_WAIT = 300.0


async def _members_here(path: str, url: str, group: str, count: int, sends: int) -> None:
    """The receiving side of a spread fan-out: ``count`` members of ``group``. Says
    "joined" once they are in the group and "heard" once each heard a probe (the
    sender probes the group meanwhile, see probe.py); then reports whether each got
    every message in order, when the last arrived, and the CPU seconds this process
    spent from "heard" to then."""
    layer = make_layer(path, url, "bench-spread", capacity=100_000)
    try:
        channels = [await layer.new_channel() for _ in range(count)]
        await join_all(layer, group, channels)
        print("joined", flush=True)
        await asyncio.wait_for(asyncio.gather(*(heard(layer, c) for c in channels)), _CHILD_WAIT)

        async def member(channel: str) -> bool:
            got = [(await receive(layer, channel))["n"] for _ in range(sends)]
            return got == list(range(sends))

        receiving = [asyncio.ensure_future(member(c)) for c in channels]
        cpu_started = time.process_time()
        print("heard", flush=True)
        ok = all(await asyncio.wait_for(asyncio.gather(*receiving), _CHILD_WAIT))
        done, cpu = time.time(), time.process_time() - cpu_started
        print(json.dumps({"ok": ok, "done": done, "cpu": cpu}), flush=True)
    finally:
        await close_layer(layer, flush=False)


async def _send_from_here(path: str, url: str, channel: str, count: int) -> None:
    layer = make_layer(path, url, "bench-cross", capacity=100_000)
    try:
        started = time.time()
        for i in range(count):
            await layer.send(channel, {"type": "bench.m", "i": i, "t0": started, "body": BODY})
    finally:
        await close_layer(layer, flush=False)


async def _memory(path: str, url: str, broadcast: bool, count: int) -> dict[str, float]:
    """Memory at scale, in bytes: Redis per backlogged message; per idle channel (a
    channel with a receive() waiting on it, as a connected consumer has) on the
    Python heap and in Redis; per group member on both; per retained history entry
    in Redis (only layers that keep a group's history)."""
    figures: dict[str, float] = {}
    if not broadcast:  # Pub/Sub keeps no backlog in Redis: nothing to measure
        figures.update(await _backlog_bytes(path, url, count))
    figures.update(await _idle_channel_bytes(path, url, count))
    figures.update(await _member_bytes(path, url, count))
    if path == "streamlayer.StreamsChannelLayer":
        figures.update(await _history_bytes(path, url, count))
    return figures


async def _backlog_bytes(path: str, url: str, count: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    with redis.Redis.from_url(url) as client:
        layer = make_layer(path, url, "bench-memory", capacity=count * 2)
        try:
            channel = await layer.new_channel()
            before = int(client.info("memory")["used_memory"])
            for i in range(count):
                await layer.send(channel, {"type": "bench.m", "i": i, "body": BODY})
            after = int(client.info("memory")["used_memory"])
            figures["redis_bytes_per_message"] = (after - before) / count
        finally:
            await close_layer(layer)
    return figures


async def _idle_channel_bytes(path: str, url: str, count: int) -> dict[str, float]:
    """``count`` idle channels in one process. Redis' share is its whole
    ``used_memory`` growth: a Pub/Sub layer's channels are subscriptions, no key."""
    figures: dict[str, float] = {}
    layer = make_layer(path, url, "bench-idle", capacity=100)
    try:
        with redis.Redis.from_url(url) as client:
            gc.collect()
            tracemalloc.start()
            baseline = tracemalloc.get_traced_memory()[0]
            redis_before = int(client.info("memory")["used_memory"])
            channels = [await layer.new_channel() for _ in range(count)]
            waiting = [asyncio.ensure_future(layer.receive(c)) for c in channels]
            for _ in range(20):  # let every receive reach its wait (bounded)
                await asyncio.sleep(0.05)
            used = tracemalloc.get_traced_memory()[0] - baseline
            tracemalloc.stop()
            redis_used = int(client.info("memory")["used_memory"]) - redis_before
        figures["client_bytes_per_idle_channel"] = used / count
        figures["redis_bytes_per_idle_channel"] = redis_used / count
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
    finally:
        await close_layer(layer)
    return figures


async def _member_bytes(path: str, url: str, count: int) -> dict[str, float]:
    """One group of ``count`` members of this process: what the joins added to
    the Python heap (the channels existed before) and to the layer's keys in Redis
    (MEMORY USAGE; a Pub/Sub layer keeps its groups in the process)."""
    layer = make_layer(path, url, "bench-members", capacity=100)
    group = "bench-members"
    try:
        with redis.Redis.from_url(url) as client:
            channels = [await layer.new_channel() for _ in range(count)]
            gc.collect()
            tracemalloc.start()
            baseline = tracemalloc.get_traced_memory()[0]
            redis_before = _keys_bytes(client, "bench-members")
            await join_all(layer, group, channels)
            used = tracemalloc.get_traced_memory()[0] - baseline
            tracemalloc.stop()
            redis_used = _keys_bytes(client, "bench-members") - redis_before
    finally:
        await close_layer(layer)
    return {
        "client_bytes_per_member": used / count,
        "redis_bytes_per_member": redis_used / count,
    }


async def _history_bytes(path: str, url: str, count: int) -> dict[str, float]:
    """``count`` group_sends to a group keeping that many in its history and
    with no member: the layer's keys in Redis (MEMORY USAGE) per retained entry."""
    cls = load_layer_class(path)
    layer = cls(hosts=[url], prefix="bench-history", group_history=count)
    try:
        with redis.Redis.from_url(url) as client:
            before = _keys_bytes(client, "bench-history")
            for i in range(count):
                await layer.group_send("bench-room", {"type": "bench.m", "i": i, "body": BODY})
            used = _keys_bytes(client, "bench-history") - before
    finally:
        await close_layer(layer)
    return {"redis_bytes_per_history_entry": used / count}


def _keys_bytes(client: redis.Redis, prefix: str) -> int:
    """The exact MEMORY USAGE of every key under ``prefix``, summed."""
    total = 0
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        total += int(client.memory_usage(key, samples=0) or 0)
    return total


async def _run_raw(url: str, sizes: Sizes) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, run in RAW_SCENARIOS.items():
        try:
            results[name] = await run(url, sizes)
        except BenchError as exc:
            results[name] = {"error": str(exc)}
    return results


def _sync_calls(path: str, url: str, count: int, broadcast: bool) -> Metrics | dict[str, str]:
    """Outside any event loop, as sync code calls a layer (see sync_calls.py); the
    member process's layer has the spread fan-out's prefix."""
    try:
        if path == "raw":
            return sync_floor(count)
        make = lambda: make_layer(path, url, "bench-spread", 100_000)  # noqa: E731
        return sync_calls(make, path, url, count, broadcast)
    except BenchError as exc:
        return {"error": str(exc)}


def _sync_calls_apart(path: str, url: str, count: int, broadcast: bool) -> Any:
    """The sync callers' scenario in a fresh process: asgiref makes an event loop
    per call, so Python's garbage collector runs often, and each run would scan
    whatever the earlier scenarios left on this process's heap."""
    command = worker_command("sync", path, url, str(count))
    done = subprocess.run(
        [*command, *(["--broadcast"] if broadcast else [])],
        capture_output=True,
        text=True,
        timeout=_SYNC_TIMEOUT,
    )
    if done.returncode != 0:
        return {"error": f"sync calls: the process failed: {done.stderr.strip()[-500:]}"}
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streamlayer.tools.bench.worker")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run every scenario for one layer")
    run.add_argument("path", help="layer class path, or 'raw' for bare redis-py")
    run.add_argument("url")
    run.add_argument("--sizes", required=True, help="Sizes as JSON")
    run.add_argument("--broadcast", action="store_true")
    run.add_argument("--memory", action="store_true")
    send = commands.add_parser("send", help="the sending side of the cross-process run")
    send.add_argument("path")
    send.add_argument("url")
    send.add_argument("channel")
    send.add_argument("count", type=int)
    members = commands.add_parser("members", help="the receiving side of the spread fan-out")
    members.add_argument("path")
    members.add_argument("url")
    members.add_argument("group")
    members.add_argument("count", type=int)
    members.add_argument("sends", type=int)
    sync = commands.add_parser("sync", help="the sync callers' scenario, in a fresh process")
    sync.add_argument("path", help="layer class path, or 'raw' for asgiref alone")
    sync.add_argument("url")
    sync.add_argument("count", type=int)
    sync.add_argument("--broadcast", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "members":
        asyncio.run(_members_here(args.path, args.url, args.group, args.count, args.sends))
        return 0
    if args.command == "send":
        asyncio.run(_send_from_here(args.path, args.url, args.channel, args.count))
        return 0
    if args.command == "sync":
        print(json.dumps(_sync_calls(args.path, args.url, args.count, args.broadcast)))
        return 0
    raw_sizes = json.loads(args.sizes)
    tuples = {name: tuple(raw_sizes[name]) for name in ("fanout_members", "scale_members")}
    sizes = Sizes(**{**raw_sizes, **tuples})
    if args.path == "raw":
        results = asyncio.run(_run_raw(args.url, sizes))
    else:
        results = asyncio.run(_run_layer(args.path, args.url, sizes, args.broadcast))
    results["sync_calls"] = _sync_calls_apart(
        args.path, args.url, sizes.sync_calls, args.broadcast
    )
    if args.path != "raw" and args.memory:
        results["memory"] = asyncio.run(
            _memory(args.path, args.url, args.broadcast, sizes.memory_items)
        )
    print(json.dumps({"pid": os.getpid(), "sizes": asdict(sizes), "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
