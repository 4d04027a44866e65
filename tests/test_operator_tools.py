"""``python -m streamlayer doctor`` and ``inspect``, run as an operator runs them,
against real servers: a healthy one, one with a command renamed away, a replica,
a Sentinel, a Redis Cluster, and nothing listening at all."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamlayer import StreamsChannelLayer
from streamlayer.keys import stream_channel_key
from streamlayer.testing import ClusterSetup, RedisServer, SentinelSetup, free_port
from streamlayer.tools.doctor import ServerReport, _check_version


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "streamlayer", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def doctor(*urls: str) -> tuple[int, list[dict[str, Any]]]:
    hosts = [arg for url in urls for arg in ("--hosts", url)]
    done = run_cli("doctor", *hosts, "--json")
    return done.returncode, json.loads(done.stdout)


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {f["check"]: f["status"] for f in report["findings"]}


def details(report: dict[str, Any]) -> dict[str, str]:
    return {f["check"]: f["detail"] for f in report["findings"]}


@pytest.fixture
def renamed_server() -> Iterator[RedisServer]:
    server = RedisServer(extra_args=("--rename-command", "XAUTOCLAIM", "XAUTOCLAIM_OFF")).start()
    yield server
    server.cleanup()


@pytest.fixture
def replica(fresh_server: RedisServer) -> Iterator[RedisServer]:
    server = RedisServer(extra_args=("--replicaof", "127.0.0.1", str(fresh_server.port))).start()
    yield server
    server.cleanup()


def test_doctor_passes_a_healthy_server_and_warns_of_no_persistence(
    fresh_server: RedisServer,
) -> None:
    code, reports = doctor(fresh_server.url)
    assert code == 0
    [report] = reports
    found = statuses(report)
    assert found["version"] == found["commands"] == found["scripting"] == "ok"
    assert found["role"] == "ok" and report["role"] == "master"
    assert found["persistence"] == "warn"  # the test servers run without AOF
    assert "median of 20 PINGs" in details(report)["latency"]
    assert report["problems"] == 0


def test_doctor_finds_a_command_renamed_away(renamed_server: RedisServer) -> None:
    code, [report] = doctor(renamed_server.url)
    assert code == 1
    assert statuses(report)["commands"] == "problem"
    assert "xautoclaim" in details(report)["commands"]


def test_doctor_refuses_a_replica(replica: RedisServer) -> None:
    code, [report] = doctor(replica.url)
    assert code == 1
    assert statuses(report)["role"] == "problem"
    assert "replica" in details(report)["role"]


def test_doctor_reports_an_unreachable_server() -> None:
    code, [report] = doctor(f"redis://127.0.0.1:{free_port()}")
    assert code == 1
    assert statuses(report) == {"connect": "problem"}


def test_doctor_follows_a_sentinel_to_its_master(sentinel_setup: SentinelSetup) -> None:
    sentinel = sentinel_setup.sentinel
    code, reports = doctor(sentinel.url)
    assert code == 0
    assert reports[0]["role"] == "sentinel"
    assert statuses(reports[0])["sentinel"] == "ok"
    master = reports[1]
    assert master["role"] == "master"
    assert str(sentinel_setup.current_master_port()) in master["address"]
    assert statuses(master)["version"] == "ok"


def test_doctor_recognises_a_cluster(cluster_setup: ClusterSetup) -> None:
    node = cluster_setup.live()[0]
    code, [report] = doctor(node.url)
    assert code == 0
    assert statuses(report)["cluster"] == "ok"
    assert '"cluster"' in details(report)["cluster"]


def test_doctor_asks_a_cluster_node_for_sharded_pubsub(cluster_setup: ClusterSetup) -> None:
    """On a cluster node the Pub/Sub layer's commands are sharded Pub/Sub's: a user with
    only the plain ones is told what it lacks, and the line that grants it."""
    node = cluster_setup.live()[0]
    grants = ["+multi", "+discard", "+ping", "+publish", "+subscribe", "+unsubscribe"]
    with node.client() as client:
        client.execute_command(
            "ACL", "SETUSER", "plainps", "on", ">pw", "resetkeys", "~asgi*", "&*", "-@all",
            "+info", "+command", "+cluster|info", "+eval", "+latency", "+config|get", *grants,
        )  # fmt: skip
    try:
        code, [report] = doctor(f"redis://plainps:pw@127.0.0.1:{node.port}")
        said = details(report)["permissions (compat.pubsub)"]
        with node.client() as client:
            major = int(str(client.info("server")["redis_version"]).split(".")[0])
        if major < 7:  # the server matrix's Redis 6.2: no sharded Pub/Sub at all
            assert statuses(report)["permissions (compat.pubsub)"] == "warn"
            assert "needs sharded Pub/Sub (Redis 7 or later)" in said
            return
        assert code == 1 and statuses(report)["permissions (compat.pubsub)"] == "problem"
        assert "SPUBLISH" in said and "SSUBSCRIBE" in said
        assert "+spublish +ssubscribe +sunsubscribe" in said
    finally:
        with node.client() as client:
            client.execute_command("ACL", "DELUSER", "plainps")


def doctor_settings(
    tmp_path: Path, layers: dict[str, Any], *extra: str
) -> tuple[int, list[dict[str, Any]], str]:
    """``doctor --settings`` on a Django settings module holding ``layers``, run
    from the project's folder as an operator would."""
    (tmp_path / "ops_settings.py").write_text(
        f"SECRET_KEY = 'x'\nCHANNEL_LAYERS = {layers!r}\n{''.join(extra)}"
    )
    command = [sys.executable, "-m", "streamlayer", "doctor", "--settings", "ops_settings"]
    done = subprocess.run(
        [*command, "--json"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    return done.returncode, json.loads(done.stdout or "[]"), done.stderr


def test_doctor_checks_a_django_projects_layers_and_their_hosts(
    fresh_server: RedisServer, tmp_path: Path
) -> None:
    streams = {
        "BACKEND": "streamlayer.StreamsChannelLayer",
        "CONFIG": {"hosts": [("127.0.0.1", fresh_server.port)], "expiry": 5},
    }
    classic = {
        "BACKEND": "streamlayer.compat.core.RedisChannelLayer",
        "CONFIG": {"hosts": [{"address": fresh_server.url}], "symmetric_encryption_keys": ["k"]},
    }
    other = {"BACKEND": "channels.layers.InMemoryChannelLayer"}
    layers = {"default": streams, "jobs": classic, "memory": other}
    code, reports, stderr = doctor_settings(tmp_path, layers)
    assert code == 0, stderr  # warnings only
    addresses = [r["address"] for r in reports]
    assert addresses == [  # the server both entries name is checked once
        "CHANNEL_LAYERS['default']",
        f"127.0.0.1:{fresh_server.port}",
        "CHANNEL_LAYERS['jobs']",
    ]
    default, server, jobs = reports
    assert statuses(default) == {"streamlayer.W002": "warn", "config": "ok"}
    assert "expiry is 5 s" in details(default)["streamlayer.W002"]
    assert statuses(jobs) == {"streamlayer.W001": "warn", "config": "ok"}
    assert statuses(server)["version"] == "ok" and server["role"] == "master"


def test_doctor_refuses_a_misspelt_key_and_an_unreachable_host(
    tmp_path: Path,
) -> None:
    port = free_port()
    layers = {
        "default": {
            "BACKEND": "streamlayer.StreamsChannelLayer",
            "CONFIG": {"hosts": [f"redis://127.0.0.1:{port}"], "expiy": 60},
        },
        "other": {
            "BACKEND": "streamlayer.StreamsChannelLayer",
            "CONFIG": {"hosts": [f"redis://127.0.0.1:{port}"]},
        },
    }
    code, reports, _ = doctor_settings(tmp_path, layers)
    assert code == 1
    default, other, server = reports
    assert statuses(default) == {"streamlayer.E001": "problem"}
    assert "expiry" in details(default)["streamlayer.E001"]  # the key it probably meant
    assert statuses(other) == {"config": "ok"}
    assert server["address"] == f"127.0.0.1:{port}"
    assert statuses(server) == {"connect": "problem"}


def test_doctor_follows_a_layers_sentinel_to_its_named_master(
    sentinel_setup: SentinelSetup, tmp_path: Path
) -> None:
    sentinel = ("127.0.0.1", sentinel_setup.sentinel.port)
    entry = {"sentinels": [sentinel], "master_name": sentinel_setup.master_name}
    layer = {"BACKEND": "streamlayer.StreamsChannelLayer", "CONFIG": {"hosts": [entry]}}
    code, reports, stderr = doctor_settings(tmp_path, {"default": layer})
    assert code == 0, stderr
    config, found_sentinel, master = reports
    assert statuses(config) == {"config": "ok"}
    assert found_sentinel["role"] == "sentinel"
    assert master["role"] == "master"
    assert str(sentinel_setup.current_master_port()) in master["address"]
    wrong = {**layer, "CONFIG": {"hosts": [{**entry, "master_name": "nope"}]}}
    code, reports, _ = doctor_settings(tmp_path, {"default": wrong})
    assert code == 1
    assert "not 'nope'" in details(reports[1])["sentinel"]


def test_doctor_says_when_it_cannot_read_the_settings(tmp_path: Path) -> None:
    done = run_cli("doctor")
    assert done.returncode == 2 and "--hosts URL or --settings" in done.stderr
    command = [sys.executable, "-m", "streamlayer", "doctor", "--settings", "no_such_settings"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2
    assert "cannot read the Django settings" in done.stderr


@pytest.mark.parametrize(
    ("info", "status"),
    [
        ({"redis_version": "6.0.16"}, "problem"),
        ({"redis_version": "6.2.14"}, "ok"),
        ({"redis_version": "8.2.1"}, "ok"),
        ({"redis_version": "7.2.4", "server_name": "valkey", "valkey_version": "8.1.1"}, "ok"),
    ],
)
def test_version_rule(info: dict[str, Any], status: str) -> None:
    report = ServerReport("here")
    _check_version(info, report)
    assert report.findings[0].status == status
    if info.get("server_name") == "valkey":
        assert "Valkey 8.1.1" in report.findings[0].detail


async def populate(hosts: list[Any], prefix: str) -> StreamsChannelLayer:
    """An inbox with a backlog of 4, a normal channel of 2 entries (after one was
    received), a group of 2 with a history of 1."""
    layer = StreamsChannelLayer(hosts=hosts, prefix=prefix, group_history=10)
    mine = await layer.new_channel()
    for i in range(3):
        await layer.send(mine, {"type": "n", "i": i})
    for _ in range(3):
        await layer.send("jobs", {"type": "job"})
    await layer.receive("jobs")  # joins the channel's consumer group, takes one job
    await layer.group_add("room", mine)
    await layer.group_add("room", "lobby")
    await layer.group_send("room", {"type": "hello"})
    return layer


async def test_inspect_shows_inboxes_channels_and_groups(fresh_server: RedisServer) -> None:
    layer = await populate([fresh_server.url], "ops")
    try:
        with fresh_server.client() as client:  # a worker read one job and died holding it
            key = stream_channel_key("ops", "jobs")
            client.xreadgroup("streamlayer", "crashed-worker", {key: ">"}, count=1)
        done = run_cli("inspect", "--hosts", fresh_server.url, "--prefix", "ops", "--json")
        assert done.returncode == 0, done.stderr
        [snapshot] = json.loads(done.stdout)
        [inbox] = snapshot["inboxes"]
        assert inbox["process"] == layer.process_id
        assert inbox["backlog"] == 4  # three sends and the group message
        assert inbox["queued_in_process"] == 0  # its reader has not read any yet
        assert inbox["last_message_age_s"] < 60
        channels = {c["channel"]: c for c in snapshot["channels"]}
        assert channels["jobs"]["backlog"] == 2
        assert channels["jobs"]["pending"] == 1
        assert {"name": "crashed-worker", "pending": 1} in [
            {k: c[k] for k in ("name", "pending")} for c in channels["jobs"]["consumers"]
        ]
        assert channels["lobby"]["backlog"] == 1
        assert snapshot["groups"] == [{"group": "room", "members": 2, "history": 1}]
        assert snapshot["totals"]["keys"] >= 5
        assert snapshot["totals"]["memory_bytes"] > 0
        table = run_cli("inspect", "--hosts", fresh_server.url, "--prefix", "ops")
        assert table.returncode == 0
        assert "process inboxes (1)" in table.stdout and "groups (1)" in table.stdout
        other = run_cli("inspect", "--hosts", fresh_server.url, "--prefix", "nobody", "--json")
        assert json.loads(other.stdout)[0]["totals"] == {"keys": 0, "memory_bytes": 0}
    finally:
        await layer.flush()
        await layer.close()


async def test_inspect_covers_every_master_of_a_cluster(cluster_setup: ClusterSetup) -> None:
    layer = await populate([cluster_setup.host_entry()], "opscl")
    try:
        node = cluster_setup.live()[0]
        done = run_cli("inspect", "--hosts", node.url, "--prefix", "opscl", "--json")
        assert done.returncode == 0, done.stderr
        [snapshot] = json.loads(done.stdout)
        assert [i["backlog"] for i in snapshot["inboxes"]] == [4]
        assert {c["channel"] for c in snapshot["channels"]} == {"jobs", "lobby"}
        assert snapshot["groups"] == [{"group": "room", "members": 2, "history": 1}]
    finally:
        await layer.flush()
        await layer.close()


# --- ACL users: what doctor finds, and the ACL SETUSER line it gives -------------------


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    """Users: "limited" lacks XAUTOCLAIM and SUBSCRIBE; "exact" has what the docs'
    ACL SETUSER line for all three layers gives, nothing more."""
    from streamlayer.tools.permissions import LAYERS, acl_setuser

    server = RedisServer().start()
    try:
        with server.client() as client:
            client.execute_command(
                "ACL", "SETUSER", "limited", "on", ">pw", "~*", "&*", "+@all",
                "-xautoclaim", "-subscribe",
            )  # fmt: skip
            line = acl_setuser(LAYERS, "asgi", user="exact").replace(">PASSWORD", ">pw")
            client.execute_command(*line.split())
        yield server
    finally:
        server.cleanup()


def _as(user: str, server: RedisServer) -> str:
    return f"redis://{user}:pw@127.0.0.1:{server.port}"


def test_doctor_names_what_an_acl_user_lacks_per_layer(acl_server: RedisServer) -> None:
    code, [report] = doctor(_as("limited", acl_server))
    assert code == 1
    found, said = statuses(report), details(report)
    assert found["permissions (Streams)"] == "problem"
    assert "xautoclaim" in said["permissions (Streams)"].lower()
    assert "ACL SETUSER" in said["permissions (Streams)"]
    assert found["permissions (compat.pubsub)"] == "problem"
    assert "subscribe" in said["permissions (compat.pubsub)"].lower()
    assert found["permissions (compat.core)"] == "ok"
    # Only the layer in use: compat.core needs neither command.
    done = run_cli("doctor", "--hosts", _as("limited", acl_server), "--layer", "compat.core")
    assert done.returncode == 0, done.stdout


def test_doctor_checks_keys_under_the_prefix(acl_server: RedisServer) -> None:
    """The exact user may touch keys under 'asgi' only: another prefix is refused."""
    done = run_cli("doctor", "--hosts", _as("exact", acl_server), "--prefix", "other", "--json")
    [report] = json.loads(done.stdout)
    assert done.returncode == 1
    assert "key" in details(report)["permissions (Streams)"]


@pytest.mark.parametrize(
    "path",
    [
        "streamlayer.StreamsChannelLayer",
        "streamlayer.compat.core.RedisChannelLayer",
        "streamlayer.compat.pubsub.RedisPubSubChannelLayer",
    ],
)
async def test_the_documented_acl_line_is_enough(acl_server: RedisServer, path: str) -> None:
    """doctor passes the user the ACL SETUSER line makes, and every layer works with
    it: specific and normal channels, groups, flush."""
    import asyncio

    from .layers import PUBSUB, layer_class

    code, [report] = doctor(_as("exact", acl_server))
    assert code == 0, report
    layer: Any = layer_class(path)(hosts=[_as("exact", acl_server)], prefix="asgi")
    try:
        channel = await layer.new_channel()
        receiving = asyncio.ensure_future(layer.receive(channel))
        await layer.group_add("room", channel)
        await asyncio.sleep(0.05)
        await layer.group_send("room", {"type": "g"})
        assert (await asyncio.wait_for(receiving, 10))["type"] == "g"
        if path != PUBSUB:
            await layer.send("jobs", {"type": "job"})
            assert (await asyncio.wait_for(layer.receive("jobs"), 10))["type"] == "job"
    finally:
        await layer.flush()
        await layer.close()


def test_the_docs_give_the_acl_lines_the_code_makes() -> None:
    """docs/operations.rst shows each layer's ACL SETUSER line as doctor prints it."""
    from streamlayer.tools.permissions import LAYERS, acl_setuser

    docs = (Path(__file__).resolve().parent.parent / "docs" / "operations.rst").read_text()
    for layer in LAYERS:
        assert acl_setuser([layer], "asgi") in docs, layer
