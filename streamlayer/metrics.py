"""Layer counters for Prometheus: a ``prometheus_client`` collector.

Each counter of ``layer.stats()`` becomes a Prometheus counter
``streamlayer_<name>_total`` labelled with the layer's alias, read at scrape time
(nothing runs between scrapes)::

    from prometheus_client import REGISTRY
    from streamlayer.metrics import LayerCollector

    REGISTRY.register(LayerCollector())          # the "default" channel layer

``prometheus_client`` is not a dependency of streamlayer: install it yourself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from channels.layers import DEFAULT_CHANNEL_LAYER, get_channel_layer

__all__ = ["LayerCollector"]


class LayerCollector:
    """Collects one channel layer's counters (looked up by alias at each scrape, so
    it follows Channels' layer registry, or given directly)."""

    def __init__(
        self, layer: Any = None, alias: str = DEFAULT_CHANNEL_LAYER, namespace: str = "streamlayer"
    ) -> None:
        self._layer = layer
        self.alias = alias
        self.namespace = namespace

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        layer = self._layer if self._layer is not None else get_channel_layer(self.alias)
        stats = getattr(layer, "stats", None)
        if not callable(stats):
            return
        for name, value in stats().items():
            family = CounterMetricFamily(
                f"{self.namespace}_{name}",
                f"streamlayer: {name.replace('_', ' ')} (see LayerStats)",
                labels=["alias"],
            )
            family.add_metric([self.alias], value)
            yield family
