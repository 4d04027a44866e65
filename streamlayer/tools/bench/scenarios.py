"""The benchmark scenarios, run against any channel layer (ours or channels_redis').

Each scenario checks what it measured: every message arrived exactly once, in
order per sender; a scenario that finds otherwise raises :class:`BenchError`
instead of reporting a number. All payloads are 200 bytes of text.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .errors import BenchError
from .probe import receive, until_heard

__all__ = [
    "SCENARIOS",
    "BenchError",
    "Scenario",
    "Sizes",
    "close_layer",
    "join_all",
    "stall_burst",
    "wait",
]

BODY = "x" * 200
#: How long any one wait for a message may take before the run is declared broken.
_WAIT = 60.0


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is; ``quick()`` for the smoke run."""

    sequential: int = 5000
    senders: int = 50
    per_sender: int = 100
    worker_messages: int = 4000
    latency_rounds: int = 2000
    #: The latency in paired batches (streamlayer.tools.bench.pairs): every layer's
    #: worker alive at once, taking turns, this many batches of this many rounds (48:
    #: a batch's median ranged 145-239 us within one run; 24 more cost 25 s).
    paired_batches: int = 48
    paired_rounds: int = 300
    fanout_members: tuple[int, ...] = (200,)
    fanout_sends: int = 50
    #: The scale curve: group sizes spread over the receiving processes, and sends.
    scale_members: tuple[int, ...] = (10, 1000, 10_000)
    scale_sends: int = 20
    many_channels: int = 1000
    per_channel: int = 5
    cross_process: int = 5000
    sync_calls: int = 1000
    #: The stall's burst: members, senders typing 4 messages/s, seconds of typing.
    burst_members: int = 20
    burst_senders: int = 40
    burst_seconds: float = 6.0
    #: Members of the group whose size, channels and presence are read.
    membership_members: int = 10_000
    membership_rounds: int = 5
    #: Messages of one bulk call (and of the single calls it is compared with), and the
    #: group's members.
    bulk_messages: int = 1000
    bulk_members: int = 10
    #: Idle channels, group members and retained history entries the memory figures
    #: are measured over.
    memory_items: int = 10_000

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            sequential=500,
            senders=20,
            per_sender=20,
            worker_messages=400,
            latency_rounds=200,
            paired_batches=3,
            paired_rounds=40,
            fanout_members=(50,),
            fanout_sends=20,
            scale_members=(10, 100),
            scale_sends=5,
            many_channels=100,
            per_channel=3,
            cross_process=500,
            sync_calls=300,
            burst_members=10,
            burst_senders=20,
            burst_seconds=4.0,
            membership_members=1000,
            membership_rounds=3,
            bulk_messages=200,
            memory_items=500,
        )


Metrics = dict[str, float]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    unit: str
    run: Callable[[Any, Sizes], Awaitable[Metrics]]
    #: Broadcast layers (Pub/Sub) have no one-of-N worker channel.
    needs_worker_channels: bool = False
    #: Only layers that know a group's members (streamlayer's stored ones).
    needs_membership: bool = False


async def close_layer(layer: Any, flush: bool = True) -> None:
    """Flush (delete the run's keys) and close, whichever of channels_redis' names
    for closing the layer has (its Pub/Sub layer closes on flush)."""
    try:
        if flush:
            await layer.flush()
    finally:
        for name in ("close", "close_pools"):
            try:
                close = getattr(layer, name)
            except AttributeError:
                continue
            await close()
            break


#: Joins made at once: channels_redis' connection pool refuses many more.
_JOINS_AT_ONCE = 50


async def join_all(layer: Any, group: str, channels: list[str], presence: bool = False) -> None:
    """Add every one of ``channels`` to ``group``, ``_JOINS_AT_ONCE`` at a time; with
    ``presence``, each with a presence record of its own."""
    for start in range(0, len(channels), _JOINS_AT_ONCE):
        joins = channels[start : start + _JOINS_AT_ONCE]
        if presence:
            calls = [
                layer.group_add(group, c, presence={"n": start + i}) for i, c in enumerate(joins)
            ]
        else:
            calls = [layer.group_add(group, c) for c in joins]
        await wait(asyncio.gather(*calls))


