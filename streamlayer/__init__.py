"""streamlayer: Django Channels layers on Redis.

``streamlayer.compat.core.RedisChannelLayer`` is wire-compatible with
channels_redis' sorted-set layer. See the documentation for the full list.
"""

from __future__ import annotations

from .config import LayerConfig
from .exceptions import ChannelFull, LayerClosed, RedisUnavailable
from .serializers import registry

__all__ = ["ChannelFull", "LayerClosed", "LayerConfig", "RedisUnavailable", "registry"]
__version__ = "0.1.0.dev0"
