"""channel_expiry: an expiry per channel pattern (first match wins, ``expiry`` the
default), validated like channel_capacity, honoured by every layer for the channels
it matches (group messages included) while the other channels on the same layer keep
theirs."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from streamlayer.config import ConfigError, LayerConfig

from .conftest import LayerFactory
from .layers import keeps, requires

RECEIVE_TIMEOUT = 10
#: Long enough that nothing in a test outlives it, short enough to wait out.
SHORT = 1.0


async def recv(layer: Any, channel: str) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), RECEIVE_TIMEOUT)


async def old_then_new(layer: Any, channels: list[str], wait: float) -> None:
    """Send "old" to each channel, wait ``wait`` seconds (the message must outlive an
    expiry: time itself is under test), then send "new"."""
    for channel in channels:
        await layer.send(channel, {"type": "old"})
    await asyncio.sleep(wait)
    for channel in channels:
        await layer.send(channel, {"type": "new"})


async def both_kinds(
    make_layer: LayerFactory, layer: Any, first: str, second: str
) -> tuple[list[str], list[str]]:
    """Channels named ``first`` and ``second``: a process-specific one each, and on
    layers that queue, a normal one each."""
    ones, twos = [await layer.new_channel(first)], [await layer.new_channel(second)]
    if keeps(make_layer, "queueing"):
        ones.append(f"{first}-jobs")
        twos.append(f"{second}-jobs")
    return ones, twos


def test_patterns_are_validated_and_the_first_match_wins() -> None:
    config = LayerConfig.from_options(
        {
            "expiry": 60,
            "channel_expiry": {
                "progress-*": 5,
                re.compile(r"^upload\.\d+$"): 2.5,
                "progress-slow": 600,  # after "progress-*": never reached
            },
        }
    )
    assert config.expiry_for("progress-1") == 5
    assert config.expiry_for("progress-slow") == 5
    assert config.expiry_for("upload.7") == 2.5
    assert config.expiry_for("chat") == 60
    assert config.longest_expiry == 600
    assert config.claim_after_for("progress-1") == 2.5  # a crashed reader's entry in time
    assert config.claim_after_for("chat") == 10
    with pytest.raises(ConfigError, match=r"channel_expiry\['p\*'\]: .*greater than 0"):
        LayerConfig.from_options({"channel_expiry": {"p*": 0}})
    with pytest.raises(TypeError, match=r"channel_expiry\['p\*'\]: .*number of seconds"):
        LayerConfig.from_options({"channel_expiry": {"p*": "5"}})
    with pytest.raises(TypeError, match="channel_expiry must be a dict of pattern -> seconds"):
        LayerConfig.from_options({"channel_expiry": 5})
    with pytest.raises(TypeError, match="glob strings or compiled regexes"):
        LayerConfig.from_options({"channel_expiry": {5: 5}})


async def test_short_expiry_channels_expire_while_the_others_keep(
    make_layer: LayerFactory,
) -> None:
    """One layer, both channel kinds: the messages of channels matching the short
    pattern are gone after it, the others' are delivered."""
    layer = make_layer(expiry=60, channel_expiry={"progress*": SHORT})
    assert layer.get_expiry("progress-1") == SHORT and layer.get_expiry("chat") == 60
    short, other = await both_kinds(make_layer, layer, "progress", "chat")
    await old_then_new(layer, short + other, SHORT + 0.5)
    for channel in short:
        assert await recv(layer, channel) == {"type": "new"}, channel
    for channel in other:
        assert await recv(layer, channel) == {"type": "old"}, channel
        assert await recv(layer, channel) == {"type": "new"}, channel
    # Counted where a reader drops one (a normal channel's is trimmed in Redis unread).
    assert layer.stats.expired >= 1
    assert layer.stats.reconnects == 0


async def test_group_messages_expire_per_member(make_layer: LayerFactory) -> None:
    """A group with a short-expiry member and others: the one message expires for that
    member only, on the stored layers also for members of another process and for a
    normal channel, whose copies wait in Redis."""
    requires(make_layer, "remote_members")
    sender = make_layer(expiry=60, channel_expiry={"progress*": SHORT})
    receiver = make_layer(expiry=60, channel_expiry={"progress*": SHORT})
    short = [await receiver.new_channel("progress"), "progress-queue"]
    other = [await receiver.new_channel("chat"), "chat-queue"]
    for channel in short + other:
        await sender.group_add("mixed", channel)
    await sender.group_send("mixed", {"type": "old"})
    await sender.group_send_bulk("mixed", [{"type": "old-bulk"}])
    await asyncio.sleep(SHORT + 0.5)
    await sender.group_send("mixed", {"type": "new"})
    for channel in short:
        assert await recv(receiver, channel) == {"type": "new"}, channel
    for channel in other:
        got = [(await recv(receiver, channel))["type"] for _ in range(3)]
        assert got == ["old", "old-bulk", "new"], channel


async def test_a_longer_channel_expiry_outlives_the_default(make_layer: LayerFactory) -> None:
    """A pattern may also lengthen a channel's life past ``expiry``: its messages wait,
    encrypted ones too (the encryption's age limit follows the longest expiry)."""
    layer = make_layer(
        expiry=SHORT,
        channel_expiry={"slow*": 30},
        symmetric_encryption_keys=["k" * 32],
    )
    slow, fast = await both_kinds(make_layer, layer, "slow", "fast")
    await old_then_new(layer, slow + fast, SHORT + 0.5)
    for channel in slow:
        assert await recv(layer, channel) == {"type": "old"}, channel
    for channel in slow + fast:
        assert await recv(layer, channel) == {"type": "new"}, channel