async def wait(awaitable: Awaitable[Any]) -> Any:
    """``awaitable``, or BenchError once it took ``_WAIT`` seconds (the message is lost)."""
    try:
        return await asyncio.wait_for(awaitable, _WAIT)
    except TimeoutError:
        raise BenchError(f"waited {_WAIT:.0f} s for a message that never came") from None


def _check_sequence(got: list[int], expected: int, what: str) -> None:
    if got != list(range(expected)):
        missing = len(set(range(expected)) - set(got))
        raise BenchError(
            f"{what}: {len(got)} received, {missing} missing, "
            f"{len(got) - len(set(got))} duplicated, in order: {got == sorted(got)}"
        )


async def p2p_sequential(layer: Any, sizes: Sizes) -> Metrics:
    """One sender awaiting each send to one process-specific channel, one receiver."""
    count = sizes.sequential
    channel = await layer.new_channel()
    received: list[int] = []
    await until_heard(layer, [channel])

    async def receiver() -> None:
        while len(received) < count:
            received.append((await receive(layer, channel))["i"])

    reading = asyncio.ensure_future(receiver())
    started = time.perf_counter()
    for i in range(count):
        await layer.send(channel, {"type": "bench.message", "i": i, "body": BODY})
    await wait(reading)
    elapsed = time.perf_counter() - started
    _check_sequence(received, count, "p2p sequential")
    return {"per_second": count / elapsed}


async def p2p_concurrent(layer: Any, sizes: Sizes) -> Metrics:
    """``senders`` senders with ``per_sender`` messages each, to as many channels,
    each read by its own receiver; all concurrent."""
    channels = [await layer.new_channel() for _ in range(sizes.senders)]
    count = sizes.per_sender
    await until_heard(layer, channels)

    async def receiver(channel: str) -> list[int]:
        return [(await receive(layer, channel))["i"] for _ in range(count)]

    async def sender(channel: str) -> None:
        for i in range(count):
            await layer.send(channel, {"type": "bench.message", "i": i, "body": BODY})

    readers = [asyncio.ensure_future(receiver(c)) for c in channels]
    started = time.perf_counter()
    await wait(asyncio.gather(*(sender(c) for c in channels)))
    results = await wait(asyncio.gather(*readers))
    elapsed = time.perf_counter() - started
    for got in results:
        _check_sequence(got, count, "p2p concurrent")
    return {"per_second": len(channels) * count / elapsed}


async def normal_channel(layer: Any, sizes: Sizes) -> Metrics:
    """One plain channel (as ``runworker`` uses), one sender, two receiving workers:
    every message to exactly one worker, in order per worker."""
    count = sizes.worker_messages
    channel = f"bench-work-{time.monotonic_ns()}"
    taken: list[list[int]] = [[], []]
    done = asyncio.Event()

    async def worker(mine: list[int]) -> None:
        while True:
            mine.append((await layer.receive(channel))["i"])
            if len(taken[0]) + len(taken[1]) >= count:
                done.set()

    workers = [asyncio.ensure_future(worker(mine)) for mine in taken]
    started = time.perf_counter()
    for i in range(count):
        await layer.send(channel, {"type": "bench.job", "i": i, "body": BODY})
    await wait(done.wait())
    elapsed = time.perf_counter() - started
    for task in workers:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    if sorted(taken[0] + taken[1]) != list(range(count)):
        raise BenchError("normal channel: a job was lost or given to both workers")
    if any(mine != sorted(mine) for mine in taken):
        raise BenchError("normal channel: a worker saw jobs out of order")
    return {"per_second": count / elapsed}


