"""Fixtures: real redis-server processes, topologies, and layer factories."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from streamlayer.base import StreamlayerLayer
from streamlayer.testing import ClusterSetup, RedisServer, SentinelSetup

from .layers import LAYERS, layer_class


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One server shared by the tests that do not harm it."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def shard_servers() -> Iterator[list[RedisServer]]:
    servers = [RedisServer().start() for _ in range(3)]
    yield servers
    for server in servers:
        server.cleanup()


@pytest.fixture(scope="session")
def sentinel_setup() -> Iterator[SentinelSetup]:
    setup = SentinelSetup().start()
    yield setup
    setup.cleanup()


@pytest.fixture(scope="session")
def cluster_setup() -> Iterator[ClusterSetup]:
    """A three-master Redis Cluster with a replica each, shared by the tests that do not
    harm it."""
    setup = ClusterSetup().start()
    yield setup
    setup.cleanup()


@pytest.fixture
def fresh_cluster() -> Iterator[ClusterSetup]:
    """A cluster of its own, for tests that kill a master."""
    setup = ClusterSetup().start()
    yield setup
    setup.cleanup()


@pytest.fixture
def fresh_server() -> Iterator[RedisServer]:
    """A server of its own, for tests that kill, pause or restart it."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(params=["single", "sharded", "sentinel", "cluster"])
def topology(request: pytest.FixtureRequest) -> list[Any]:
    """The ``hosts`` value of each topology the conformance suite runs on."""
    if request.param == "cluster":
        if "layer_path" in request.fixturenames:
            path = request.getfixturevalue("layer_path")
            if not layer_class(path).supports_cluster:
                pytest.skip(
                    "Redis Cluster is for StreamsChannelLayer; compat layers shard client-side"
                )
        cluster: ClusterSetup = request.getfixturevalue("cluster_setup")
        return [cluster.host_entry()]
    if request.param == "single":
        server: RedisServer = request.getfixturevalue("redis_server")
        return [server.url]
    if request.param == "sharded":
        servers: list[RedisServer] = request.getfixturevalue("shard_servers")
        return [("127.0.0.1", s.port) for s in servers]
    setup: SentinelSetup = request.getfixturevalue("sentinel_setup")
    return [setup.host_entry()]


@pytest.fixture(params=LAYERS)
def layer_path(request: pytest.FixtureRequest) -> str:
    path: str = request.param
    return path


LayerFactory = Callable[..., StreamlayerLayer]


@pytest.fixture
def prefix() -> str:
    """A prefix of this test's own, so tests sharing a server never see each other's keys."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def make_layer(
    layer_path: str, topology: list[Any], prefix: str
) -> AsyncIterator[LayerFactory]:
    """Build layers of the parametrized class on the parametrized topology; flushed after."""
    made: list[StreamlayerLayer] = []

    def factory(**options: Any) -> StreamlayerLayer:
        options.setdefault("hosts", topology)
        options.setdefault("prefix", prefix)
        layer = layer_class(layer_path)(**options)
        made.append(layer)
        return layer

    factory.layer_path = layer_path  # type: ignore[attr-defined]  # read by layers.keeps()
    yield factory
    if made:
        await made[0].flush()
    for layer in made:
        await layer.close()
