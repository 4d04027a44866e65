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
from streamlayer.redispy import lean_connection_class
from streamlayer.scripts import STREAM_APPEND
from streamlayer.testing import RedisServer

from .layers import ping_pong

ROUNDS = 40


async def recv(layer: Any, channel: str) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), 15)


class TracedConnection(lean_connection_class(AsyncConnection)):  # type: ignore[misc]
    """A connection that notes what each write carries: 's' a send (a STREAM_APPEND
    call), 'r' a read (a write with an XREAD), in the order written. It writes as the
    layer's own connections do (lean_connection_class), or its timing would differ."""

    writes: ClassVar[list[str]] = []

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        packed = command if isinstance(command, bytes | str) else b"".join(command)
        data = packed.encode() if isinstance(packed, str) else packed
        if STREAM_APPEND.sha.encode() in data:
            TracedConnection.writes.append("s")
        elif b"XREAD" in data:
            TracedConnection.writes.append("r")
        await super().send_packed_command(command, check_health)


async def test_a_streams_reply_goes_before_the_next_read(
    fresh_server: RedisServer,
) -> None:
    """A receiver's reply may be sent several event-loop turns after its wake-up
    (here the pings' sender receives through ``wait_for``: three turns, as a Channels
    consumer's receive is). The reader lets that chain run before writing its next
    read, so the reply's append is written first and the read finds it at once: every
    send is followed by a read. With the read written after one turn, it went ahead
    of the ping (a write and the reply to its bookkeeping on the ping's way), and the
    echo's pong followed the ping with no read between."""
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
    assert writes.count("s") == 2 * ROUNDS
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
