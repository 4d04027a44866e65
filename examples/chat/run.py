"""Run the example chat: a throwaway redis-server (or --hosts) and two daphne
processes sharing it, so every message crosses processes.

    python examples/chat/run.py            # the tour, then open both printed URLs
    python examples/chat/run.py --check    # the tour only; exit status says how it went
    python examples/chat/run.py --hosts redis://127.0.0.1:6379

It first walks through a scripted conversation (tour.py: two tabs on two
processes, one offline while Redis restarts, back on the other process, then
process 2 SIGKILLed and its tab leaving the room's presence) and
prints each checked step, then serves until Ctrl+C, which stops everything it
started.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from streamlayer.testing import DaphneServers

HERE = Path(__file__).resolve().parent


class ChatServers(DaphneServers):
    """``count`` daphne processes serving the chat app against ``redis_url``."""

    def __init__(self, redis_url: str, count: int = 2, log_dir: Path | None = None) -> None:
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "DJANGO_SETTINGS_MODULE": "chat.settings",
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        super().__init__("chat.asgi:application", HERE, env, count, log_dir)
        self.redis_url = redis_url


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", help="a redis:// URL instead of a throwaway server")
    parser.add_argument("--check", action="store_true", help="run the tour, then stop")
    parser.add_argument("--no-tour", action="store_true", help="serve without the tour")
    args = parser.parse_args()
    from streamlayer.testing import RedisServer

    server = None
    if args.hosts is None:
        server = RedisServer(persistence=True).start()
    url = args.hosts or server.url  # type: ignore[union-attr]
    log_dir = Path(tempfile.mkdtemp(prefix="streamlayer-chat-"))
    servers = ChatServers(url, log_dir=log_dir).start()
    try:
        ok = True if args.no_tour else _tour(servers, server)
        _show_warnings(log_dir)
        if args.check or not ok:
            return 0 if ok else 1
        print(f"\nRedis at {url}; the chat is served by two processes:")
        for chat_url in servers.urls:
            print(f"  {chat_url}lobby/")
        print(f"Their logs: {log_dir}/process-*.log")
        print("Open one in each tab, chat, close a tab or restart Redis:")
        print("the messages it missed come back.")
        print("Ctrl+C to stop.")
        while all(p.poll() is None for p in servers.processes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        servers.stop()
        if server is not None:
            server.cleanup()
    return 0


def _show_warnings(log_dir: Path) -> None:
    """What the processes logged at WARNING and above: during the tour, the
    layer's reconnect notices when Redis restarted."""
    for log in sorted(log_dir.glob("process-*.log")):
        lines = log.read_text(errors="replace").splitlines()
        notable = [line for line in lines if " WARNING " in line or " ERROR " in line]
        if notable:
            print(f"{log.stem} logged:")
            for line in notable:
                print(f"  {line}")


def _tour(servers: ChatServers, server: object | None) -> bool:
    """Run tour.py against the servers and print its steps; True when all passed."""
    import asyncio

    from rich.console import Console
    from rich.table import Table

    sys.path.insert(0, str(HERE))
    from tour import Tour

    restart = None
    if server is not None:

        def restart() -> None:
            server.stop()  # type: ignore[attr-defined]
            server.start()  # type: ignore[attr-defined]

    bases = [u.replace("http://", "ws://") for u in servers.urls]
    tour = Tour(bases, restart, servers.crash, servers.revive)
    ok = asyncio.run(tour.run())
    table = Table(title="A conversation through the chat, checked")
    for column in ("step", "result", "what happened", "s"):
        table.add_column(column, justify="right" if column == "s" else "left")
    for step in tour.steps:
        result = "[green]ok[/]" if step.ok else "[red]FAILED[/]"
        table.add_row(step.what, result, step.detail, f"{step.seconds:.2f}")
    Console().print(table)
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
