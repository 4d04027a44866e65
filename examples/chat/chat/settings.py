"""Settings of the example chat: one room per URL, history kept for replay.

``REDIS_URL`` names the Redis every server process shares (``run.py`` starts a
throwaway one).
"""

import os

SECRET_KEY = "example-chat-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
INSTALLED_APPS = ["channels", "streamlayer"]
ROOT_URLCONF = "chat.urls"
ASGI_APPLICATION = "chat.asgi.application"
USE_TZ = True
TIME_ZONE = "UTC"

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "streamlayer.StreamsChannelLayer",
        "CONFIG": {
            "hosts": [os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")],
            "prefix": "chat",
            # Every room keeps its last 500 messages for an hour: a tab that comes
            # back within that gets what it missed, in order.
            "group_history": {"room-*": 500},
            "group_history_expiry": 3600,
            "on_reconnect": "redis.reconnect",
            # Who is in each room: a tab of a crashed server process leaves within
            # 5 s (short, for the demo to show it; the default is 30 s), and the
            # room's tabs hear who comes and goes.
            "presence_timeout": 5,
            "presence_events": {"room-*": True},
        },
    },
}
