"""The few exceptions a caller of a streamlayer layer can see.

Lower-level redis-py errors are translated at one boundary (:mod:`streamlayer.retry`)
so that application code handles one documented hierarchy.
"""

from __future__ import annotations

from channels.exceptions import ChannelFull

__all__ = [
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
