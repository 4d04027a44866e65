"""What the Streams layer's stream entries look like, read back.

Every entry the layer appends (see ``append_all`` in :mod:`streamlayer.scripts`)
has the serialized message under ``d`` and a dedup tag under ``i``; an inbox
entry names its channels under ``c``; a group message with history carries its
group under ``g`` and its position under ``p``. The inbox reader and the
normal-channel reader both read entries; this module is what they share about
them, so the layout is read in one place.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

__all__ = [
    "Batch",
    "Entry",
    "RecentTags",
    "as_bytes",
    "group_position",
    "next_stream_id",
    "raw_stream_entries",
    "stream_entries",
]

#: An entry as redis-py returns it: its id and its fields.
Entry = tuple[bytes, dict[bytes, bytes]]


class Batch:
    """Messages appended together, in order (one for a plain send): each serialized,
    with its history position ('' without). Serialized once, however many streams
    they go to (``append_all`` takes them once per script call)."""

    __slots__ = ("payloads", "positions")

    def __init__(self, payloads: Sequence[bytes], positions: Sequence[str] = ()) -> None:
        self.payloads = payloads
        self.positions = positions or [""] * len(payloads)

    def __len__(self) -> int:
        return len(self.payloads)

    def args(self) -> list[Any]:
        """The batch as ``append_all`` reads it: its size, then payload and position
        of each message."""
        args: list[Any] = [len(self.payloads)]
        for payload, position in zip(self.payloads, self.positions, strict=True):
            args += (payload, position)
        return args


def stream_entries(response: Any) -> list[Entry]:
    """The entries of the one stream in an XREAD / XREADGROUP reply, whatever its shape
    (RESP2 list of [key, entries], RESP3 dict) after redis-py's reply callback;
    deleted entries come back as (id, {})."""
    if not response:
        return []
    streams = list(response.values()) if isinstance(response, dict) else [r[1] for r in response]
    entries: list[Any] = streams[0] if streams else []
    if len(entries) == 1 and isinstance(entries[0], list):  # RESP3 legacy wrapping
        entries = entries[0]
    result: list[Entry] = []
    for entry_id, fields in entries:
        if entry_id is not None:
            result.append((as_bytes(entry_id), fields or {}))
    return result


def raw_stream_entries(response: Any) -> list[Entry]:
    """The entries of the one stream in an XREAD reply as a connection read it, with no
    reply callback (see redispy.exchange): each entry's fields a flat list of names
    and values. Not :func:`stream_entries`: a raw reply of one entry has the very
    shape that function unwraps as RESP3's legacy wrapping."""
    if not response:
        return []
    streams = list(response.values()) if isinstance(response, dict) else [r[1] for r in response]
    result: list[Entry] = []
    for entry_id, fields in streams[0] if streams else []:
        if entry_id is not None:
            pairs = dict(zip(fields[::2], fields[1::2], strict=True)) if fields else {}
            result.append((as_bytes(entry_id), pairs))
    return result


def next_stream_id(entry_id: str) -> str:
    """The smallest id greater than ``entry_id`` (for an exclusive XTRIM MINID)."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def sent_ms(entry_id: bytes) -> int:
    """When the entry was appended (a stream id starts with milliseconds)."""
    return int(entry_id.split(b"-", 1)[0])


def group_position(fields: dict[bytes, bytes]) -> tuple[str | None, str]:
    """The group and position an entry's fields carry (None: not a group message with
    history)."""
    group = fields.get(b"g")
    if group is None:
        return None, ""
    return group.decode(), fields.get(b"p", b"").decode()


def as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class RecentTags:
    """The dedup tags of the last ``size`` entries handed on (at least; at most a
    quarter more): a copy a retried send made, or one a failover gave out again, is
    seen before and dropped.

    Kept in generations of a quarter of ``size`` each, the oldest dropped whole when
    the newest fills. An ``OrderedDict`` with one tag in and one out per entry left
    a deleted slot per entry and rebuilt its 10,000-entry table every 12,000 or so:
    a 0.65-0.87 ms stall of the reader (and of every receiver it serves). Dropping
    a generation of 2,500 takes about 80 µs (docs/performance.rst, "A sixth run")."""

    GENERATIONS = 4

    def __init__(self, size: int = 10_000) -> None:
        self._per = max(1, -(-size // self.GENERATIONS))
        # The full generations, enough to hold ``size`` tags, and the one filling.
        self._generations: deque[set[bytes]] = deque([set()], maxlen=self.GENERATIONS + 1)

    def seen(self, tag: bytes) -> bool:
        """True if ``tag`` was seen before; remembers it otherwise."""
        for generation in self._generations:
            if tag in generation:
                return True
        newest = self._generations[-1]
        newest.add(tag)
        if len(newest) >= self._per:
            self._generations.append(set())  # the oldest generation goes
        return False
