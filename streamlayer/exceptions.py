"""The few exceptions a caller of a streamlayer layer can see.

Lower-level redis-py errors are translated at one boundary (:mod:`streamlayer.retry`)
so that application code handles one documented hierarchy.
"""

from __future__ import annotations

from channels.exceptions import ChannelFull

__all__ = [
    "BulkChannelFull",
    "ChannelFull",
    "LayerClosed",
    "RedisAccessDenied",
    "RedisOutOfMemory",
    "RedisUnavailable",
    "StreamlayerError",
]


class StreamlayerError(Exception):
    """Base class of streamlayer's own errors."""


class RedisUnavailable(StreamlayerError, ConnectionError):
    """Redis could not be reached for longer than ``retry_timeout`` seconds.

    Raised only after the layer retried a transient error (a dropped
    connection, a paused or restarting server, a Sentinel failover) for the
    whole configured bound; the original error is chained as ``__cause__``.
    """


class LayerClosed(StreamlayerError, RuntimeError):
    """A receive was waiting when the layer was closed or flushed."""


class RedisAccessDenied(StreamlayerError, PermissionError):
    """Redis refused the layer's credentials (``WRONGPASS``, ``NOAUTH``) or its ACL
    user lacks a command, key or channel the layer needs (``NOPERM``).

    A configuration error, not a blip: raised at once, never retried, on every
    layer and every path (a Pub/Sub subscription too). The message names the
    operation and Redis's own words; the redis-py error is chained as ``__cause__``.
    ``python -m streamlayer doctor`` lists what an ACL user is missing per layer.
    """


class RedisOutOfMemory(StreamlayerError):
    """Redis is at its ``maxmemory`` and refused to store a message (``OOM``, with
    the ``noeviction`` policy a channel layer wants).

    Nothing was stored, and nothing already accepted is lost: receives go on, and
    free memory as they take messages, after which sends work again. Not retried
    (a full Redis does not empty itself within ``retry_timeout``); not counted as
    ``full`` (that is a channel's capacity, not the server's memory).
    """


class BulkChannelFull(ChannelFull):  # type: ignore[misc]
    """``send_bulk()`` filled its channel part-way: the first :attr:`accepted` messages
    were stored, in order, and the other :attr:`refused` were not (a bulk send is
    refused from the first message that finds no room: a channel that is full stays
    so for the rest of the batch). A :class:`ChannelFull`, so code that handles a full
    channel handles this too; ``messages[error.accepted:]`` is what to send again."""

    def __init__(self, channel: str, accepted: int, refused: int, capacity: int) -> None:
        super().__init__(
            f"channel {channel!r} is at its capacity of {capacity} messages: accepted "
            f"the first {accepted} of {accepted + refused} messages, refused the rest"
        )
        self.channel = channel
        self.accepted = accepted
        self.refused = refused
