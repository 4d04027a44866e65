"""Two chats side by side: the Channels tutorial's, which knows nothing of the
layer, and one whose tabs get what they missed when they reconnect."""

import json

from channels.generic.websocket import AsyncJsonWebsocketConsumer, AsyncWebsocketConsumer

from streamlayer.consumers import ReplayConsumerMixin


class ChatConsumer(AsyncWebsocketConsumer):
    """The Channels tutorial's consumer, as it is: no handler for any notice of the
    layer, so it never gets one (only consumers that ask do)."""

    async def connect(self):
        self.room_group_name = f"chat_{self.scope['url_route']['kwargs']['room_name']}"
        await self.channel_layer.group_add(self.room_group_name, self.channel_name)
        await self.accept()

    async def disconnect(self, close_code):
        await self.channel_layer.group_discard(self.room_group_name, self.channel_name)

    async def receive(self, text_data):
        message = json.loads(text_data)["message"]
        await self.channel_layer.group_send(
            self.room_group_name, {"type": "chat.message", "message": message}
        )

    async def chat_message(self, event):
        await self.send(text_data=json.dumps({"message": event["message"]}))


class ReplayChatConsumer(ReplayConsumerMixin, AsyncJsonWebsocketConsumer):
    """A tab reconnects with ``?since=<position of the last message it showed>`` and
    gets every message after it, in order, then live ones."""

    async def get_replay_groups(self):
        return [f"room-{self.scope['url_route']['kwargs']['room_name']}"]

    async def connect(self):
        await self.accept()
        await self.join_replay_groups()  # from ?since=..., when the tab sends one

    async def receive_json(self, content):
        # The sending side: a tab says something to its room.
        [group] = await self.get_replay_groups()
        text = str(content.get("text", ""))[:2000]
        await self.channel_layer.group_send(group, {"type": "chat.message", "text": text})

    async def chat_message(self, event):
        await self.send_json({"text": event["text"], "position": self.position_of(event)})

    async def replay_incomplete(self, group):
        # Some messages after the tab's position are gone for good (trimmed,
        # expired, Redis lost them, or this group or backend keeps no history):
        # send what is retained for the tab to show instead. An empty list means
        # nothing is: the tab keeps what it shows and says something may be missing.
        page = await self.load_history(group)
        await self.send_json(
            {
                "reload": [
                    {"text": m["text"], "position": self.position_of(m)} for m in page.messages
                ]
            }
        )
