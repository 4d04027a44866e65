"""The benchmark suite's quick mode as a smoke test: every layer and the raw floor
run every scenario, and every scenario's own checks (no message lost, duplicated or
reordered) pass. Correctness only: no figure is asserted."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamlayer.testing import RedisServer
from streamlayer.tools.bench import LAYERS
from streamlayer.tools.bench.scenarios import SCENARIOS


@pytest.mark.timeout(300)  # six processes in turn, each running every scenario small
def test_quick_bench_runs_every_layer_and_checks_every_message(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    report, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    command = [sys.executable, "-m", "streamlayer", "bench", "--quick", "--hosts"]
    command += [redis_server.url, "--json", str(report), "--plot", str(chart)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(report.read_text())["results"]
    assert set(results) == set(LAYERS)
    for name, (_path, broadcast) in LAYERS.items():
        measured = results[name]
        if name == "raw redis-py":
            assert set(measured) == {
                "p2p_sequential",
                "p2p_concurrent",
                "p2p_concurrent_awaited",
                "latency",
                "latency_paired",
                "sync_calls",
            }
            assert measured["sync_calls"]["per_second"] > 0  # asgiref's floor
            continue
        for scenario in SCENARIOS:
            if scenario.needs_worker_channels and broadcast:
                assert "skipped" in measured[scenario.name]
            else:
                assert measured[scenario.name], f"{name} {scenario.name} measured nothing"
        paired = measured["latency_paired"]
        assert 0 < paired["p50_us"] <= paired["p99_us"], paired
        assert measured["cross_process"]["per_second"] > 0
        assert measured["sync_calls"]["per_second"] > 0
        if not name.startswith("channels_redis"):  # which opens one per call
            assert measured["sync_calls"]["new_connections"] <= 1
        assert measured["fanout_spread"]["per_second"] > 0
        assert set(measured["bulk"]) == {
            "send_single_per_second",
            "send_bulk_per_second",
            "group_single_per_second",
            "group_bulk_per_second",
        }
        memory = measured["memory"]
        for figure in ("client_bytes_per_idle_channel", "redis_bytes_per_idle_channel",
                       "client_bytes_per_member", "redis_bytes_per_member"):  # fmt: skip
            assert figure in memory, f"{name}: no {figure}"
        assert ("redis_bytes_per_history_entry" in memory) is (name == "Streams")
        assert memory["client_bytes_per_member"] > 0
        if name == "Streams":
            assert memory["redis_bytes_per_history_entry"] > 0
        scale = measured["fanout_scale"]
        for members in (10, 100):
            for metric in (
                "per_second",
                "cpu_us_per_delivery",
                "commands_per_send",
                "bytes_per_send",
                "redis_us_per_send",
            ):
                assert scale[f"members_{members}_{metric}"] > 0, f"{name}: {members} {metric}"
        assert ("redis_bytes_per_message" in memory) is not broadcast
    assert "StreamsChannelLayer against the performance targets" in done.stdout
    assert chart.stat().st_size > 10_000


@pytest.mark.timeout(180)
def test_pairs_compares_contenders_batch_by_batch(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The paired-batches tool (streamlayer.tools.bench.pairs): long-lived workers
    take turns; each contender's medians and its paired ratios to the first, which
    is 1 to itself."""
    summary_file = tmp_path / "pairs.json"
    command = [sys.executable, "-m", "streamlayer.tools.bench.pairs", redis_server.url]
    command += ["first=Streams", "compat.pubsub", "raw redis-py", "--batches", "3"]
    command += ["--rounds", "40", "--json", str(summary_file)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(summary_file.read_text())
    assert list(summary) == ["first", "compat.pubsub", "raw redis-py"]
    assert summary["first"]["p50_ratio"] == summary["first"]["cpu_ratio"] == 1.0
    for figures in summary.values():
        assert 0 < figures["p50_us"] <= figures["p99_us"]
        assert figures["cpu_us_per_round"] > 0 and figures["p50_ratio"] > 0
    assert "compat.pubsub" in done.stdout


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="pinning needs Linux")
def test_pairs_pins_its_workers_off_the_scheduler(redis_server: RedisServer) -> None:
    """Every worker runs on one CPU, the same for all (where there are two or more): left
    free, the scheduler's placement beside Redis or apart moved a median by 40%."""
    from streamlayer.tools.bench.pairs import Contender, _Worker
    from streamlayer.tools.bench.placement import client_cpu

    cpu = client_cpu()
    if len(os.sched_getaffinity(0)) < 2:
        assert cpu is None
        return
    assert cpu == max(os.sched_getaffinity(0))
    workers = [_Worker(Contender(name, "raw redis-py"), redis_server.url) for name in "ab"]
    try:
        for worker in workers:
            assert os.sched_getaffinity(worker.process.pid) == {cpu}
            assert worker.batch(20)["p50_us"] > 0
    finally:
        for worker in workers:
            worker.stop()


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="pinning needs Linux")
def test_a_local_server_is_pinned_off_the_workers_cpu(fresh_server: RedisServer) -> None:
    """The bench pins the server it starts, and ``pairs --pin-redis`` a server on this
    machine, to every CPU but the workers': left free, Redis followed the workers in
    one full bench and not in the next, and the paired ratios went with it."""
    from streamlayer.tools.bench.pairs import pin_local_server
    from streamlayer.tools.bench.placement import client_cpu

    assert fresh_server.process is not None
    allowed = os.sched_getaffinity(0)
    cpus = pin_local_server(fresh_server.url)
    if len(allowed) < 2:
        assert cpus is None
        return
    assert cpus == allowed - {client_cpu()}
    assert os.sched_getaffinity(fresh_server.process.pid) == cpus


