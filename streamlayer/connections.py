"""Connection pools: one module owns them all.

redis-py's asyncio connections belong to the event loop that opened them.
Django code reaches a layer from many loops (``async_to_sync`` in a view, a
management command or a Celery task runs each call on a fresh loop), so every
pool here is kept per host *and* per running loop. A small guard task in each
loop closes that loop's pools when the loop winds down (``asyncio.run`` and
asgiref cancel every remaining task before closing a loop), and pools of
loops found closed are dropped, so nothing is reused across loops or leaked.

Calls from sync code (``async_to_sync(layer.send)``) are the exception: they
use one synchronous, thread-safe redis-py client per host instead, shared by
every calling thread (:class:`SyncCallerClient`; when and why in
:mod:`streamlayer.sync`).

The shard choice for a key is the same CRC-based consistent hash that
channels_redis uses, so both put a given channel or group on the same server.
"""

from __future__ import annotations

import asyncio
import atexit
import binascii
import contextlib
import logging
import threading
import weakref
from collections.abc import Sequence
from typing import Any, cast

import redis
import redis.cluster
import redis.retry
import redis.sentinel
from redis import asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from .batching import ShardBatcher
from .config import HostSpec
from .exceptions import LayerClosed
from .redispy import key_slot, make_writes_lean
from .sync import SYNC_IO, SyncCallerClient

__all__ = ["ConnectionManager", "consistent_hash", "create_pool"]

logger = logging.getLogger(__name__)

#: How long a winding-down loop's pools wait for the loop's other tasks to finish.
_TEARDOWN_GRACE = 2.0

#: redis-py's default socket timeout; blocking reads must stay well inside it.
DEFAULT_SOCKET_TIMEOUT = 5.0
#: How late Redis may end a blocking command's wait (a cron tick at the default
#: ``hz 10``, and some room): a blocking read stays this far inside the socket timeout.
BLOCK_LATE = 0.15


def consistent_hash(value: str | bytes, ring_size: int) -> int:
    """Map ``value`` onto one of ``ring_size`` shards (channels_redis' ring: CRC32 mod 4096)."""
    if ring_size == 1:
        return 0
    raw = value.encode("utf8") if isinstance(value, str) else value
    bucket = binascii.crc32(raw) & 0xFFF
    return int(bucket / (4096 / float(ring_size)))


def _pool_kwargs(spec: HostSpec, retry: type[Any] = Retry) -> dict[str, Any]:
    """``spec``'s client options; ``retry`` is redis-py's Retry class of the client kind
    (asyncio or synchronous)."""
    kwargs = dict(spec.kwargs)
    # Retries belong to streamlayer.retry alone: one policy, one documented bound.
    kwargs.setdefault("retry", retry(NoBackoff(), 0))
    return kwargs


def create_pool(spec: HostSpec) -> tuple[aioredis.ConnectionPool, list[aioredis.Redis]]:
    """A connection pool for ``spec`` plus the extra clients it owns (Sentinel's)."""
    pool, extras = _create_pool(spec)
    make_writes_lean(pool)
    return pool, extras


# redis-py annotates these in some releases and not in others (8.2 added types the
# earlier ones lack): called through Any, the code type-checks the same on every
# release pyproject allows.
_AsyncSentinel: Any = Sentinel
_AsyncSentinelPool: Any = SentinelConnectionPool
_SyncSentinel: Any = redis.sentinel.Sentinel
_SyncClusterNode: Any = redis.cluster.ClusterNode


def _create_pool(spec: HostSpec) -> tuple[aioredis.ConnectionPool, list[aioredis.Redis]]:
    kwargs = _pool_kwargs(spec)
    if spec.is_sentinel:
        sentinel = _AsyncSentinel(
            list(spec.sentinels),
            sentinel_kwargs=None if spec.sentinel_kwargs is None else dict(spec.sentinel_kwargs),
        )
        pool: aioredis.ConnectionPool = _AsyncSentinelPool(spec.master_name, sentinel, **kwargs)
        return pool, list(sentinel.sentinels)
    if spec.url is not None:
        return aioredis.ConnectionPool.from_url(spec.url, **kwargs), []
    return aioredis.ConnectionPool(**kwargs), []


def create_cluster_client(spec: HostSpec) -> aioredis.Redis:
    """A Redis Cluster client for ``spec``. It offers the same command methods as
    ``redis.asyncio.Redis``, routing each command to the node owning its keys' slot."""
    nodes = [ClusterNode(host, port) for host, port in spec.cluster_nodes]
    client = RedisCluster(startup_nodes=nodes, **_pool_kwargs(spec))
    return cast(aioredis.Redis, client)


def socket_timeout(spec: HostSpec) -> float | None:
    """The socket timeout redis-py will use for ``spec`` (None: wait forever)."""
    if "socket_timeout" in spec.kwargs:
        value = spec.kwargs["socket_timeout"]
        return None if value is None else float(value)
    return DEFAULT_SOCKET_TIMEOUT


