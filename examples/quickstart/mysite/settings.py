# Appended to the settings.py that "django-admin startproject mysite" wrote.
# ruff: noqa: F821 (INSTALLED_APPS is startproject's)
import os

INSTALLED_APPS = ["daphne", *INSTALLED_APPS, "channels", "streamlayer"]
ASGI_APPLICATION = "mysite.asgi.application"

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "streamlayer.StreamsChannelLayer",
        "CONFIG": {
            "hosts": [os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")],
            # Rooms of the replay chat keep their last 200 messages for a day.
            "group_history": {"room-*": 200},
            "group_history_expiry": 86400,
            # Consumers that ask for it (the replay mixin does) hear of reconnects.
            "on_reconnect": "redis.reconnect",
        },
    },
}
