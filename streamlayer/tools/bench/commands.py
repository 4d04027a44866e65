"""How the bench starts a worker process: each layer's run (``__init__``), the sender
of the cross-process scenario, the member processes of the spread fan-out, the scale
curve and the sync callers, and the sync callers' own process (``worker``)."""

from __future__ import annotations

import sys

__all__ = ["worker_command"]


def worker_command(*args: str) -> list[str]:
    """``python -m streamlayer.tools.bench.worker ARGS``, in this interpreter (the
    one whose packages the parent sees)."""
    return [sys.executable, "-m", "streamlayer.tools.bench.worker", *args]