def test_pairs_turns_vary_the_order_and_never_repeat_a_worker() -> None:
    """Each round of batches is a shuffled order, the same every run; no worker runs
    two batches in a row, and every worker follows every other one at some point (a
    fixed order gave each worker's p99 what its fixed predecessor left running)."""
    from streamlayer.tools.bench.pairs import turns

    orders = turns(3, 24)
    assert orders == turns(3, 24)
    assert all(sorted(order) == [0, 1, 2] for order in orders)
    sequence = [index for order in orders for index in order]
    pairs = set(itertools.pairwise(sequence))
    assert all(a != b for a, b in pairs), "a worker ran two batches in a row"
    assert pairs == {(a, b) for a in range(3) for b in range(3) if a != b}
    assert {order[0] for order in orders} == {0, 1, 2}
    assert turns(2, 4) == [[0, 1]] * 4  # two workers: alternating is the only way


def test_pairs_refuses_an_unknown_layer() -> None:
    from streamlayer.tools.bench.pairs import Contender

    assert Contender.parse("old=Streams@/tmp/x") == Contender("old", "Streams", "/tmp/x")
    assert Contender.parse("compat.pubsub") == Contender("compat.pubsub", "compat.pubsub")
    with pytest.raises(ValueError, match="unknown layer 'Stream'"):
        Contender.parse("old=Stream")


def test_paired_latency_ratios_are_read_round_by_round() -> None:
    """A ratio of the paired latency is the median of the two layers' ratios within each
    round, not the ratio of their medians: a drift both batches of a round shared
    cancels. Here the layers swap places in the slow rounds: by their medians they
    look 1.5x apart, round by round one is always 1.1x the other."""
    from streamlayer.tools.bench.report import paired_ratio, ratio, target_ratios

    fast = [100.0, 100.0, 100.0, 200.0, 200.0]
    ours = [110.0, 110.0, 110.0, 220.0, 220.0]  # 1.1x in every round
    theirs_p99 = [300.0, 300.0, 300.0, 300.0, 300.0]
    results = {
        "Streams": {
            "latency_paired": {
                "p50_us": 110.0,  # the medians, as compare() reports them
                "p99_us": 330.0,
                "batches": {"p50_us": ours, "p99_us": [330.0] * 5},
            },
            "p2p_concurrent": {"per_second": 30.0},
        },
        "compat.pubsub": {
            "latency_paired": {
                "p50_us": 73.0,  # a median from another run's batches: not used
                "p99_us": 300.0,
                "batches": {"p50_us": fast, "p99_us": theirs_p99},
            }
        },
        "channels_redis pubsub": {
            "latency_paired": {"p50_us": 100.0, "p99_us": 330.0},  # no batches kept
            "p2p_concurrent": {"per_second": 10.0},
        },
    }
    assert paired_ratio(ours, fast) == pytest.approx(1.1)
    assert ratio(results, "Streams", "compat.pubsub", "latency_paired", "p50_us") == (
        pytest.approx(1.1)
    )
    assert ratio(results, "Streams", "compat.pubsub", "latency_paired", "p99_us") == (
        pytest.approx(1.1)
    )
    # Without both layers' batches: the ratio of the figures.
    crps = "channels_redis pubsub"
    assert ratio(results, "Streams", crps, "latency_paired", "p50_us") == pytest.approx(1.1)
    assert ratio(results, "Streams", crps, "p2p_concurrent", "per_second") == pytest.approx(3)
    assert ratio(results, "Streams", "raw redis-py", "latency", "p50_us") is None
    found = {target.label: value for target, value in target_ratios(results)}
    assert found["latency p50 vs compat.pubsub"] == pytest.approx(1.1)
    assert found["latency p99 vs channels_redis pubsub"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])  # batches of different runs cannot pair


def test_pairs_summary_keeps_each_batch(redis_server: RedisServer) -> None:
    """compare() keeps every contender's figures batch by batch, in the order of the
    rounds, beside their medians and paired ratios to the first."""
    from streamlayer.tools.bench.pairs import FIGURES, Contender, compare

    contenders = [Contender("a", "raw redis-py"), Contender("b", "raw redis-py")]
    summary = compare(contenders, redis_server.url, batches=3, rounds=20)
    for figures in summary.values():
        assert set(figures["batches"]) == set(FIGURES)
        for key in FIGURES:
            assert len(figures["batches"][key]) == 3
            assert figures[key] == sorted(figures["batches"][key])[1]
    assert summary["a"]["p99_ratio"] == 1.0
    a, b = summary["a"]["batches"]["p50_us"], summary["b"]["batches"]["p50_us"]
    within = sorted(y / x for x, y in zip(a, b, strict=True))
    assert summary["b"]["p50_ratio"] == pytest.approx(within[1])
