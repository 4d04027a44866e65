"""The example chat (examples/chat) end to end: two daphne processes on one Redis,
real WebSocket clients (the ``websockets`` package), messages crossing processes,
a tab that comes back with ``?since=`` on the other process, and Redis restarting
mid-conversation."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from streamlayer.testing import RedisServer

from .browser import CHROMIUM, chromium_page

websockets = pytest.importorskip("websockets")
pytest.importorskip("daphne")

RUN = Path(__file__).resolve().parent.parent / "examples" / "chat" / "run.py"
_WAIT = 15.0


def _example(name: str) -> Any:
    """A module of the example chat (examples/chat is not a package)."""
    path = RUN.with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_chat_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def _chat_servers() -> Any:
    return _example("run").ChatServers


# The tour's tab helpers: send as a tab does, hear n messages, their texts.
_tour = _example("tour")
say, hear, texts = _tour.say, _tour.hear, _tour.texts


@pytest.fixture
def redis_aof() -> Iterator[RedisServer]:
    server = RedisServer(persistence=True).start()
    yield server
    server.cleanup()


@pytest.fixture
def chat(redis_aof: RedisServer) -> Iterator[Any]:
    servers = _chat_servers()(redis_aof.url).start()
    yield servers
    servers.stop()


def ws_url(chat: Any, index: int, room: str, since: str | None = None) -> str:
    url = f"ws://127.0.0.1:{chat.ports[index]}/ws/chat/{room}/"
    return url + (f"?since={since}" if since else "")


@pytest.fixture
async def pair(chat: Any) -> AsyncIterator[tuple[Any, Any]]:
    """Two tabs in one room, one on each server process, both joined."""
    a = await websockets.connect(ws_url(chat, 0, "lobby"))
    b = await websockets.connect(ws_url(chat, 1, "lobby"))
    # b's message reaching a proves both joined (a consumer handles messages only
    # after connect(), which joins, has returned).
    await say(b, "hello", "b")
    assert await texts(a, 1) == ["hello"]
    assert await texts(b, 1) == ["hello"]
    yield a, b
    await a.close()
    await b.close()


async def test_messages_cross_processes_in_order(pair: tuple[Any, Any]) -> None:
    a, b = pair
    for i in range(30):
        await say(a, f"m{i}")
    expected = [f"m{i}" for i in range(30)]
    assert await texts(b, 30) == expected
    assert await texts(a, 30) == expected


async def test_a_tab_back_on_the_other_process_gets_what_it_missed(
    chat: Any, pair: tuple[Any, Any]
) -> None:
    a, b = pair
    await say(a, "before")
    [seen] = await hear(b, 1)
    await texts(a, 1)
    await b.close()  # the tab goes offline, remembering where it was
    for i in range(5):
        await say(a, f"missed {i}")
    assert await texts(a, 5) == [f"missed {i}" for i in range(5)]
    back = await websockets.connect(ws_url(chat, 0, "lobby", since=seen["position"]))
    try:
        replayed = await hear(back, 5)
        assert [m["text"] for m in replayed] == [f"missed {i}" for i in range(5)]
        positions = [m["position"] for m in replayed]
        assert len(set(positions)) == 5 and seen["position"] not in positions
        await say(a, "live again")
        assert await texts(back, 1) == ["live again"]
    finally:
        await back.close()


async def test_redis_restarting_mid_conversation_loses_nothing(
    redis_aof: RedisServer, pair: tuple[Any, Any]
) -> None:
    a, b = pair
    for i in range(5):
        await say(a, f"before {i}")
    assert await texts(b, 5) == [f"before {i}" for i in range(5)]
    await asyncio.to_thread(redis_aof.stop)
    await asyncio.to_thread(redis_aof.start)
    for i in range(5):  # sent while the servers' connections come back: retried
        await say(a, f"after {i}")
    got = await texts(b, 5)
    assert got == [f"after {i}" for i in range(5)]
    assert (await texts(a, 10))[-5:] == got


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (Debian: apt-get install chromium)",
)
async def test_the_page_replays_in_a_real_browser(chat: Any, tmp_path: Path) -> None:
    """The page's own script, in headless Chromium: opened with ?since= it connects,
    gets the messages after that position replayed, and shows them; a screenshot of
    it is kept next to the test's files."""
    async with websockets.connect(ws_url(chat, 0, "lobby")) as a:
        for text in ("alpha-one", "bravo-two", "charlie-three"):
            await say(a, text)
        first, *_ = await hear(a, 3)
    async with chromium_page(tmp_path / "profile") as page:
        await page.open(f"{chat.urls[1]}lobby/?since={first['position']}")
        log = await asyncio.wait_for(
            page.text_once_it_holds("log", "bravo-two", "charlie-three"), _WAIT
        )
        picture = await page.screenshot()
    assert "alpha-one" not in log  # it came before the position the page was opened at
    assert log.index("bravo-two") < log.index("charlie-three")
    assert len(picture) > 5_000
    await asyncio.to_thread((tmp_path / "chat.png").write_bytes, picture)


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed (Debian: apt-get install chromium)",
)
async def test_the_page_shows_who_is_online(chat: Any, tmp_path: Path) -> None:
    """The page asks who is here and keeps its list live: a tab named zed on the
    other process shows up, and goes when it closes."""
    async with chromium_page(tmp_path / "profile") as page:
        await page.open(f"{chat.urls[0]}lobby/")
        await asyncio.wait_for(page.text_once_it_holds("online", "online: guest"), _WAIT)
        zed = await websockets.connect(ws_url(chat, 1, "lobby") + "?name=zed")
        shown = await asyncio.wait_for(page.text_once_it_holds("online", "zed"), _WAIT)
        assert shown == "online: guest, zed"
        await zed.close()
        gone = await asyncio.wait_for(
            page.text_once_it_holds("online", "guest", lacking=("zed",)), _WAIT
        )
        assert gone == "online: guest"


def test_the_readme_main_command_runs_its_checked_tour() -> None:
    """``./scripts/demo`` runs examples/chat/run.py; with --check it stops after the
    scripted conversation (Redis restart included) and says how it went."""
    done = subprocess.run(
        [sys.executable, str(RUN), "--check"], capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count(" ok ") == 5, done.stdout
    assert "FAILED" not in done.stdout
    assert "reconnected (recovered=True)" in done.stdout


async def test_a_sync_django_view_announces_without_opening_connections(
    redis_aof: RedisServer, pair: tuple[Any, Any], chat: Any
) -> None:
    """``POST /lobby/announce/`` is a plain sync view calling
    ``async_to_sync(layer.group_send)`` under daphne: 100 of them reach both tabs in
    order, and Redis accepts no new connection meanwhile (the calls run on the
    server's loop and its connections; docs/sync.rst)."""
    import urllib.request

    a, b = pair
    url = f"{chat.urls[1]}lobby/announce/"

    def announce_all() -> None:
        for i in range(100):
            request = urllib.request.Request(url, data=f"news {i}".encode(), method="POST")
            with urllib.request.urlopen(request, timeout=_WAIT) as response:
                assert response.status == 204

    before = await asyncio.to_thread(redis_aof.total_connections)
    await asyncio.to_thread(announce_all)
    opened = await asyncio.to_thread(redis_aof.total_connections) - before - 1
    assert opened <= 1
    expected = [f"news {i}" for i in range(100)]
    assert await texts(a, 100) == expected
    assert await texts(b, 100) == expected
