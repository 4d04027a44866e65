"""``streamlayer.compat.pubsub.RedisPubSubChannelLayer``: channels_redis' Pub/Sub
layer, on streamlayer's config, serializers and connections.

Wire-compatible with ``channels_redis.pubsub`` 4.x: a channel is the Redis
Pub/Sub channel of the same name, a group is the Pub/Sub channel
``<prefix>__group__<group>``, a message is the serializer's bytes (no random
prefix), and both channels and groups go to the shard channels_redis' hash
picks. So old and new processes can publish to each other during a migration.

What differs is what happens when the connection breaks. Each shard has one
:class:`~streamlayer.subscriber.Subscriber` per event loop that reconnects by
itself (backoff with jitter), subscribes every channel and group again and
fires ``on_disconnect`` / ``on_reconnect`` to every local channel, and a
``send`` / ``group_send`` retries for up to ``retry_timeout`` instead of
raising into the consumer. Pub/Sub keeps nothing: what is published while a
subscriber is cut off is gone, which is why the reconnect message says
``"recovered": False``. :class:`~streamlayer.StreamsChannelLayer` replays it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, ClassVar

import redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from ..base import StreamlayerLayer
from ..config import ConfigError
from ..connections import socket_timeout
from ..exceptions import LayerClosed
from ..local import LocalChannels
from ..redispy import cluster_node_of, load_cluster_map, refresh_cluster_map
from ..subscriber import ClusterNodeSource, ShardSource, Subscriber
from ..sync import sync_aware, sync_aware_on_loop

__all__ = ["RELEASE_AFTER", "RedisPubSubChannelLayer"]

logger = logging.getLogger(__name__)

#: Seconds a channel stays subscribed after its last receive() was cancelled.
#: Channels cancels receive() when a consumer exits, and Channels has no
#: "delete channel" call, so this is how subscriptions of departed consumers
#: end; a receive() that comes back within this time has lost nothing.
RELEASE_AFTER = 5.0

_DEFAULT_HEARTBEAT = 5.0


class _LoopPresence:
    """Everything the layer holds in one event loop: local queues, which channels and
    groups are subscribed here, and one subscriber per shard (on a Redis Cluster, per
    node owning subscribed channels)."""

    def __init__(self, layer: RedisPubSubChannelLayer) -> None:
        self.layer = layer
        self.loop = asyncio.get_running_loop()
        self.local = LocalChannels(layer.count)
        #: Channels received on (or made) in this loop.
        self.channels: set[str] = set()
        #: Group Pub/Sub channel -> member channels of this loop.
        self.groups: dict[str, set[str]] = {}
        self.subscribers: dict[int, Subscriber] = {}
        self._reroutes: set[asyncio.Task[None]] = set()
        self._releases: dict[str, asyncio.TimerHandle] = {}

    def _new_subscriber(self, source: ShardSource | ClusterNodeSource) -> Subscriber:
        shard = source.shard if isinstance(source, ShardSource) else 0
        heartbeat = socket_timeout(self.layer.config.hosts[shard]) or _DEFAULT_HEARTBEAT
        subscriber = Subscriber(self, source, heartbeat)
        self.subscribers[len(self.subscribers)] = subscriber
        return subscriber

    async def subscriber_for(self, name: str) -> Subscriber:
        """The subscriber ``name`` belongs to: its shard's, or on a Redis Cluster that
        of the node owning its slot (made on first use)."""
        connections = self.layer.connections
        if not connections.is_cluster:
            shard = connections.shard_for(name)
            for subscriber in self.subscribers.values():
                if isinstance(subscriber.source, ShardSource) and subscriber.source.shard == shard:
                    return subscriber
            return self._new_subscriber(ShardSource(connections, shard))
        client = connections.client(0)
        await load_cluster_map(client)
        node = cluster_node_of(client, name).name
        for subscriber in self.subscribers.values():
            if isinstance(subscriber.source, ClusterNodeSource) and subscriber.source.node == node:
                return subscriber
        return self._new_subscriber(ClusterNodeSource(client, node))

    async def subscribe(self, name: str) -> None:
        await self.layer.require_pubsub_support()
        subscriber = await self.subscriber_for(name)
        await subscriber.subscribe(name, self.layer.config.retry_timeout)

    def unsubscribe(self, name: str) -> None:
        for subscriber in self.subscribers.values():
            if name in subscriber.wanted:
                subscriber.unsubscribe(name)

    def reroute(self, name: str, confirmations: list[asyncio.Future[None]]) -> None:
        """A cluster moved ``name``'s slot: subscribe it where it lives now."""
        task = self.loop.create_task(self._reroute(name, confirmations))
        self._reroutes.add(task)
        task.add_done_callback(self._reroutes.discard)

    async def _reroute(self, name: str, confirmations: list[asyncio.Future[None]]) -> None:
        try:
            await self.layer.with_retry(
                f"subscribe {name!r} where it moved",
                lambda: refresh_cluster_map(self.layer.connections.client(0)),
            )
            subscriber = await self.subscriber_for(name)
        except Exception as exc:
            for future in confirmations:
                if not future.done():
                    future.set_exception(exc)
            logger.error("Pub/Sub channel %r moved and could not follow: %r", name, exc)
            return
        if name in self.channels or name in self.groups:
            subscriber.adopt(name, confirmations)
            return
        for future in confirmations:  # released meanwhile: nobody wants it any more
            if not future.done():
                future.set_result(None)

    async def add_channel(self, channel: str) -> None:
        """Subscribe ``channel`` here. Known at once, so what arrives while the
        SUBSCRIBE is confirmed is kept; forgotten again if Redis stays away."""
        self.keep(channel)
        if channel in self.channels:
            return
        self.channels.add(channel)
        try:
            await self.subscribe(channel)
        except asyncio.CancelledError:
            raise  # still wanted: the subscriber completes it, release_later() ends it
        except BaseException:
            self.channels.discard(channel)
            raise

    def keep(self, channel: str) -> None:
        """A receive() came: the channel's consumer is alive (its local.get() touches
        it), so a release planned for it is off."""
        release = self._releases.pop(channel, None)
        if release is not None:
            release.cancel()

    def release_later(self, channel: str) -> None:
        """The last receive() on ``channel`` was cancelled: unsubscribe it unless
        another receive() comes within RELEASE_AFTER seconds."""
        if channel in self._releases or self.local.has_waiters(channel):
            return
        self._releases[channel] = self.loop.call_later(RELEASE_AFTER, self._release, channel)

    def _release(self, channel: str) -> None:
        self._releases.pop(channel, None)
        if self.local.has_waiters(channel) or channel not in self.channels:
            return
        self.channels.discard(channel)
        self.local.forget(channel)
        self.unsubscribe(channel)
        for group, members in list(self.groups.items()):
            members.discard(channel)
            if not members:
                del self.groups[group]
                self.unsubscribe(group)

    async def stop(self, error: BaseException) -> None:
        for release in self._releases.values():
            release.cancel()
        self._releases.clear()
        for task in self._reroutes:
            task.cancel()
        await asyncio.gather(*self._reroutes, return_exceptions=True)
        self.local.fail(error)
        subscribers = list(self.subscribers.values())
        self.subscribers.clear()
        for subscriber in subscribers:
            await subscriber.stop()
        self.channels.clear()
        self.groups.clear()
        self.local.clear()

    # --- what the subscribers report (SubscriberOwner) -----------------------------------

    def on_published(self, name: str, data: bytes) -> None:
        members = self.groups.get(name)
        if members is None and name not in self.channels:
            return  # unsubscribed a moment ago
        message = self.layer.try_deserialize(data, f"Pub/Sub channel {name!r}")
        if message is None:
            return
        targets = sorted(members) if members is not None else [name]
        layer = self.layer
        if not layer.config.channel_expiry:
            self.local.deliver_to(targets, message, time.time() + layer.config.expiry)
            return
        for target in targets:  # each waits in its queue no longer than its own expiry
            copy = dict(message) if len(targets) > 1 else message
            self.local.deliver(target, copy, time.time() + layer.get_expiry(target))

    def connection_lost(self, where: str) -> None:
        self.layer.notify_lost(self.local, self.channels)

    def connection_back(self, where: str) -> None:
        logger.warning("Pub/Sub of %s reconnected; messages meanwhile are lost", where)
        self.layer.notify_back(self.local, self.channels, recovered=False)


