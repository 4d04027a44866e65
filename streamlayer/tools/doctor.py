"""``python -m streamlayer doctor``: is this Redis fit to carry a channel layer?

Each check gives a :class:`Finding`: ``ok``, ``warn`` (works, but something a user
should know: no persistence, keys that may be evicted) or ``problem`` (streamlayer
will fail or lose messages: too old, a command renamed away, a read-only replica).
The command exits 1 when any check finds a problem, so it can gate a deployment.

A Sentinel address is recognised, and every master it watches is checked in turn;
a Redis Cluster node is recognised, and the cluster's health is checked too.

:func:`diagnose_layers` starts from a ``CHANNEL_LAYERS`` mapping instead (``doctor
--settings``): each streamlayer entry's configuration is checked as Django's
system checks do, then every host it names, in the form it names it (URL,
``(host, port)``, dict of client options with its password and TLS settings, the
Sentinels of a named master, the nodes of a Cluster).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from django.core.checks import ERROR

from ..backends import backend_of
from ..config import HostSpec, LayerConfig
from ..connections import create_sync_client
from .permissions import LAYERS, CannotCheck, acl_setuser, missing_permissions

__all__ = [
    "MIN_VERSION",
    "REQUIRED_COMMANDS",
    "Finding",
    "ServerReport",
    "diagnose",
    "diagnose_host",
    "diagnose_layers",
]

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
_TIMEOUTS = {"socket_timeout": _TIMEOUT, "socket_connect_timeout": _TIMEOUT}


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


#: Which layers' permissions to check, each under which prefix.
Scope = Sequence[tuple[str, str]]


def scope_of(layers: Iterable[str] = (), prefix: str = "asgi") -> Scope:
    """Every layer (or those named) under ``prefix``."""
    return [(layer, prefix) for layer in (layers or LAYERS)]


def diagnose(url: str, scope: Scope | None = None) -> list[ServerReport]:
    """Check the server at ``url`` (and, for a Sentinel, every master it watches), and
    the connected user's permissions for ``scope`` (by default: every layer, prefix
    ``asgi``)."""
    client = redis.Redis.from_url(url, **_TIMEOUTS)
    return _diagnose(client, _address(url), scope=scope_of() if scope is None else scope)


def diagnose_host(host: HostSpec, scope: Scope = ()) -> list[ServerReport]:
    """Check one ``hosts`` entry of a layer configuration, connecting as the layer would."""
    if host.is_cluster:
        kwargs = {**_client_kwargs(host.kwargs), **_TIMEOUTS}
        return [
            report
            for node_host, port in host.cluster_nodes
            for report in _diagnose(
                redis.Redis(host=node_host, port=port, **kwargs),
                f"{node_host}:{port}",
                scope=scope,
            )
        ]
    if host.is_sentinel:
        kwargs = {**_client_kwargs(host.sentinel_kwargs or {}), **_TIMEOUTS}
        master = {"name": host.master_name, "kwargs": _client_kwargs(host.kwargs)}
        return [
            report
            for node_host, port in host.sentinels
            for report in _diagnose(
                redis.Redis(host=node_host, port=port, **kwargs),
                f"{node_host}:{port}",
                master,
                scope=scope,
            )
        ]
    address = _address(host.url) if host.url else host.describe().removeprefix("redis://")
    return _diagnose(create_sync_client(host), address, scope=scope)


def diagnose_layers(
    layers: Mapping[str, Mapping[str, Any]], interface_timeout: float | None = None
) -> list[ServerReport]:
    """A report on each streamlayer entry's configuration, then on each of its hosts
    (a host several entries share is checked once)."""
    from ..checks import DEFAULT_INTERFACE_TIMEOUT, check_layers

    timeout = DEFAULT_INTERFACE_TIMEOUT if interface_timeout is None else interface_timeout
    reports: list[ServerReport] = []
    entries: list[tuple[ServerReport, LayerConfig | None]] = []
    #: Per host: the (layer, prefix) pairs of every entry naming it, checked together.
    scopes: dict[str, list[tuple[str, str]]] = {}
    for alias, entry in layers.items():
        backend = str(entry.get("BACKEND", ""))
        if not backend.startswith("streamlayer."):
            continue
        report = ServerReport(f"CHANNEL_LAYERS[{alias!r}]", role="config")
        messages = check_layers({alias: entry}, interface_timeout=timeout)
        for message in messages:
            status = "problem" if message.level >= ERROR else "warn"
            hint = f" ({message.hint})" if message.hint else ""
            report.add(message.id or "config", status, f"{message.msg}{hint}")
        if any(f.status == "problem" for f in report.findings):
            entries.append((report, None))  # a configuration refused names no host to trust
            continue
        report.add("config", "ok", f"{backend}: the layer accepts this CONFIG")
        config = LayerConfig.from_options(dict(entry.get("CONFIG", {}) or {}))
        entries.append((report, config))
        shipped = backend_of(backend)
        layer = shipped.name if shipped is not None else None
        for host in config.hosts:
            scope = scopes.setdefault(host.describe(), [])
            if layer is not None and (layer, config.prefix) not in scope:
                scope.append((layer, config.prefix))
    seen: set[str] = set()
    for report, accepted in entries:
        reports.append(report)
        for host in accepted.hosts if accepted is not None else ():
            if host.describe() not in seen:  # a host several entries name: checked once
                seen.add(host.describe())
                reports += diagnose_host(host, scopes[host.describe()])
    return reports


def _client_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """redis-py's pool options as a client takes them (``unix_socket_path`` is the
    client's name of the pool's ``path``)."""
    kwargs = dict(options)
    if "path" in kwargs:
        kwargs["unix_socket_path"] = kwargs.pop("path")
    return kwargs


def _diagnose(
    client: redis.Redis,
    address: str,
    master: Mapping[str, Any] | None = None,
    *,
    scope: Scope = (),
) -> list[ServerReport]:
    report = ServerReport(address)
    try:
        try:
            client.ping()
        except redis.RedisError as exc:
            report.add("connect", "problem", f"cannot reach Redis: {exc}")
            return [report]
        try:
            info = client.info()
        except redis.exceptions.NoPermissionError:
            # An application's ACL user: what it may do is the question that matters.
            report.add(
                "server",
                "warn",
                "this user may not run INFO: version, role, memory and persistence not "
                "checked (run doctor as an admin user for those)",
            )
            # Whether this is a cluster node is unknown here: the plain Pub/Sub probes.
            _check_permissions(client, report, scope, cluster=False)
            return [report]
        # Valkey names it server_mode.
        if (info.get("redis_mode") or info.get("server_mode")) == "sentinel":
            report.role = "sentinel"
            return [report, *_sentinel_masters(client, report, master, scope)]
        _check_server(client, info, report, scope)
        return [report]
    finally:
        client.close()


def _address(url: str) -> str:
    pool = redis.ConnectionPool.from_url(url)
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def _check_server(
    client: redis.Redis, info: dict[str, Any], report: ServerReport, scope: Scope
) -> None:
    report.role = str(info.get("role", "unknown"))
    _check_version(info, report)
    _check_role(info, report)
    cluster = bool(int(info.get("cluster_enabled", 0)))
    sharded_pubsub = _version(str(info.get("redis_version", "0"))) >= (7, 0, 0)
    checks: list[tuple[str, Callable[[], None]]] = [
        ("commands", lambda: _check_commands(client, report)),
        (
            "permissions",
            lambda: _check_permissions(client, report, scope, cluster, sharded_pubsub),
        ),
        ("scripting", lambda: _check_scripting(client, report)),
        ("latency", lambda: _check_latency(client, report)),
        ("maxmemory", lambda: _check_memory_policy(client, info, report)),
        ("persistence", lambda: _check_persistence(client, info, report)),
    ]
    if cluster:
        checks.append(("cluster", lambda: _check_cluster(client, report)))
    for name, check in checks:
        try:
            check()
        except redis.exceptions.NoPermissionError as exc:
            report.add(name, "warn", f"not checked: this user may not ({exc})")


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


def _check_permissions(
    client: redis.Redis,
    report: ServerReport,
    scope: Scope,
    cluster: bool,
    sharded_pubsub: bool = True,
) -> None:
    """What the connected user may not do of what each layer in ``scope`` needs (see
    :mod:`streamlayer.tools.permissions`: asked of Redis, nothing run). The Pub/Sub
    layer on a cluster without sharded Pub/Sub cannot run at all: said instead."""
    for layer, prefix in scope:
        check = f"permissions ({layer})"
        if layer == "compat.pubsub" and cluster and not sharded_pubsub:
            report.add(
                check,
                "warn",
                "compat.pubsub cannot run on this cluster: it needs sharded Pub/Sub "
                "(Redis 7 or later)",
            )
            continue
        try:
            refused = missing_permissions(client, layer, prefix, cluster)
        except CannotCheck as exc:
            report.add(check, "warn", f"not checked: {exc}")
            continue
        if refused:
            detail = f"{len(refused)} refused under prefix {prefix!r}: " + "; ".join(refused[:4])
            if len(refused) > 4:
                detail += f"; and {len(refused) - 4} more"
            line = acl_setuser([layer], prefix, cluster=cluster)
            report.add(check, "problem", f"{detail}. The {layer} layer needs: {line}")
        else:
            report.add(check, "ok", f"the user may run all the {layer} layer sends")


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
            'hosts=[{"cluster": [...]}] with StreamsChannelLayer, or with '
            "compat.pubsub (sharded Pub/Sub: Redis 7 or later)",
        )
    else:
        report.add("cluster", "problem", f"Redis Cluster in state {state!r}")


def _sentinel_masters(
    client: redis.Redis,
    report: ServerReport,
    master: Mapping[str, Any] | None,
    scope: Scope,
) -> list[ServerReport]:
    """Every master the Sentinel watches, or only the one a layer names (checked with
    the layer's own client options: password, TLS)."""
    masters: Any = client.sentinel_masters()
    if not masters:
        report.add("sentinel", "problem", "this Sentinel watches no master")
        return []
    names = ", ".join(sorted(masters))
    kwargs: dict[str, Any] = {}
    if master is not None:
        if master["name"] not in masters:
            report.add(
                "sentinel", "problem", f"this Sentinel watches {names}, not {master['name']!r}"
            )
            return []
        masters = {master["name"]: masters[master["name"]]}
        kwargs = dict(master["kwargs"])
        report.add("sentinel", "ok", f"Sentinel watching {master['name']!r}")
    else:
        report.add(
            "sentinel",
            "ok",
            f"Sentinel watching {names}: use hosts=[{{'sentinels': [...], 'master_name': ...}}]",
        )
    reports = []
    for name, state in sorted(masters.items()):
        server = redis.Redis(host=state["ip"], port=int(state["port"]), **{**kwargs, **_TIMEOUTS})
        for found in _diagnose(server, f"{state['ip']}:{state['port']}", scope=scope):
            found.address = f"{found.address} (master {name!r})"
            reports.append(found)
    return reports
