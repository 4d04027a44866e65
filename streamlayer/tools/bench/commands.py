"""Which layers the bench runs, and how it starts a worker process: each layer's run
(``__init__``), the sender of the cross-process scenario, the member processes of the
spread fan-out, the scale curve and the sync callers, and the sync callers' own
process (``worker``); the paired latency's workers are ``pairs``'."""

from __future__ import annotations

import sys

from ...backends import BACKENDS

__all__ = ["LAYERS", "worker_command"]

#: name -> (class path, whether it broadcasts like Pub/Sub). channels_redis rows
#: need the ``bench`` extra; "raw redis-py" is the floor.
LAYERS: dict[str, tuple[str, bool]] = {
    **{backend.name: (backend.path, backend.pubsub) for backend in BACKENDS},
    "channels_redis core": ("channels_redis.core.RedisChannelLayer", False),
    "channels_redis pubsub": ("channels_redis.pubsub.RedisPubSubChannelLayer", True),
    "raw redis-py": ("raw", False),
}


def worker_command(*args: str) -> list[str]:
    """``python -m streamlayer.tools.bench.worker ARGS``, in this interpreter (the
    one whose packages the parent sees)."""
    return [sys.executable, "-m", "streamlayer.tools.bench.worker", *args]