class RedisPubSubChannelLayer(StreamlayerLayer):
    """Redis Pub/Sub channel layer, wire-compatible with channels_redis.pubsub 4.x.
    On a Redis Cluster (7 or later) it runs on sharded Pub/Sub."""

    extensions: ClassVar[list[str]] = ["groups", "flush"]
    supports_cluster = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        #: Whether the cluster's servers were found to have sharded Pub/Sub (Redis 7+).
        self._sharded_checked = False

    @classmethod
    def why_no_cluster(cls) -> str | None:
        """redis-py's asyncio cluster client has sharded Pub/Sub from redis-py 8."""
        if hasattr(RedisCluster, "spublish"):
            return None
        return (
            f"{cls.__name__} on a Redis Cluster needs sharded Pub/Sub, which this "
            f"redis-py ({redis.__version__}) lacks in its asyncio cluster client: "
            "redis-py 8 or later"
        )

    async def require_pubsub_support(self) -> None:
        """On a Redis Cluster: refuse, clearly, servers without sharded Pub/Sub (before
        Redis 7), whose plain Pub/Sub would broadcast every message to every node.
        Asked once, by an SPUBLISH to a name no channel can have (nobody hears it):
        what the layer sends anyway, so an ACL user needs nothing more for it."""
        if self._sharded_checked or not self.connections.is_cluster:
            return
        client = self.connections.client(0)
        probe = f"{self.prefix}:probe"  # a colon: no channel or group name has one
        try:
            await self.with_retry("check for sharded Pub/Sub", lambda: client.spublish(probe, b""))
        except RedisError as exc:
            # The server's "unknown command", or redis-py's cluster client finding no
            # SPUBLISH in the server's COMMAND table.
            text = str(exc).lower()
            if "unknown command" not in text and "spublish command doesn't exist" not in text:
                raise
            raise ConfigError(
                f"{type(self).__name__} on a Redis Cluster needs sharded Pub/Sub "
                "(SSUBSCRIBE / SPUBLISH, Redis 7 or later), which this cluster's servers "
                "do not know: upgrade them, or use streamlayer.StreamsChannelLayer"
            ) from exc
        self._sharded_checked = True

    def start_process_state(self) -> None:
        """A forked child subscribes afresh: the parent's subscriptions are the parent's."""
        super().start_process_state()
        self._presences: dict[asyncio.AbstractEventLoop, _LoopPresence] = {}

    def _here(self) -> _LoopPresence:
        """This event loop's presence (each loop subscribes on its own connections)."""
        loop = asyncio.get_running_loop()
        presence = self._presences.get(loop)
        if presence is None:
            for closed in [known for known in self._presences if known.is_closed()]:
                del self._presences[closed]
            presence = self._presences[loop] = _LoopPresence(self)
        return presence

    def want_notices(self, channel: str) -> None:
        """Deliver the connection notices to ``channel``, any channel this event loop
        receives on (see :meth:`StreamlayerLayer.want_notices`)."""
        self._here().local.want_notices(self.check_channel(channel))

    def group_channel(self, group: str) -> str:
        """The Pub/Sub channel of ``group`` (channels_redis' name for it)."""
        return f"{self.prefix}__group__{group}"

    # --- channel layer API --------------------------------------------------------------

    async def new_channel(self, prefix: str = "specific") -> str:
        """A new channel of this process, ``<prefix>.<layer prefix>!<random>``,
        subscribed before it is returned (any name works on the wire: channels_redis
        processes publish to it as to any other)."""
        channel = f"{prefix}.{self.prefix}!{uuid.uuid4().hex}"
        self.check_channel(channel)
        await self._here().add_channel(channel)
        return channel

    @sync_aware
    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Publish ``message`` to ``channel``. Nobody subscribed: it is gone (Pub/Sub)."""
        self.check_channel(channel)
        self.check_message(message)
        await self._publish(channel, self.serialize(message), f"send to {channel!r}")
        self.stats.count("sent")

    async def receive(self, channel: str) -> dict[str, Any]:
        """The next message published to ``channel`` (subscribing to it first)."""
        self.check_channel(channel)
        presence = self._here()
        try:
            await presence.add_channel(channel)
            message = await presence.local.get(channel)
        except asyncio.CancelledError:
            presence.release_later(channel)
            raise
        self.stats.count("received")
        return message

    async def join_group(self, group: str, channel: str) -> None:
        """Subscribe this process to ``group`` on behalf of ``channel``, one of its own."""
        presence = self._here()
        if channel not in presence.channels:
            raise ValueError(
                f"group_add({group!r}, {channel!r}): on the Pub/Sub layer a group member "
                "must be a channel of this process and event loop (from new_channel() or "
                "received on here), as in self.channel_layer.group_add(group, "
                "self.channel_name)"
            )
        name = self.group_channel(group)
        presence.groups.setdefault(name, set()).add(channel)
        await presence.subscribe(name)

    async def group_discard(self, group: str, channel: str) -> None:
        """Remove ``channel`` from ``group``; unsubscribe when no local member is left."""
        self.check_group(group)
        self.check_channel(channel)
        presence = self._here()
        name = self.group_channel(group)
        members = presence.groups.get(name)
        if members is None or channel not in members:
            return
        members.discard(channel)
        if not members:
            del presence.groups[name]
            presence.unsubscribe(name)

    @sync_aware
    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Publish ``message`` once to the group's Pub/Sub channel."""
        self.check_group(group)
        self.check_message(message)
        name = self.group_channel(group)
        await self._publish(name, self.serialize(message), f"group_send to {group!r}")
        self.stats.count("sent")

    async def send_batch(self, channel: str, messages: list[dict[str, Any]]) -> int:
        """Publish each message in order, in one pipeline: Pub/Sub keeps no backlog, so
        every one is accepted (and gone if nobody listens)."""
        payloads = [self.serialize(message) for message in messages]
        await self._publish_all(channel, payloads, f"send_bulk to {channel!r}")
        return len(payloads)

    async def group_send_batch(self, group: str, messages: list[dict[str, Any]]) -> None:
        payloads = [self.serialize(message) for message in messages]
        name = self.group_channel(group)
        await self._publish_all(name, payloads, f"group_send_bulk to {group!r}")
        self.stats.count("sent", len(payloads))

    async def _publish(self, name: str, payload: bytes, what: str) -> None:
        await self.require_pubsub_support()
        shard = self.connections.shard_for(name)
        if self.connections.is_cluster:  # sharded: to the node owning name's slot
            await self.with_retry(
                what, lambda: self.connections.client(shard).spublish(name, payload)
            )
            return
        await self.with_retry(what, lambda: self.connections.client(shard).publish(name, payload))

    async def _publish_all(self, name: str, payloads: list[bytes], what: str) -> None:
        """PUBLISH each payload to ``name``, in order, in one round trip."""
        await self.require_pubsub_support()
        shard = self.connections.shard_for(name)
        sharded = self.connections.is_cluster

        async def publish() -> None:
            pipe = self.connections.client(shard).pipeline(transaction=False)
            for payload in payloads:
                if sharded:
                    pipe.spublish(name, payload)
                else:
                    pipe.publish(name, payload)
            await pipe.execute()

        await self.with_retry(what, publish)

    # --- flush and close ------------------------------------------------------------------

    @sync_aware_on_loop
    async def flush(self) -> None:
        """Unsubscribe everything, drop local messages and close this loop's connections.
        The layer stays usable: the next call subscribes afresh."""
        await self._stop_here(LayerClosed("the channel layer was flushed"))
        await self.connections.close(sync_clients=False)

    @sync_aware_on_loop
    async def close(self) -> None:
        """Stop this loop's subscribers and close its connections."""
        await self._stop_here(LayerClosed("the channel layer was closed"))
        await super().close()

    async def _stop_here(self, error: BaseException) -> None:
        presence = self._presences.pop(asyncio.get_running_loop(), None)
        if presence is not None:
            await presence.stop(error)
