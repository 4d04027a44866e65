"""streamlayer: Django Channels layers on Redis.

``streamlayer.StreamsChannelLayer`` is the Redis Streams layer;
``streamlayer.compat.core.RedisChannelLayer`` is wire-compatible with
channels_redis' sorted-set layer.
"""

from __future__ import annotations

from .config import LayerConfig
from .exceptions import (
    BulkChannelFull,
    ChannelFull,
    LayerClosed,
    RedisAccessDenied,
    RedisOutOfMemory,
    RedisUnavailable,
)
from .history import POSITION_KEY, HistoryPage, Position
from .serializers import registry
from .streams import StreamsChannelLayer

__all__ = [
    "POSITION_KEY",
    "BulkChannelFull",
    "ChannelFull",
    "HistoryPage",
    "LayerClosed",
    "LayerConfig",
    "Position",
    "RedisAccessDenied",
    "RedisOutOfMemory",
    "RedisUnavailable",
    "StreamsChannelLayer",
    "registry",
]
__version__ = "0.1.0.dev0"
