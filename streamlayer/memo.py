"""A bounded memo: what a layer remembers to skip repeated work, forgotten at once
when it grows too large.

A layer validates a channel name once, looks a capacity up once, remembers a
group's members for its next one-trip send, a channel's process for the next
group send. A long-running process meets an unbounded number of names, so each
memo has a limit; reaching it clears the memo (cheaper than tracking what is
least recent, and a memo is only ever a shortcut: the work is redone).
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["Memo"]

K = TypeVar("K")
V = TypeVar("V")


class Memo(dict[K, V]):
    """A dict of at most ``limit`` entries; look up with ``in`` / ``get`` as usual."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def remember(self, key: K, value: V) -> V:
        """Store ``value`` under ``key`` (clearing the memo first if it is full)."""
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value
