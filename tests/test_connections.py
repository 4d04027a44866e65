"""Connections: per-loop pools that never leak, shard choice, unix sockets, TLS, Sentinel."""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import datetime
import gc
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync

from streamlayer.compat.core import RedisChannelLayer
from streamlayer.connections import consistent_hash
from streamlayer.testing import RedisServer, SentinelSetup, free_port
from streamlayer.tools.demo import CountingConnection

from .layers import LAYERS, PUBSUB, layer_class

#: The layers that store what they accepted (what a Pub/Sub subscriber misses is gone).
STORED = [path for path in LAYERS if path != PUBSUB]


def incumbent_hash(value: str, ring_size: int) -> int:
    """channels_redis' ring, restated here as the oracle."""
    if ring_size == 1:
        return 0
    bigval = binascii.crc32(value.encode("utf8")) & 0xFFF
    return int(bigval / (4096 / float(ring_size)))


def test_consistent_hash_matches_channels_redis() -> None:
    from channels_redis.utils import _consistent_hash

    names = [f"group-{i}" for i in range(500)] + ["specific.abc!", "http.request", "ü-name"]
    for ring in (1, 2, 3, 5, 8):
        for name in names:
            assert consistent_hash(name, ring) == _consistent_hash(name, ring)
            assert consistent_hash(name, ring) == incumbent_hash(name, ring)
    assert {consistent_hash(n, 3) for n in names} == {0, 1, 2}


async def wait_for_clients(server: RedisServer, expected: int) -> int:
    """Poll (bounded) until the server counts ``expected`` clients; return the last count."""
    count = -1
    for _ in range(200):
        count = await asyncio.to_thread(server.connected_clients)
        if count == expected:
            return count
        await asyncio.sleep(0.01)
    return count


async def test_sync_callers_share_connections_and_close_releases_them(
    fresh_server: RedisServer,
) -> None:
    """async_to_sync runs each call on a loop made for it; the layer runs the call on
    its synchronous pool instead (streamlayer.sync), so three threads' 183 calls open
    at most one connection per thread, no loop keeps a pool, and close() lets go."""
    layer = RedisChannelLayer(hosts=[fresh_server.url], prefix="loops")
    baseline = await asyncio.to_thread(fresh_server.connected_clients)  # the checker itself

    def sync_caller() -> None:
        for i in range(30):
            async_to_sync(layer.send)("loops", {"type": "n", "i": i})
            async_to_sync(layer.group_add)("g", "loops")
        async_to_sync(layer.group_send)("g", {"type": "g"})

    threads = [threading.Thread(target=sync_caller) for _ in range(3)]
    for thread in threads:
        thread.start()
    await asyncio.to_thread(lambda: [t.join() for t in threads])
    assert baseline < await asyncio.to_thread(fresh_server.connected_clients) <= baseline + 3
    assert layer.connections.open_loops() == 0
    received = [await asyncio.wait_for(layer.receive("loops"), 5) for _ in range(93)]
    assert len(received) == 93
    await layer.flush()
    await layer.close()
    assert await wait_for_clients(fresh_server, baseline) == baseline


async def test_close_releases_connections(fresh_server: RedisServer) -> None:
    layer = RedisChannelLayer(hosts=[fresh_server.url], prefix="close")
    baseline = await asyncio.to_thread(fresh_server.connected_clients)
    channel = await layer.new_channel()
    waiting = asyncio.ensure_future(layer.receive(channel))
    await layer.send("close", {"type": "x"})
    await asyncio.sleep(0.05)  # let the reader start its blocking read
    await layer.close()
    with pytest.raises(Exception, match="closed"):
        await asyncio.wait_for(waiting, 5)
    assert await wait_for_clients(fresh_server, baseline) == baseline
    assert [t for t in asyncio.all_tasks() if "streamlayer" in t.get_name()] == []


