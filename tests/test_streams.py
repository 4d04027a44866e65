"""StreamsChannelLayer's own promises: zero loss across real faults, honest
``recovered`` flags, cancellation storms, crashed workers, keys that clean up."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from streamlayer import StreamsChannelLayer
from streamlayer.entries import Batch
from streamlayer.keys import stream_inbox_key
from streamlayer.scripts import STREAM_APPEND
from streamlayer.testing import RedisServer


async def recv(layer: StreamsChannelLayer, channel: str, within: float = 15) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), within)


@pytest.fixture
def aof_server() -> Any:
    server = RedisServer(persistence=True).start()
    yield server
    server.cleanup()


@pytest.fixture
async def layer(fresh_server: RedisServer) -> AsyncIterator[StreamsChannelLayer]:
    made = StreamsChannelLayer(
        hosts=[fresh_server.url],
        prefix="streams",
        capacity=5000,
        on_disconnect="redis.disconnect",
        on_reconnect="redis.reconnect",
    )
    yield made
    if fresh_server.process is not None:
        await made.flush()
    await made.close()


async def collect(layer: StreamsChannelLayer, channel: str, count: int) -> list[dict[str, Any]]:
    """Receive until ``count`` data messages arrived; keep the notices apart."""
    got: list[dict[str, Any]] = []
    while len([m for m in got if m["type"] == "n"]) < count:
        got.append(await recv(layer, channel))
    return got


def numbers(messages: list[dict[str, Any]]) -> list[int]:
    return [m["i"] for m in messages if m["type"] == "n"]


@pytest.mark.parametrize("kind", ["specific", "normal"])
@pytest.mark.faults
async def test_zero_loss_while_connections_are_killed(
    layer: StreamsChannelLayer, fresh_server: RedisServer, kind: str
) -> None:
    channel = await layer.new_channel() if kind == "specific" else "kills"
    total = 400
    receiving = asyncio.ensure_future(collect(layer, channel, total))

    async def sender() -> None:
        for i in range(total):
            await layer.send(channel, {"type": "n", "i": i})
            if i % 50 == 25:
                await asyncio.to_thread(fresh_server.kill_clients)

    await asyncio.wait_for(sender(), 60)
    got = await asyncio.wait_for(receiving, 60)
    assert numbers(got) == list(range(total)), "lost, duplicated or reordered"


async def wait_until_blocked(server: RedisServer, clients: int = 1) -> None:
    """Until ``clients`` connections sit in a blocking read (bounded)."""
    for _ in range(500):
        with server.client() as client:
            if int(client.info("clients")["blocked_clients"]) >= clients:
                return
        await asyncio.sleep(0.01)
    raise AssertionError("no reader ever blocked")


async def reader_blocked_after_one_message(
    layer: StreamsChannelLayer, server: RedisServer
) -> tuple[str, asyncio.Future[dict[str, Any]]]:
    """A channel (asking for notices) whose first message was received, and a receive
    blocked on the next."""
    channel = await layer.new_channel()
    layer.want_notices(channel)
    await layer.send(channel, {"type": "n", "i": 0})
    assert (await recv(layer, channel))["i"] == 0
    waiting = asyncio.ensure_future(recv(layer, channel))
    await wait_until_blocked(server)
    return channel, waiting


@pytest.mark.faults
async def test_reader_kill_fires_both_hooks_and_recovers(
    layer: StreamsChannelLayer, fresh_server: RedisServer
) -> None:
    channel, waiting = await reader_blocked_after_one_message(layer, fresh_server)
    fresh_server.kill_clients()
    assert await asyncio.wait_for(waiting, 10) == {"type": "redis.disconnect"}
    assert await recv(layer, channel) == {"type": "redis.reconnect", "recovered": True}
    await layer.send(channel, {"type": "n", "i": 1})
    assert (await recv(layer, channel))["i"] == 1


@pytest.mark.faults
async def test_pause_loses_nothing(layer: StreamsChannelLayer, fresh_server: RedisServer) -> None:
    specific = await layer.new_channel()
    receiving = asyncio.ensure_future(collect(layer, specific, 100))
    normal = asyncio.ensure_future(collect(layer, "paused", 100))
    for i in range(100):
        if i == 50:
            fresh_server.pause(1500)
        await layer.send(specific, {"type": "n", "i": i})
        await layer.send("paused", {"type": "n", "i": i})
    assert numbers(await asyncio.wait_for(receiving, 30)) == list(range(100))
    assert numbers(await asyncio.wait_for(normal, 30)) == list(range(100))


@pytest.mark.faults
async def test_restart_with_aof_loses_nothing(aof_server: RedisServer) -> None:
    layer = StreamsChannelLayer(
        hosts=[aof_server.url],
        prefix="aof",
        on_disconnect="redis.disconnect",
        on_reconnect="redis.reconnect",
        capacity=1000,
    )
    channel = await layer.new_channel()
    layer.want_notices(channel)
    receiving = asyncio.ensure_future(collect(layer, channel, 100))
    for i in range(50):
        await layer.send(channel, {"type": "n", "i": i})
    await wait_until_blocked(aof_server)  # the reader has read all 50 and waits for more
    aof_server.stop()
    restarting = asyncio.ensure_future(asyncio.to_thread(aof_server.start))
    for i in range(50, 100):
        await layer.send(channel, {"type": "n", "i": i})  # retried until the server is back
    await restarting
    got = await asyncio.wait_for(receiving, 30)
    assert numbers(got) == list(range(100))
    notices = [m for m in got if m["type"] != "n"]
    # The AOF kept the inbox and its cursor: the reader can tell nothing was lost.
    assert notices == [
        {"type": "redis.disconnect"},
        {"type": "redis.reconnect", "recovered": True},
    ]
    await layer.flush()
    await layer.close()


@pytest.mark.faults
async def test_restart_without_persistence_says_not_recovered(
    layer: StreamsChannelLayer, fresh_server: RedisServer
) -> None:
    channel, waiting = await reader_blocked_after_one_message(layer, fresh_server)
    fresh_server.stop()
    await asyncio.to_thread(fresh_server.start)
    assert await asyncio.wait_for(waiting, 15) == {"type": "redis.disconnect"}
    assert await recv(layer, channel) == {"type": "redis.reconnect", "recovered": False}


@pytest.mark.faults
async def test_a_reset_while_no_reader_runs_is_reported(
    layer: StreamsChannelLayer, fresh_server: RedisServer
) -> None:
    """Redis restarts empty between two receives: no read failed, yet the next
    receive learns the inbox was lost (its cursor key is gone)."""
    channel = await layer.new_channel()
    layer.want_notices(channel)
    await layer.send(channel, {"type": "n", "i": 0})
    assert (await recv(layer, channel))["i"] == 0
    for _ in range(500):  # until the idle reader has settled and stopped (bounded)
        if layer.inbox.reader is None or layer.inbox.reader.task.done():
            break
        await asyncio.sleep(0.01)
    fresh_server.stop()
    await asyncio.to_thread(fresh_server.start)
    await layer.send(channel, {"type": "n", "i": 1})
    assert await recv(layer, channel) == {"type": "redis.disconnect"}
    assert await recv(layer, channel) == {"type": "redis.reconnect", "recovered": False}
    assert (await recv(layer, channel))["i"] == 1


@pytest.mark.parametrize("kind", ["specific", "normal"])
async def test_a_thousand_random_cancellations(layer: StreamsChannelLayer, kind: str) -> None:
    """Messages trickle in while receives are cancelled at random points: before they
    start, while they wait, as a message arrives, while it is being acknowledged."""
    channel = await layer.new_channel() if kind == "specific" else "storm"
    rng = random.Random(1000)
    total, got, cancellations = 500, [], 0

    async def trickle() -> None:
        for i in range(total):
            await layer.send(channel, {"type": "n", "i": i})
            await asyncio.sleep(rng.choice([0, 0.001, 0.002]))

    sender = asyncio.ensure_future(trickle())
    for _ in range(20_000):
        if cancellations >= 1000 and len(got) == total:
            break
        receive = asyncio.ensure_future(layer.receive(channel))
        await asyncio.sleep(rng.choice([0, 0, 0.0002, 0.0005, 0.001, 0.002]))
        receive.cancel()
        try:
            got.append((await receive)["i"])  # it finished before the cancel took hold
        except asyncio.CancelledError:
            cancellations += 1
    await sender
    while len(got) < total:
        got.append((await recv(layer, channel))["i"])
    assert cancellations >= 1000
    assert sorted(got) == list(range(total)), "a message was lost or duplicated"
    assert got == list(range(total)), "messages were reordered"
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive(channel), 0.3)


async def test_cancelling_an_idle_normal_receive_takes_effect_at_once(
    layer: StreamsChannelLayer, fresh_server: RedisServer
) -> None:
    """The blocking read goes on in its own task, so the cancel does not wait for it
    (on Python 3.11 redis-py can swallow a cancel until its read returns)."""
    for _ in range(20):
        receiving = asyncio.ensure_future(layer.receive("idle"))
        await wait_until_blocked(fresh_server)
        receiving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(receiving, 1.0)  # a read blocks for 2.5 s
    await layer.send("idle", {"type": "n", "i": 1})
    assert (await recv(layer, "idle"))["i"] == 1


WORKER = textwrap.dedent(
    """
    import asyncio, sys
    from streamlayer import StreamsChannelLayer

    async def main():
        layer = StreamsChannelLayer(hosts=[sys.argv[1]], prefix="crash")
        state = layer.normal.state("jobs")
        await layer.normal._ensure_group("jobs", state)
        state.check_pending = False
        while not state.held:
            await layer.normal._read_new("jobs", state)  # read, never acknowledge
        print("holding", state.held[0][0].decode(), flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


@pytest.mark.faults
async def test_entries_of_a_killed_worker_are_delivered_once(fresh_server: RedisServer) -> None:
    layer = StreamsChannelLayer(hosts=[fresh_server.url], prefix="crash", claim_after=1)
    await layer.send("jobs", {"type": "job", "n": 1})
    worker = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
        [sys.executable, "-c", WORKER, fresh_server.url],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert worker.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(worker.stdout.readline), 20)
        assert line.startswith(b"holding")
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        worker.stdout.close()
    started = time.monotonic()
    assert await recv(layer, "jobs") == {"type": "job", "n": 1}
    assert time.monotonic() - started >= 0.5, "taken over before claim_after"
    assert layer.stats.redelivered == 1
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive("jobs"), 1.5)
    await layer.flush()
    await layer.close()


