"""The README's main command keeps working: every layer, every check, small numbers."""

from __future__ import annotations

import pytest

from streamlayer.testing import RedisServer
from streamlayer.tools.demo import run_demo


def test_demo_runs_and_checks_every_layer(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_demo(hosts=redis_server.url, count=200) == 0
    out = capsys.readouterr().out
    for name in ("streamlayer Streams", "streamlayer compat.core", "streamlayer compat.pubsub"):
        [row] = [line for line in out.splitlines() if line.startswith(name + " ")]
        # Round trips per send, counted by a connection class given in hosts: one
        # script call (a 0 here once meant the layer's lean writes skipped the
        # counting class).
        assert row[len(name) :].split()[0] == "1", row
