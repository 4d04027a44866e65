"""One WebSocket per browser tab, in the group of its room.

The tab sends back the position of the last message it showed when it
reconnects (``?since=``); ReplayConsumerMixin joins the room from there, so
what was said while the tab was offline (or this server restarted, or Redis
did) arrives first, in order, then live messages.

PresenceConsumerMixin makes the tab present in its room under the name it
gives (``?name=``): the page asks who is here and shows who comes and goes,
including the tabs of a server process that crashed (they leave within the
``presence_timeout`` of settings.py).
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncJsonWebsocketConsumer

from streamlayer.consumers import PresenceConsumerMixin, ReplayConsumerMixin

MAX_TEXT = 2000


class ChatConsumer(PresenceConsumerMixin, ReplayConsumerMixin, AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    async def get_replay_groups(self) -> list[str]:
        return [f"room-{self.scope['url_route']['kwargs']['room']}"]

    async def get_presence_groups(self) -> list[str]:
        return await self.get_replay_groups()

    def get_presence_info(self) -> dict[str, Any]:
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        return {"name": query.get("name", ["guest"])[-1][:40]}

    async def connect(self) -> None:
        await self.accept()
        await self.join_replay_groups()
        await self.join_presence_groups()

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        if await self.answer_presence_request(content):
            return
        text = str(content.get("text", ""))[:MAX_TEXT] if isinstance(content, dict) else ""
        if not text:
            return
        author = str(content.get("author", "someone"))[:40]
        [group] = await self.get_replay_groups()
        await self.channel_layer.group_send(
            group, {"type": "chat.message", "text": text, "author": author, "at": time.time()}
        )

    async def chat_message(self, event: dict[str, Any]) -> None:
        await self.send_json(self.for_browser(event))

    async def replay_incomplete(self, group: str) -> None:
        """Some messages are gone for good: send the backlog to show instead."""
        page = await self.load_history(group)
        said = [m for m in page.messages if m.get("type") == "chat.message"]
        await self.send_json({"reload": [self.for_browser(m) for m in said]})

    def for_browser(self, event: dict[str, Any]) -> dict[str, Any]:
        return {
            "text": event["text"],
            "author": event.get("author", ""),
            "at": event.get("at"),
            "position": self.position_of(event),
        }
