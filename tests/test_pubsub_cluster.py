"""RedisPubSubChannelLayer on a real Redis Cluster, on sharded Pub/Sub (SSUBSCRIBE /
SPUBLISH): a subscriber per node owning subscribed channels, which follows a master
failover and a slot moved to another node; and the refusal where sharded Pub/Sub is
missing. The conformance suite runs on the cluster too (tests/test_conformance.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from streamlayer.compat import pubsub
from streamlayer.compat.pubsub import RedisPubSubChannelLayer
from streamlayer.config import ConfigError
from streamlayer.testing import ClusterSetup, RedisServer, ServerUnavailable

NOTICES = {"on_disconnect": "redis.disconnect", "on_reconnect": "redis.reconnect"}
#: On a redis-py without sharded Pub/Sub in its asyncio cluster client (before 8) the
#: layer refuses a cluster (tested last here): the rest cannot run.
needs_sharded_pubsub = pytest.mark.skipif(
    RedisPubSubChannelLayer.why_no_cluster() is not None,
    reason=str(RedisPubSubChannelLayer.why_no_cluster()),
)


async def recv(layer: Any, channel: str, within: float = 30) -> dict[str, Any]:
    message: dict[str, Any] = await asyncio.wait_for(layer.receive(channel), within)
    return message


def shard_subscribers(cluster: ClusterSetup) -> dict[int, set[str]]:
    """Each live master's shard channels with a subscriber (PUBSUB SHARDCHANNELS)."""
    found = {}
    for server in cluster.live():
        with server.client() as client:
            if client.info("replication")["role"] == "master":
                names = client.execute_command("PUBSUB", "SHARDCHANNELS")
                found[server.port] = {n.decode() for n in names}
    return found


async def channels_on_every_master(
    layer: RedisPubSubChannelLayer, cluster: ClusterSetup, per_master: int = 2
) -> list[str]:
    """New channels of ``layer`` until each master owns ``per_master`` of them."""
    channels: list[str] = []
    counts: dict[int, int] = {}
    for _ in range(200):
        channel = await layer.new_channel()
        port = cluster.master_for(channel).port
        if counts.get(port, 0) < per_master:
            counts[port] = counts.get(port, 0) + 1
            channels.append(channel)
        if len(counts) == len(cluster.masters) and min(counts.values()) == per_master:
            return channels
    raise AssertionError(f"channels did not spread over every master: {counts}")


@needs_sharded_pubsub
async def test_channels_live_on_the_node_of_their_slot(
    cluster_setup: ClusterSetup, prefix: str
) -> None:
    """Each channel is SSUBSCRIBEd on the master owning its slot, and a send, a group
    send and a bulk send reach it there."""
    layer = RedisPubSubChannelLayer(hosts=[cluster_setup.host_entry()], prefix=prefix)
    try:
        channels = await channels_on_every_master(layer, cluster_setup)
        subscribed = shard_subscribers(cluster_setup)
        for channel in channels:
            assert channel in subscribed[cluster_setup.master_for(channel).port]
        for channel in channels:
            await layer.group_add("everywhere", channel)
            await layer.send(channel, {"type": "direct"})
        await layer.group_send("everywhere", {"type": "group"})
        await layer.group_send_bulk("everywhere", [{"type": "bulk", "i": i} for i in range(3)])
        for channel in channels:
            got = [(await recv(layer, channel))["type"] for _ in range(5)]
            assert got == ["direct", "group", "bulk", "bulk", "bulk"]
    finally:
        await layer.flush()
        await layer.close()


