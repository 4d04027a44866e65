"""Fixtures: real redis-server processes, topologies, and layer factories."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from streamlayer.base import StreamlayerLayer
from streamlayer.testing import (
    ClusterSetup,
    RedisServer,
    SentinelSetup,
    ServerUnavailable,
    find_redis_server,
    server_version,
)

from .layers import LAYERS, layer_class, layer_factory


def _server() -> tuple[str | None, str]:
    """(the binary every fixture starts, its version), or (None, why it cannot run)."""
    try:
        binary = find_redis_server()
        return binary, server_version(binary)
    except (ServerUnavailable, RuntimeError) as exc:
        return None, str(exc)


def pytest_report_header(config: pytest.Config) -> str:
    binary, what = _server()
    return f"redis-server: {binary} ({what})" if binary else f"redis-server: none ({what})"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A server build that is not installed or cannot run here skips the run with the
    reason, instead of failing every test (REDIS_SERVER names it: see testing.py)."""
    binary, why = _server()
    if binary is None:
        skip = pytest.mark.skip(reason=f"no runnable redis-server: {why}")
        for item in items:
            item.add_marker(skip)


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
            why_not = layer_class(path).why_no_cluster()
            if why_not:
                pytest.skip(why_not)
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

    def build(**options: Any) -> StreamlayerLayer:
        options.setdefault("hosts", topology)
        options.setdefault("prefix", prefix)
        return layer_class(layer_path)(**options)

    async with layer_factory(build) as factory:
        factory.layer_path = layer_path  # type: ignore[attr-defined]  # read by layers.keeps()
        yield factory
