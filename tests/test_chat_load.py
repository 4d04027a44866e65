"""The example chat under a real app's load: 40 WebSocket clients in one room across
two daphne processes, every client typing, while Redis pauses for 2 s and later
restarts empty. Each phase reports delivered / lost / duplicated per delivery
(one message reaching one client), and sockets closed. A message the page shows
in the backlog it redraws from after Redis lost its data (the ``reload``) counts as
shown, not lost: the consumer drops its queued copies (``load_history``), so those
messages reach the page that way only.

* pause: nothing lost, nothing duplicated, no socket closed (the stall's queued
  sends land as one burst, which the Streams layer's default capacity absorbs);
* empty restart: nothing duplicated, no socket closed, every client told (the
  page gets a ``reload``), delivery resumes by itself; what is lost is bounded by
  what Redis held or received while it was down, and printed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from streamlayer.testing import RedisServer

from .test_chat_e2e import _chat_servers

websockets = pytest.importorskip("websockets")

pytestmark = pytest.mark.faults

CLIENTS = 40
RATE = 2.0  # messages per second per client: 80 group sends/s, 3,200 deliveries/s
_WAIT = 30.0
#: A message typed this long before the restart has left Redis (been read) by then.
_IN_FLIGHT = 0.5
#: Both processes' readers have restored their memberships this long after Redis is
#: back (they retry every 0.2 s at most, see READER_MAX_WAIT).
_HEALED_WITHIN = 1.0


@dataclass
class Client:
    """One browser tab: sends numbered messages, records what it is shown."""

    number: int
    socket: Any
    seen: list[str] = field(default_factory=list)
    reloads: int = 0
    #: Messages the page was sent as a backlog to redraw from (after Redis lost its
    #: data): shown, though not one by one.
    reloaded: set[str] = field(default_factory=set)
    sent: list[str] = field(default_factory=list)
    sent_at: dict[str, float] = field(default_factory=dict)

    def shown(self) -> set[str]:
        """Every message the page shows: delivered one by one, or in a backlog."""
        return set(self.seen) | self.reloaded

    async def listen(self) -> None:
        async for raw in self.socket:
            message = json.loads(raw)
            if "reload" in message:
                # The page redraws from this backlog (views.py); the consumer drops the
                # copies of these messages still queued for it (load_history).
                self.reloads += 1
                self.reloaded.update(m["text"] for m in message["reload"])
            else:
                self.seen.append(message["text"])

    async def type_for(self, seconds: float, phase: str) -> None:
        deadline = time.monotonic() + seconds
        n = 0
        # People do not type in step: the clients' sends spread over each interval
        # (in step, a fault would meet a burst of 40 messages or none).
        await asyncio.sleep(self.number / CLIENTS / RATE)
        while time.monotonic() < deadline:
            text = f"{phase}-{self.number}-{n}"
            self.sent_at[text] = time.monotonic()
            await self.socket.send(json.dumps({"text": text, "author": str(self.number)}))
            self.sent.append(text)
            n += 1
            await asyncio.sleep(1 / RATE)  # a person typing, whatever the servers do


@pytest.fixture
def plain_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()  # no persistence: a restart comes back empty
    yield server
    server.cleanup()


def _typed(clients: list[Client], phase: str) -> dict[str, float]:
    """Each message of ``phase`` a client sent, and when it was typed."""
    return {t: c.sent_at[t] for c in clients for t in c.sent if t.startswith(f"{phase}-")}


def _lost_sent_at(clients: list[Client], phase: str) -> list[float]:
    """When each message of ``phase`` that some client missed was typed."""
    typed = _typed(clients, phase)
    missed = {t for c in clients for t in typed.keys() - c.shown()}
    return sorted(typed[t] for t in missed)


def _report(clients: list[Client], phase: str) -> dict[str, int]:
    """Per delivery (one message, one client): delivered one by one, shown only in a
    reload's backlog, lost (shown neither way), duplicated (delivered twice)."""
    sent = set(_typed(clients, phase))
    lost = dup = delivered = reloaded = 0
    for client in clients:
        mine = [t for t in client.seen if t.startswith(f"{phase}-")]
        delivered += len(mine)
        dup += len(mine) - len(set(mine))
        reloaded += len((client.reloaded & sent) - set(mine))
        lost += len(sent - client.shown())
    return {
        "sent": len(sent),
        "delivered": delivered,
        "only_in_reload": reloaded,
        "lost": lost,
        "duplicated": dup,
    }


