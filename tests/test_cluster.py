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
from streamlayer.testing import ClusterSetup, RedisServer, ServerExited, running


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


def test_a_server_whose_port_was_taken_says_so() -> None:
    """A port checked free can be taken before the server binds it (test workers start
    servers at once). The other process's server then answers every probe on it: the
    start must see its own server exit, not take the other one for it (a cluster node
    so taken once made two workers' clusters one, and neither met in 30 s)."""
    with running(RedisServer()) as holder:
        late = RedisServer(port=holder.port)
        try:
            with pytest.raises(ServerExited) as exited:
                late.start()
            assert exited.value.port_taken
        finally:
            late.cleanup()


def test_a_cluster_built_where_a_port_was_taken_moves_to_other_ports() -> None:
    """ClusterSetup builds the cluster again on fresh ports when a node's port was
    taken before it bound it, and the cluster it returns is whole and its own."""
    setup = ClusterSetup(masters=2, replicas=0)
    taken = setup.masters[1].port
    with running(RedisServer(port=taken)) as holder:
        setup.start()
        try:
            ports = {server.port for server in setup.servers}
            assert taken not in ports and len(ports) == 2
            assert setup.healthy()
            for server in setup.servers:
                with server.client() as client:
                    nodes = client.execute_command("CLUSTER", "NODES").decode().splitlines()
                assert len(nodes) == 2
            with holder.client() as client:
                assert client.ping()  # the other process's server, untouched
        finally:
            setup.cleanup()
