"""Which CPU the latency workers and Redis run on.

A ping-pong's latency depends on whether the client shares a CPU with Redis: on
one CPU a round pays Redis' own time in full and no cross-CPU wake-up; on two it
pays the wake-ups and Redis' time overlaps them. Left to the scheduler, either
happens, and not alike for every layer (a layer that costs Redis more loses
more beside it): the paired batches' ratios moved from 1.04x to 1.34x between two
full benches of the same code (docs/performance.rst, "A sixth run"). So the
workers go on the last CPU and a server the bench started on the others, as in a
deployment where Redis has a core of its own.
"""

from __future__ import annotations

import os

__all__ = ["client_cpu", "pin_server", "server_cpus"]


def client_cpu() -> int | None:
    """The CPU every worker is pinned to (the last this process may use), or None
    where there is no choice to make (one CPU) or no way to pin (not Linux)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    allowed = os.sched_getaffinity(0)
    return max(allowed) if len(allowed) > 1 else None


def server_cpus() -> set[int] | None:
    """The CPUs a server is pinned to: every one this process may use but the
    workers'; None where the workers are not pinned."""
    cpu = client_cpu()
    if cpu is None:
        return None
    return os.sched_getaffinity(0) - {cpu}


def pin_server(pid: int) -> set[int] | None:
    """Pin the server process ``pid`` off the workers' CPU; the CPUs it is pinned to,
    or None where that cannot be done (one CPU, not Linux, not allowed)."""
    cpus = server_cpus()
    if cpus is None:
        return None
    try:
        os.sched_setaffinity(pid, cpus)
    except OSError:
        return None
    return cpus
