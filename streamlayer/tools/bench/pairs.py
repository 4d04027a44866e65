"""Latency in paired batches: two or more layers, or two checkouts of one, compared
on the bench's ``latency`` scenario.

    python -m streamlayer.tools.bench.pairs redis://127.0.0.1:6379 \\
        before=Streams@/path/to/old/checkout after=Streams compat.pubsub

Why not separate runs: on a shared virtual machine the speed of the whole machine
drifts from one minute to the next, and one process's median moved by a quarter
between runs of the same code (docs/performance.rst, "A fourth run"); five or ten
runs of each could not tell a 10% change. Here each label gets one long-lived
worker process, and the workers take turns, batch after batch: a drift lands on
all of them alike. Each round of turns goes in a shuffled order (the same shuffles
every run), and no worker runs two batches in a row: a batch run right after the
same worker's was slow (median 190 µs against 110), and in one fixed order a
worker's p99 carried what its fixed predecessor left running. A ratio is the
median over rounds of each batch's ratio to the first label's batch of the round.

Where the machine has two CPUs or more, every worker is pinned to the last one
(``sched_setaffinity``), so every worker runs where the others did. Left to the
scheduler, a worker sometimes landed on Redis' CPU and sometimes not, and that
alone moved one layer's median from 185 to 110 µs (a ping-pong on one CPU costs
no cross-CPU wake-ups, but pays Redis' own CPU time in full): which layer got the
lucky placement decided the ratio. Redis, left free, wandered too: on one
machine it mostly kept to the other CPU (docs/performance.rst, "A fifth run"), on
another it followed the workers in one full bench and not in the next ("A sixth
run"). ``--pin-redis`` pins a server on this machine to the other CPUs (the
bench pins the throwaway server it starts): see :mod:`.placement`.

A label is ``NAME=LAYER@PATH``: ``LAYER`` a name of the bench's table
(``python -m streamlayer bench --help``), ``@PATH`` a checkout put first on the
worker's ``PYTHONPATH`` (to compare versions), ``NAME=`` what to call it; only
``LAYER`` is required.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import redis

from .commands import LAYERS
from .placement import client_cpu, pin_server
from .report import paired_ratio

__all__ = ["FIGURES", "Contender", "compare", "main", "turns"]

#: What a worker reports of each batch.
FIGURES = ("p50_us", "p99_us", "cpu_us_per_round")
#: The paired ratios to the first contender in a summary, and the figures they are of.
RATIOS = (("p50_us", "p50_ratio"), ("p99_us", "p99_ratio"), ("cpu_us_per_round", "cpu_ratio"))


@dataclass(frozen=True)
class Contender:
    """One label of the comparison: a layer of the bench's table, from a checkout."""

    name: str
    layer: str
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> Contender:
        name, _, rest = text.rpartition("=")
        layer, _, path = rest.partition("@")
        if layer not in LAYERS:
            known = ", ".join(LAYERS)
            raise ValueError(f"unknown layer {layer!r} in {text!r}: one of {known}")
        return cls(name or layer, layer, path or None)


def turns(workers: int, rounds: int) -> list[list[int]]:
    """The order of each round of batches: shuffled (seeded: every run takes the same
    turns), the first of a round never the last of the one before."""
    shuffler = random.Random(0)
    orders: list[list[int]] = []
    for _ in range(rounds):
        order = list(range(workers))
        shuffler.shuffle(order)
        if orders and workers > 1 and order[0] == orders[-1][-1]:
            order[0], order[1] = order[1], order[0]
        orders.append(order)
    return orders