async def test_an_entry_taken_over_while_held_is_not_delivered_twice(
    fresh_server: RedisServer,
) -> None:
    """A's fetch read an entry no receive took (the receive was cancelled), for longer
    than claim_after: B takes it over and delivers it, and A must then skip it."""
    a = StreamsChannelLayer(hosts=[fresh_server.url], prefix="held", claim_after=1)
    b = StreamsChannelLayer(hosts=[fresh_server.url], prefix="held", claim_after=1)
    await a.send("jobs", {"type": "job", "n": 1})
    receiving = asyncio.ensure_future(a.receive("jobs"))
    await asyncio.sleep(0)  # the receive has started the fetch
    receiving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await receiving
    for _ in range(500):  # until A's fetch holds the entry (bounded)
        if a.normal["jobs"].held:
            break
        await asyncio.sleep(0.01)
    assert a.normal["jobs"].held, "A's fetch never read the entry"
    assert await recv(b, "jobs") == {"type": "job", "n": 1}
    assert b.stats.redelivered == 1
    await a.send("jobs", {"type": "job", "n": 2})
    assert await recv(a, "jobs") == {"type": "job", "n": 2}
    assert a.stats.duplicates == 1
    await a.flush()
    await a.close()
    await b.close()


@pytest.mark.parametrize("lost", ["acknowledgement", "send"])
async def test_a_delivered_message_a_failover_forgot_is_not_delivered_again(
    fresh_server: RedisServer, lost: str
) -> None:
    """Redis replicates asynchronously: a failover can promote a replica that has not
    seen what the master did in its last milliseconds. Here the stream is put back as
    it was before (DUMP, then RESTORE after the delivery), as such a replica holds it.

    * acknowledgement: the replica had the entry, not our read and acknowledgement of
      it: the entry is unread again, and read again;
    * send: the replica never had the entry (which we received from the master), and
      the sender, whose reply the failover cut, retries: the copy is appended again,
      with the same dedup tag.

    Either way the copy is acknowledged and dropped, not handed over twice."""
    layer = StreamsChannelLayer(hosts=[fresh_server.url], prefix="lost")
    key, delivered_key = "lost:s:chan:{jobs}", "lost:s:done:{jobs}"
    await layer.send("jobs", {"type": "job", "n": 0})
    assert await recv(layer, "jobs") == {"type": "job", "n": 0}  # the group exists
    with fresh_server.client() as client:
        if lost == "acknowledgement":
            await layer.send("jobs", {"type": "job", "n": 1})
        before = client.dump(key)
        assert before is not None
        if lost == "send":
            await layer.send("jobs", {"type": "job", "n": 1})
        assert await recv(layer, "jobs") == {"type": "job", "n": 1}
        tag = client.zrange(delivered_key, -1, -1)[0]  # STREAM_ACK keeps it
        client.restore(key, 0, before, replace=True)
        client.delete(delivered_key)  # the replica never had it either
    if lost == "send":  # the sender's retry, as append_to makes it, same tag
        channel_key, side, shard = layer.destination("jobs")
        batch = Batch([layer.serialize({"type": "job", "n": 1})])
        record = [tag, "", layer.get_capacity("jobs"), layer.expiry_ms("jobs"), ""]
        args = [*batch.args(), *record]
        assert await layer.append("retry", STREAM_APPEND, shard, [channel_key, side], args,
                                  maybe_landed=True) == 0  # fmt: skip
    with fresh_server.client() as client:
        assert client.xlen(key) == 1, "the delivered message is back"
    await layer.send("jobs", {"type": "job", "n": 2})
    assert await recv(layer, "jobs") == {"type": "job", "n": 2}
    assert layer.stats.duplicates == 1
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive("jobs"), 0.3)
    with fresh_server.client() as client:
        assert client.xlen(key) == 0, "the copy was acknowledged and deleted"
    await layer.flush()
    await layer.close()


