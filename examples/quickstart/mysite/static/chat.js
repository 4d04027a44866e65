// The browser side of the replay chat (docs/replay.rst): show messages, remember
// the position of the last one, reconnect with it.

// What the tab shows, whatever the socket does (no DOM, no socket: tested in Node).
function chatState(view) {
  const shown = new Set(); // positions on screen, to ignore repeats
  let last = null; // position of the last message shown
  function show(message) {
    if (message.position && shown.has(message.position)) return;
    if (message.position) { shown.add(message.position); last = message.position; }
    view.append(message.text);
  }
  function receive(data) {
    if (!data.reload) { show(data); return; }
    if (data.reload.length === 0) {
      // Nothing is retained to show instead: keep the chat as it is, and say
      // that some messages may be missing.
      view.gap();
      return;
    }
    view.clear(); // the retained backlog replaces what was shown
    shown.clear();
    data.reload.forEach(show);
  }
  return { show, receive, get last() { return last; }, set last(position) { last = position; } };
}

async function startChat(room, log, state) {
  const line = (text, className) => {
    const p = document.createElement("p");
    p.textContent = text;
    if (className) p.className = className;
    log.append(p);
  };
  const chat = chatState({
    append: (text) => line(text),
    clear: () => { log.textContent = ""; },
    gap: () => line("(some messages may be missing)", "gap"),
  });
  // The backlog first, and the position to resume from (the page's view reads it).
  const backlog = await (await fetch(`/rooms/${encodeURIComponent(room)}/history/`)).json();
  backlog.messages.forEach(chat.show);
  if (backlog.position) chat.last = backlog.position;

  function connect(delay = 500) {
    const url = new URL(`/ws/replay/${encodeURIComponent(room)}/`, window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    if (chat.last) url.searchParams.set("since", chat.last);
    const socket = new WebSocket(url);
    socket.onopen = () => { delay = 500; state.textContent = "connected"; };
    socket.onmessage = (event) => chat.receive(JSON.parse(event.data));
    socket.onclose = () => { // reconnect with backoff and jitter
      state.textContent = "reconnecting...";
      setTimeout(() => connect(Math.min(delay * 2, 10000)), delay * (0.5 + Math.random()));
    };
  }
  connect();
}

if (typeof module !== "undefined") module.exports = { chatState }; // for the tests (Node)
