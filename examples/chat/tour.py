"""A scripted conversation through the running chat, so the demo shows what it
does on a machine without a browser: two tabs on two processes, one tab going
offline while Redis restarts, coming back on the other process, and a server
process crashing: its tab leaves the room's presence within presence_timeout.

Each step is checked; ``run.py`` prints them and exits non-zero (with
``--check``) when one fails. The tab clients are real WebSocket clients (the
``websockets`` package), as in ``tests/test_chat_e2e.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import websockets

ROOM = "tour"
_WAIT = 15.0
#: The chat's presence_timeout (settings.py), and how late a leave may come after it:
#: one refresh period of the process that sweeps it, and slack for a busy machine.
PRESENCE_TIMEOUT = 5.0
_LEAVE_SLACK = PRESENCE_TIMEOUT / 3 + 3.0


@dataclass
class Step:
    what: str
    ok: bool
    detail: str
    seconds: float


@dataclass
class Tour:
    """The chat's WebSocket URLs, one per process, how to restart Redis (None when
    the Redis is not ours to restart), and how to crash and revive a process."""

    ws_bases: list[str]
    restart_redis: Callable[[], None] | None = None
    crash: Callable[[int], None] | None = None
    revive: Callable[[int], None] | None = None
    steps: list[Step] = field(default_factory=list)
    #: The open tabs ("a", "b", and "back" once tab 2 returns), and the last message
    #: tab 2 saw before it went away (where it resumes from).
    _tabs: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    _last_seen: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def url(self, process: int, since: str | None = None, name: str | None = None) -> str:
        url = f"{self.ws_bases[process]}ws/chat/{ROOM}/"
        query = "&".join(
            f"{key}={value}" for key, value in (("since", since), ("name", name)) if value
        )
        return url + (f"?{query}" if query else "")

    async def check(self, what: str, step: Callable[[], Awaitable[str]]) -> bool:
        started = time.perf_counter()
        try:
            detail, ok = await step(), True
        except (AssertionError, TimeoutError, OSError, websockets.WebSocketException) as error:
            detail, ok = f"{type(error).__name__}: {error}", False
        self.steps.append(Step(what, ok, detail, time.perf_counter() - started))
        return ok

    async def run(self) -> bool:
        """Every step in order; stops at the first failure (later steps need it)."""
        a = await websockets.connect(self.url(0))
        b = await websockets.connect(self.url(1))
        self._tabs = {"a": a, "b": b}
        try:
            return (
                await self.check("two tabs on two processes", self._cross)
                and await self.check("order across processes", self._in_order)
                and await self.check("tab 2 offline, chat goes on", self._offline)
                and await self.check("tab 2 back on process 1 (?since=)", self._comes_back)
                and await self.check("process 2 crashes: its tab leaves", self._crash)
            )
        finally:
            for socket in self._tabs.values():
                await socket.close()

    # --- the steps: each returns what it showed, or raises -----------------------------

    async def _cross(self) -> str:
        a, b = self._tabs["a"], self._tabs["b"]
        await say(b, "hello from process 2", "tab 2")
        _expect(await texts(a, 1), ["hello from process 2"])
        _expect(await texts(b, 1), ["hello from process 2"])
        return "tab 2's message reached tab 1 through Redis"

    async def _in_order(self) -> str:
        a, b = self._tabs["a"], self._tabs["b"]
        sent = [f"message {i}" for i in range(20)]
        for text in sent:
            await say(a, text, "tab 1")
        heard = await hear(b, 20)
        _expect([m["text"] for m in heard], sent)
        await texts(a, 20)
        self._last_seen = heard[-1]
        return "20 messages from tab 1 arrived at tab 2, in order"

    async def _offline(self) -> str:
        a = self._tabs["a"]
        await self._tabs["b"].close()
        missed = [f"while tab 2 was away {i}" for i in range(3)]
        for text in missed:
            await say(a, text, "tab 1")
        _expect(await texts(a, 3), missed)
        if self.restart_redis is None:
            return "tab 1 said 3 more (Redis is not ours: no restart)"
        await asyncio.to_thread(self.restart_redis)
        after = [f"after the restart {i}" for i in range(2)]
        for text in after:
            await say(a, text, "tab 1")
        _expect(await texts(a, 2), after)
        return "tab 1 said 3 more, Redis restarted, tab 1 said 2 more"

    async def _comes_back(self) -> str:
        a = self._tabs["a"]
        back = self._tabs["back"] = await websockets.connect(
            self.url(0, since=self._last_seen["position"])
        )
        count = 5 if self.restart_redis else 3
        replayed = await texts(back, count)
        _expect(replayed[:3], [f"while tab 2 was away {i}" for i in range(3)])
        _expect(replayed[3:], [f"after the restart {i}" for i in range(count - 3)])
        await say(a, "welcome back", "tab 1")
        _expect(await texts(back, 1), ["welcome back"])
        return f"the {count} missed messages came first, in order, then live ones"

    async def _crash(self) -> str:
        if self.crash is None or self.revive is None:
            return "the processes are not ours to crash: skipped"
        a = self._tabs["a"]
        carol = self._tabs["carol"] = await websockets.connect(self.url(1, name="carol"))
        await a.send(json.dumps({"presence": "who"}))
        here = await presence_frame(a, "here")
        if "carol" not in [m["info"].get("name") for m in here["members"]]:
            await presence_frame(a, "join", "carol")  # she joined after the answer
        await asyncio.to_thread(self.crash, 1)
        crashed = time.perf_counter()
        await presence_frame(a, "leave", "carol", within=PRESENCE_TIMEOUT + _LEAVE_SLACK)
        took = time.perf_counter() - crashed
        await carol.close()  # its server is gone
        del self._tabs["carol"]
        await asyncio.to_thread(self.revive, 1)
        return (
            f"process 2 SIGKILLed: tab 1 saw carol leave {took:.1f} s later "
            f"(presence_timeout {PRESENCE_TIMEOUT:g} s); process 2 started again"
        )


async def presence_frame(
    socket: Any, kind: str, name: str | None = None, within: float = _WAIT
) -> dict[str, Any]:
    """The next presence frame of ``kind`` (for a member named ``name``), skipping
    chat messages and other members' frames."""
    async with asyncio.timeout(within):
        while True:
            frame = json.loads(await socket.recv())
            if frame.get("presence") != kind:
                continue
            if name is None or (frame.get("info") or {}).get("name") == name:
                return frame  # type: ignore[no-any-return]


def _expect(got: list[str], wanted: list[str]) -> None:
    if got != wanted:
        raise AssertionError(f"expected {wanted!r}, got {got!r}")


async def say(socket: Any, text: str, author: str = "a") -> None:
    """Send ``text`` as a tab does (also used by tests/test_chat_e2e.py)."""
    await socket.send(json.dumps({"text": text, "author": author}))


async def hear(socket: Any, count: int) -> list[dict[str, Any]]:
    return [json.loads(await asyncio.wait_for(socket.recv(), _WAIT)) for _ in range(count)]


async def texts(socket: Any, count: int) -> list[str]:
    return [m["text"] for m in await hear(socket, count)]
