"""Run the example chat: a throwaway redis-server (or --hosts) and two daphne
processes sharing it, so every message crosses processes.

    python examples/chat/run.py            # then open both printed URLs
    python examples/chat/run.py --hosts redis://127.0.0.1:6379

Ctrl+C stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
_START_TIMEOUT = 30.0


class ChatServers:
    """``count`` daphne processes serving the chat app against ``redis_url``."""

    def __init__(self, redis_url: str, count: int = 2) -> None:
        from streamlayer.testing import free_port

        self.redis_url = redis_url
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
        for port in self.ports:
            command = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)]
            self.processes.append(
                subprocess.Popen([*command, "chat.asgi:application"], cwd=HERE, env=env)
            )
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
    args = parser.parse_args()
    from streamlayer.testing import RedisServer

    server = None
    if args.hosts is None:
        server = RedisServer(persistence=True).start()
    url = args.hosts or server.url  # type: ignore[union-attr]
    servers = ChatServers(url).start()
    print(f"Redis at {url}; the chat is served by two processes:")
    for chat_url in servers.urls:
        print(f"  {chat_url}lobby/")
    print("Open one in each tab, chat, close a tab or restart Redis: missed messages come back.")
    print("Ctrl+C to stop.")
    try:
        while all(p.poll() is None for p in servers.processes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        servers.stop()
        if server is not None:
            server.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
