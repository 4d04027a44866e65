"""Layers that keep channels_redis' wire format, for migrations and mixed fleets."""

from __future__ import annotations

from .core import RedisChannelLayer
from .pubsub import RedisPubSubChannelLayer

__all__ = ["RedisChannelLayer", "RedisPubSubChannelLayer"]
