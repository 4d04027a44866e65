"""Layer counters as a Prometheus exporter sees them, scraped from a real registry."""

from __future__ import annotations

import pytest

from streamlayer import StreamsChannelLayer
from streamlayer.testing import RedisServer

prometheus_client = pytest.importorskip("prometheus_client")

from streamlayer.metrics import LayerCollector  # noqa: E402


async def test_counters_reach_prometheus(fresh_server: RedisServer) -> None:
    layer = StreamsChannelLayer(hosts=[fresh_server.url], prefix="metrics", capacity=2)
    try:
        channel = await layer.new_channel()
        for i in range(2):
            await layer.send(channel, {"type": "m", "i": i})
        with pytest.raises(Exception, match="capacity"):
            await layer.send(channel, {"type": "m", "i": 2})
        await layer.receive(channel)
        assert layer.stats() == {**layer.stats(), "sent": 2, "received": 1, "full": 1}
        registry = prometheus_client.CollectorRegistry()
        registry.register(LayerCollector(layer, alias="chat"))
        scraped = prometheus_client.generate_latest(registry).decode()
        assert 'streamlayer_sent_total{alias="chat"} 2.0' in scraped
        assert 'streamlayer_received_total{alias="chat"} 1.0' in scraped
        assert 'streamlayer_full_total{alias="chat"} 1.0' in scraped
        assert "streamlayer_reconnects_total" in scraped
    finally:
        await layer.flush()
        await layer.close()
