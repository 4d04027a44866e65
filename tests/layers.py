"""The layer classes every conformance test runs against.

Later layers join this list; a test that does not apply to one of them says
why with ``pytest.skip`` at the top of the test, so exclusions stay visible.
"""

from __future__ import annotations

import importlib

from streamlayer.base import StreamlayerLayer

LAYERS = [
    "streamlayer.compat.core.RedisChannelLayer",
    "streamlayer.StreamsChannelLayer",
]


def layer_class(path: str) -> type[StreamlayerLayer]:
    module, _, name = path.rpartition(".")
    cls: type[StreamlayerLayer] = getattr(importlib.import_module(module), name)
    return cls
