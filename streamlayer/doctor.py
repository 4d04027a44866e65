"""``python -m streamlayer doctor``: is this Redis fit to carry a channel layer?

Each check gives a :class:`Finding`: ``ok``, ``warn`` (works, but something a user
should know: no persistence, keys that may be evicted) or ``problem`` (streamlayer
will fail or lose messages: too old, a command renamed away, a read-only replica).
The command exits 1 when any check finds a problem, so it can gate a deployment.

A Sentinel address is recognised, and every master it watches is checked in turn;
a Redis Cluster node is recognised, and the cluster's health is checked too.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

__all__ = ["MIN_VERSION", "REQUIRED_COMMANDS", "Finding", "ServerReport", "diagnose"]

#: XAUTOCLAIM, XTRIM MINID and SET ... GET arrived in Redis 6.2.
MIN_VERSION = (6, 2)
#: Every command the layers send (scripts call the stream commands from Lua).
REQUIRED_COMMANDS = (
    "evalsha", "script", "xadd", "xread", "xreadgroup", "xautoclaim", "xack", "xdel",
    "xtrim", "xlen", "xrange", "xrevrange", "xpending", "xgroup", "xinfo", "zadd",
    "zrem", "zrange", "zremrangebyscore", "zcard", "pexpire", "expire", "unlink",
    "scan", "publish", "subscribe",
)  # fmt: skip
_PINGS = 20
_TIMEOUT = 5.0


@dataclass(frozen=True)
class Finding:
    check: str
    status: str  # "ok", "warn" or "problem"
    detail: str


@dataclass
class ServerReport:
    """What was found about one server (a Sentinel's masters get reports of their own)."""

    address: str
    role: str = "unknown"
    findings: list[Finding] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return sum(1 for f in self.findings if f.status == "problem")

    def add(self, check: str, status: str, detail: str) -> None:
        self.findings.append(Finding(check, status, detail))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "problems": self.problems}


def diagnose(url: str) -> list[ServerReport]:
    """Check the server at ``url`` (and, for a Sentinel, every master it watches)."""
    report = ServerReport(_address(url))
    client = redis.Redis.from_url(url, socket_timeout=_TIMEOUT, socket_connect_timeout=_TIMEOUT)
    try:
        try:
            client.ping()
        except redis.RedisError as exc:
            report.add("connect", "problem", f"cannot reach Redis: {exc}")
            return [report]
        info = client.info()
        # Valkey names it server_mode.
        if (info.get("redis_mode") or info.get("server_mode")) == "sentinel":
            report.role = "sentinel"
            return [report, *_sentinel_masters(client, report)]
        _check_server(client, info, report)
        return [report]
    finally:
        client.close()


def _address(url: str) -> str:
    pool = redis.ConnectionPool.from_url(url)
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def _check_server(client: redis.Redis, info: dict[str, Any], report: ServerReport) -> None:
    report.role = str(info.get("role", "unknown"))
    _check_version(info, report)
    _check_role(info, report)
    _check_commands(client, report)
    _check_scripting(client, report)
    _check_latency(client, report)
    _check_memory_policy(client, info, report)
    _check_persistence(client, info, report)
    if int(info.get("cluster_enabled", 0)):
        _check_cluster(client, report)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def _check_version(info: dict[str, Any], report: ServerReport) -> None:
    name = "Valkey" if info.get("server_name") == "valkey" else "Redis"
    text = str(info.get("valkey_version") or info.get("redis_version", "0"))
    # Valkey reports the Redis version it is compatible with as redis_version.
    compatible = _version(str(info.get("redis_version", "0")))
    if compatible < MIN_VERSION:
        wanted = ".".join(map(str, MIN_VERSION))
        report.add(
            "version",
            "problem",
            f"{name} {text}: streamlayer needs Redis >= {wanted} (XAUTOCLAIM, XTRIM MINID)",
        )
    else:
        report.add("version", "ok", f"{name} {text}")


def _check_role(info: dict[str, Any], report: ServerReport) -> None:
    if info.get("role") == "slave":
        master = f"{info.get('master_host')}:{info.get('master_port')}"
        report.add(
            "role", "problem", f"a read-only replica of {master}: point hosts at the master"
        )
    else:
        report.add("role", "ok", str(info.get("role", "master")))


