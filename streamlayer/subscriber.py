"""One shard's Pub/Sub subscription connection, kept alive.

A :class:`Subscriber` owns one dedicated connection in SUBSCRIBE mode and one
task that reads it. The set of Pub/Sub channels it should be subscribed to
(``wanted``) is the truth; the connection is just its current carrier. When
the connection drops (killed, server restarted, network gone), the task tells
its owner, reconnects with exponential backoff and jitter for as long as it
takes, subscribes ``wanted`` again on the new connection, and tells its owner
it is back.

The task blocks in a read and wakes only when something arrives or once per
heartbeat, when it sends a PING: an idle subscriber costs nothing, and a
connection that died silently is noticed within two heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any, Protocol

from redis.asyncio.connection import AbstractConnection

from .cancellation import CancelGuard
from .connections import ConnectionManager
from .exceptions import LayerClosed, RedisAccessDenied, RedisUnavailable
from .redispy import open_own_connection, read_push
from .retry import ACCESS_ERRORS, TRANSIENT_ERRORS, access_denied, retry_forever
from .sync import background_context

__all__ = ["Subscriber", "SubscriberOwner"]

logger = logging.getLogger(__name__)

#: Channels per SUBSCRIBE command when subscribing a whole set again.
_SUBSCRIBE_BATCH = 500
#: Seconds between connection attempts while Redis refuses our credentials (an
#: operator may fix the ACL; nothing else will).
_DENIED_PAUSE = 5.0


class SubscriberOwner(Protocol):
    """What a subscriber tells its layer."""

    def on_published(self, name: str, data: bytes) -> None: ...
    def connection_lost(self, shard: int) -> None: ...
    def connection_back(self, shard: int) -> None: ...


class ConnectionDead(ConnectionError):
    """The server did not answer a PING within a heartbeat."""


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


class Subscriber:
    """The Pub/Sub connection of one shard in one event loop."""

    def __init__(
        self,
        owner: SubscriberOwner,
        connections: ConnectionManager,
        shard: int,
        heartbeat: float,
    ) -> None:
        self.owner = owner
        self.connections = connections
        self.shard = shard
        self.heartbeat = heartbeat
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
            self._run(), name=f"streamlayer-pubsub-{shard}", context=background_context()
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
            await self._send_quietly("SUBSCRIBE", name)
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
        if self._ready:
            write = self.loop.create_task(self._send_quietly("UNSUBSCRIBE", name))
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
        lost = False
        try:
            while True:
                await self._reconnect()
                if lost:
                    lost = False
                    self.owner.connection_back(self.shard)
                try:
                    await self._listen(guard)
                except TRANSIENT_ERRORS as exc:
                    logger.warning("Pub/Sub connection of shard %d lost: %s", self.shard, exc)
                    await self._drop_connection()
                    lost = True
                    self.owner.connection_lost(self.shard)
        except LayerClosed:
            pass  # the event loop is winding down: its connections are being closed
        finally:
            await self._drop_connection()

    async def _reconnect(self) -> None:
        """Connect and subscribe ``wanted``, retrying with backoff and jitter until it
        works. Refused credentials fail every waiting subscribe at once (and every
        later one while they are refused), and are tried again now and then."""
        what = f"the Pub/Sub connection of shard {self.shard}"
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
        pool = self.connections.client(self.shard).connection_pool
        self._conn = conn = await open_own_connection(pool)
        # From here subscribe() sends its own SUBSCRIBE: none falls between the two.
        self._ready = True
        names = sorted(self.wanted)
        for start in range(0, len(names), _SUBSCRIBE_BATCH):
            await conn.send_command("SUBSCRIBE", *names[start : start + _SUBSCRIBE_BATCH])

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
                self._deny(access_denied(f"subscribe on shard {self.shard}", exc))
                self.denied = None  # the connection is fine: other subscribes may pass
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
        if kind == "message" and len(response) >= 3:
            self.owner.on_published(_text(response[1]), response[2])
        elif kind == "subscribe" and len(response) >= 2:
            self._confirm([_text(response[1])])

    def _confirm(self, names: Iterable[str]) -> None:
        for name in names:
            for future in self._confirmations.pop(name, []):
                if not future.done():
                    future.set_result(None)
