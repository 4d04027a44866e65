"""The page: a room's messages, who is online, a text box, and the WebSocket that
survives disconnects (it reconnects with the position of the last message it
showed, and asks again who is here)."""

import time

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.views.decorators.csrf import csrf_exempt

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>streamlayer chat: {room}</title>
<style>
 body {{ font-family: sans-serif; max-width: 40em; margin: 2em auto; }}
 #log {{ border: 1px solid #ccc; height: 22em; overflow-y: auto; padding: .5em; }}
 #log p {{ margin: .2em 0; }} .author {{ color: #555; font-weight: bold; }}
 #state {{ font-size: .8em; color: #777; }} .gap {{ color: #a60; font-style: italic; }}
 #online {{ font-size: .9em; color: #264; }}
</style></head>
<body>
<h1>Room <code>{room}</code></h1>
<p id="state">connecting...</p>
<p id="online"></p>
<div id="log"></div>
<form id="say"><input id="author" value="guest" size="8">
<input id="text" autocomplete="off" size="40" autofocus><button>Send</button></form>
<script>
const room = {room_json};
const log = document.getElementById("log"), state = document.getElementById("state");
const key = "chat-last-" + room;
// Position of the last message shown: from a link (?since=...), or this tab's memory.
let last = new URL(location.href).searchParams.get("since") || sessionStorage.getItem(key);
const shown = new Set();
const online = new Map();  // channel -> info, from the server's presence frames
let socket = null;

function showOnline() {{
  const tabs = {{}};
  for (const info of online.values()) {{
    const name = (info && info.name) || "guest";
    tabs[name] = (tabs[name] || 0) + 1;
  }}
  const names = Object.keys(tabs).sort().map(
    (name) => tabs[name] > 1 ? name + " (" + tabs[name] + " tabs)" : name);
  document.getElementById("online").textContent = "online: " + names.join(", ");
}}

function presence(data) {{
  if (data.presence === "here") {{
    online.clear();
    data.members.forEach((m) => online.set(m.channel, m.info));
  }} else if (data.presence === "join") online.set(data.channel, data.info);
  else if (data.presence === "leave") online.delete(data.channel);
  showOnline();
}}

function show(m) {{
  if (m.position && shown.has(m.position)) return;
  if (m.position) {{
    shown.add(m.position); last = m.position; sessionStorage.setItem(key, last);
  }}
  const p = document.createElement("p");
  const who = document.createElement("span");
  who.className = "author"; who.textContent = m.author + ": ";
  p.append(who, document.createTextNode(m.text));
  log.append(p); log.scrollTop = log.scrollHeight;
}}

function gap() {{
  const p = document.createElement("p");
  p.className = "gap"; p.textContent = "(some messages may be missing)";
  log.append(p); log.scrollTop = log.scrollHeight;
}}

function connect(delay = 500) {{
  const url = new URL("/ws/chat/" + room + "/", window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  if (last) url.searchParams.set("since", last);
  url.searchParams.set("name", document.getElementById("author").value);
  socket = new WebSocket(url);
  socket.onopen = () => {{
    delay = 500; state.textContent = "connected to " + location.host;
    socket.send(JSON.stringify({{presence: "who"}}));
  }};
  socket.onmessage = (event) => {{
    const data = JSON.parse(event.data);
    if (data.presence) presence(data);
    else if (!data.reload) show(data);
    else if (data.reload.length) {{
      log.textContent = ""; shown.clear(); data.reload.forEach(show);
    }}
    else gap();  // nothing retained to show instead: keep the chat, say so
  }};
  socket.onclose = () => {{
    state.textContent = "offline: reconnecting...";
    setTimeout(() => connect(Math.min(delay * 2, 10000)), delay * (0.5 + Math.random()));
  }};
}}
document.getElementById("say").onsubmit = (event) => {{
  event.preventDefault();
  const text = document.getElementById("text");
  if (socket && socket.readyState === 1 && text.value) {{
    const author = document.getElementById("author").value;
    socket.send(JSON.stringify({{text: text.value, author: author}}));
    text.value = "";
  }}
}};
connect();
</script></body></html>
"""


def index(request: HttpRequest, room: str = "lobby") -> HttpResponse:
    import json

    return HttpResponse(PAGE.format(room=room, room_json=json.dumps(room)))


@csrf_exempt
def announce(request: HttpRequest, room: str) -> HttpResponse:
    """``POST /<room>/announce/`` with the text as the body: a plain sync Django view
    (a cron job, a webhook, an admin action) telling a room something.

    Django runs it in a thread under the ASGI server; ``async_to_sync`` finds the
    server's loop there and the layer sends on that loop's connections, so a
    thousand announcements open no connection (see docs/sync.rst)."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    text = request.body.decode("utf8", "replace")[:2000]
    layer = get_channel_layer()
    message = {"type": "chat.message", "text": text, "author": "announcer", "at": time.time()}
    async_to_sync(layer.group_send)(f"room-{room}", message)
    return HttpResponse(status=204)