def _check_commands(client: redis.Redis, report: ServerReport) -> None:
    # The raw reply: redis-py's parser for COMMAND chokes on the nil a missing one gives.
    client.set_response_callback("COMMAND", lambda response, **options: response)
    replies = client.execute_command(  # type: ignore[no-untyped-call]
        "COMMAND", "INFO", *REQUIRED_COMMANDS
    )
    missing = [name for name, reply in zip(REQUIRED_COMMANDS, replies, strict=True) if not reply]
    if missing:
        report.add(
            "commands",
            "problem",
            f"missing or renamed (rename-command / ACL): {', '.join(missing)}",
        )
    else:
        report.add("commands", "ok", f"all {len(REQUIRED_COMMANDS)} commands the layers use")


def _check_scripting(client: redis.Redis, report: ServerReport) -> None:
    try:
        answer = client.eval("return 1", 0)
    except redis.RedisError as exc:
        report.add("scripting", "problem", f"Lua scripts cannot run: {exc}")
        return
    if answer == 1:
        report.add("scripting", "ok", "Lua scripts run")
    else:
        report.add("scripting", "problem", f"a test script answered {answer!r}")


def _check_latency(client: redis.Redis, report: ServerReport) -> None:
    samples = []
    for _ in range(_PINGS):
        started = time.perf_counter()
        client.ping()
        samples.append((time.perf_counter() - started) * 1000)
    median = statistics.median(samples)
    status = "ok" if median < 5 else "warn"
    hint = "" if status == "ok" else " (every send waits at least this long)"
    report.add("latency", status, f"round trip {median:.2f} ms median of {_PINGS} PINGs{hint}")


def _config(client: redis.Redis, name: str) -> str | None:
    """A CONFIG GET value, or None where CONFIG is not allowed (managed services)."""
    try:
        values = client.config_get(name)
    except redis.RedisError:
        return None
    value = values.get(name)
    return None if value is None else str(value)


def _check_memory_policy(client: redis.Redis, info: dict[str, Any], report: ServerReport) -> None:
    policy = str(info.get("maxmemory_policy") or _config(client, "maxmemory-policy") or "")
    maxmemory = int(info.get("maxmemory", 0) or 0)
    if maxmemory and policy != "noeviction":
        report.add(
            "eviction",
            "warn",
            f"maxmemory {maxmemory} with {policy}: under memory pressure Redis may evict "
            "channel streams and groups (every streamlayer key has a TTL, so volatile-* "
            "policies apply too); noeviction makes sends fail loudly instead",
        )
    else:
        report.add("eviction", "ok", f"{policy or 'unknown policy'}, maxmemory {maxmemory}")


def _check_persistence(client: redis.Redis, info: dict[str, Any], report: ServerReport) -> None:
    aof = int(info.get("aof_enabled", 0) or 0)
    save = _config(client, "save")
    if aof:
        report.add("persistence", "ok", "AOF on: a restart keeps undelivered messages")
    elif save:
        report.add(
            "persistence",
            "warn",
            f"RDB snapshots only ({save}): a restart loses what arrived since the last one "
            "(reconnect notices then say recovered=False)",
        )
    else:
        report.add(
            "persistence",
            "warn",
            "none: a restart loses every undelivered message (reconnect notices then say "
            "recovered=False); turn on appendonly for zero loss across restarts",
        )


def _check_cluster(client: redis.Redis, report: ServerReport) -> None:
    info = client.cluster("INFO")
    state = info.get("cluster_state") if isinstance(info, dict) else None
    masters = int(info.get("cluster_size", 0)) if isinstance(info, dict) else 0
    if state == "ok":
        report.add(
            "cluster",
            "ok",
            f"Redis Cluster, state ok, {masters} masters: use "
            'hosts=[{"cluster": [...]}] with StreamsChannelLayer',
        )
    else:
        report.add("cluster", "problem", f"Redis Cluster in state {state!r}")


def _sentinel_masters(client: redis.Redis, report: ServerReport) -> list[ServerReport]:
    masters: Any = client.sentinel_masters()
    if not masters:
        report.add("sentinel", "problem", "this Sentinel watches no master")
        return []
    names = ", ".join(sorted(masters))
    report.add(
        "sentinel",
        "ok",
        f"Sentinel watching {names}: use hosts=[{{'sentinels': [...], 'master_name': ...}}]",
    )
    reports = []
    for name, state in sorted(masters.items()):
        url = f"redis://{state['ip']}:{state['port']}"
        for found in diagnose(url):
            found.address = f"{found.address} (master {name!r})"
            reports.append(found)
    return reports
