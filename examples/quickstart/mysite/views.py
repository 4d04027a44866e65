"""The HTTP side: the page, its backlog, and a plain sync view that talks to a room."""

import html
import json
from pathlib import Path

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.http import HttpResponse, HttpResponseNotAllowed, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from streamlayer import POSITION_KEY

PAGE = """<!doctype html><meta charset="utf-8"><title>{title}</title>
<div id="log"></div><p id="state"></p>
<script>{script}</script>
<script>startChat({room_json}, document.getElementById("log"),
                  document.getElementById("state"));</script>
"""


def room(request, room_name):
    script = (Path(__file__).with_name("static") / "chat.js").read_text()
    page = PAGE.format(
        title=html.escape(room_name), room_json=json.dumps(room_name), script=script
    )
    return HttpResponse(page)


def history(request, room_name):
    """What a page shows when it opens, and the position to resume from."""
    layer = get_channel_layer()
    page = async_to_sync(layer.group_history)(f"room-{room_name}", limit=50)
    messages = [
        {"text": m["text"], "position": m[POSITION_KEY]["position"]} for m in page.messages
    ]
    return JsonResponse({"messages": messages, "position": page.position})


@csrf_exempt
def announce(request, room_name):
    """``POST`` a text to a room from sync code: a webhook, a cron job, an admin action."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    layer = get_channel_layer()
    text = request.body.decode("utf-8", "replace")[:2000]
    async_to_sync(layer.group_send)(f"room-{room_name}", {"type": "chat.message", "text": text})
    return HttpResponse(status=204)
