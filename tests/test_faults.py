"""Real faults against real servers: killed connections, a paused server, a restart.

A blip must cost latency, not an exception in the consumer (which would close
its WebSocket); only when ``retry_timeout`` passes does the caller see
:class:`~streamlayer.RedisUnavailable`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from streamlayer import RedisUnavailable
from streamlayer.base import StreamlayerLayer
from streamlayer.testing import RedisServer

from .layers import layer_class

pytestmark = pytest.mark.faults

FAULT_LAYERS = ["streamlayer.compat.core.RedisChannelLayer", "streamlayer.StreamsChannelLayer"]


@pytest.fixture(params=FAULT_LAYERS)
async def layer(request: pytest.FixtureRequest, fresh_server: RedisServer) -> AsyncIterator[Any]:
    made = layer_class(request.param)(hosts=[fresh_server.url], prefix="faults", capacity=1000)
    yield made
    if fresh_server.process is not None:
        await made.flush()
    await made.close()


async def wait_for_blocked_clients(server: RedisServer, count: int) -> None:
    """Until ``count`` clients sit in a blocking read on the server (bounded)."""
    for _ in range(500):
        with server.client() as client:
            if int(client.info("clients")["blocked_clients"]) >= count:
                return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"never saw {count} blocked client(s)")


async def test_client_kill_costs_no_message(
    layer: StreamlayerLayer, fresh_server: RedisServer
) -> None:
    specific = await layer.new_channel()
    await layer.group_add("killed", specific)
    for round_ in range(3):
        normal = asyncio.ensure_future(layer.receive("kill.normal"))
        local = asyncio.ensure_future(layer.receive(specific))
        await wait_for_blocked_clients(fresh_server, 2)
        assert fresh_server.kill_clients() >= 2
        await layer.send("kill.normal", {"type": "n", "round": round_})
        assert fresh_server.kill_clients() >= 1
        await layer.group_send("killed", {"type": "g", "round": round_})
        assert (await asyncio.wait_for(normal, 10))["round"] == round_
        assert (await asyncio.wait_for(local, 10))["round"] == round_


async def test_client_kill_during_a_burst_of_sends(
    layer: StreamlayerLayer, fresh_server: RedisServer
) -> None:
    """Sends retried after their connection died are not stored twice."""
    killing = asyncio.ensure_future(asyncio.to_thread(fresh_server.keep_killing_clients, 10, 0.01))
    sent = 0
    # Bounded by the channel's capacity (1000): every send is accepted, so each one
    # is in the count, and a faster layer does not turn the test into a ChannelFull.
    while not killing.done() and sent < 1000:
        await layer.send("burst", {"type": "n", "i": sent})
        sent += 1
    await killing
    got = [(await asyncio.wait_for(layer.receive("burst"), 10))["i"] for _ in range(sent)]
    assert got == list(range(sent))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive("burst"), 0.3)


async def test_client_pause_is_waited_out(
    layer: StreamlayerLayer, fresh_server: RedisServer
) -> None:
    specific = await layer.new_channel()
    await layer.group_add("paused", specific)
    await layer.send("warm-up", {"type": "w"})  # connections exist before the pause
    assert await asyncio.wait_for(layer.receive("warm-up"), 10) == {"type": "w"}
    receiving = asyncio.ensure_future(layer.receive(specific))
    fresh_server.pause(2000)
    started = time.monotonic()
    await layer.send("during-pause", {"type": "p"})
    await layer.group_send("paused", {"type": "g"})
    assert time.monotonic() - started > 1.0, "the pause did not hold the send"
    assert await asyncio.wait_for(receiving, 10) == {"type": "g"}
    assert await asyncio.wait_for(layer.receive("during-pause"), 10) == {"type": "p"}


async def test_server_restart_is_retried(
    layer: StreamlayerLayer, fresh_server: RedisServer
) -> None:
    specific = await layer.new_channel()
    receiving = asyncio.ensure_future(layer.receive(specific))
    await wait_for_blocked_clients(fresh_server, 1)
    fresh_server.stop()
    sending = asyncio.ensure_future(layer.send("after-restart", {"type": "r"}))
    await asyncio.sleep(0.5)  # the server stays down for a while: that is the fault
    assert not sending.done()
    await asyncio.to_thread(fresh_server.start)
    await asyncio.wait_for(sending, 15)
    assert await asyncio.wait_for(layer.receive("after-restart"), 10) == {"type": "r"}
    await layer.send(specific, {"type": "to-the-waiting-receiver"})
    assert await asyncio.wait_for(receiving, 15) == {"type": "to-the-waiting-receiver"}


@pytest.mark.parametrize("layer_path", FAULT_LAYERS)
async def test_retry_gives_up_after_retry_timeout(
    fresh_server: RedisServer, layer_path: str
) -> None:
    layer = layer_class(layer_path)(hosts=[fresh_server.url], retry_timeout=1)
    await layer.send("c", {"type": "x"})
    fresh_server.stop()
    started = time.monotonic()
    with pytest.raises(RedisUnavailable, match="retry_timeout") as info:
        await layer.send("c", {"type": "x"})
    assert 0.9 < time.monotonic() - started < 5
    assert info.value.__cause__ is not None
    with pytest.raises(RedisUnavailable):
        await layer.receive("c")
    with pytest.raises(RedisUnavailable):
        await layer.group_send("g", {"type": "x"})
    await layer.close()


@pytest.mark.parametrize("layer_path", FAULT_LAYERS)
# --- the same faults under sync callers (async_to_sync from plain threads) --------------


def sync_sends(layer: StreamlayerLayer, channel: str, numbers: range) -> float:
    """async_to_sync(layer.send) of each number from this (plain) thread; seconds taken."""
    from asgiref.sync import async_to_sync

    started = time.monotonic()
    for i in numbers:
        async_to_sync(layer.send)(channel, {"type": "n", "i": i})
    return time.monotonic() - started


async def received(layer: StreamlayerLayer, channel: str, count: int) -> list[int]:
    return [(await asyncio.wait_for(layer.receive(channel), 10))["i"] for _ in range(count)]


async def test_sync_callers_ride_out_killed_connections(
    layer: StreamlayerLayer, fresh_server: RedisServer
) -> None:
    """CLIENT KILL of the shared sync connection between calls and during a burst from
    two threads: every call succeeds, every message is stored once."""
    await asyncio.to_thread(sync_sends, layer, "sync-kill", range(0, 10))
    assert fresh_server.kill_clients() >= 1  # the shared sync connection
    await asyncio.to_thread(sync_sends, layer, "sync-kill", range(10, 20))

    killing = asyncio.ensure_future(asyncio.to_thread(fresh_server.keep_killing_clients, 10, 0.01))
    await asyncio.gather(
        asyncio.to_thread(sync_sends, layer, "sync-kill-a", range(300)),
        asyncio.to_thread(sync_sends, layer, "sync-kill-b", range(300)),
    )
    await killing
    assert await received(layer, "sync-kill", 20) == list(range(20))
    assert await received(layer, "sync-kill-a", 300) == list(range(300))
    assert await received(layer, "sync-kill-b", 300) == list(range(300))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(layer.receive("sync-kill-a"), 0.3)


async def test_sync_callers_wait_out_a_pause_and_a_restart(
    layer: StreamlayerLayer, fresh_server: RedisServer
) -> None:
    await asyncio.to_thread(sync_sends, layer, "sync-pause", range(0, 1))
    fresh_server.pause(1500)
    took = await asyncio.to_thread(sync_sends, layer, "sync-pause", range(1, 2))
    assert took > 1.0, "the pause did not hold the call"
    fresh_server.stop()
    sending = asyncio.ensure_future(
        asyncio.to_thread(sync_sends, layer, "sync-pause", range(2, 3))
    )
    await asyncio.sleep(0.5)  # the server stays down for a while: that is the fault
    assert not sending.done()
    await asyncio.to_thread(fresh_server.start)
    await asyncio.wait_for(sending, 15)
    # Without persistence the restart lost the first two; the one sent across it is there.
    assert await received(layer, "sync-pause", 1) == [2]


@pytest.mark.parametrize("layer_path", FAULT_LAYERS)
async def test_sync_callers_give_up_after_retry_timeout(
    fresh_server: RedisServer, layer_path: str
) -> None:
    layer = layer_class(layer_path)(hosts=[fresh_server.url], retry_timeout=1)
    await asyncio.to_thread(sync_sends, layer, "c", range(1))
    fresh_server.stop()
    started = time.monotonic()
    with pytest.raises(RedisUnavailable, match="retry_timeout"):
        await asyncio.to_thread(sync_sends, layer, "c", range(1))
    assert 0.9 < time.monotonic() - started < 5
    await layer.close()
