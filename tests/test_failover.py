"""A master SIGKILLed mid-stream, once under Sentinel and once in a Redis Cluster: the
same scenario, the same assertions. Its replica takes over and the Streams layer
follows by itself. Reported per run (``record_property``): delivered, lost (only the
unreplicated window is acceptable), duplicated, the reconnect notices the consumers
got, and whether a replay from before the kill is whole."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from streamlayer import StreamsChannelLayer
from streamlayer.history import POSITION_KEY
from streamlayer.keys import stream_channel_key, stream_history_key, stream_inbox_key
from streamlayer.testing import ClusterSetup, SentinelSetup

pytestmark = pytest.mark.faults

PREFIX = "fo"
TOTAL, KILL_AT = 300, 100


@dataclass
class Topology:
    """What the scenario needs of a highly available Redis."""

    hosts: list[Any]
    #: Whether two keys are served by the same master.
    same_master: Callable[[str, str], bool]
    #: SIGKILL the master serving a key; returns once a replica took over.
    kill_master_of: Callable[[str], object]


@pytest.fixture(params=["sentinel", "cluster"])
def topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    if request.param == "sentinel":
        setup = SentinelSetup().start()
        try:
            yield Topology(
                [setup.host_entry()], lambda a, b: True, lambda key: setup.kill_master()
            )
        finally:
            setup.cleanup()
        return
    cluster: ClusterSetup = request.getfixturevalue("fresh_cluster")
    yield Topology(
        [cluster.host_entry()],
        lambda a, b: cluster.master_for(a) is cluster.master_for(b),
        cluster.kill_master_of,
    )


def _on_the_same_master(topology: Topology, key: str, name_key: Callable[[str], str]) -> str:
    """A name whose key (``name_key(name)``) the master serving ``key`` holds."""
    return next(
        name
        for name in (f"n{i}" for i in range(1000))
        if topology.same_master(key, name_key(name))
    )


async def test_master_killed_mid_stream(topology: Topology, record_property: Any) -> None:
    """SIGKILL the master holding a process's inbox, a normal channel and a group's
    history while messages flow: group_send to a process-specific member, send to
    another process-specific channel and to the normal channel."""
    layer = StreamsChannelLayer(
        hosts=topology.hosts,
        prefix=PREFIX,
        retry_timeout=30,
        capacity=1000,
        group_history=1000,
        on_disconnect="redis.disconnect",
        on_reconnect="redis.reconnect",
    )
    try:
        specific, direct = await layer.new_channel(), await layer.new_channel()
        layer.want_notices(specific)
        inbox = stream_inbox_key(PREFIX, layer.process_id)
        normal = _on_the_same_master(topology, inbox, lambda n: stream_channel_key(PREFIX, n))
        group = _on_the_same_master(topology, inbox, lambda n: stream_history_key(PREFIX, n))
        await layer.group_add(group, specific)
        received: dict[str, list[int]] = {specific: [], direct: [], normal: []}
        notices: list[dict[str, Any]] = []
        positions: list[str] = []
        confirmed_after_failover: list[int] = []
        promoted = asyncio.Event()

        async def receiver(channel: str) -> None:
            while True:
                message = await layer.receive(channel)
                if message["type"] == "n":
                    received[channel].append(message["i"])
                    if POSITION_KEY in message:
                        positions.append(message[POSITION_KEY]["position"])
                else:
                    notices.append(message)

        readers = [asyncio.ensure_future(receiver(c)) for c in received]

        async def kill_master() -> None:
            await asyncio.to_thread(topology.kill_master_of, inbox)
            promoted.set()

        killing: asyncio.Future[None] | None = None
        for i in range(TOTAL):
            if i == KILL_AT:
                killing = asyncio.ensure_future(kill_master())
            await layer.group_send(group, {"type": "n", "i": i})
            await layer.send(direct, {"type": "n", "i": i})
            await layer.send(normal, {"type": "n", "i": i})
            if promoted.is_set():
                confirmed_after_failover.append(i)
            await asyncio.sleep(0.005)
        assert killing is not None
        await asyncio.wait_for(killing, 90)
        assert confirmed_after_failover, "the failover outlasted the whole run"
        for _ in range(1000):  # until the last message arrived on both channels (bounded)
            if all(got and got[-1] == TOTAL - 1 for got in received.values()):
                break
            await asyncio.sleep(0.01)
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

        for channel, got in received.items():
            kind = {specific: "group member", direct: "specific", normal: "normal"}[channel]
            lost = sorted(set(range(TOTAL)) - set(got))
            duplicated = len(got) - len(set(got))
            key = kind.replace(" ", "_")
            record_property(f"{key}_delivered", len(set(got)))
            record_property(f"{key}_lost", lost)
            record_property(f"{key}_duplicated", duplicated)
            print(f"{kind}: delivered {len(set(got))}/{TOTAL}, lost {lost}, dup {duplicated}")
            assert duplicated == 0
            assert got == sorted(got), "reordered"
            # Whatever a send confirmed after the promotion must be there; anything lost
            # was confirmed by the dying master before it could replicate it.
            assert not set(confirmed_after_failover) & set(lost)
            assert all(i >= KILL_AT - 50 for i in lost), "lost long before the kill"

        # The inbox reader lost its master: its consumers heard of it, then of the
        # reconnect, with recovered saying whether the inbox it resumed is the same.
        kinds = [n["type"] for n in notices]
        record_property("notices", notices)
        print("notices:", notices)
        assert "redis.disconnect" in kinds and "redis.reconnect" in kinds
        reconnect = next(n for n in notices if n["type"] == "redis.reconnect")
        assert isinstance(reconnect["recovered"], bool)

        # The history survived on the promoted replica: a client resuming from a
        # position before the kill gets the rest, and the replay says whether it is whole.
        late = await layer.new_channel()
        since = positions[KILL_AT // 2]
        complete = await layer.group_add(group, late, since=since)
        replayed = [(await asyncio.wait_for(layer.receive(late), 10))["i"]]
        while replayed[-1] != TOTAL - 1:
            replayed.append((await asyncio.wait_for(layer.receive(late), 10))["i"])
        history_lost = sorted(set(range(KILL_AT // 2 + 1, TOTAL)) - set(replayed))
        record_property("history_lost", history_lost)
        print("replay after failover: complete", complete, "missing", history_lost)
        assert replayed == sorted(set(replayed))
        assert complete is True  # nothing was trimmed; the epoch was replicated
    finally:
        await layer.flush()
        await layer.close()