async def latency(layer: Any, sizes: Sizes) -> Metrics:
    """Ping-pong between two channels; one-way latency is half a round."""
    ping, pong = await layer.new_channel(), await layer.new_channel()
    rounds = sizes.latency_rounds
    await until_heard(layer, [ping, pong])

    async def echo() -> None:
        for _ in range(rounds):
            message = await receive(layer, ping)
            await layer.send(pong, {"type": "bench.pong", "i": message["i"], "body": BODY})

    echoing = asyncio.ensure_future(echo())
    samples: list[float] = []
    for i in range(rounds):
        started = time.perf_counter()
        await layer.send(ping, {"type": "bench.ping", "i": i, "body": BODY})
        answer = await wait(receive(layer, pong))
        samples.append((time.perf_counter() - started) / 2)
        if answer["i"] != i:
            raise BenchError(f"latency: pong {answer['i']} answered ping {i}")
    await wait(echoing)
    return _percentiles(samples[rounds // 10 :])  # the first tenth warms up


def _percentiles(samples: list[float]) -> Metrics:
    cuts = statistics.quantiles(samples, n=100)
    return {"p50_us": cuts[49] * 1e6, "p90_us": cuts[89] * 1e6, "p99_us": cuts[98] * 1e6}


async def fanout(layer: Any, sizes: Sizes) -> Metrics:
    """One group per size in ``fanout_members``, all members in this process;
    ``fanout_sends`` group_sends each; deliveries per second."""
    metrics: Metrics = {}
    for members in sizes.fanout_members:
        group = f"bench-room-{members}-{time.monotonic_ns()}"
        channels = [await layer.new_channel() for _ in range(members)]
        for channel in channels:
            await layer.group_add(group, channel)
        sends = sizes.fanout_sends
        await until_heard(layer, channels, group)

        async def member(channel: str, sends: int = sends) -> list[int]:
            return [(await receive(layer, channel))["n"] for _ in range(sends)]

        readers = [asyncio.ensure_future(member(c)) for c in channels]
        started = time.perf_counter()
        for n in range(sends):
            await layer.group_send(group, {"type": "bench.fanout", "n": n, "body": BODY})
        results = await wait(asyncio.gather(*readers))
        elapsed = time.perf_counter() - started
        for got in results:
            _check_sequence(got, sends, f"fan-out to {members}")
        metrics[f"members_{members}_per_second"] = members * sends / elapsed
    return metrics


async def many_channels(layer: Any, sizes: Sizes) -> Metrics:
    """``many_channels`` channels with ``per_channel`` messages each, all sent first,
    then all received concurrently."""
    channels = [await layer.new_channel() for _ in range(sizes.many_channels)]
    count = sizes.per_channel
    await until_heard(layer, channels)
    started = time.perf_counter()

    async def receiver(channel: str) -> list[int]:
        return [(await receive(layer, channel))["i"] for _ in range(count)]

    readers = [asyncio.ensure_future(receiver(c)) for c in channels]
    for i in range(count):
        for channel in channels:
            await layer.send(channel, {"type": "bench.message", "i": i, "body": BODY})
    results = await wait(asyncio.gather(*readers))
    elapsed = time.perf_counter() - started
    for got in results:
        _check_sequence(got, count, "many channels")
    return {"per_second": len(channels) * count / elapsed}


#: How long Redis stalls in the burst scenario (a fork for BGSAVE, an fsync, a failover).
STALL_MS = 2000
#: What a burst member spends on each message (a WebSocket send): 3 ms.
_MEMBER_WORK = 0.003


async def _until_delivered(
    everything: asyncio.Event, progress: dict[str, float], settle: bool
) -> None:
    """Until every delivery arrived (bounded), or with ``settle`` until the members
    went quiet for a whole second (the rest is not coming)."""
    if not settle:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(everything.wait(), _WAIT)
        return
    count: float = -1
    for _ in range(int(_WAIT)):
        if everything.is_set() or count == (count := progress["total"]):
            return
        await asyncio.sleep(1.0)


def _burst_lost(channel: str, seen: list[tuple[int, int]], senders: int, each: int) -> int:
    """How many of the ``senders`` x ``each`` messages ``channel`` missed; duplicates
    or a sender's messages out of order raise BenchError."""
    if len(seen) != len(set(seen)):
        raise BenchError(f"burst: {channel} got {len(seen) - len(set(seen))} duplicates")
    for s in range(senders):
        mine = [n for sender, n in seen if sender == s]
        if mine != sorted(mine):
            raise BenchError(f"burst: {channel} got sender {s}'s messages out of order")
    return senders * each - len(seen)


async def stall_burst(
    layer: Any, sizes: Sizes, pause: Callable[[int], None], settle: bool = False
) -> Metrics:
    """A chat room under load through a stall: ``burst_members`` members each spending
    3 ms per message, ``burst_senders`` senders whose clients type 4 messages/s each
    (queued while a group_send waits, as a consumer's WebSocket messages are),
    Redis paused for STALL_MS in the middle, so the queued sends land as one burst.
    Deliveries lost, the share delivered, and the seconds the backlog took to drain
    after the stall. Duplicates or reordering raise BenchError; ``settle`` waits
    for the members to go quiet instead of for every delivery (some are expected
    to be refused or lost)."""
    group = f"bench-burst-{time.monotonic_ns()}"
    members = [await layer.new_channel() for _ in range(sizes.burst_members)]
    for channel in members:
        await layer.group_add(group, channel)
    per_sender = int(sizes.burst_seconds * 4)
    expected = sizes.burst_senders * per_sender * len(members)
    got: dict[str, list[tuple[int, int]]] = {m: [] for m in members}
    everything = asyncio.Event()
    progress: dict[str, float] = {"total": 0, "last_at": time.perf_counter()}

    async def member(channel: str) -> None:
        while True:
            message = await receive(layer, channel)
            got[channel].append((message["s"], message["n"]))
            progress["total"] += 1
            progress["last_at"] = time.perf_counter()
            if progress["total"] >= expected:
                everything.set()
            await asyncio.sleep(_MEMBER_WORK)

    async def sender(s: int) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()

        async def type_messages() -> None:
            for n in range(per_sender):
                queue.put_nowait(n)
                await asyncio.sleep(0.25)  # the client types on, whatever Redis does

        typing = asyncio.ensure_future(type_messages())
        for _ in range(per_sender):
            n = await queue.get()
            message = {"type": "bench.chat", "s": s, "n": n, "body": BODY}
            await layer.group_send(group, message)
        await typing

    await until_heard(layer, members, group)
    readers = [asyncio.ensure_future(member(m)) for m in members]
    sending = asyncio.gather(*(sender(s) for s in range(sizes.burst_senders)))
    await asyncio.sleep(sizes.burst_seconds / 4)
    await asyncio.to_thread(pause, STALL_MS)
    stall_ended = time.perf_counter() + STALL_MS / 1000
    await wait(sending)
    await _until_delivered(everything, progress, settle)
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    lost = sum(_burst_lost(channel, seen, sizes.burst_senders, per_sender)
               for channel, seen in got.items())  # fmt: skip
    return {
        "lost": lost,
        "duplicated": 0,
        "delivered_percent": 100 * (expected - lost) / expected,
        "drain_s": max(0.0, progress["last_at"] - stall_ended),
    }


async def membership(layer: Any, sizes: Sizes) -> Metrics:
    """A group of ``membership_members`` channels joined with presence: how long
    group_size, group_channels and presence take, beside a group_send to the same
    group (median of ``membership_rounds`` calls each, in ms; the send until its
    call returns)."""
    group = f"bench-members-{time.monotonic_ns()}"
    count = sizes.membership_members
    channels = [await layer.new_channel() for _ in range(count)]
    await join_all(layer, group, channels, presence=True)
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "group_size_ms": lambda: layer.group_size(group),
        "group_channels_ms": lambda: layer.group_channels(group),
        "presence_ms": lambda: layer.presence(group),
        "group_send_ms": lambda: layer.group_send(group, {"type": "bench.fanout", "body": BODY}),
    }
    metrics: Metrics = {}
    for name, call in calls.items():
        samples = []
        for _ in range(sizes.membership_rounds):
            started = time.perf_counter()
            answer = await wait(call())
            samples.append((time.perf_counter() - started) * 1000)
            _check_membership(name, answer, count)
        metrics[name] = statistics.median(samples)
    return metrics


async def bulk(layer: Any, sizes: Sizes) -> Metrics:
    """``bulk_messages`` messages to one process-specific channel, and to a group of
    ``bulk_members`` of them: as one call each (awaited in turn, as a loop in an app
    sends them), and as one send_bulk / group_send_bulk call; until every member
    received every message, in order. A layer without the bulk calls (channels_redis)
    makes single calls in the bulk rows too: it is what its users do."""
    count = sizes.bulk_messages
    messages = [{"type": "bench.bulk", "n": n, "body": BODY} for n in range(count)]
    channel = await layer.new_channel()
    group = f"bench-bulk-{time.monotonic_ns()}"
    members = [await layer.new_channel() for _ in range(sizes.bulk_members)]
    for member in members:
        await layer.group_add(group, member)
    await until_heard(layer, [channel])
    await until_heard(layer, members, group)

    async def singles(target: str, send: Callable[[str, Any], Awaitable[None]]) -> None:
        for message in messages:
            await send(target, message)

    async def at_once(target: str, send_bulk: Any, send: Any) -> None:
        if send_bulk is None:
            await singles(target, send)
        else:
            await send_bulk(target, messages)

    async def timed(sending: Awaitable[None], receivers: list[str]) -> float:
        async def receive_all(receiver: str) -> None:
            got = [(await wait(receive(layer, receiver)))["n"] for _ in range(count)]
            _check_sequence(got, count, f"bulk to {receiver}")

        started = time.perf_counter()
        await wait(asyncio.gather(sending, *(receive_all(r) for r in receivers)))
        return count * len(receivers) / (time.perf_counter() - started)

    send_bulk = getattr(layer, "send_bulk", None)
    group_bulk = getattr(layer, "group_send_bulk", None)
    return {
        "send_single_per_second": await timed(singles(channel, layer.send), [channel]),
        "send_bulk_per_second": await timed(at_once(channel, send_bulk, layer.send), [channel]),
        "group_single_per_second": await timed(singles(group, layer.group_send), members),
        "group_bulk_per_second": await timed(
            at_once(group, group_bulk, layer.group_send), members
        ),
    }


def _check_membership(name: str, answer: Any, count: int) -> None:
    if name == "group_size_ms" and answer != count:
        raise BenchError(f"membership: group_size said {answer}, not {count}")
    if name in ("group_channels_ms", "presence_ms") and len(answer) != count:
        raise BenchError(f"membership: {name[:-3]} listed {len(answer)}, not {count}")


SCENARIOS: list[Scenario] = [
    Scenario("p2p_sequential", "p2p sequential", "msg/s", p2p_sequential),
    Scenario("p2p_concurrent", "p2p concurrent", "msg/s", p2p_concurrent),
    Scenario("normal_channel", "normal channel, 2 workers", "msg/s", normal_channel, True),
    Scenario("latency", "latency (one way)", "us", latency),
    Scenario("fanout", "fan-out", "deliveries/s", fanout),
    Scenario("many_channels", "many channels", "msg/s", many_channels),
    Scenario("membership", "membership of a big group", "ms", membership, needs_membership=True),
    Scenario("bulk", "bulk sends", "msg/s", bulk),
]
