"""Run the example chat: a throwaway redis-server (or --hosts) and two daphne
processes sharing it, so every message crosses processes.

    python examples/chat/run.py            # the tour, then open both printed URLs
    python examples/chat/run.py --check    # the tour only; exit status says how it went
    python examples/chat/run.py --hosts redis://127.0.0.1:6379

It first walks through a scripted conversation (tour.py: two tabs on two
processes, one offline while Redis restarts, back on the other process) and
prints each checked step, then serves until Ctrl+C, which stops everything it
started.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_START_TIMEOUT = 30.0


class ChatServers:
    """``count`` daphne processes serving the chat app against ``redis_url``."""

    def __init__(self, redis_url: str, count: int = 2, log_dir: Path | None = None) -> None:
        from streamlayer.testing import free_port

        self.redis_url = redis_url
        self.log_dir = log_dir
        self.ports = [free_port() for _ in range(count)]
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}/" for port in self.ports]

    def start(self) -> ChatServers:
        env = {
            **os.environ,
            "REDIS_URL": self.redis_url,
            "DJANGO_SETTINGS_MODULE": "chat.settings",
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        for number, port in enumerate(self.ports, 1):
            command = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)]
            output = None
            if self.log_dir is not None:
                output = (self.log_dir / f"process-{number}.log").open("ab")
            self.processes.append(
                subprocess.Popen(
                    [*command, "chat.asgi:application"],
                    cwd=HERE,
                    env=env,
                    stdout=output,
                    stderr=subprocess.STDOUT if output else None,
                )
            )
            if output is not None:
                output.close()  # the child holds its own copy
        for port, process in zip(self.ports, self.processes, strict=True):
            _wait_for_port(port, process)
        return self

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"daphne on port {port} exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # polling a port another process opens: no event to wait on
    raise RuntimeError(f"daphne on port {port} did not start within {_START_TIMEOUT:g}s")


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

    tour = Tour([u.replace("http://", "ws://") for u in servers.urls], restart)
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