async def test_consumers_of_departed_workers_are_forgotten(fresh_server: RedisServer) -> None:
    """A worker that received and left stays a consumer of the group only until it has
    been idle for max(6 x claim_after, 4 x the blocking read)."""
    host = {"host": "127.0.0.1", "port": fresh_server.port, "socket_timeout": 1}
    options: dict[str, Any] = {"hosts": [host], "prefix": "gone", "claim_after": 0.3}
    stays, leaves = StreamsChannelLayer(**options), StreamsChannelLayer(**options)
    await leaves.send("jobs", {"type": "job"})
    assert await recv(leaves, "jobs") == {"type": "job"}
    await leaves.close()
    await asyncio.sleep(2.2)  # idle time is what is under test: 4 x 0.5 s blocking reads
    await stays.send("jobs", {"type": "job"})
    assert await recv(stays, "jobs") == {"type": "job"}
    names: set[str] = {leaves.process_id}
    for _ in range(300):  # the next claim round prunes (bounded)
        with fresh_server.client() as client:
            consumers = client.xinfo_consumers("gone:s:chan:{jobs}", "streamlayer")
        names = {c["name"].decode() for c in consumers}
        if leaves.process_id not in names:
            break
        await asyncio.sleep(0.05)
    assert leaves.process_id not in names
    assert stays.process_id in names
    await stays.flush()
    await stays.close()


