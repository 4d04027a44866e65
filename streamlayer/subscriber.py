"""One Pub/Sub subscription connection, kept alive: one per shard, or on a Redis
Cluster one per node that owns subscribed channels (sharded Pub/Sub).

A :class:`Subscriber` owns one dedicated connection in SUBSCRIBE (SSUBSCRIBE)
mode and one task that reads it; its :class:`SubscriptionSource` says where that
connection goes. The set of Pub/Sub channels it should be subscribed to
(``wanted``) is the truth; the connection is just its current carrier. When
the connection drops (killed, server restarted, network gone), the task tells
its owner, reconnects with exponential backoff and jitter for as long as it
takes, subscribes ``wanted`` again on the new connection, and tells its owner
it is back.

The task blocks in a read and wakes only when something arrives or once per
heartbeat, when it sends a PING: an idle subscriber costs nothing, and a
connection that died silently is noticed within two heartbeats.

On a Redis Cluster a shard channel lives on the node that owns its slot. A
subscriber that lost its node asks the cluster for its map again at each attempt
to reconnect, so after a failover it reconnects to the promoted replica; a
channel the map now puts on another node (a resharding) is handed to that
node's subscriber, as is one the server unsubscribes because its slot moved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any, Protocol

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from .cancellation import CancelGuard
from .connections import ConnectionManager
from .exceptions import LayerClosed, RedisAccessDenied, RedisUnavailable
from .redispy import (
    cluster_node_of,
    load_cluster_map,
    open_node_connection,
    open_own_connection,
    read_push,
    refresh_cluster_map,
)
from .retry import ACCESS_ERRORS, TRANSIENT_ERRORS, access_denied, retry_forever
from .sync import background_context

__all__ = [
    "ClusterNodeSource",
    "ShardSource",
    "Subscriber",
    "SubscriberOwner",
    "SubscriptionSource",
]

logger = logging.getLogger(__name__)

#: Channels per SUBSCRIBE command when subscribing a whole set again.
_SUBSCRIBE_BATCH = 500
#: Seconds between connection attempts while Redis refuses our credentials (an
#: operator may fix the ACL; nothing else will).
_DENIED_PAUSE = 5.0


class SubscriberOwner(Protocol):
    """What a subscriber tells its layer."""

    def on_published(self, name: str, data: bytes) -> None: ...
    def connection_lost(self, where: str) -> None: ...
    def connection_back(self, where: str) -> None: ...
    def reroute(self, name: str, confirmations: list[asyncio.Future[None]]) -> None:
        """Subscribe ``name`` where it lives now (a Redis Cluster moved its slot),
        settling ``confirmations`` when it is."""


class SubscriptionSource(Protocol):
    """Where a subscriber's connection goes."""

    #: Sharded Pub/Sub (SSUBSCRIBE, 'smessage': a Redis Cluster) or plain.
    sharded: bool

    def describe(self) -> str: ...

    async def open(self, wanted: set[str], refresh: bool) -> tuple[AbstractConnection, set[str]]:
        """A new connection for the ``wanted`` channels, and those of them it cannot
        serve (they belong elsewhere now). ``refresh``: the last one was lost."""


class ShardSource:
    """One shard's server (plain, URL or Sentinel): the shard's pool makes it."""

    sharded = False

    def __init__(self, connections: ConnectionManager, shard: int) -> None:
        self.connections = connections
        self.shard = shard

    def describe(self) -> str:
        return f"shard {self.shard}"

    async def open(self, wanted: set[str], refresh: bool) -> tuple[AbstractConnection, set[str]]:
        pool = self.connections.client(self.shard).connection_pool
        return await open_own_connection(pool), set()


class ClusterNodeSource:
    """The node of a Redis Cluster that owns some subscribed shard channels.

    Which node that is can change: after a failover its replica owns the slots,
    after a resharding another node owns some. At each (re)connection the source
    goes to the node owning most of the wanted channels, from a map asked afresh
    after a lost connection, and names the others (to subscribe where they live)."""

    sharded = True

    def __init__(self, client: Any, node: str) -> None:
        self.client = client
        #: The node's name (host:port) as the cluster map gives it.
        self.node = node

    def describe(self) -> str:
        return f"cluster node {self.node}"

    async def open(self, wanted: set[str], refresh: bool) -> tuple[AbstractConnection, set[str]]:
        await (refresh_cluster_map if refresh else load_cluster_map)(self.client)
        owners = {name: cluster_node_of(self.client, name).name for name in wanted}
        if owners:
            counts: dict[str, int] = {}
            for owner in owners.values():
                counts[owner] = counts.get(owner, 0) + 1
            self.node = max(counts, key=lambda owner: (counts[owner], owner == self.node))
        connection = await open_node_connection(self.client, self.node)
        return connection, {name for name, owner in owners.items() if owner != self.node}


