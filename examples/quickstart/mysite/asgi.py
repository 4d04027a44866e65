"""HTTP goes to Django, WebSockets to the two chats' consumers."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
django_asgi_app = get_asgi_application()  # before importing consumers: it sets Django up

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from . import consumers  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter(
            [
                path("ws/chat/<slug:room_name>/", consumers.ChatConsumer.as_asgi()),
                path("ws/replay/<slug:room_name>/", consumers.ReplayChatConsumer.as_asgi()),
            ]
        ),
    }
)
