"""LocalChannels (streamlayer.local) and Memo (streamlayer.memo) on their own: a
process's queues need no Redis, so these are plain unit tests of what the layers
rely on (order, cancellation losing nothing, expiry counted, backlog reports,
who gets notices)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from streamlayer.local import LocalChannels
from streamlayer.memo import Memo


def counting() -> tuple[LocalChannels, Counter[str]]:
    counts: Counter[str] = Counter()

    def count(name: str, n: int) -> None:
        counts[name] += n

    return LocalChannels(count), counts


def later(seconds: float = 60) -> float:
    return time.time() + seconds


async def test_messages_come_out_in_order_per_channel() -> None:
    local, _ = counting()
    for n in range(3):
        local.deliver("a", {"n": n}, later())
        local.deliver("b", {"n": 10 + n}, later())
    assert [(await local.get("a"))["n"] for _ in range(3)] == [0, 1, 2]
    assert [(await local.get("b"))["n"] for _ in range(3)] == [10, 11, 12]
    assert local.queued() == 0


async def test_a_waiting_receiver_is_handed_the_message() -> None:
    local, _ = counting()
    waiting = asyncio.ensure_future(local.get("a"))
    await asyncio.sleep(0)  # it registered as a waiter
    assert local.waiting() == 1
    local.deliver("a", {"n": 1}, later())
    assert await asyncio.wait_for(waiting, 1) == {"n": 1}
    assert local.waiting() == 0


async def test_a_cancelled_receive_loses_nothing() -> None:
    """A message that reaches a receiver in the instant it is cancelled goes to the
    next receiver instead."""
    local, _ = counting()
    first = asyncio.ensure_future(local.get("a"))
    await asyncio.sleep(0)
    local.deliver("a", {"n": 1}, later())  # resolves first's future...
    first.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(local.get("a"), 1) == {"n": 1}


async def test_an_expired_message_is_counted_never_delivered() -> None:
    local, counts = counting()
    local.deliver("a", {"n": "old"}, time.time() - 1)
    local.deliver("a", {"n": "new"}, later())
    assert await local.get("a") == {"n": "new"}
    assert counts["expired"] == 1


def test_sweep_forgets_queues_whose_messages_all_expired() -> None:
    local, counts = counting()
    local.deliver("gone", {"n": 1}, time.time() - 1)
    local.deliver("gone", {"n": 2}, time.time() - 1)
    local.deliver("live", {"n": 3}, later())
    local.sweep(time.time())
    assert counts["expired"] == 2
    assert not local.has_queued("gone") and local.has_queued("live")
    assert local.queued() == 1


def test_counted_backlogs_are_reported_when_they_change() -> None:
    """What the Streams reader reports to Redis: each channel whose counted backlog
    changed since the last report, and the largest backlog."""
    local, _ = counting()
    for n in range(3):
        local.deliver("a", {"n": n}, later(), counted=True)
    local.deliver("b", {"n": 0}, later(), counted=True)
    local.deliver("c", {"n": 0}, later())  # not counted: not reported
    assert local.has_reports()
    assert local.reports() == ({"a": 3, "b": 1}, 3)
    assert local.reports() == ({}, 3)  # nothing moved
    local.report_all()  # Redis lost the reports
    assert local.reports() == ({"a": 3, "b": 1}, 3)


async def test_a_received_message_leaves_the_report() -> None:
    local, _ = counting()
    local.deliver("a", {"n": 0}, later(), counted=True)
    local.reports()
    await local.get("a")
    assert local.reports() == ({"a": 0}, 0)


def test_forgetting_a_channel_drops_and_counts_what_it_held() -> None:
    local, counts = counting()
    local.deliver("a", {"n": 0}, later())
    local.deliver("a", {"n": 1}, later())
    local.forget("a")
    assert counts["dropped"] == 2 and local.queued() == 0


async def test_fail_wakes_every_waiter_with_the_error() -> None:
    local, _ = counting()
    waiters = [asyncio.ensure_future(local.get(c)) for c in ("a", "a", "b")]
    await asyncio.sleep(0)
    local.fail(RuntimeError("closed"))
    for waiter in waiters:
        with pytest.raises(RuntimeError, match="closed"):
            await waiter
    assert local.waiting() == 0


async def test_deliver_to_gives_each_channel_its_own_copy() -> None:
    local, _ = counting()
    message = {"n": 1}
    local.deliver_to(["a", "b"], message, later())
    got_a, got_b = await local.get("a"), await local.get("b")
    assert got_a == got_b == message
    got_a["changed"] = True  # a consumer changing its message changes nobody else's
    assert "changed" not in got_b
    local.deliver_to(["c"], message, later())
    assert await local.get("c") is message  # one channel: no copy needed


async def test_a_shared_message_is_copied_for_whoever_takes_it() -> None:
    """deliver_to hands one entry to every member and the copy is made on receipt:
    a waiting receiver, a queued message and one passed on by a receiver cancelled
    in that instant each come out as a copy of their own, the original untouched."""
    local, _ = counting()
    waiting = asyncio.ensure_future(local.get("a"))
    cancelled = asyncio.ensure_future(local.get("b"))
    await asyncio.sleep(0)  # both wait
    message = {"n": 1, "nested": [1]}
    local.deliver_to(["a", "b", "c"], message, later())
    cancelled.cancel()  # b's entry goes back to b's queue
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    got = [await asyncio.wait_for(waiting, 1), await local.get("b"), await local.get("c")]
    assert got == [message] * 3
    assert all(each is not message for each in got)
    assert len({id(each) for each in got}) == 3
    for each in got:
        each["changed"] = True
    assert "changed" not in message


def test_notices_go_only_to_the_channels_that_asked() -> None:
    local, _ = counting()
    local.want_notices("asked")
    unasked = local.tell({"type": "redis.reconnect"}, ["asked", "plain", "other"], later())
    assert unasked == 2
    assert local.has_queued("asked") and not local.has_queued("plain")
    local.forget("asked")
    assert local.tell({"type": "redis.reconnect"}, ["asked"], later()) == 1


def test_live_channels_are_the_ones_received_from_lately() -> None:
    local, _ = counting()
    local.touch("recent")
    assert local.live_channels(60) == {"recent"}
    assert local.live_channels(-1) == set()


def test_a_memo_starts_afresh_when_full() -> None:
    memo: Memo[str, int] = Memo(3)
    for n in range(3):
        assert memo.remember(f"k{n}", n) == n
    assert dict(memo) == {"k0": 0, "k1": 1, "k2": 2}
    memo.remember("k3", 3)  # full: forgotten, then remembered
    assert dict(memo) == {"k3": 3}
    assert "k0" not in memo and memo.get("k3") == 3