async def _quiet(clients: list[Client], phase: str, expected: int) -> None:
    """Until every client was shown ``expected`` messages of ``phase``, or nothing new
    arrived for two seconds (bounded)."""
    last = -1
    for _ in range(int(_WAIT / 0.5)):
        now = sum(1 for c in clients for t in c.shown() if t.startswith(f"{phase}-"))
        if now >= expected * len(clients):
            return
        if now == last:
            return
        last = now
        await asyncio.sleep(2.0 if now == last else 0.5)


async def test_forty_clients_through_a_pause_and_an_empty_restart(
    plain_redis: RedisServer,
) -> None:
    servers = _chat_servers()(plain_redis.url).start()
    clients: list[Client] = []
    listeners: list[asyncio.Task[None]] = []
    try:
        for number in range(CLIENTS):
            port = servers.ports[number % 2]
            socket = await websockets.connect(f"ws://127.0.0.1:{port}/ws/chat/load/")
            clients.append(Client(number, socket))
        listeners = [asyncio.ensure_future(c.listen()) for c in clients]
        # Everyone joined once a probe from one tab reaches all 40.
        for attempt in range(20):
            await clients[0].socket.send(json.dumps({"text": f"probe-{attempt}"}))
            await asyncio.sleep(0.5)
            if all(f"probe-{attempt}" in c.seen for c in clients):
                break
        else:
            pytest.fail("the 40 tabs never all joined the room")

        # Phase 1: a 2 s CLIENT PAUSE while everyone types.
        typing = asyncio.gather(*(c.type_for(6.0, "pause") for c in clients))
        await asyncio.sleep(2.0)
        await asyncio.to_thread(plain_redis.pause, 2000)
        await typing
        sent = sum(len([t for t in c.sent if t.startswith("pause-")]) for c in clients)
        await _quiet(clients, "pause", sent)
        pause = _report(clients, "pause")
        print(f"\npause 2 s: {pause}")
        assert pause["lost"] == 0 and pause["duplicated"] == 0, pause
        assert all(c.socket.close_code is None for c in clients), "a socket was closed"

        # Phase 2: Redis restarts without its data while everyone types.
        typing = asyncio.gather(*(c.type_for(8.0, "restart") for c in clients))
        await asyncio.sleep(2.0)
        restarted_at = time.monotonic()
        await asyncio.to_thread(plain_redis.restart)
        back_at = time.monotonic()
        await typing
        sent = sum(len([t for t in c.sent if t.startswith("restart-")]) for c in clients)
        await _quiet(clients, "restart", sent)
        restart = _report(clients, "restart")
        down = back_at - restarted_at
        print(f"empty restart (down {down:.2f} s): {restart}")
        assert restart["duplicated"] == 0, restart
        assert all(c.socket.close_code is None for c in clients), "a socket was closed"
        assert all(c.reloads >= 1 for c in clients), "a client was not told"
        # Every page shows the last second of typing (one by one, or in a reload that
        # came after it: a starved server's consumers resync late), and delivery one
        # by one resumed by itself: a message typed now reaches every client live.
        last = {[t for t in c.sent if t.startswith("restart-")][-1] for c in clients}
        for client in clients:
            missing = sorted(last - client.shown())
            assert not missing, f"client {client.number} stopped receiving: {missing}"
        await clients[1].socket.send(json.dumps({"text": "after-restart"}))
        for _ in range(int(_WAIT / 0.1)):
            if all("after-restart" in c.seen for c in clients):
                break
            await asyncio.sleep(0.1)
        deaf = [c.number for c in clients if "after-restart" not in c.seen]
        assert not deaf, f"clients not receiving one by one after the restart: {deaf}"
        # Lost: at most what was in flight around the restart (Redis held or took it
        # while down, or took it back up before the processes had restored their
        # memberships); nothing before or long after.
        lost_at = _lost_sent_at(clients, "restart")
        if lost_at:
            window = (lost_at[0] - restarted_at, lost_at[-1] - back_at)
            start, end = window
            print(f"lost: typed from {start:+.2f} s of the restart to {end:+.2f} s of its end")
            assert lost_at[0] >= restarted_at - _IN_FLIGHT, (window, restart)
            assert lost_at[-1] <= back_at + _HEALED_WITHIN, (window, restart)
        assert restart["lost"] <= restart["sent"] * CLIENTS * 0.05, restart
    finally:
        for listener in listeners:
            listener.cancel()
        for client in clients:
            await client.socket.close()
        servers.stop()
