"""StreamsChannelLayer on a real Redis Cluster (three masters, a replica each): group
sends over members in every slot, and compat.core refusing a cluster (it shards
client-side). A master killed mid-stream is tests/test_failover.py; the Pub/Sub
layer on a cluster is tests/test_pubsub_cluster.py."""

from __future__ import annotations

import asyncio

import pytest

from streamlayer import StreamsChannelLayer
from streamlayer.compat.core import RedisChannelLayer
from streamlayer.compat.pubsub import RedisPubSubChannelLayer
from streamlayer.config import ConfigError
from streamlayer.keys import stream_channel_key
from streamlayer.testing import ClusterSetup


def test_compat_core_refuses_a_cluster() -> None:
    with pytest.raises(ConfigError, match="cannot use a Redis Cluster"):
        RedisChannelLayer(hosts=[{"cluster": [("127.0.0.1", 7000)]}])
    if RedisPubSubChannelLayer.why_no_cluster() is None:  # sharded Pub/Sub: redis-py 8+
        RedisPubSubChannelLayer(hosts=[{"cluster": [("127.0.0.1", 7000)]}])


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
