"""Positions in a group's history, and what a history read returns.

A position names one message of one incarnation of a group's history stream:
``"<epoch>:<entry id>"``, for example ``"9f86d081:1732501234567-0"``. The epoch
is a random name the stream gets when it is born; Redis losing its data (a
restart without persistence, a flush, the history expiring while the group is
idle) starts a new epoch, so a position from before is recognisably foreign
and a replay from it is reported incomplete instead of silently skipping.

Every message a group with history delivers carries its position under
:data:`POSITION_KEY`, together with the group's name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["POSITION_KEY", "HistoryPage", "Position", "position_tag"]

#: The reserved key under which a delivered group message carries
#: ``{"group": <group name>, "position": <position string>}``.
POSITION_KEY = "__position__"

_POSITION = re.compile(r"([0-9a-f]{1,32}):(\d{1,19})-(\d{1,19})")
_MAX_ID_PART = 2**64 - 1


@dataclass(frozen=True)
class Position:
    """A parsed position: the history stream's epoch and an entry id in it."""

    epoch: str
    entry_id: str

    @classmethod
    def parse(cls, value: Any) -> Position:
        """Parse ``value`` (a position string); ValueError names what is wrong with it."""
        if isinstance(value, Position):
            return value
        if not isinstance(value, str):
            raise TypeError(f"a position must be a string, got {type(value).__name__}")
        match = _POSITION.fullmatch(value)
        if match is None:
            raise ValueError(
                f"{value!r} is not a group history position (expected '<epoch>:<ms>-<seq>', "
                "as found under the message key " + repr(POSITION_KEY) + ")"
            )
        ms, seq = int(match[2]), int(match[3])
        if ms > _MAX_ID_PART or seq >= _MAX_ID_PART:
            raise ValueError(f"{value!r} is out of the range of stream entry ids")
        return cls(match[1], f"{ms}-{seq}")

    def __str__(self) -> str:
        return f"{self.epoch}:{self.entry_id}"


def position_tag(group: str, position: str) -> dict[str, str]:
    """What a delivered message carries under :data:`POSITION_KEY`."""
    return {"group": group, "position": position}


@dataclass
class HistoryPage:
    """Messages read from a group's history, oldest first.

    ``messages`` each carry their position under :data:`POSITION_KEY`.
    ``complete`` is False when some message after the requested position is no
    longer retained (trimmed, expired, or lost with an earlier epoch).
    ``position`` is where a reader that has seen this page stands: the newest
    message's position, or the stream's latest if the page is empty, so a client
    that loads a backlog can resume from it.
    """

    messages: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = True
    position: str = ""
