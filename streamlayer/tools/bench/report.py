"""The bench's tables (rich), its target check, and its optional chart."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = [
    "TARGETS",
    "paired_ratio",
    "print_report",
    "ratio",
    "results_table",
    "target_ratios",
    "write_plot",
]


def _scale_rows(members: int) -> list[tuple[str, str, str, bool]]:
    """The scale curve's rows for a group of ``members`` (sizes not run show nothing)."""
    size, metric = f"scale: group of {members:,}", f"members_{members}"
    return [
        ("fanout_scale", f"{metric}_per_second", f"{size} over 4 processes (deliveries/s)", False),
        ("fanout_scale", f"{metric}_cpu_us_per_delivery",
         f"{size}, CPU per delivery, all processes (us)", True),
        ("fanout_scale", f"{metric}_commands_per_send",
         f"{size}, Redis commands per group_send", True),
        ("fanout_scale", f"{metric}_bytes_per_send",
         f"{size}, network bytes per group_send", True),
        ("fanout_scale", f"{metric}_redis_us_per_send",
         f"{size}, Redis CPU per group_send (us)", True),
    ]  # fmt: skip


#: (scenario, metric, label, lower is better)
ROWS: list[tuple[str, str, str, bool]] = [
    ("p2p_sequential", "per_second", "p2p sequential (msg/s)", False),
    ("p2p_concurrent", "per_second", "p2p concurrent (msg/s)", False),
    (
        "p2p_concurrent_awaited",
        "per_second",
        "raw: p2p concurrent, each XADD awaited, pipelined across senders (msg/s)",
        False,
    ),
    ("normal_channel", "per_second", "normal channel, 2 workers (msg/s)", False),
    ("latency", "p50_us", "latency p50 (us)", True),
    ("latency", "p90_us", "latency p90 (us)", True),
    ("latency", "p99_us", "latency p99 (us)", True),
    ("latency_paired", "p50_us", "latency p50, paired batches (us)", True),
    ("latency_paired", "p99_us", "latency p99, paired batches (us)", True),
    ("fanout", "members_200_per_second", "fan-out to 200 (deliveries/s)", False),
    ("fanout", "members_1000_per_second", "fan-out to 1000 (deliveries/s)", False),
    ("fanout", "members_50_per_second", "fan-out to 50 (deliveries/s)", False),
    ("fanout_spread", "per_second", "fan-out over 4 processes (deliveries/s)", False),
    *(row for members in (10, 100, 1000, 10_000) for row in _scale_rows(members)),
    ("many_channels", "per_second", "many channels (msg/s)", False),
    ("cross_process", "per_second", "cross-process (msg/s)", False),
    (
        "sync_calls",
        "per_second",
        "sync callers, async_to_sync(group_send) (calls/s; raw: asgiref alone)",
        False,
    ),
    (
        "sync_calls",
        "alone_per_second",
        "sync callers, no receiving process (calls/s; raw: asgiref alone)",
        False,
    ),
    (
        "sync_calls",
        "thread_per_call_per_second",
        "asgiref alone with a thread per call (calls/s)",
        False,
    ),
    ("sync_calls", "new_connections", "sync callers: new Redis connections in those calls", True),
    ("burst", "delivered_percent", "burst after a 2 s stall, defaults: delivered (%)", False),
    ("burst", "lost", "burst after a 2 s stall, defaults: deliveries lost", True),
    ("burst", "drain_s", "burst after a 2 s stall: seconds to drain after it", True),
    ("membership", "group_size_ms", "group_size of a big group (ms)", True),
    ("membership", "group_channels_ms", "group_channels of a big group (ms)", True),
    ("membership", "presence_ms", "presence of a big group (ms)", True),
    ("membership", "group_send_ms", "group_send to that group (ms, until it returns)", True),
    ("bulk", "send_single_per_second", "1,000 sends, a call each (msg/s)", False),
    (
        "bulk",
        "send_bulk_per_second",
        "1,000 sends, one send_bulk (msg/s; channels_redis: a call each)",
        False,
    ),
    (
        "bulk",
        "group_single_per_second",
        "1,000 group_sends to 10, a call each (deliveries/s)",
        False,
    ),
    (
        "bulk",
        "group_bulk_per_second",
        "1,000 group_sends to 10, one group_send_bulk (deliveries/s; channels_redis: a call each)",
        False,
    ),
    ("memory", "redis_bytes_per_message", "Redis bytes per backlogged message", True),
    ("memory", "client_bytes_per_idle_channel", "client bytes per idle channel", True),
    ("memory", "redis_bytes_per_idle_channel", "Redis bytes per idle channel", True),
    ("memory", "client_bytes_per_member", "client bytes per group member", True),
    ("memory", "redis_bytes_per_member", "Redis bytes per group member", True),
    ("memory", "redis_bytes_per_history_entry", "Redis bytes per retained history entry", True),
]