def create_sync_client(spec: HostSpec) -> Any:
    """A synchronous, thread-safe client for ``spec`` (plain, URL, Sentinel or Cluster),
    with the same options as the asyncio pools and no retries of its own."""
    kwargs = _pool_kwargs(spec, redis.retry.Retry)
    # A call blocks its thread on these sockets: bound every wait, as the retry policy
    # assumes (the calls are short; nothing here is a blocking read).
    timeout = socket_timeout(spec) or DEFAULT_SOCKET_TIMEOUT
    kwargs.setdefault("socket_timeout", timeout)
    kwargs.setdefault("socket_connect_timeout", timeout)
    if spec.is_cluster:
        nodes = [_SyncClusterNode(host, port) for host, port in spec.cluster_nodes]
        return redis.RedisCluster(startup_nodes=nodes, **kwargs)
    if spec.is_sentinel:
        sentinel = _SyncSentinel(
            list(spec.sentinels),
            sentinel_kwargs=None if spec.sentinel_kwargs is None else dict(spec.sentinel_kwargs),
        )
        return sentinel.master_for(spec.master_name, **kwargs)
    if spec.url is not None:
        return redis.Redis.from_url(spec.url, **kwargs)
    return redis.Redis(connection_pool=redis.ConnectionPool(**kwargs))


class _LoopClients:
    """The clients of one event loop; closed by its guard task when the loop winds down."""

    def __init__(self, loop: asyncio.AbstractEventLoop, manager: ConnectionManager) -> None:
        self.loop = loop
        self.clients: dict[int, aioredis.Redis] = {}
        self.batchers: dict[int, ShardBatcher] = {}
        self.extras: list[aioredis.Redis] = []
        self._manager = manager
        #: Set when the loop winds down: from then on no new connection may be opened.
        self.closing = False
        self._closed_explicitly = False
        self._guard = loop.create_task(self._guard_loop(), name="streamlayer-connection-guard")

    @property
    def finished(self) -> bool:
        """Closed for good: a new set of clients may be made for this loop."""
        return self._guard.done()

    def client(self, index: int) -> aioredis.Redis:
        if self.closing:
            # A task of this loop that outlived the cancellation wave (say, a retry
            # after its connection was closed) must not open a socket nobody will close.
            raise LayerClosed("the event loop of this connection is shutting down")
        client = self.clients.get(index)
        if client is None:
            spec = self._manager.hosts[index]
            if spec.is_cluster:
                client = create_cluster_client(spec)
            else:
                pool, extras = create_pool(spec)
                client = aioredis.Redis(connection_pool=pool)
                self.extras.extend(extras)
            self.clients[index] = client
        return client

    def batcher(self, index: int) -> ShardBatcher:
        batcher = self.batchers.get(index)
        if batcher is None or self.closing:
            client = self.client(index)  # raises LayerClosed once the loop winds down
            pipelining = not self._manager.hosts[index].is_cluster
            batcher = self.batchers[index] = ShardBatcher(client, pipelining=pipelining)
        return batcher

    async def _guard_loop(self) -> None:
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            self.closing = True
            if not self._closed_explicitly:
                await self._let_other_tasks_finish()
            await self._close_clients()

    @staticmethod
    async def _let_other_tasks_finish() -> None:
        """At loop teardown every task was cancelled together; let the others finish
        their cancellation (and hand their connections back) before the pools close,
        or a connection still being opened would escape the close."""
        current = asyncio.current_task()
        others = {t for t in asyncio.all_tasks() if t is not current and not t.done()}
        if others:
            await asyncio.wait(others, timeout=_TEARDOWN_GRACE)

    async def _close_clients(self) -> None:
        clients, extras = list(self.clients.values()), self.extras
        batchers = list(self.batchers.values())
        self.clients, self.extras, self.batchers = {}, [], {}
        for batcher in batchers:
            await batcher.close()
        for client in [*clients, *extras]:
            try:
                await _close_client(client)
            except Exception:  # a dead connection must not stop the others closing
                logger.debug("error closing a Redis client", exc_info=True)

    async def close(self) -> None:
        """Close every client now (from inside this loop) and stop the guard."""
        self._closed_explicitly = True
        self._guard.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._guard
        await self._close_clients()


async def _close_client(client: Any) -> None:
    """Close a client and its connections (a cluster client owns one pool per node)."""
    if isinstance(client, RedisCluster):
        await client.aclose()
    else:
        await client.aclose(close_connection_pool=True)