async def test_keys_vanish_after_flush_and_after_their_ttl(fresh_server: RedisServer) -> None:
    layer = StreamsChannelLayer(hosts=[fresh_server.url], prefix="ttl", expiry=1, group_expiry=1)
    specific = await layer.new_channel()
    await layer.group_add("room", specific)
    await layer.group_add("room", "work")
    await layer.group_send("room", {"type": "g"})
    assert await recv(layer, specific) == {"type": "g"}
    assert await recv(layer, "work") == {"type": "g"}
    with fresh_server.client() as client:
        assert client.keys("ttl:*")
    await layer.close()
    await asyncio.sleep(2.5)  # the TTLs are what is under test
    with fresh_server.client() as client:
        assert client.keys("ttl:*") == []
    await layer.send("work", {"type": "x"})
    await layer.flush()
    with fresh_server.client() as client:
        assert client.keys("ttl:*") == []
    await layer.close()


CROSS_PROCESS = textwrap.dedent(
    """
    import asyncio, sys
    from streamlayer import StreamsChannelLayer

    async def main():
        layer = StreamsChannelLayer(hosts=[sys.argv[1]], prefix="xproc")
        mine = await layer.new_channel()
        await layer.group_add("everyone", mine)
        request = await layer.receive("requests")
        await layer.send(request["reply_to"], {"type": "reply", "from": mine})
        print((await layer.receive(mine))["type"], flush=True)
        await layer.close()

    asyncio.run(main())
    """
)