async def test_unix_socket(redis_server: RedisServer, prefix: str) -> None:
    layer = RedisChannelLayer(hosts=[f"unix://{redis_server.unix_socket}"], prefix=prefix)
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "over-a-socket"})
    assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "over-a-socket"}
    with redis_server.client() as client:
        unix_clients = [c for c in client.client_list() if "U" in c["flags"]]
    assert unix_clients, "no client connected over the unix socket"
    await layer.flush()
    await layer.close()


async def test_sharding_puts_keys_where_channels_redis_would(
    shard_servers: list[RedisServer], prefix: str
) -> None:
    hosts = [("127.0.0.1", s.port) for s in shard_servers]
    layer = RedisChannelLayer(hosts=hosts, prefix=prefix)
    groups = [f"room-{i}" for i in range(12)]
    for group in groups:
        await layer.group_add(group, "member")
    for group in groups:
        home = shard_servers[incumbent_hash(group, 3)]
        with home.client() as client:
            assert client.exists(f"{prefix}:group:{group}"), group
    await layer.flush()
    for server in shard_servers:
        with server.client() as client:
            assert client.keys(f"{prefix}*") == []
    await layer.close()


# --- TLS ---------------------------------------------------------------------------


def _write_certificates(directory: Path) -> tuple[Path, Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, cert_path


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[RedisServer, int, Path]]:
    cert, key, ca = _write_certificates(tmp_path)
    tls_port = free_port()
    server = RedisServer(
        extra_args=(
            "--tls-port",
            str(tls_port),
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(ca),
            "--tls-auth-clients",
            "no",
        )
    )
    try:
        server.start()
    except RuntimeError as exc:
        server.cleanup()
        pytest.skip(f"this redis-server was built without TLS: {str(exc)[-200:]}")
    yield server, tls_port, ca
    server.cleanup()


@pytest.mark.parametrize("verify", ["ca-file", "no-verify"])
async def test_tls(tls_server: tuple[RedisServer, int, Path], verify: str, prefix: str) -> None:
    _server, tls_port, ca = tls_server
    extra = {"ssl_ca_certs": str(ca)} if verify == "ca-file" else {"ssl_cert_reqs": None}
    layer = RedisChannelLayer(
        hosts=[{"address": f"rediss://127.0.0.1:{tls_port}", **extra}], prefix=prefix
    )
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "secret"})
    assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "secret"}
    await layer.flush()
    await layer.close()


# --- Sentinel ----------------------------------------------------------------------


@pytest.mark.sentinel
async def test_sentinel_failover_is_survived(prefix: str) -> None:
    """Kill nothing by hand: ask the sentinel to fail over and keep using the layer."""
    setup = SentinelSetup().start()
    try:
        layer = RedisChannelLayer(hosts=[setup.host_entry()], prefix=prefix, retry_timeout=30)
        channel = await layer.new_channel()
        await layer.group_add("failover", channel)
        await layer.send(channel, {"type": "before"})
        assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "before"}
        old_port = setup.current_master_port()
        new_port = await asyncio.to_thread(setup.failover)
        assert new_port != old_port
        await layer.group_send("failover", {"type": "after"})
        assert await asyncio.wait_for(layer.receive(channel), 30) == {"type": "after"}
        await layer.send("failover.normal", {"type": "normal-after"})
        received = await asyncio.wait_for(layer.receive("failover.normal"), 30)
        assert received == {"type": "normal-after"}
        await layer.flush()
        await layer.close()
    finally:
        setup.cleanup()


async def test_a_loop_ending_mid_read_leaks_nothing(fresh_server: RedisServer) -> None:
    """A sync caller gives up on a receive: its loop ends while the inbox reader and a
    normal-channel fetch are blocked in Redis. Nothing may leak, nothing may be lost."""
    layer = RedisChannelLayer(hosts=[fresh_server.url], prefix="midread")
    baseline = await asyncio.to_thread(fresh_server.connected_clients)

    async def give_up(channel: str) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(layer.receive(channel), 0.2)

    def sync_caller() -> str:
        channel = async_to_sync(layer.new_channel)()
        async_to_sync(give_up)(channel)
        async_to_sync(give_up)("midread.normal")
        return channel

    channel = await asyncio.to_thread(sync_caller)
    gc.collect()  # an unclosed socket would warn here, and warnings are errors
    assert await wait_for_clients(fresh_server, baseline) == baseline
    await layer.send(channel, {"type": "later"})
    await layer.send("midread.normal", {"type": "later"})
    assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "later"}
    assert await asyncio.wait_for(layer.receive("midread.normal"), 5) == {"type": "later"}
    await layer.flush()
    await layer.close()


