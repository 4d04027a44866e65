"""The layer classes every conformance test runs against, and the promises of the
channel layer spec a layer does not keep by design.

A test that relies on such a promise calls :func:`requires` first, which skips
it for those layers with the reason, so every exclusion stays visible in the
test report; a test that only partly relies on one asks :func:`keeps`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from streamlayer.base import StreamlayerLayer

PUBSUB = "streamlayer.compat.pubsub.RedisPubSubChannelLayer"

LAYERS = [
    "streamlayer.compat.core.RedisChannelLayer",
    "streamlayer.StreamsChannelLayer",
    PUBSUB,
]

#: Promise -> why the Pub/Sub layer does not keep it. Redis Pub/Sub stores nothing.
_PUBSUB_DOES_NOT_KEEP = {
    "queueing": "Pub/Sub stores nothing: a message sent before anyone subscribed is gone",
    "capacity": "nothing waits in Redis, so there is no backlog to bound (no ChannelFull)",
    "workers": "every subscriber of a channel gets its own copy; no one-of-N delivery",
    "group_expiry": "group membership is this process's subscription, not a scored set",
    "remote_members": "a group member must be a channel of the process that subscribes",
    "exclusive_channels": "any process may subscribe to any channel name",
    "loop_crossing": "a subscription lives in the event loop that made it, and each "
    "async_to_sync call runs on a loop of its own",
}

EXCLUSIONS: dict[str, dict[str, str]] = {PUBSUB: _PUBSUB_DOES_NOT_KEEP}


def layer_class(path: str) -> type[StreamlayerLayer]:
    module, _, name = path.rpartition(".")
    cls: type[StreamlayerLayer] = getattr(importlib.import_module(module), name)
    return cls


def keeps(layer_or_path: Any, promise: str) -> bool:
    """Whether the layer (a path, a class, an instance or a make_layer factory) keeps it."""
    path = getattr(layer_or_path, "layer_path", layer_or_path)
    if not isinstance(path, str):
        cls = layer_or_path if isinstance(layer_or_path, type) else type(layer_or_path)
        path = f"{cls.__module__}.{cls.__qualname__}"
    return promise not in EXCLUSIONS.get(path, {})


def requires(layer_or_path: Any, promise: str) -> None:
    """Skip this test for a layer that does not keep ``promise``, saying why."""
    if not keeps(layer_or_path, promise):
        path = getattr(layer_or_path, "layer_path", layer_or_path)
        pytest.skip(f"{promise}: {EXCLUSIONS[path][promise]}")


@contextlib.asynccontextmanager
async def side_by_side(
    ours_cls: Any, theirs_cls: Any, hosts: list[str], prefix: str, keys: list[str] | None
) -> AsyncIterator[tuple[Any, Any]]:
    """(ours, theirs): one of our layers and a channels_redis layer on the same hosts and
    prefix, encrypted alike; both flushed (and ours closed) afterwards."""
    options: dict[str, Any] = {"hosts": hosts, "prefix": prefix}
    if keys:
        options["symmetric_encryption_keys"] = keys
    ours, theirs = ours_cls(**options), theirs_cls(**options)
    yield ours, theirs
    await ours.flush()
    await ours.close()
    await theirs.flush()


@contextlib.asynccontextmanager
async def layer_factory(
    build: Callable[..., StreamlayerLayer],
) -> AsyncIterator[Callable[..., Any]]:
    """A test's layers: each call builds one with ``build(**options)``; afterwards the
    first is flushed (one flush deletes the prefix's keys for all) and all are closed."""
    made: list[StreamlayerLayer] = []

    def make(**options: Any) -> Any:
        layer = build(**options)
        made.append(layer)
        return layer

    try:
        yield make
    finally:
        if made:
            await made[0].flush()
        for layer in made:
            await layer.close()


async def ping_pong(layer: Any, rounds: int) -> None:
    """``rounds`` request/reply exchanges between two channels of ``layer``, checked
    in order: the pinger receives through ``wait_for`` (three event-loop turns from
    its wake-up, as a Channels consumer's receive is), the echo task directly (it
    replies in the turn it wakes up)."""
    ping, pong = await layer.new_channel(), await layer.new_channel()

    async def echo() -> None:
        for _ in range(rounds):
            message = await layer.receive(ping)
            await layer.send(pong, {"type": "pong", "i": message["i"]})

    echoing = asyncio.ensure_future(echo())
    for i in range(rounds):
        await layer.send(ping, {"type": "ping", "i": i})
        assert (await asyncio.wait_for(layer.receive(pong), 15))["i"] == i
    await asyncio.wait_for(echoing, 15)
