"""``python -m streamlayer bench``: every layer side by side on one Redis.

Each layer runs every scenario of :mod:`streamlayer.tools.bench.scenarios` in an OS
process of its own, one layer after another, against the same redis-server
(a throwaway one it starts, or ``--hosts``); bare redis-py runs the floor
(:mod:`streamlayer.tools.bench.raw`). Every scenario checks its messages (none
lost, none duplicated, order kept per sender) before it reports a number.
The report gives each figure and its ratio to the references the targets are
stated against: channels_redis of the same kind and the raw floor.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ...testing import RedisServer
from .commands import LAYERS, worker_command
from .placement import client_cpu, pin_server
from .report import print_report, write_plot
from .scenarios import Sizes

__all__ = ["LAYERS", "run_bench"]

_LAYER_TIMEOUT = 900
_BENCH_EXTRA = "pip install 'streamlayer[bench]'"


def _installed(path: str) -> bool:
    if path == "raw":
        return True
    module = path.rpartition(".")[0]
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _run_one(path: str, url: str, sizes: Sizes, broadcast: bool, memory: bool) -> dict[str, Any]:
    command = worker_command("run", path, url)
    command += ["--sizes", json.dumps(asdict(sizes))]
    if broadcast:
        command.append("--broadcast")
    if memory:
        command.append("--memory")
    done = subprocess.run(command, capture_output=True, text=True, timeout=_LAYER_TIMEOUT)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip()[-2000:]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])["results"]
    return result


def run_bench(
    hosts: str | None = None,
    quick: bool = False,
    json_path: str | None = None,
    plot_path: str | None = None,
    only: list[str] | None = None,
    memory: bool = True,
    repeat: int | None = None,
) -> int:
    """Entry point of ``python -m streamlayer bench``; returns the exit status
    (1 when a scenario found a lost, duplicated or reordered message).

    Each layer runs ``repeat`` times (default 3, 1 in quick mode), the layers taking
    turns, and every figure is the median of its runs: this machine's speed drifts by
    tens of percent within minutes, and interleaved runs spread the drift over every
    layer instead of charging it to whichever ran during a slow spell."""
    sizes = Sizes.quick() if quick else Sizes()
    console = _console()
    server = None
    if hosts is None:
        server = RedisServer().start()
        url = server.url
        console.print(f"started a throwaway redis-server on {url} ({server.binary})")
        if server.process is not None and (cpus := pin_server(server.process.pid)):
            workers = client_cpu()
            console.print(f"redis-server on CPUs {sorted(cpus)}, latency pairs on CPU {workers}")
    else:
        url = hosts
    results: dict[str, Any] = {}
    try:
        with redis.Redis.from_url(url) as client:
            version = client.info("server")["redis_version"]
        rounds = repeat if repeat is not None else (1 if quick else 3)
        console.print(
            f"Redis {version} at {url}; {'quick' if quick else 'full'} sizes; {rounds} round(s)"
        )
        layers = _layers_to_run(only, console)
        runs: dict[str, list[dict[str, Any]]] = {}
        with _progress(console) as progress:
            task = progress.add_task("layers", total=rounds * len(layers))
            for round_number in range(1, rounds + 1):
                for name, (path, broadcast) in layers.items():
                    progress.update(task, description=f"round {round_number}/{rounds}: {name}")
                    with_memory = memory and path != "raw" and round_number == 1
                    started = time.monotonic()
                    runs.setdefault(name, []).append(
                        _run_one(path, url, sizes, broadcast, with_memory)
                    )
                    progress.advance(task)
                    if not console.is_terminal:  # no live bar in a log: a line per run
                        took = time.monotonic() - started
                        console.print(f"round {round_number}/{rounds}: {name} ({took:.0f} s)")
        results = {name: median_of(layer_runs) for name, layer_runs in runs.items()}
        console.print("latency in paired batches: every layer at once, taking turns")
        for name, paired in _paired_latency(list(layers), url, sizes).items():
            results[name]["latency_paired"] = paired
    finally:
        if server is not None:
            server.cleanup()
    console.print()
    print_report(results, console)
    report = {
        "redis_version": version,
        "sizes": asdict(sizes),
        "rounds": rounds,
        "results": results,
        "runs": runs,
    }
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2))
        console.print(f"wrote {json_path}")
    if plot_path:
        console.print(write_plot(results, plot_path))
    return 1 if _errors(results) else 0


def _paired_latency(names: list[str], url: str, sizes: Sizes) -> dict[str, dict[str, Any]]:
    """The latency scenario once more, the layers' workers alive together and taking
    turns batch by batch (:mod:`streamlayer.tools.bench.pairs`): the machine's drift
    between one layer's run and the next (a quarter of a median within minutes here)
    lands on every layer alike, so the latency ratios are read from these rows."""
    # Imported here: ``python -m streamlayer.tools.bench.pairs`` imports this package
    # first, and runpy warns when the package already imported the module it runs.
    from .pairs import Contender, compare

    contenders = [Contender(name, name) for name in names]
    try:
        return compare(contenders, url, sizes.paired_batches, sizes.paired_rounds)
    except (RuntimeError, ValueError, OSError) as exc:
        return {name: {"error": f"paired latency: {exc}"} for name in names}


def _console() -> Console:
    """Wide enough for six layer columns when the output goes to a file or a CI log
    (rich assumes 80 columns there)."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def _layers_to_run(only: list[str] | None, console: Console) -> dict[str, tuple[str, bool]]:
    chosen = {}
    for name, (path, broadcast) in LAYERS.items():
        if only and name not in only:
            continue
        if not _installed(path):
            console.print(f"skipping {name}: not installed ({_BENCH_EXTRA})")
            continue
        chosen[name] = (path, broadcast)
    return chosen


def _progress(console: Console) -> Progress:
    """A bar over every layer run (each takes from seconds to minutes); where the
    output is not a terminal rich draws it once, at the end."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One layer's runs merged: each figure the median of its runs; a scenario that
    failed in any run reports that failure."""
    merged: dict[str, Any] = {}
    for run in runs:
        if "error" in run:
            return run
    for scenario in runs[0]:
        outcomes = [run[scenario] for run in runs if scenario in run]
        failed = [o for o in outcomes if isinstance(o, dict) and "error" in o]
        if failed or not all(isinstance(o, dict) for o in outcomes):
            merged[scenario] = failed[0] if failed else outcomes[0]
            continue
        merged[scenario] = {
            metric: (
                statistics.median(float(o[metric]) for o in outcomes if metric in o)
                if isinstance(value, int | float)
                else value
            )
            for metric, value in outcomes[0].items()
        }
    for run in runs[1:]:  # figures measured in some rounds only (memory: the first)
        for scenario, outcome in run.items():
            merged.setdefault(scenario, outcome)
    return merged


def _errors(results: dict[str, Any]) -> list[str]:
    found = []
    for name, layer in results.items():
        if "error" in layer:
            found.append(f"{name}: {layer['error']}")
            continue
        for scenario, metrics in layer.items():
            if isinstance(metrics, dict) and "error" in metrics:
                found.append(f"{name} {scenario}: {metrics['error']}")
    for line in found:
        print("ERROR", line, file=sys.stderr)
    return found