#: Each layer's ratios are against the channels_redis layer of the same kind.
INCUMBENT = {
    "Streams": "channels_redis core",
    "compat.core": "channels_redis core",
    "compat.pubsub": "channels_redis pubsub",
}


def figure(results: dict[str, Any], layer: str, scenario: str, metric: str) -> float | None:
    value = results.get(layer, {}).get(scenario, {})
    if not isinstance(value, dict) or metric not in value:
        return None
    return float(value[metric])


def paired_ratio(ours: list[float], theirs: list[float]) -> float:
    """The median over rounds of each of our batches' figure over theirs in the same
    round of paired batches (:mod:`.pairs`).

    Not the ratio of the two medians: the machine's speed drifts from one round to
    the next (one layer's batch medians ranged 145-239 us within a run), and a ratio
    within a round cancels the drift both batches shared. In one full bench the
    ratio of the medians was 1.15x where the paired ratio of the same batches was
    1.09x (docs/performance.rst, "A seventh run")."""
    return statistics.median(o / t for o, t in zip(ours, theirs, strict=True))


def ratio(
    results: dict[str, Any],
    layer: str,
    reference: str,
    scenario: str,
    metric: str,
    reference_metric: str | None = None,
) -> float | None:
    """``layer``'s ``metric`` over ``reference``'s (its ``reference_metric`` when
    given); paired batch by batch when the scenario kept both layers' batches (the
    paired latency), else the ratio of the two figures. None when one is missing."""
    theirs_metric = reference_metric or metric
    ours = figure(results, layer, scenario, metric)
    theirs = figure(results, reference, scenario, theirs_metric)
    if ours is None or not theirs:
        return None
    ours_batches = _batches(results, layer, scenario, metric)
    theirs_batches = _batches(results, reference, scenario, theirs_metric)
    if (
        ours_batches
        and theirs_batches
        and len(ours_batches) == len(theirs_batches)
        and all(theirs_batches)
    ):
        return paired_ratio(ours_batches, theirs_batches)
    return ours / theirs


def _batches(results: dict[str, Any], layer: str, scenario: str, metric: str) -> list[float]:
    value = results.get(layer, {}).get(scenario, {})
    batches = value.get("batches", {}) if isinstance(value, dict) else {}
    found = batches.get(metric) if isinstance(batches, dict) else None
    return [float(v) for v in found] if isinstance(found, list) else []


def _cell(value: float | None, against: float | None) -> str:
    """A figure, and its ratio to channels_redis' when there is one."""
    if value is None:
        return "-"
    text = f"{value:,.0f}" if value >= 10 else f"{value:.1f}"
    if against is not None:
        text += f" ({against:.2f}x)"
    return text


def results_table(results: dict[str, Any]) -> Table:
    """Every figure of every layer, each with its ratio to channels_redis of the same kind."""
    layers = list(results)
    table = Table(title="Every layer on the same Redis (ratio to channels_redis)")
    table.add_column("scenario")
    for layer in layers:
        table.add_column(layer, justify="right")
    for scenario, metric, label, _lower in ROWS:
        values = [figure(results, layer, scenario, metric) for layer in layers]
        if all(v is None for v in values):
            continue
        cells = []
        for layer, value in zip(layers, values, strict=True):
            incumbent = INCUMBENT.get(layer)
            against = ratio(results, layer, incumbent, scenario, metric) if incumbent else None
            cells.append(_cell(value, against))
        table.add_row(label, *cells)
    table.caption = (
        "Ratios: Streams and compat.core against channels_redis' sorted-set layer, "
        "compat.pubsub against its Pub/Sub layer; for latency and memory lower is better. "
        "Every message was checked: none lost (but in the burst rows, which count "
        "losses), none duplicated, order kept per sender."
    )
    return table


def targets_table(results: dict[str, Any]) -> Table:
    table = Table(title="StreamsChannelLayer against the performance targets")
    for column in ("target", "ratio", "wanted", "verdict"):
        table.add_column(column, justify="right" if column in ("ratio", "wanted") else "left")
    for target, ratio in target_ratios(results):
        if ratio is None:
            table.add_row(target.label, "-", target.wanted, "not measured in this run")
            continue
        verdict = "[green]met[/]" if target.ok(ratio) else "[bold red]NOT met[/]"
        table.add_row(target.label, f"{ratio:.2f}x", target.wanted, verdict)
    return table


def print_report(results: dict[str, Any], console: Console) -> None:
    console.print(results_table(results))
    console.print(targets_table(results))
    errors = [(layer, detail) for layer in results for detail in _layer_errors(results[layer])]
    for layer, detail in errors:
        console.print(f"[bold red]error[/] {layer}: {detail}", markup=True, highlight=False)


