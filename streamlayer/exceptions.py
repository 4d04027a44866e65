"""The few exceptions a caller of a streamlayer layer can see.

Lower-level redis-py errors are translated at one boundary (:mod:`streamlayer.retry`)
so that application code handles one documented hierarchy.
"""

from __future__ import annotations

from channels.exceptions import ChannelFull

__all__ = ["ChannelFull", "LayerClosed", "RedisUnavailable", "StreamlayerError"]


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
