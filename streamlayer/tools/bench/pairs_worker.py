"""The worker of :mod:`streamlayer.tools.bench.pairs`: one layer, a batch of the
bench's ``latency`` rounds for each line read from stdin, its figures as a line of
JSON. Run by its file, so that the streamlayer it measures is the one first on
``PYTHONPATH`` (a checkout to compare), not the one next to this file; it imports
only what every version of the bench has."""

from __future__ import annotations

import sys

del sys.path[0]  # this file's directory: not a place to import from

import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

from streamlayer.tools.bench.raw import raw_latency  # noqa: E402
from streamlayer.tools.bench.scenarios import Sizes, close_layer, latency  # noqa: E402
from streamlayer.tools.bench.worker import make_layer  # noqa: E402

#: Rounds run before the first batch (connections, scripts, caches).
WARM_UP = 200


async def serve(path: str, url: str) -> None:
    layer = None if path == "raw" else make_layer(path, url, f"pairs-{os.getpid()}", 100_000)

    async def run(rounds: int) -> dict[str, float]:
        sizes = Sizes(latency_rounds=rounds)
        if layer is None:
            return await raw_latency(url, sizes)
        return await latency(layer, sizes)

    await run(WARM_UP)
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            rounds = int(line)
            before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            figures = dict(await run(rounds))
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            figures["cpu_us_per_round"] = cpu / rounds * 1e6
            figures["seconds"] = time.perf_counter() - started
            print(json.dumps(figures), flush=True)
    finally:
        if layer is not None:
            await close_layer(layer)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], sys.argv[2]))
