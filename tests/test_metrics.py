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


def test_the_docs_describe_every_counter_one_by_one() -> None:
    """docs/django.rst has one row per counter of ``layer.stats()``, and no other."""
    import dataclasses
    import re
    from pathlib import Path

    from streamlayer.base import LayerStats

    docs = (Path(__file__).resolve().parent.parent / "docs" / "django.rst").read_text()
    table = docs.split("   * - counter", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^   \* - ``(\w+)``$", table, flags=re.MULTILINE)
    assert rows == [f.name for f in dataclasses.fields(LayerStats) if not f.name.startswith("_")]