def _layer_errors(layer: Any) -> list[str]:
    if not isinstance(layer, dict):
        return []
    if "error" in layer:
        return [str(layer["error"])]
    return [
        f"{name}: {value['error']}"
        for name, value in layer.items()
        if isinstance(value, dict) and "error" in value
    ]


@dataclass(frozen=True)
class Target:
    """``Streams`` figure compared with a reference layer's: ratio must pass ``ok``."""

    label: str
    scenario: str
    metric: str
    reference: str
    wanted: str
    ok: Callable[[float], bool]
    #: The reference layer's metric, when it is not ``metric`` (a layer against itself).
    reference_metric: str | None = None


TARGETS = [
    Target("p2p concurrent vs raw pipelined", "p2p_concurrent", "per_second",
           "raw redis-py", ">= 0.5x", lambda r: r >= 0.5),
    Target("p2p concurrent vs channels_redis core", "p2p_concurrent", "per_second",
           "channels_redis core", ">= 20x", lambda r: r >= 20),
    Target("p2p concurrent vs channels_redis pubsub", "p2p_concurrent", "per_second",
           "channels_redis pubsub", ">= 6x", lambda r: r >= 6),
    Target("p2p sequential vs raw unpipelined", "p2p_sequential", "per_second",
           "raw redis-py", ">= 0.8x", lambda r: r >= 0.8),
    Target("fan-out to 200 vs channels_redis pubsub", "fanout", "members_200_per_second",
           "channels_redis pubsub", ">= 1.5x", lambda r: r >= 1.5),
    Target("scale: CPU per delivery, group of 10,000 vs of 1,000", "fanout_scale",
           "members_10000_cpu_us_per_delivery", "Streams", "<= 1.1x (flat or falling)",
           lambda r: r <= 1.1, "members_1000_cpu_us_per_delivery"),
    Target("latency p50 vs compat.pubsub", "latency_paired", "p50_us",
           "compat.pubsub", "<= 1.1x", lambda r: r <= 1.1),
    Target("latency p99 vs channels_redis pubsub", "latency_paired", "p99_us",
           "channels_redis pubsub", "<= 1x", lambda r: r <= 1.0),
    Target("latency p50 vs channels_redis pubsub", "latency_paired", "p50_us",
           "channels_redis pubsub", "<= 1x", lambda r: r <= 1.0),
    Target("latency p50 vs raw XADD/XREAD pair", "latency_paired", "p50_us",
           "raw redis-py", "<= 1.6x", lambda r: r <= 1.6),
    Target("sync calls, member in another process, vs channels_redis core", "sync_calls",
           "per_second", "channels_redis core", ">= 5x", lambda r: r >= 5),
    Target("sync calls, no receiving process, vs channels_redis core", "sync_calls",
           "alone_per_second", "channels_redis core", ">= 5x", lambda r: r >= 5),
    Target("Redis bytes per message vs channels_redis core", "memory",
           "redis_bytes_per_message", "channels_redis core", "<= 1x", lambda r: r <= 1.0),
    Target("client bytes per idle channel vs channels_redis core", "memory",
           "client_bytes_per_idle_channel", "channels_redis core", "<= 1x", lambda r: r <= 1.0),
]  # fmt: skip


def target_ratios(results: dict[str, Any]) -> list[tuple[Target, float | None]]:
    """Each target with the measured ratio of Streams to its reference (None when one of
    the two was not measured)."""
    return [
        (
            target,
            ratio(
                results,
                "Streams",
                target.reference,
                target.scenario,
                target.metric,
                target.reference_metric,
            ),
        )
        for target in TARGETS
    ]


def write_plot(results: dict[str, Any], path: str) -> str:
    """A PNG of the throughput scenarios and the latency percentiles."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib is missing (pip install 'streamlayer[bench]')"
    layers = list(results)
    throughput = [r for r in ROWS if not r[3]]
    latency = [r for r in ROWS if r[0] == "latency"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 9))
    _bars(top, results, layers, throughput, log=True)
    top.set_title("throughput (higher is better, log scale)")
    _bars(bottom, results, layers, latency, log=False)
    bottom.set_title("one-way latency in microseconds (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def _bars(axis: Any, results: dict[str, Any], layers: list[str], rows: Any, log: bool) -> None:
    present = [r for r in rows if any(figure(results, n, r[0], r[1]) for n in layers)]
    width = 0.8 / max(1, len(layers))
    for index, layer in enumerate(layers):
        values = [figure(results, layer, r[0], r[1]) or math.nan for r in present]
        positions = [i + index * width for i in range(len(present))]
        axis.bar(positions, values, width, label=layer)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(present))])
    axis.set_xticklabels([r[2].split(" (")[0] for r in present], rotation=15, ha="right")
    if log:
        axis.set_yscale("log")
    axis.legend(fontsize=8)