async def test_layer_recovers_if_its_connection_guard_is_cancelled(
    redis_server: RedisServer, prefix: str
) -> None:
    """Some code cancels every task of a live loop; the layer must not be bricked."""
    layer = RedisChannelLayer(hosts=[redis_server.url], prefix=prefix)
    await layer.send("guarded", {"type": "one"})
    guards = [t for t in asyncio.all_tasks() if t.get_name() == "streamlayer-connection-guard"]
    assert guards
    for guard in guards:
        guard.cancel()
    await asyncio.gather(*guards, return_exceptions=True)
    await layer.send("guarded", {"type": "two"})
    assert (await asyncio.wait_for(layer.receive("guarded"), 5))["type"] == "one"
    assert (await asyncio.wait_for(layer.receive("guarded"), 5))["type"] == "two"
    await layer.flush()
    await layer.close()


async def test_idle_receive_just_waits(fresh_server: RedisServer, layer_path: str) -> None:
    """Blocking reads stay inside the socket timeout: a quiet channel is not an error."""
    layer = layer_class(layer_path)(hosts=[{"address": fresh_server.url, "socket_timeout": 0.5}])
    specific = await layer.new_channel()
    normal = asyncio.ensure_future(layer.receive("quiet"))
    local = asyncio.ensure_future(layer.receive(specific))
    await asyncio.sleep(2.0)  # four socket timeouts of silence: time itself is under test
    assert not normal.done() and not local.done()
    await layer.send("quiet", {"type": "q"})
    await layer.send(specific, {"type": "q"})
    assert await asyncio.wait_for(normal, 5) == {"type": "q"}
    assert await asyncio.wait_for(local, 5) == {"type": "q"}
    assert layer.stats.retries == 0
    await layer.flush()
    await layer.close()


async def test_a_connection_class_of_the_users_sees_every_write(
    redis_server: RedisServer, layer_path: str
) -> None:
    """The layers' lean writes replace redis-py's own write only: a
    ``connection_class`` in hosts that writes its own way (to count or trace) keeps
    every write going through it."""
    host = {"address": redis_server.url, "connection_class": CountingConnection}
    layer = layer_class(layer_path)(hosts=[host], prefix=f"counting{abs(hash(layer_path))}")
    try:
        channel = await layer.new_channel()
        await layer.send(channel, {"type": "warm-up"})
        before = CountingConnection.writes
        for _ in range(10):
            await layer.send(channel, {"type": "m"})
        assert CountingConnection.writes - before == 10
    finally:
        await layer.flush()
        await layer.close()


