"""The stored layers' inbox readers and the receivers they wake: a reader lets the
receivers it woke run before it writes its next read, so a reply goes before that
read and the read finds it at once (streamlayer.reader.let_woken_run). Each test
runs a ping-pong whose pinger receives through ``wait_for``, three event-loop
turns from its wake-up as a Channels consumer's receive is, against a real
server, and looks at what reached Redis and in which order."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, ClassVar

from redis.asyncio import Connection as AsyncConnection

from streamlayer import StreamsChannelLayer
from streamlayer.compat.core import RedisChannelLayer
from streamlayer.keys import stream_inbox_key
from streamlayer.redispy import lean_connection_class
from streamlayer.scripts import STREAM_APPEND
from streamlayer.testing import RedisServer

from .layers import ping_pong

ROUNDS = 40


async def recv(layer: Any, channel: str) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), 15)


class TracedConnection(lean_connection_class(AsyncConnection)):  # type: ignore[misc]
    """A connection that notes what each write carries: 's' a send (a STREAM_APPEND
    call), 'r' a read (a write with an XREAD), 'b' both (a send that rode with the
    reader's read: streamlayer.batching), in the order written. It writes as the
    layer's own connections do (lean_connection_class), or its timing would differ."""

    writes: ClassVar[list[str]] = []

    @staticmethod
    def note(data: bytes) -> None:
        send, read = STREAM_APPEND.sha.encode() in data, b"XREAD" in data
        if send or read:
            TracedConnection.writes.append("b" if send and read else "s" if send else "r")

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        packed = command if isinstance(command, bytes | str) else b"".join(command)
        self.note(packed.encode() if isinstance(packed, str) else packed)
        await super().send_packed_command(command, check_health)

    def write_now(self, commands: list[tuple[Any, ...]]) -> bool:
        written = bool(super().write_now(commands))
        if written:
            self.note(b"".join(self.pack_commands(commands)))
        return written


async def test_a_streams_reply_goes_before_the_next_read(
    fresh_server: RedisServer,
) -> None:
    """A receiver's reply may be sent several event-loop turns after its wake-up
    (here the pings' sender receives through ``wait_for``: three turns, as a Channels
    consumer's receive is). The reader lets that chain run before writing its next
    read, and the reply rides with that read: one write with the reply's append
    before the XREAD, which finds it at once. With the read written after one turn,
    it went ahead of the ping (a write and the reply to its bookkeeping on the
    ping's way), and the echo's pong followed the ping with no read between; before
    the ride, each send was a write of its own, the read right after it."""
    host = {"address": fresh_server.url, "connection_class": TracedConnection}
    layer = StreamsChannelLayer(hosts=[host], prefix="traced")
    try:
        warm = await layer.new_channel()
        await layer.send(warm, {"type": "warm"})  # the first read checks the cursor
        assert (await recv(layer, warm))["type"] == "warm"
        TracedConnection.writes.clear()
        await ping_pong(layer, ROUNDS)
    finally:
        await layer.close()
    writes = "".join(TracedConnection.writes)
    assert writes.count("s") + writes.count("b") == 2 * ROUNDS
    assert writes.count("b") >= 2 * ROUNDS * 0.9, writes  # the sends rode with reads
    assert writes.count("ss") <= ROUNDS // 10, writes


async def test_a_classic_reply_goes_before_the_next_pop(fresh_server: RedisServer) -> None:
    """compat.core: the reader's next pop is written after the reply, so it finds the
    reply at once and no blocking pop is needed. With the pop written at once (no
    turn for the receivers) every round took two blocking pops, the reply waiting
    for one to be in place."""
    layer = RedisChannelLayer(hosts=[fresh_server.url], prefix="classic")
    try:
        warm = await layer.new_channel()
        await layer.send(warm, {"type": "warm"})
        assert (await recv(layer, warm))["type"] == "warm"
        with fresh_server.client() as client:
            client.config_resetstat()
            await ping_pong(layer, ROUNDS)
            stats = client.info("commandstats")
    finally:
        await layer.flush()
        await layer.close()
    pops = stats.get("cmdstat_zpopmin", {}).get("calls", 0)
    blocking = stats.get("cmdstat_bzpopmin", {}).get("calls", 0)
    assert pops >= 2 * ROUNDS
    assert blocking <= ROUNDS // 10, (pops, blocking)


# --- a reply that rides with the reader's next read (streamlayer.batching) ----------


async def test_rides_through_killed_connections_lose_and_repeat_nothing(
    fresh_server: RedisServer,
) -> None:
    """Connections killed every 10 ms under a ping-pong whose replies ride with the
    reader's reads: a ride whose connection died fails its caller, which retries
    (the dedup tags find a send that landed, in Redis or, once the reader took it,
    in the reader's memory of recent tags), so every round still arrives once, in
    order (ping_pong checks it)."""
    layer = StreamsChannelLayer(hosts=[fresh_server.url], prefix="rides")
    try:
        killing = asyncio.ensure_future(
            asyncio.to_thread(fresh_server.keep_killing_clients, 30, 0.01, ("normal",))
        )
        rounds = 0
        while not killing.done() and rounds < 2000:
            await ping_pong(layer, 10)
            rounds += 10
        await killing
        assert layer.connections.batcher(0).rides > rounds  # the replies rode
        assert layer.stats.retries > 0  # and connections died under them
    finally:
        await layer.flush()
        await layer.close()


async def test_a_ride_that_finds_no_script_goes_the_usual_way(
    fresh_server: RedisServer,
) -> None:
    """An emptied script cache (a restart, SCRIPT FLUSH) answers a ride NOSCRIPT: the
    call did not run, and goes again on a lone-call connection, which loads the
    script. Nothing is retried, nothing lost."""
    layer = StreamsChannelLayer(hosts=[fresh_server.url], prefix="noscript")
    try:
        for _ in range(5):
            with fresh_server.client() as client:
                client.script_flush()
            await ping_pong(layer, 4)
        assert layer.connections.batcher(0).rides >= 10
        assert layer.stats.retries == 0
    finally:
        await layer.flush()
        await layer.close()


async def test_a_ride_cut_short_by_close_fails_its_caller(fresh_server: RedisServer) -> None:
    """The layer closes while a reply rides with the reader's read, before the reader
    read the replies: the reader's stop fails the ride (its connection is closed, not
    handed back with replies unread), and the caller's retry settles the send: it
    returns or raises, it does not hang, and the message is stored at most once."""
    layer = StreamsChannelLayer(hosts=[fresh_server.url], prefix="cut", retry_timeout=2)
    ping, pong = await layer.new_channel(), await layer.new_channel()
    rides = layer.connections.batcher(0).rides
    await layer.send(ping, {"type": "ping"})
    await recv(layer, ping)  # the reader is in the window where a call may ride
    replying = asyncio.ensure_future(layer.send(pong, {"type": "pong"}))
    await asyncio.sleep(0)  # the reply rides, its reply not read yet
    assert layer.connections.batcher(0).rides == rides + 1
    await layer.close()
    done, _ = await asyncio.wait([replying], timeout=10)
    assert done, "the send that rode hangs"
    with fresh_server.client() as client:
        assert client.xlen(stream_inbox_key("cut", layer.process_id)) <= 2
    await layer.flush()
    await layer.close()
