"""Headless Chromium driven over the DevTools protocol, for the tests that open a page.

Why not ``chromium --dump-dom``: with ``--virtual-time-budget`` Chromium fast-forwards
its clock while no network fetch is pending, and an open WebSocket is not one, so the
DOM is dumped whenever the machine happens to be that far: a page showing what its
socket brought had a race with the dump on a busy CI machine. Here the test waits on
the page itself: a promise in the page resolves when its text holds what the test
expects (a ``MutationObserver``, an event), bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import websockets

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Resolves with the element's text once it contains every wanted string and none of
# the unwanted ones.
_WAIT_FOR_TEXT = """
new Promise((resolve) => {
  const wanted = %(wanted)s, unwanted = %(unwanted)s;
  const element = document.getElementById(%(element)s);
  const done = () => wanted.every((w) => element.textContent.includes(w))
    && !unwanted.some((u) => element.textContent.includes(u));
  if (done()) return resolve(element.textContent);
  new MutationObserver((_, observer) => {
    if (done()) { observer.disconnect(); resolve(element.textContent); }
  }).observe(element, {childList: true, subtree: true, characterData: true});
})
"""


class Page:
    """One tab: navigate, wait for text, take a screenshot."""

    def __init__(self, socket: Any) -> None:
        self._socket = socket
        self._ids = itertools.count(1)
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reading = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for raw in self._socket:
            message = json.loads(raw)
            if "id" in message:
                self._replies.pop(message["id"]).set_result(message)
            else:
                self._events.put_nowait(message)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        number = next(self._ids)
        reply = self._replies[number] = asyncio.get_running_loop().create_future()
        await self._socket.send(json.dumps({"id": number, "method": method, "params": params}))
        answer = await reply
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer["result"]
        return result

    async def open(self, url: str) -> None:
        """Navigate and return once the page's load event fired."""
        await self.call("Page.enable")
        await self.call("Page.navigate", url=url)
        while (await self._events.get())["method"] != "Page.loadEventFired":
            pass

    async def text_once_it_holds(
        self, element: str, *wanted: str, lacking: tuple[str, ...] = ()
    ) -> str:
        """The element's text, as soon as it contains every string in ``wanted`` and
        none in ``lacking``."""
        script = _WAIT_FOR_TEXT % {
            "wanted": json.dumps(wanted),
            "unwanted": json.dumps(lacking),
            "element": json.dumps(element),
        }
        answer = await self.call(
            "Runtime.evaluate", expression=script, awaitPromise=True, returnByValue=True
        )
        text: str = answer["result"]["value"]
        return text

    async def screenshot(self) -> bytes:
        """What the tab shows, as a PNG."""
        shot = await self.call("Page.captureScreenshot", format="png")
        return base64.b64decode(shot["data"])

    async def close(self) -> None:
        self._reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reading
        await self._socket.close()


@contextlib.asynccontextmanager
async def chromium_page(profile: Path) -> AsyncIterator[Page]:
    """A headless Chromium with one blank tab, ended on exit (``profile`` is a
    throwaway user-data directory)."""
    if CHROMIUM is None:
        raise RuntimeError("headless Chromium is not installed")
    process = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=900,700",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        "--remote-allow-origins=*",
        f"--user-data-dir={profile}",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    draining: asyncio.Future[None] | None = None
    try:
        assert process.stderr is not None
        browser_url = await _devtools_url(process.stderr)
        # Keep reading what Chromium says, so a full pipe never stalls it.
        draining = asyncio.ensure_future(_drain(process.stderr))
        page_url = await _new_tab(browser_url)
        page = Page(await websockets.connect(page_url, max_size=None))
        try:
            yield page
        finally:
            await page.close()
    finally:
        process.kill()
        await process.wait()
        if draining is not None:
            await draining


async def _devtools_url(stderr: asyncio.StreamReader) -> str:
    """The browser's DevTools address, from the line Chromium prints when it listens."""
    seen = []
    while line := (await stderr.readline()).decode(errors="replace"):
        seen.append(line)
        if line.startswith("DevTools listening on "):
            return line.removeprefix("DevTools listening on ").strip()
    raise RuntimeError("Chromium ended without listening for DevTools:\n" + "".join(seen[-20:]))


async def _drain(stderr: asyncio.StreamReader) -> None:
    while await stderr.read(65536):
        pass


async def _new_tab(browser_url: str) -> str:
    """The DevTools address of a new blank tab."""
    async with websockets.connect(browser_url) as browser:
        request = {"id": 1, "method": "Target.createTarget", "params": {"url": "about:blank"}}
        await browser.send(json.dumps(request))
        while (reply := json.loads(await browser.recv())).get("id") != 1:
            pass
    host = browser_url.split("/devtools/")[0]
    return f"{host}/devtools/page/{reply['result']['targetId']}"
