"""What a layer's helpers may use of their layer.

The Streams layer keeps its inbox (:mod:`streamlayer.inbox`), its normal
channels (:mod:`streamlayer.normal`) and its group history
(:mod:`streamlayer.replay`) in objects of their own. None of them imports the
layer: each declares, as a ``Protocol`` extending :class:`LayerHost`, the few
things it needs, and the layer provides them. So the import graph has no
circle, and what a helper depends on is written in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from .config import LayerConfig
from .connections import ConnectionManager
from .scripts import LuaScript

__all__ = ["LayerHost"]

T = TypeVar("T")


class LayerHost(Protocol):
    """Naming, configuration, connections, counting, decoding, and Redis calls under
    the layer's retry policy (see :class:`~streamlayer.base.StreamlayerLayer`)."""

    prefix: str
    process_id: str
    config: LayerConfig
    connections: ConnectionManager

    def count(self, name: str, n: int = 1) -> None: ...

    def try_deserialize(self, data: bytes, where: str) -> dict[str, Any] | None: ...

    async def with_retry(
        self,
        what: str,
        call: Callable[[], Awaitable[T]],
        on_error: Callable[[BaseException], None] | None = None,
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
