"""What a bench run raises when a layer broke a promise it is measured on."""

from __future__ import annotations

__all__ = ["BenchError"]


class BenchError(RuntimeError):
    """A scenario saw a lost, duplicated or reordered message, or a wait ran out."""
