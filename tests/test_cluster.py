"""StreamsChannelLayer on a real Redis Cluster (three masters, a replica each): keys of
one script share a slot, a master killed mid-stream fails over without a restart of the
layer, and what was delivered, lost and duplicated is reported."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import ClusterDownError, SlotNotCoveredError, TryAgainError

from streamlayer import StreamsChannelLayer
from streamlayer.compat.core import RedisChannelLayer
from streamlayer.compat.pubsub import RedisPubSubChannelLayer
from streamlayer.config import ConfigError
from streamlayer.history import POSITION_KEY
from streamlayer.keys import stream_channel_key, stream_history_key, stream_inbox_key
from streamlayer.retry import retry_transient
from streamlayer.testing import ClusterSetup

pytestmark = pytest.mark.faults


@pytest.mark.parametrize("layer_class", [RedisChannelLayer, RedisPubSubChannelLayer])
def test_compat_layers_refuse_a_cluster(layer_class: type) -> None:
    with pytest.raises(ConfigError, match="cannot use a Redis Cluster"):
        layer_class(hosts=[{"cluster": [("127.0.0.1", 7000)]}])


async def test_group_members_on_many_slots(cluster_setup: ClusterSetup, prefix: str) -> None:
    """A group_send reaches members whose streams live in many slots on every node."""
    layer = StreamsChannelLayer(hosts=[cluster_setup.host_entry()], prefix=prefix)
    try:
        channels = [f"worker-{i}" for i in range(30)] + [await layer.new_channel()]
        nodes = {cluster_setup.master_for(stream_channel_key(prefix, c)).port for c in channels}
        assert len(nodes) == 3, "the members should be spread over every master"
        for channel in channels:
            await layer.group_add("everyone", channel)
        await layer.group_send("everyone", {"type": "hello"})
        for channel in channels:
            assert (await asyncio.wait_for(layer.receive(channel), 10))["type"] == "hello"
        assert layer.stats.sent == len(channels)
    finally:
        await layer.flush()
        await layer.close()


async def test_master_killed_in_cluster(fresh_cluster: ClusterSetup, record_property: Any) -> None:
    """SIGKILL the master holding a process's inbox, a normal channel and a group's
    history mid-stream: its replica takes over, the layer follows by itself. Reported:
    delivered, lost (only the unreplicated window is acceptable), duplicated, and the
    reconnect notices the consumers got."""
    prefix = "cl"
    layer = StreamsChannelLayer(
        hosts=[fresh_cluster.host_entry()],
        prefix=prefix,
        retry_timeout=30,
        capacity=1000,
        group_history=1000,
        on_disconnect="redis.disconnect",
        on_reconnect="redis.reconnect",
    )
    try:
        specific = await layer.new_channel()
        layer.want_notices(specific)
        inbox = stream_inbox_key(prefix, layer.process_id)
        victim = fresh_cluster.master_for(inbox)
        normal = next(
            f"jobs-{i}"
            for i in range(1000)
            if fresh_cluster.master_for(stream_channel_key(prefix, f"jobs-{i}")) is victim
        )
        group = next(
            f"room-{i}"
            for i in range(1000)
            if fresh_cluster.master_for(stream_history_key(prefix, f"room-{i}")) is victim
        )
        await layer.group_add(group, specific)
        total, kill_at = 300, 100
        received: dict[str, list[int]] = {specific: [], normal: []}
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
            await asyncio.to_thread(fresh_cluster.kill_master_of, inbox)
            promoted.set()

        killing: asyncio.Future[None] | None = None
        for i in range(total):
            if i == kill_at:
                killing = asyncio.ensure_future(kill_master())
            await layer.group_send(group, {"type": "n", "i": i})
            await layer.send(normal, {"type": "n", "i": i})
            if promoted.is_set():
                confirmed_after_failover.append(i)
            await asyncio.sleep(0.005)
        assert killing is not None
        await asyncio.wait_for(killing, 90)
        assert confirmed_after_failover, "the failover outlasted the whole run"
        for _ in range(1000):  # until the last message arrived on both channels (bounded)
            if all(got and got[-1] == total - 1 for got in received.values()):
                break
            await asyncio.sleep(0.01)
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

        for channel, got in received.items():
            kind = "specific" if channel == specific else "normal"
            lost = sorted(set(range(total)) - set(got))
            duplicated = len(got) - len(set(got))
            record_property(f"{kind}_delivered", len(set(got)))
            record_property(f"{kind}_lost", lost)
            record_property(f"{kind}_duplicated", duplicated)
            print(f"{kind}: delivered {len(set(got))}/{total}, lost {lost}, dup {duplicated}")
            assert duplicated == 0
            assert got == sorted(got), "reordered"
            assert not set(confirmed_after_failover) & set(lost)
            assert all(i >= kill_at - 50 for i in lost), "lost long before the kill"

        # The inbox reader lost its node: its consumers heard of it, then of the
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
        since = positions[kill_at // 2]
        complete = await layer.group_add(group, late, since=since)
        replayed = [(await asyncio.wait_for(layer.receive(late), 10))["i"]]
        while replayed[-1] != total - 1:
            replayed.append((await asyncio.wait_for(layer.receive(late), 10))["i"])
        history_lost = sorted(set(range(kill_at // 2 + 1, total)) - set(replayed))
        record_property("history_lost", history_lost)
        print("replay after failover: complete", complete, "missing", history_lost)
        assert replayed == sorted(set(replayed))
        assert complete is True  # nothing was trimmed; the epoch was replicated
    finally:
        await layer.close()


@pytest.mark.parametrize(
    "error",
    [
        ClusterDownError("CLUSTERDOWN The cluster is down"),
        TryAgainError("TRYAGAIN Multiple keys request during rehashing of slot"),
        SlotNotCoveredError('Slot "42" is not covered by the cluster.'),
    ],
)
async def test_a_cluster_mid_failover_is_waited_for(error: Exception) -> None:
    """What a Redis Cluster answers while a replica is being promoted is retried under
    retry_timeout like a lost connection, not handed to the consumer as a failure
    (found by test_master_killed_in_cluster under load: a receive died mid-failover)."""
    attempts = 0

    async def reconfiguring() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise error
        return "served by the promoted replica"

    result = await retry_transient(reconfiguring, give_up_after=10, what="a read")
    assert result == "served by the promoted replica"
    assert attempts == 3