@pytest.mark.parametrize("hiredis", [True, False])
def test_commands_are_packed_as_redis_py_packs_them(
    hiredis: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lean connections pack with hiredis in one call; what hiredis cannot take
    as it is goes to redis-py's packer, with redis-py's error for a bad argument.
    Without hiredis (an optional extra) redis-py's packer does it all."""
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError

    from streamlayer import redispy
    from streamlayer.redispy import lean_connection_class

    assert redispy._hiredis_pack is not None, "the test extra installs hiredis"
    if not hiredis:
        monkeypatch.setattr(redispy, "_hiredis_pack", None)

    lean, plain = lean_connection_class(Connection)(), Connection()
    for args in [
        ("EVALSHA", "abc", 2, "k1", b"k2", 10, 2.5, "é", b"\xff"),
        ("CLIENT LIST",),  # a multi-word name, split by redis-py
        ("SET", "k", memoryview(b"v")),
    ]:
        assert b"".join(lean.pack_command(*args)) == b"".join(plain.pack_command(*args))
    for bad in (None, True, [1]):
        with pytest.raises(DataError):
            lean.pack_command("SET", "k", bad)
        with pytest.raises(DataError):
            lean.pack_commands([("PING",), ("SET", "k", bad)])
    several = [("PING",), ("CLIENT LIST",), ("SET", "k", "é"), ("GET", b"k")]
    for commands in (several, several[2:], [("SET", "k", memoryview(b"v")), ("GET", "k")]):
        assert b"".join(lean.pack_commands(commands)) == b"".join(plain.pack_commands(commands))
    latin = lean_connection_class(Connection)(encoding="latin-1")
    assert (
        b"".join(latin.pack_command("SET", "k", "é"))
        == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n\xe9\r\n"
    )


@pytest.mark.faults
@pytest.mark.parametrize("size", [200, 8 * 1024 * 1024])
@pytest.mark.parametrize("stored_path", STORED)
async def test_a_stopped_server_fails_sends_within_the_socket_timeout(
    fresh_server: RedisServer, stored_path: str, size: int
) -> None:
    """SIGSTOP: the server reads nothing and answers nothing, the sockets stay open. A
    small write goes out without a timer of its own (it cannot wait); a large one
    fills the socket and waits under ``socket_timeout``; either way the reply never
    comes, and the send gives up after ``retry_timeout``, then works once the server
    is back. (The stored layers: on Pub/Sub what is published while the subscriber
    reconnects is lost by design.)"""
    import signal
    import time

    from streamlayer import RedisUnavailable

    host = {"address": fresh_server.url, "socket_timeout": 0.5}
    layer = layer_class(stored_path)(hosts=[host], prefix="stopped", retry_timeout=1.5)
    channel = await layer.new_channel()
    got: list[str] = []

    async def receiver() -> None:
        for _ in range(100):  # bounded
            try:
                got.append((await layer.receive(channel))["type"])
            except RedisUnavailable:  # the reader gave up on the stopped server: receive again
                continue
            if got[-1] == "after":
                return

    receiving = asyncio.ensure_future(receiver())
    await asyncio.sleep(0.2)  # the receive waits (Pub/Sub: subscribed)
    await layer.send(channel, {"type": "warm-up"})
    assert fresh_server.process is not None
    fresh_server.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(RedisUnavailable):
            await asyncio.wait_for(layer.send(channel, {"type": "m", "body": "x" * size}), 30)
        assert time.monotonic() - started < 10, "the send waited past its bounds"
    finally:
        fresh_server.process.send_signal(signal.SIGCONT)
    for _ in range(100):  # the layer finds the server again (bounded)
        try:
            await layer.send(channel, {"type": "after"})
            break
        except RedisUnavailable:
            continue
    await asyncio.wait_for(receiving, 30)
    # The refused send's bytes may have reached the server's socket before it stopped:
    # its fate is unknown to the sender, so it may or may not have landed.
    assert got in (["warm-up", "after"], ["warm-up", "m", "after"])
    await layer.flush()
    await layer.close()


@pytest.mark.parametrize(
    "path", ["streamlayer.StreamsChannelLayer", "streamlayer.compat.core.RedisChannelLayer"]
)
async def test_an_idle_receive_under_a_short_socket_timeout_sees_no_reconnect(
    redis_server: RedisServer, prefix: str, path: str
) -> None:
    """Redis ends a blocking read's wait at its next cron tick, up to 100 ms late:
    with ``socket_timeout`` 0.2 s a wait of half of it (0.1 s) timed the socket out
    now and then, and an idle receive reported a reconnect about every second (on
    compat.core "not recovered"). The waits now stay that far inside the timeout."""
    host = {"address": redis_server.url, "socket_timeout": 0.2}
    layer = layer_class(path)(hosts=[host], prefix=prefix)
    try:
        channel = await layer.new_channel()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(layer.receive(channel), 2.5)
        assert layer.stats()["retries"] == 0
        assert layer.stats()["reconnects"] == 0
    finally:
        await layer.close()


@pytest.mark.parametrize("protocol", [2, 3])
async def test_exchange_reads_each_reply_under_its_own_socket_timeout(
    redis_server: RedisServer, protocol: int
) -> None:
    """exchange() reads a write's replies straight from redis-py's parser under one
    timer, moved on after each reply: every reply may take up to ``socket_timeout``
    (as redis-py gives each), an error reply comes back as its exception in its
    place, and the connection stays usable. Both protocols (redis-py 8 speaks RESP3
    by default; redis-py 5 RESP2)."""
    from redis import asyncio as aioredis
    from redis.exceptions import ResponseError

    from streamlayer.redispy import exchange, lean_connection_class

    # Redis ends a blocking read's wait at its next cron tick: up to 1/hz (100 ms)
    # late. Each 0.3 s read below takes 0.3-0.4 s, under the 0.5 s timeout.
    pool = aioredis.ConnectionPool.from_url(
        redis_server.url, protocol=protocol, socket_timeout=0.5
    )
    connection = lean_connection_class(pool.connection_class)(**pool.connection_kwargs)
    await connection.connect()
    key = f"exchange-{protocol}"
    try:
        # Two blocking reads of 0.3 s each: 0.6 s in all, more than one socket timeout.
        replies = await exchange(
            connection,
            [
                ("SET", key, "text"),
                ("XREAD", "BLOCK", 300, "STREAMS", f"{key}-s", "$"),
                ("INCR", key),  # not an integer: an error reply
                ("XREAD", "BLOCK", 300, "STREAMS", f"{key}-s", "$"),
                ("GET", key),
            ],
        )
        assert replies[0] in (True, b"OK")
        assert replies[1] is None and replies[3] is None
        assert isinstance(replies[2], ResponseError)
        assert replies[4] == b"text"
        assert connection.is_connected
        # Idle past the timeout (the time itself is under test): the timer finds no
        # read under way and is dropped, and the next read arms one afresh.
        await asyncio.sleep(0.7)
        wait = ("XREAD", "BLOCK", 300, "STREAMS", f"{key}-s", "$")
        assert await exchange(connection, [wait]) == [None]
        assert await exchange(connection, [("DEL", key)]) == [1]
    finally:
        await connection.disconnect()
        await pool.aclose()


@pytest.mark.faults
@pytest.mark.parametrize("protocol", [2, 3])
async def test_exchange_gives_up_on_a_silent_or_closed_server(
    fresh_server: RedisServer, protocol: int
) -> None:
    """A stopped server (SIGSTOP: the socket stays open, nothing answers): exchange()
    raises redis-py's TimeoutError after ``socket_timeout`` and closes the
    connection, which may hold the late reply. A connection the server closed
    (CLIENT KILL) raises redis-py's ConnectionError. Both are what the retry policy
    takes as transient."""
    import signal
    import time

    from redis import asyncio as aioredis
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from streamlayer.redispy import exchange

    pool = aioredis.ConnectionPool.from_url(
        fresh_server.url, protocol=protocol, socket_timeout=0.3
    )
    connection = pool.make_connection()
    await connection.connect()
    admin = aioredis.Redis.from_url(fresh_server.url)
    assert fresh_server.process is not None
    try:
        # A read first, then idle past the timeout: the stop below meets a timer armed
        # afresh, not the first read's.
        assert await exchange(connection, [("PING",)]) in ([True], [b"PONG"])
        await asyncio.sleep(0.5)
        fresh_server.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(RedisTimeoutError, match="Timeout reading"):
                await exchange(connection, [("PING",), ("PING",)])
            assert 0.25 < time.monotonic() - started < 3
            assert not connection.is_connected
        finally:
            fresh_server.process.send_signal(signal.SIGCONT)
        await connection.connect()
        reading = asyncio.ensure_future(
            exchange(connection, [("XREAD", "BLOCK", 100, "STREAMS", "none", "$")] * 3)
        )
        # Let the reads get under way (either way the kill must fail them).
        await asyncio.sleep(0.02)
        assert await admin.client_kill_filter(_type=None, skipme=True) >= 1
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(reading, 5)
        assert not connection.is_connected
    finally:
        await connection.disconnect()
        await admin.aclose()
        await pool.aclose()
