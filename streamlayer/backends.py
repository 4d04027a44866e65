"""The layer classes streamlayer ships, in one registry.

The Django checks, ``doctor`` (and its ACL probes), ``inspect``, the demo and the
benchmark all need to know the layers by their ``BACKEND`` path and by a short
name, and what each keeps: this is the one list they read. Pure data: importing
it imports no layer.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BACKENDS", "Backend", "backend_named", "backend_of"]


@dataclass(frozen=True)
class Backend:
    """One layer class: its short name, its ``BACKEND`` path (and the other paths it
    can be named by), whether it replays group history, and whether it stores
    nothing (Pub/Sub: every subscriber gets its own copy)."""

    name: str
    path: str
    aliases: tuple[str, ...] = ()
    replays: bool = False
    pubsub: bool = False

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path, *self.aliases)


BACKENDS: tuple[Backend, ...] = (
    Backend(
        "Streams",
        "streamlayer.StreamsChannelLayer",
        aliases=("streamlayer.streams.StreamsChannelLayer",),
        replays=True,
    ),
    Backend("compat.core", "streamlayer.compat.core.RedisChannelLayer"),
    Backend("compat.pubsub", "streamlayer.compat.pubsub.RedisPubSubChannelLayer", pubsub=True),
)


def backend_of(path: str) -> Backend | None:
    """The layer a ``BACKEND`` string names (None: not one of ours)."""
    return next((b for b in BACKENDS if path in b.paths), None)


def backend_named(name: str) -> Backend:
    """The layer of a short name (``"Streams"``, ``"compat.core"``, ``"compat.pubsub"``)."""
    for backend in BACKENDS:
        if backend.name == name:
            return backend
    raise ValueError(f"no layer is named {name!r}: {[b.name for b in BACKENDS]}")
