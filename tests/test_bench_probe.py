"""The bench's probes (streamlayer/tools/bench/probe.py): a scenario's clock starts
only once every reader hears, probing is bounded, and readers never count a probe.

channels_redis' Pub/Sub layer returns from ``group_add()`` before Redis has its
subscription, and a CI run's fan-out waited out its minute for a message published
in between. That race is rare; here a real layer's joins are made late on purpose,
so a scenario that starts before its members are in the group loses for sure."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from streamlayer import StreamsChannelLayer
from streamlayer.testing import RedisServer
from streamlayer.tools.bench import probe, scenarios
from streamlayer.tools.bench.probe import PROBE, NotHeard, heard, probing, receive, until_heard
from streamlayer.tools.bench.scenarios import Sizes

#: How late a join takes effect after group_add() returned.
_LATE = 0.3


class LateJoins:
    """A real layer whose ``group_add`` returns before the member is in the group,
    and joins it ``_LATE`` seconds later, as a Pub/Sub subscription may land."""

    def __init__(self, layer: StreamsChannelLayer) -> None:
        self.layer = layer
        self.joins: list[asyncio.Task[None]] = []

    async def group_add(self, group: str, channel: str) -> None:
        self.joins.append(asyncio.ensure_future(self._join_later(group, channel)))

    async def _join_later(self, group: str, channel: str) -> None:
        await asyncio.sleep(_LATE)
        await self.layer.group_add(group, channel)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.layer, name)


@pytest.fixture
async def layer(redis_server: RedisServer) -> AsyncIterator[StreamsChannelLayer]:
    made = StreamsChannelLayer(hosts=[redis_server.url], prefix=f"probe-{uuid.uuid4().hex}")
    try:
        yield made
    finally:
        await made.flush()
        await made.close()


async def test_fan_out_starts_its_clock_once_every_member_hears(
    layer: StreamsChannelLayer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the probes, every group_send below went out before the joins: the
    # members waited out the scenario's wait (cut to 5 s here) and it raised.
    monkeypatch.setattr(scenarios, "_WAIT", 5.0)
    late = LateJoins(layer)
    started = time.monotonic()
    metrics = await scenarios.fanout(late, Sizes(fanout_members=(5,), fanout_sends=10))
    assert metrics["members_5_per_second"] > 0
    assert all(join.done() for join in late.joins)
    assert time.monotonic() - started >= _LATE  # it did wait for the joins


async def test_probing_is_bounded_and_backs_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "_GIVE_UP", 0.7)
    probes: list[float] = []

    async def count_probe() -> None:
        probes.append(time.monotonic())

    never = asyncio.Event()
    with pytest.raises(NotHeard, match="1 readers heard no probe"):
        await probing(count_probe, [never.wait()])
    # Waits of 0.05, 0.1, 0.2, 0.4 s: four or five probes in 0.7 s, not one per poll.
    assert 3 <= len(probes) <= 6, probes
    gaps = [later - earlier for earlier, later in itertools.pairwise(probes)]
    assert gaps == sorted(gaps), gaps


async def test_an_answer_that_failed_fails_the_probing() -> None:
    async def broken() -> None:
        raise RuntimeError("the member process died")

    async def nothing() -> None:
        return None

    with pytest.raises(RuntimeError, match="member process died"):
        await probing(nothing, [broken()])


async def test_readers_skip_probes_and_hearing_takes_one(layer: StreamsChannelLayer) -> None:
    channel = await layer.new_channel()
    await until_heard(layer, [channel])  # sends one probe; heard() consumes it
    for message in (PROBE, PROBE, {"type": "bench.message", "i": 1}, PROBE):
        await layer.send(channel, message)
    assert await receive(layer, channel) == {"type": "bench.message", "i": 1}
    await asyncio.wait_for(heard(layer, channel), 5)  # the last probe is still there