class ConnectionDead(ConnectionError):
    """The server did not answer a PING within a heartbeat."""


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


class Subscriber:
    """One Pub/Sub connection (of a shard, or of a cluster node) in one event loop."""

    def __init__(
        self,
        owner: SubscriberOwner,
        source: SubscriptionSource,
        heartbeat: float,
    ) -> None:
        self.owner = owner
        self.source = source
        self.heartbeat = heartbeat
        prefix = "S" if source.sharded else ""
        self._subscribe, self._unsubscribe = f"{prefix}SUBSCRIBE", f"{prefix}UNSUBSCRIBE"
        #: The last connection was lost: the next one asks a cluster for its map again.
        self._lost = False
        #: Names subscribed again on a new connection and not yet confirmed; the owner
        #: hears the connection is back once there are none (its subscriptions live).
        self._resubscribing: set[str] = set()
        self._back_pending = False
        #: Pub/Sub channel names this shard's connection must be subscribed to.
        self.wanted: set[str] = set()
        self._confirmations: dict[str, list[asyncio.Future[None]]] = {}
        self._conn: AbstractConnection | None = None
        self._ready = False
        self._writes: set[asyncio.Task[None]] = set()
        #: Times the read loop woke up (traffic or a heartbeat): an idle one stays still.
        self.wakeups = 0
        #: Why Redis refused this connection's credentials, while it does.
        self.denied: RedisAccessDenied | None = None
        self.loop = asyncio.get_running_loop()
        self.task = self.loop.create_task(
            self._run(),
            name=f"streamlayer-pubsub-{source.describe()}",
            context=background_context(),
        )

    # --- what the layer calls ---------------------------------------------------------

    async def subscribe(self, name: str, bound: float) -> None:
        """Subscribe to ``name`` and wait until the server confirmed it (at most
        ``bound`` seconds, across reconnects), so a message published next arrives."""
        if self.denied is not None:
            raise self.denied
        if name in self.wanted and not self._confirmations.get(name):
            return
        self.wanted.add(name)
        confirmed = self.loop.create_future()
        self._confirmations.setdefault(name, []).append(confirmed)
        if self._ready:
            await self._send_quietly(self._subscribe, name)
        try:
            await asyncio.wait_for(asyncio.shield(confirmed), bound)
        except RedisAccessDenied:
            self.wanted.discard(name)
            raise
        except TimeoutError:
            self.wanted.discard(name)
            raise RedisUnavailable(
                f"subscribe to {name!r}: Redis did not confirm within {bound:g}s (retry_timeout)"
            ) from None
        finally:
            waiting = self._confirmations.get(name)
            if waiting and confirmed in waiting:
                waiting.remove(confirmed)

    def unsubscribe(self, name: str) -> None:
        """Stop wanting ``name``; the UNSUBSCRIBE goes out in the background."""
        if name not in self.wanted:
            return
        self.wanted.discard(name)
        self._settled(name)
        self._write_later(self._unsubscribe, name)

    def adopt(self, name: str, confirmations: list[asyncio.Future[None]]) -> None:
        """Take over ``name`` from another subscriber (see SubscriberOwner.reroute)."""
        self.wanted.add(name)
        if confirmations:
            self._confirmations.setdefault(name, []).extend(confirmations)
        self._write_later(self._subscribe, name)

    def _hand_over(self, name: str) -> None:
        """``name`` lives on another node now: its owner subscribes it there."""
        self.wanted.discard(name)
        self._settled(name)
        self.owner.reroute(name, self._confirmations.pop(name, []))

    def _settled(self, name: str) -> None:
        """``name`` awaits no confirmation here any more (left, moved or refused)."""
        self._resubscribing.discard(name)
        self._maybe_back()

    def _write_later(self, *command: str) -> None:
        """Send in the background, if connected (else the reconnect sends ``wanted``)."""
        if self._ready:
            write = self.loop.create_task(self._send_quietly(*command))
            self._writes.add(write)
            write.add_done_callback(self._writes.discard)

    async def stop(self) -> None:
        tasks = [self.task, *self._writes]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- the task ------------------------------------------------------------------------

    async def _run(self) -> None:
        guard = CancelGuard()
        try:
            while True:
                await self._reconnect()
                if self._lost:
                    self._lost = False
                    self._back_pending = True
                    self._maybe_back()
                try:
                    await self._listen(guard)
                except TRANSIENT_ERRORS as exc:
                    where = self.source.describe()
                    logger.warning("Pub/Sub connection of %s lost: %s", where, exc)
                    await self._drop_connection()
                    self._lost = True
                    self.owner.connection_lost(where)
        except LayerClosed:
            pass  # the event loop is winding down: its connections are being closed
        finally:
            await self._drop_connection()

    async def _reconnect(self) -> None:
        """Connect and subscribe ``wanted``, retrying with backoff and jitter until it
        works. Refused credentials fail every waiting subscribe at once (and every
        later one while they are refused), and are tried again now and then."""
        what = f"the Pub/Sub connection of {self.source.describe()}"
        while True:
            try:
                await retry_forever(self._connect, what=what)
            except ACCESS_ERRORS as exc:
                self._deny(access_denied(what, exc))
                await asyncio.sleep(_DENIED_PAUSE)
                continue
            self.denied = None
            return

    def _deny(self, error: RedisAccessDenied) -> None:
        """Fail every subscribe waiting for a confirmation with ``error``."""
        logger.error("%s", error)
        self.denied = error
        confirmations, self._confirmations = self._confirmations, {}
        for futures in confirmations.values():
            for future in futures:
                if not future.done():
                    future.set_exception(error)

    async def _connect(self) -> None:
        await self._drop_connection()
        self._conn, elsewhere = await self.source.open(set(self.wanted), self._lost)
        for name in elsewhere:
            self._hand_over(name)
        # From here subscribe() sends its own SUBSCRIBE: none falls between the two.
        self._ready = True
        names = sorted(self.wanted)
        self._resubscribing = set(names)
        for start in range(0, len(names), _SUBSCRIBE_BATCH):
            batch = names[start : start + _SUBSCRIBE_BATCH]
            if self.source.sharded:
                # One SSUBSCRIBE per channel (one command's channels must share a slot),
                # written at once.
                packed = self._conn.pack_commands([(self._subscribe, n) for n in batch])
                await self._conn.send_packed_command(packed)
            else:
                await self._conn.send_command(self._subscribe, *batch)

    async def _drop_connection(self) -> None:
        self._ready = False
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    async def _send_quietly(self, *command: str) -> None:
        """Send on the live connection; if it just died, the reconnect re-sends."""
        conn = self._conn
        if conn is None:
            return
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await conn.send_command(*command)

    async def _listen(self, guard: CancelGuard) -> None:
        conn = self._conn
        if conn is None:
            raise ConnectionDead("no connection")
        unanswered = 0
        while True:
            try:
                response = await read_push(conn, self.heartbeat)
            except ACCESS_ERRORS as exc:  # a SUBSCRIBE the ACL user may not send
                self._deny(access_denied(f"subscribe on {self.source.describe()}", exc))
                self.denied = None  # the connection is fine: other subscribes may pass
                self._resubscribing.clear()  # which one was refused is not said
                self._maybe_back()
                continue
            except ResponseError as exc:
                if "MOVED" in str(exc):
                    # An SSUBSCRIBE this node no longer serves: the cluster changed. Connect
                    # again from a fresh map (which hands the moved channels on).
                    raise ConnectionError(f"the cluster moved a channel: {exc}") from exc
                logger.error("Pub/Sub of %s refused a command: %s", self.source.describe(), exc)
                continue
            guard.check()
            self.wakeups += 1
            if response is None:  # a heartbeat without traffic: is the server there?
                if unanswered:
                    raise ConnectionDead(f"no answer to PING within {self.heartbeat:g}s")
                unanswered += 1
                await conn.send_command("PING")
                continue
            unanswered = 0
            self._handle(response)

    def _handle(self, response: Any) -> None:
        if not isinstance(response, list | tuple) or not response:
            return  # a RESP3 PONG
        kind = _text(response[0]).lower()
        if kind in ("message", "smessage") and len(response) >= 3:
            self.owner.on_published(_text(response[1]), response[2])
        elif kind in ("subscribe", "ssubscribe") and len(response) >= 2:
            self._confirm([_text(response[1])])
        elif kind == "sunsubscribe" and len(response) >= 2:
            name = _text(response[1])
            if name in self.wanted:  # not asked for: the cluster moved its slot
                self._hand_over(name)

    def _maybe_back(self) -> None:
        """Tell the owner the connection is back, once every name is subscribed again."""
        if self._back_pending and not self._resubscribing:
            self._back_pending = False
            self.owner.connection_back(self.source.describe())

    def _confirm(self, names: Iterable[str]) -> None:
        names = list(names)
        self._resubscribing.difference_update(names)
        self._maybe_back()
        for name in names:
            for future in self._confirmations.pop(name, []):
                if not future.done():
                    future.set_result(None)