@pytest.mark.faults
async def test_two_processes_exchange_messages_and_groups(fresh_server: RedisServer) -> None:
    layer = StreamsChannelLayer(hosts=[fresh_server.url], prefix="xproc")
    child = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
        [sys.executable, "-c", CROSS_PROCESS, fresh_server.url],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        mine = await layer.new_channel()
        await layer.send("requests", {"type": "request", "reply_to": mine})
        reply = await recv(layer, mine, within=30)
        assert reply["type"] == "reply"
        await layer.group_send("everyone", {"type": "broadcast"})
        out, _ = await asyncio.to_thread(child.communicate, timeout=30)
        assert out.strip() == b"broadcast"
        assert child.returncode == 0
    finally:
        if child.poll() is None:
            child.kill()
    await layer.flush()
    await layer.close()


@pytest.mark.sentinel
async def test_the_inbox_is_trimmed_as_it_is_read_and_fully_when_idle(
    layer: StreamsChannelLayer, fresh_server: RedisServer
) -> None:
    """Receiving one message at a time, each consumed entry leaves Redis with the next
    read (so capacity checks see the true backlog); once nobody receives, all of them."""
    channel = await layer.new_channel()
    inbox = stream_inbox_key("streams", layer.process_id)
    lengths = []
    with fresh_server.client() as client:
        for i in range(200):
            await layer.send(channel, {"type": "n", "i": i})
            assert (await recv(layer, channel))["i"] == i
            lengths.append(client.xlen(inbox))
        assert max(lengths) <= 1
        for _ in range(500):  # until the idle reader has settled and stopped (bounded)
            if layer.inbox.reader is None or layer.inbox.reader.task.done():
                break
            await asyncio.sleep(0.01)
        assert client.xlen(inbox) == 0


async def test_replies_to_waiting_receivers_cost_no_bookkeeping_script(
    layer: StreamsChannelLayer, fresh_server: RedisServer
) -> None:
    """A request/reply exchange: each message goes straight to a receiver already
    waiting, so no backlog moves and the reader trims with a bare XTRIM instead of
    its bookkeeping script (the script stays for the cursor check and backlogs). The
    inbox still empties read by read: capacity checks see the true backlog."""
    ping, pong = await layer.new_channel(), await layer.new_channel()
    inbox = stream_inbox_key("streams", layer.process_id)
    rounds = 100

    async def echo() -> None:
        for _ in range(rounds):
            message = await layer.receive(ping)
            await layer.send(pong, {"type": "n", "i": message["i"]})

    def calls(client: Any, command: str) -> int:
        return int(client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))

    await layer.send(ping, {"type": "warm"})  # the reader's first read checks the cursor
    assert (await recv(layer, ping))["type"] == "warm"
    lengths = []
    with fresh_server.client() as client:
        before = calls(client, "evalsha")
        echoing = asyncio.ensure_future(echo())
        for i in range(rounds):
            await layer.send(ping, {"type": "n", "i": i})
            assert (await recv(layer, pong))["i"] == i
            lengths.append(client.xlen(inbox))
        await asyncio.wait_for(echoing, 15)
        scripts = calls(client, "evalsha") - before
    # Two sends a round; a few bookkeeping calls at most (a cursor check every
    # blocking read's length, a receiver that had not started waiting yet).
    assert 2 * rounds <= scripts <= 2 * rounds + 10, scripts
    assert max(lengths) <= 1