class ConnectionManager:
    """Owns the Redis clients of one layer: per host (shard) and per event loop."""

    def __init__(self, hosts: Sequence[HostSpec]) -> None:
        if not hosts:
            raise ValueError("at least one host is required")
        self.hosts = tuple(hosts)
        self._loops: dict[asyncio.AbstractEventLoop, _LoopClients] = {}
        #: Per host: the client sync callers' calls share (made on first use).
        self._sync_clients: dict[int, SyncCallerClient] = {}
        self._sync_lock = threading.Lock()

    @property
    def ring_size(self) -> int:
        return len(self.hosts)

    @property
    def is_cluster(self) -> bool:
        return self.hosts[0].is_cluster

    def shard_for(self, name: str | bytes) -> int:
        return consistent_hash(name, len(self.hosts))

    def script_scope(self, shard: int, key: str) -> tuple[int, int]:
        """Which keys one script call may touch together with ``key``: those on the same
        shard, and on a Redis Cluster also in the same hash slot."""
        return shard, key_slot(key.encode()) if self.is_cluster else 0

    def client(self, index: int) -> aioredis.Redis:
        """The client for shard ``index`` in the running event loop (created lazily);
        in a sync caller's call, the shared synchronous one."""
        if SYNC_IO.get():
            return cast(aioredis.Redis, self.sync_client(index))
        return self._loop_clients().client(index)

    def sync_client(self, index: int) -> SyncCallerClient:
        """The synchronous client of shard ``index`` every sync caller shares."""
        client = self._sync_clients.get(index)
        if client is None:
            with self._sync_lock:
                client = self._sync_clients.get(index)
                if client is None:
                    client = SyncCallerClient(create_sync_client(self.hosts[index]))
                    self._sync_clients[index] = client
                    _WITH_SYNC_CLIENTS.add(self)
        return client

    def _loop_clients(self) -> _LoopClients:
        loop = asyncio.get_running_loop()
        clients = self._loops.get(loop)
        if clients is None or clients.finished:
            self._drop_closed_loops()
            clients = self._loops[loop] = _LoopClients(loop, self)
        return clients

    def batcher(self, index: int) -> ShardBatcher:
        """The script batcher for shard ``index`` in the running event loop: script calls
        made in the same loop turn share one pipeline (see :mod:`streamlayer.batching`)."""
        if SYNC_IO.get():
            return cast(ShardBatcher, self.sync_client(index))
        return self._loop_clients().batcher(index)

    def block_timeout(self, index: int, wanted: float) -> float:
        """How long a blocking command on shard ``index`` may wait: at most ``wanted``,
        and at most half the socket timeout, so an idle wait never looks like a dead socket.

        Also BLOCK_LATE short of the socket timeout: Redis ends a blocking command's wait
        at its next cron tick, up to ``1/hz`` late (100 ms at the default ``hz 10``), so
        with a socket timeout of 0.2 s a wait of half of it timed out the socket now and
        then, and an idle receive saw a "reconnect" a second."""
        timeout = socket_timeout(self.hosts[index])
        if timeout is None:
            return wanted
        return max(0.01, min(wanted, timeout / 2, timeout - BLOCK_LATE))

    async def close(self, *, sync_clients: bool = True) -> None:
        """Close this loop's clients and the sync callers' ones (a later sync call opens
        afresh; ``flush()`` keeps them); forget the clients of closed loops."""
        if sync_clients:
            self.close_sync_clients()
        self._drop_closed_loops()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - close() is always awaited
            return
        clients = self._loops.pop(loop, None)
        if clients is not None:
            await clients.close()

    def forget_after_fork(self) -> None:
        """In a forked child: drop every client without closing it. The sockets are the
        parent's too; the objects are kept (never collected, never closed), and redis-py's
        synchronous pools would notice the fork by themselves anyway."""
        _ABANDONED.extend([self._loops, self._sync_clients])
        self._loops, self._sync_clients = {}, {}
        self._sync_lock = threading.Lock()

    def close_sync_clients(self) -> None:
        """Disconnect the sync callers' clients. Safe at any moment: a call in flight on
        one sees a dropped connection and is retried like any other."""
        with self._sync_lock:
            clients, self._sync_clients = list(self._sync_clients.values()), {}
        for client in clients:
            try:
                client.close()
            except Exception:  # a dead connection must not stop the others closing
                logger.debug("error closing a sync client", exc_info=True)

    def open_loops(self) -> int:
        """How many event loops currently hold clients (for tests and diagnostics)."""
        self._drop_closed_loops()
        return len(self._loops)

    def _drop_closed_loops(self) -> None:
        # A snapshot first: loops of other threads may be added meanwhile.
        for loop in [loop for loop in list(self._loops) if loop.is_closed()]:
            self._loops.pop(loop, None)


#: A forked child's copies of its parent's clients (see forget_after_fork()).
_ABANDONED: list[Any] = []

#: Managers holding sync callers' clients, closed at interpreter exit.
_WITH_SYNC_CLIENTS: weakref.WeakSet[ConnectionManager] = weakref.WeakSet()


@atexit.register
def _close_sync_clients_at_exit() -> None:
    for manager in list(_WITH_SYNC_CLIENTS):
        manager.close_sync_clients()
