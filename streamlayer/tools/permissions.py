"""What each layer needs of a Redis ACL user, and a check of it that changes nothing.

``COMMAND INFO`` answers whether a command exists, not whether the connected user
may run it, and ``ACL DRYRUN`` needs the ``ACL`` command, which an application's
user rarely has (nor Redis 6.2). So the check asks Redis itself with the user's
own rights: every command a layer sends, on keys (and Pub/Sub channels) named as
the layer names them under its prefix, is queued in a ``MULTI`` that is then
discarded. Redis checks a command's ACL (command, keys, channels) when it
queues it, answering ``QUEUED`` or ``NOPERM``, and runs nothing of a discarded
transaction. Scripts' inner commands are probed one by one, since Redis checks
them when the script runs them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis

from ..backends import BACKENDS
from ..keys import (
    classic_alive_key,
    classic_backup_key,
    classic_channel_key,
    classic_group_key,
    stream_channel_key,
    stream_delivered_key,
    stream_group_digest_key,
    stream_group_key,
    stream_history_key,
    stream_history_meta_key,
    stream_inbox_key,
    stream_inbox_state_key,
)
from ..redispy import lend_sync_connection

__all__ = ["LAYERS", "CannotCheck", "acl_setuser", "missing_permissions", "probes"]

#: The layers by the short names the operator tools use, and their BACKEND paths.
LAYERS = {backend.name: backend.path for backend in BACKENDS}

_SHA = "0" * 40
_PROBE = "doctor"


def _streams(prefix: str) -> list[tuple[str, ...]]:
    inbox, state = stream_inbox_key(prefix, _PROBE), stream_inbox_state_key(prefix, _PROBE)
    chan, done = stream_channel_key(prefix, _PROBE), stream_delivered_key(prefix, _PROBE)
    group = stream_group_key(prefix, _PROBE)
    digest = stream_group_digest_key(prefix, _PROBE)
    history = stream_history_key(prefix, _PROBE)
    meta = stream_history_meta_key(prefix, _PROBE)
    return [
        ("EVALSHA", _SHA, "1", inbox),
        ("SCRIPT", "LOAD", "return 1"),
        ("XREAD", "COUNT", "1", "STREAMS", inbox, "0"),
        ("XTRIM", inbox, "MINID", "0"),  # the reader's bare trim
        ("XREADGROUP", "GROUP", "g", "c", "COUNT", "1", "STREAMS", chan, ">"),
        ("XAUTOCLAIM", chan, "g", "c", "0", "0"),
        ("XINFO", "CONSUMERS", chan, "g"),
        # Called by the scripts:
        ("XADD", inbox, "*", "d", "x"),
        ("XADD", history, "*", "d", "x"),
        ("XTRIM", chan, "MINID", "0"),
        ("XLEN", inbox),
        ("XRANGE", history, "-", "+"),
        ("XREVRANGE", chan, "+", "-"),
        ("XDEL", chan, "0-1"),
        ("XACK", chan, "g", "0-1"),
        ("XPENDING", chan, "g"),
        ("XGROUP", "CREATE", chan, "g", "0", "MKSTREAM"),
        ("XGROUP", "DELCONSUMER", chan, "g", "c"),
        ("HGET", state, "@"),
        ("HMGET", state, "x"),
        ("HSET", state, "@", "0-0"),
        ("HSET", meta, "epoch", "x"),
        ("HDEL", state, "x"),
        ("ZADD", group, "1", "x"),
        ("ZADD", done, "1", "x"),
        ("ZREM", group, "x"),
        ("ZCARD", group),
        ("PTTL", group),
        ("GET", digest),
        ("SET", digest, "x"),
        ("DEL", digest),
        ("ZRANGE", group, "0", "-1"),
        ("ZRANGEBYSCORE", group, "0", "1"),
        ("ZREMRANGEBYSCORE", done, "0", "1"),
        ("ZSCORE", done, "x"),
        ("PEXPIRE", inbox, "1000"),
        ("EXPIRE", group, "1"),
        ("SCAN", "0"),
        ("UNLINK", inbox),
    ]


def _classic(prefix: str) -> list[tuple[str, ...]]:
    inbox = classic_channel_key(prefix, f"specific.{_PROBE}!")
    chan = classic_channel_key(prefix, _PROBE)
    group = classic_group_key(prefix, _PROBE)
    return [
        ("EVALSHA", _SHA, "1", chan),
        ("SCRIPT", "LOAD", "return 1"),
        ("ZPOPMIN", inbox, "1"),
        ("BZPOPMIN", chan, "1"),
        ("ZADD", chan, "1", "x"),
        ("ZADD", group, "1", "x"),
        ("ZREM", group, "x"),
        ("ZRANGE", classic_backup_key(chan), "0", "-1"),
        ("ZRANGEBYSCORE", group, "0", "1"),
        ("ZREMRANGEBYSCORE", chan, "0", "1"),
        ("ZCOUNT", chan, "0", "1"),
        ("ZCARD", chan),
        ("DEL", classic_backup_key(chan)),
        ("EXPIRE", chan, "1"),
        ("SET", classic_alive_key(prefix, f"specific.{_PROBE}!"), "1", "EX", "1", "GET"),
        ("SCAN", "0"),
        ("UNLINK", chan),
    ]


def _pubsub(prefix: str, cluster: bool = False) -> list[tuple[str, ...]]:
    group = f"{prefix}__group__{_PROBE}"
    channel = f"specific.{prefix}!{_PROBE}"
    if cluster:  # sharded Pub/Sub, one slot per channel (so one probe each)
        return [
            ("SPUBLISH", group, "x"),
            ("SPUBLISH", channel, "x"),
            ("SSUBSCRIBE", group),
            ("SUNSUBSCRIBE", group),
            ("PING",),
        ]
    return [
        ("PUBLISH", group, "x"),
        ("PUBLISH", channel, "x"),
        ("SUBSCRIBE", group, channel),
        ("UNSUBSCRIBE", group),
        ("PING",),
    ]


_PROBES = {"Streams": _streams, "compat.core": _classic, "compat.pubsub": _pubsub}


def probes(layer: str, prefix: str, cluster: bool = False) -> list[tuple[str, ...]]:
    """Every command ``layer`` sends, on keys named as it names them under ``prefix``
    (on a Redis Cluster, the Pub/Sub layer's are sharded Pub/Sub's)."""
    if layer == "compat.pubsub":
        return _pubsub(prefix, cluster)
    return _PROBES[layer](prefix)


class CannotCheck(RuntimeError):
    """The user may run neither MULTI nor ACL DRYRUN: its rights cannot be asked."""


def missing_permissions(
    client: redis.Redis, layer: str, prefix: str, cluster: bool = False
) -> list[str]:
    """What the connected user may not do of what ``layer`` needs: one line per refused
    command (naming its key or channel), empty when nothing is missing. Raises
    CannotCheck when the user may not queue a transaction nor run ACL DRYRUN."""
    try:
        return _queued(client, probes(layer, prefix, cluster))
    except redis.exceptions.NoPermissionError:
        pass  # no MULTI for this user: ACL DRYRUN, if it may run that
    try:
        user = client.execute_command("ACL", "WHOAMI")  # type: ignore[no-untyped-call]
        user = user.decode() if isinstance(user, bytes) else str(user)
        refused = []
        for probe in probes(layer, prefix, cluster):
            answer = client.execute_command("ACL", "DRYRUN", user, *probe)  # type: ignore[no-untyped-call]
            answer = answer.decode() if isinstance(answer, bytes) else str(answer)
            if answer != "OK":
                refused.append(f"{' '.join(probe[:2])}...: {answer}")
        return refused
    except redis.exceptions.ResponseError as exc:
        raise CannotCheck(
            f"this user may run neither MULTI nor ACL DRYRUN ({exc}): grant it +multi "
            "+discard (they run nothing the other commands do not) to let doctor ask"
        ) from exc


def _queued(client: redis.Redis, lines: list[tuple[str, ...]]) -> list[str]:
    """Queue every command line in a MULTI, then DISCARD: the ones Redis refused."""
    refused: list[str] = []
    connection: Any = lend_sync_connection(client.connection_pool, "MULTI")
    try:
        connection.send_command("MULTI")
        connection.read_response()
        for probe in lines:
            connection.send_command(*probe)
            try:
                connection.read_response()
            except redis.exceptions.NoPermissionError as exc:
                refused.append(f"{' '.join(probe[:2])}...: {exc}")
            except redis.exceptions.ResponseError:
                pass  # not a permission (a renamed command, a replica, another slot)
        connection.send_command("DISCARD")
        connection.read_response()
    finally:
        client.connection_pool.release(connection)
    return refused


def acl_setuser(
    layers: Iterable[str], prefix: str, user: str = "app", cluster: bool = False
) -> str:
    """The ``ACL SETUSER`` line that gives ``user`` exactly what ``layers`` need under
    ``prefix`` (set its password with ``>...`` in place of ``>PASSWORD``)."""
    layers = tuple(layers)
    commands: set[str] = set()
    for layer in layers:
        for probe in probes(layer, prefix, cluster):
            name = probe[0].lower()
            sub = probe[1].lower() if name in ("script", "xinfo", "xgroup") else None
            commands.add(f"+{name}|{sub}" if sub else f"+{name}")
    # MULTI and DISCARD run nothing the other commands do not: doctor queues the
    # layers' commands in a discarded transaction to ask Redis what the user may do.
    commands |= {"+multi", "+discard"}
    keys = f"~{prefix}*"
    channels = "&*" if "compat.pubsub" in layers else "resetchannels"
    return f"ACL SETUSER {user} on >PASSWORD resetkeys {keys} {channels} -@all " + " ".join(
        sorted(commands)
    )
