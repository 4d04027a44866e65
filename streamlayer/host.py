"""What a layer's helpers may use of their layer.

The Streams layer keeps its inbox (:mod:`streamlayer.inbox`), its normal
channels (:mod:`streamlayer.normal`) and its group history
(:mod:`streamlayer.replay`) in objects of their own, and both stored layers
their presence (:mod:`streamlayer.presence`). None of them imports the
layer: each declares, as a ``Protocol`` extending :class:`LayerHost`, the few
things it needs (extending :class:`ScriptHost` or :class:`LayerHost`), and the
layer provides them. So the import graph has no
circle, and what a helper depends on is written in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from .config import LayerConfig
from .connections import ConnectionManager
from .scripts import LuaScript

__all__ = ["LayerHost", "ScriptHost"]

T = TypeVar("T")


class ScriptHost(Protocol):
    """Configuration, connections, counting, decoding, and Redis calls under the
    layer's retry policy: what every layer offers its helpers (see
    :class:`~streamlayer.base.StreamlayerLayer`)."""

    config: LayerConfig
    connections: ConnectionManager

    def count(self, name: str, n: int = 1) -> None: ...

    def try_deserialize(self, data: bytes, where: str) -> dict[str, Any] | None: ...

    def get_expiry(self, channel: str) -> float: ...

    async def with_retry(
        self,
        what: str,
        call: Callable[[], Awaitable[T]],
        on_error: Callable[[BaseException], None] | None = None,
        *,
        reader: bool = False,
    ) -> T: ...

    async def call_script(
        self,
        what: str,
        script: LuaScript,
        shard: int,
        keys: Sequence[Any],
        args: Sequence[Any] | Callable[[], Sequence[Any]],
        *,
        idempotent: bool = False,
        maybe_landed: bool = False,
    ) -> Any: ...


class LayerHost(ScriptHost, Protocol):
    """A Streams helper's host: the above, and the layer's naming (its prefix and this
    process's id)."""

    prefix: str
    process_id: str