class _Worker:
    """One contender's process, running batches when told."""

    def __init__(self, contender: Contender, url: str) -> None:
        env = dict(os.environ)
        if contender.path:
            paths = [contender.path, env.get("PYTHONPATH", "")]
            env["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
        # Run by its file, from a directory of no checkout: ``python -m`` and the
        # current directory would put this checkout first, whatever PYTHONPATH says.
        command = [sys.executable, str(Path(__file__).with_name("pairs_worker.py"))]
        command += [LAYERS[contender.layer][0], url]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tempfile.gettempdir(),
        )
        cpu = client_cpu()
        if cpu is not None:
            os.sched_setaffinity(self.process.pid, {cpu})

    def batch(self, rounds: int) -> dict[str, float]:
        stdin, stdout = self._pipes()
        stdin.write(f"{rounds}\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"a worker ended (exit code {self.process.wait()})")
        result: dict[str, float] = json.loads(line)
        return result

    def stop(self) -> None:
        stdin, stdout = self._pipes()
        stdin.close()
        self.process.wait(timeout=60)
        stdout.close()

    def _pipes(self) -> tuple[IO[str], IO[str]]:
        if self.process.stdin is None or self.process.stdout is None:  # pragma: no cover
            raise RuntimeError("the worker has no pipes")
        return self.process.stdin, self.process.stdout


def compare(
    contenders: list[Contender], url: str, batches: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """Per contender: the medians of its batches (``p50_us``, ``p99_us``,
    ``cpu_us_per_round``), the paired ratios of each to the first's (``p50_ratio``,
    ``p99_ratio``, ``cpu_ratio``), and under ``batches`` each figure batch by batch."""
    workers = [_Worker(contender, url) for contender in contenders]
    runs: list[list[dict[str, float]]] = [[] for _ in contenders]
    try:
        for order in turns(len(workers), batches):
            for index in order:
                runs[index].append(workers[index].batch(rounds))
    finally:
        for worker in workers:
            worker.stop()
    kept_all = [
        {key: [run[key] for run in batches_run] for key in FIGURES} for batches_run in runs
    ]
    summary: dict[str, dict[str, Any]] = {}
    for contender, kept in zip(contenders, kept_all, strict=True):
        figures: dict[str, Any] = {key: statistics.median(kept[key]) for key in FIGURES}
        for key, ratio in RATIOS:
            figures[ratio] = paired_ratio(kept[key], kept_all[0][key])
        # Batch by batch, in the order of the rounds: every contender ran one batch per
        # round, so the bench reads any two contenders' ratio from these (report.ratio).
        figures["batches"] = kept
        summary[contender.name] = figures
    return summary


def pin_local_server(url: str) -> set[int] | None:
    """Pin the server at ``url`` off the workers' CPU when it runs on this machine
    (its ``INFO`` names its process; a server elsewhere has another machine's ids)."""
    with redis.Redis.from_url(url) as client:
        where = client.connection_pool.connection_kwargs
        if "path" not in where and where.get("host") not in ("127.0.0.1", "localhost", "::1"):
            return None
        pid = int(client.info("server")["process_id"])
    return pin_server(pid)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m streamlayer.tools.bench.pairs", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("url", help="the Redis every worker uses")
    parser.add_argument("contenders", nargs="*", metavar="[NAME=]LAYER[@PATH]")
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=300, help="ping-pong rounds per batch")
    parser.add_argument("--json", metavar="FILE", help="also write the summary here")
    parser.add_argument(
        "--pin-redis",
        action="store_true",
        help="pin the Redis at url (a process on this machine) off the workers' CPU",
    )
    args = parser.parse_intermixed_args(argv)  # flags before the contenders too
    if len(args.contenders) < 2:
        parser.error("give a Redis URL and at least two contenders")
    try:
        contenders = [Contender.parse(text) for text in args.contenders]
    except ValueError as exc:
        parser.error(str(exc))
    pinned = pin_local_server(args.url) if args.pin_redis else None
    summary = compare(contenders, args.url, args.batches, args.rounds)
    base = contenders[0].name
    cpu = client_cpu()
    redis_on = f"Redis on CPUs {sorted(pinned)}" if pinned else "Redis not pinned"
    print("workers on CPU", cpu, f"({redis_on})" if cpu is not None else "workers not pinned")
    for name, figures in summary.items():
        print(
            f"{name:>24}: p50 {figures['p50_us']:6.0f} us  p99 {figures['p99_us']:6.0f} us  "
            f"CPU {figures['cpu_us_per_round']:6.0f} us/round  "
            f"p50 {figures['p50_ratio']:.3f}x  p99 {figures['p99_ratio']:.3f}x  "
            f"CPU {figures['cpu_ratio']:.3f}x {base}"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(summary, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