@needs_sharded_pubsub
@pytest.mark.faults
async def test_master_killed_resubscribes_on_its_replica(
    fresh_cluster: ClusterSetup, prefix: str
) -> None:
    """SIGKILL the master owning a subscribed channel's slot: the channel's consumer
    hears redis.disconnect, then redis.reconnect (recovered: False, as Pub/Sub keeps
    nothing) once its subscriber SSUBSCRIBEd again on the promoted replica, and gets
    what is sent after. Channels on the other masters keep receiving throughout."""
    layer = RedisPubSubChannelLayer(
        hosts=[fresh_cluster.host_entry()], prefix=prefix, retry_timeout=30, **NOTICES
    )
    try:
        channels = await channels_on_every_master(layer, fresh_cluster, per_master=1)
        victim = channels[0]
        others = [c for c in channels if c != victim]
        for channel in channels:
            layer.want_notices(channel)
            await layer.group_add("room", channel)
        old = fresh_cluster.master_for(victim).port
        new = (await asyncio.to_thread(fresh_cluster.kill_master_of, victim)).port
        assert new != old
        assert await recv(layer, victim) == {"type": "redis.disconnect"}
        back = await recv(layer, victim)
        assert back == {"type": "redis.reconnect", "recovered": False}
        assert victim in shard_subscribers(fresh_cluster)[new]
        await layer.send(victim, {"type": "after"})
        await layer.group_send("room", {"type": "room-after"})
        assert await recv(layer, victim) == {"type": "after"}
        assert await recv(layer, victim) == {"type": "room-after"}
        for channel in others:  # their node never went: only the notices in between
            got = [(await recv(layer, channel))["type"] for _ in range(3)]
            assert got == ["redis.disconnect", "redis.reconnect", "room-after"]
        assert layer.stats.reconnects == 1
    finally:
        await layer.flush()
        await layer.close()


def _move_slot(cluster: ClusterSetup, slot: int, source: RedisServer, target: RedisServer) -> None:
    """Hand ``slot`` (no keys in it) from one master to another, as a resharding does."""
    target_id, source_id = cluster.node_id(target), cluster.node_id(source)
    with target.client() as client:
        client.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    with source.client() as client:
        client.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    for server in (target, source):
        with server.client() as client:
            client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)


@needs_sharded_pubsub
async def test_a_moved_slot_is_followed(fresh_cluster: ClusterSetup, prefix: str) -> None:
    """A resharding moves a subscribed channel's slot to another master: the server
    drops the subscription (SUNSUBSCRIBE), and the layer subscribes it on the new
    owner, where later sends reach it."""
    layer = RedisPubSubChannelLayer(hosts=[fresh_cluster.host_entry()], prefix=prefix)
    try:
        channel = await layer.new_channel()
        source = fresh_cluster.master_for(channel)
        target = next(m for m in fresh_cluster.masters if m is not source)
        with source.client() as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", channel))
        await asyncio.to_thread(_move_slot, fresh_cluster, slot, source, target)
        for _ in range(300):  # until the layer subscribed it on its new owner (bounded)
            if channel in shard_subscribers(fresh_cluster)[target.port]:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the channel was not subscribed on its new owner")
        await layer.send(channel, {"type": "moved"})
        assert await recv(layer, channel) == {"type": "moved"}
    finally:
        await layer.flush()
        await layer.close()


@needs_sharded_pubsub
async def test_refused_on_a_cluster_without_sharded_pubsub(
    monkeypatch: pytest.MonkeyPatch, prefix: str
) -> None:
    """Redis 6.2 has no SSUBSCRIBE: the first call says so (a cluster of the redis-6.2
    build, where that build runs here)."""
    monkeypatch.setenv("REDIS_SERVER", "redis-6.2")
    try:
        cluster = ClusterSetup(masters=3, replicas=0)
    except ServerUnavailable as exc:
        pytest.skip(f"no Redis 6.2 build here: {exc}")
    cluster.start()
    try:
        layer = RedisPubSubChannelLayer(hosts=[cluster.host_entry()], prefix=prefix)
        with pytest.raises(
            ConfigError, match=r"Redis 7 or later\), which this cluster's servers do not know"
        ):
            await layer.new_channel()
        with pytest.raises(ConfigError, match="sharded Pub/Sub"):
            await layer.send("anything", {"type": "x"})
        await layer.close()
    finally:
        cluster.cleanup()


def test_refused_with_a_redis_py_without_sharded_pubsub(monkeypatch: pytest.MonkeyPatch) -> None:
    """redis-py before 8 (no spublish on its asyncio RedisCluster): refused when built."""
    monkeypatch.setattr(pubsub, "RedisCluster", type("OldRedisCluster", (), {}))
    with pytest.raises(ConfigError, match=r"needs sharded Pub/Sub, which this redis-py .*8 or"):
        RedisPubSubChannelLayer(hosts=[{"cluster": [("127.0.0.1", 7000)]}])
