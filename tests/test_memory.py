"""A Redis at its ``maxmemory`` (policy ``noeviction``) refuses what it cannot hold:
a send then fails with RedisOutOfMemory, naming the limit, instead of growing Redis
past it; what was accepted before is still delivered, and sending works again once
receives have freed memory. (Redis refuses a script for memory only at its first
write, so every appending script writes the new message first.)"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest

from streamlayer import RedisOutOfMemory
from streamlayer.base import StreamlayerLayer
from streamlayer.testing import RedisServer

from .layers import layer_class

STORED = ["streamlayer.StreamsChannelLayer", "streamlayer.compat.core.RedisChannelLayer"]
_LIMIT = 2 * 1024 * 1024
_BODY = "x" * 20_000


@pytest.fixture
def small_server() -> Iterator[RedisServer]:
    server = RedisServer(
        extra_args=("--maxmemory", str(_LIMIT), "--maxmemory-policy", "noeviction")
    ).start()
    yield server
    server.cleanup()


def _used(server: RedisServer) -> int:
    with server.client() as client:
        return int(client.info("memory")["used_memory"])


async def _fill(send: Any, first: int = 0) -> list[int]:
    """Send 20 KB messages until Redis refuses one; the numbers accepted."""
    accepted: list[int] = []
    with pytest.raises(RedisOutOfMemory, match="maxmemory"):
        for n in range(first, first + 400):
            await send({"type": "m", "n": n, "body": _BODY})
            accepted.append(n)
    return accepted


async def _send_again(layer: StreamlayerLayer, channel: str) -> None:
    """Sending works again once memory was freed (bounded: a reader trims in rounds)."""
    for _ in range(200):
        try:
            await layer.send(channel, {"type": "m", "n": -1, "body": _BODY})
            return
        except RedisOutOfMemory:
            await asyncio.sleep(0.05)
    pytest.fail("sending never worked again after memory was freed")


@pytest.mark.parametrize("path", STORED)
@pytest.mark.parametrize("kind", ["specific", "normal"])
async def test_sends_beyond_maxmemory_fail_loudly_and_lose_nothing(
    small_server: RedisServer, path: str, kind: str
) -> None:
    """A sender fills Redis while the receiving process is busy elsewhere (nothing
    reads, so Redis holds the backlog)."""
    cls = layer_class(path)
    receiver: Any = cls(hosts=[small_server.url], prefix="mem", capacity=10_000)
    sender: Any = cls(hosts=[small_server.url], prefix="mem", capacity=10_000)
    try:
        channel = await receiver.new_channel() if kind == "specific" else "jobs"
        await receiver.group_add("room", channel)
        await sender.group_send("room", {"type": "m", "n": -2})  # plans the one-trip send
        accepted = await _fill(partial(sender.send, channel))
        assert 0 < len(accepted) < 150, len(accepted)
        # A group send Redis cannot hold fails the same way (Redis takes writes again
        # while it is a hair below its limit, so maybe after one or two).
        accepted += await _fill(partial(sender.group_send, "room"), first=1000)
        assert len(accepted) < 160, len(accepted)
        assert _used(small_server) < _LIMIT + 256 * 1024  # not past the limit
        got = [(await asyncio.wait_for(receiver.receive(channel), 10))["n"]
               for _ in range(len(accepted) + 1)]  # fmt: skip
        assert got == [-2, *accepted]
        await _send_again(sender, channel)
        assert (await asyncio.wait_for(receiver.receive(channel), 10))["n"] == -1
        assert sender.stats()["full"] == 0  # memory is not capacity: nothing counted
    finally:
        await receiver.flush()
        await receiver.close()
        await sender.close()
