"""The one retry policy (streamlayer.retry) on its own: what is retried, what is not,
the bound, and what a caller sees when it gives up. No Redis: the errors are the
ones redis-py raises, the failing calls are plain coroutines."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis import exceptions as redis_errors

from streamlayer import RedisUnavailable
from streamlayer.exceptions import RedisAccessDenied, RedisOutOfMemory
from streamlayer.retry import retry_forever, retry_transient


class Flaky:
    """A call failing with ``errors`` in turn, then answering ``"done"``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


async def test_the_first_attempt_runs_as_is() -> None:
    call, heard = Flaky(), []
    assert await retry_transient(call, give_up_after=1, what="x", on_retry=heard.append) == "done"
    assert call.calls == 1 and heard == []


@pytest.mark.parametrize(
    "error",
    [
        redis_errors.ConnectionError("Connection reset by peer"),
        redis_errors.TimeoutError("Timeout reading from socket"),
        redis_errors.BusyLoadingError("LOADING Redis is loading the dataset in memory"),
        redis_errors.ReadOnlyError("READONLY You can't write against a read only replica."),
        redis_errors.ClusterDownError("CLUSTERDOWN The cluster is down"),
        redis_errors.TryAgainError("TRYAGAIN Multiple keys request during rehashing of slot"),
        redis_errors.SlotNotCoveredError('Slot "42" is not covered by the cluster.'),
        ConnectionResetError(104, "Connection reset by peer"),
    ],
)
async def test_a_blip_is_retried_and_each_failure_heard(error: Exception) -> None:
    """A restart, a failover, a Redis Cluster mid-failover: retried under the bound,
    not handed to the consumer as a failure."""
    call, heard = Flaky(error, error), []
    assert await retry_transient(call, give_up_after=10, what="x", on_retry=heard.append) == "done"
    assert call.calls == 3 and heard == [error, error]


async def test_it_gives_up_after_the_bound_naming_the_operation() -> None:
    async def down() -> None:
        raise redis_errors.ConnectionError("Connection refused")

    started = time.monotonic()
    with pytest.raises(
        RedisUnavailable, match=r"send to 'chat'.*0\.3s \(retry_timeout\)"
    ) as caught:
        await retry_transient(down, give_up_after=0.3, what="send to 'chat'")
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 3, f"gave up after {elapsed:.2f}s for a 0.3 s bound"
    assert isinstance(caught.value.__cause__, redis_errors.ConnectionError)


@pytest.mark.parametrize(
    "error",
    [
        redis_errors.AuthenticationError("WRONGPASS invalid username-password pair"),
        redis_errors.NoPermissionError("NOPERM this user has no permissions to run 'xadd'"),
    ],
)
async def test_refused_access_is_never_retried(error: Exception) -> None:
    """Wrong credentials or a missing ACL permission surface at once, even when met on
    a retry (AuthenticationError is a ConnectionError to redis-py)."""
    for call in (Flaky(error), Flaky(redis_errors.ConnectionError("reset"), error)):
        with pytest.raises(RedisAccessDenied, match="doctor") as caught:
            await retry_transient(call, give_up_after=10, what="x")
        assert caught.value.__cause__ is error
        assert not call.errors, "it stopped before meeting the refusal"
    assert call.calls == 2


@pytest.mark.parametrize(
    "error",
    [
        redis_errors.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'."),
        # Redis 6.2 reports a script's refused write as a plain error quoting it.
        redis_errors.ResponseError(
            "Error running script: OOM command not allowed when used memory > 'maxmemory'."
        ),
    ],
)
async def test_a_full_redis_is_never_retried(error: Exception) -> None:
    call = Flaky(error)
    with pytest.raises(RedisOutOfMemory, match="maxmemory"):
        await retry_transient(call, give_up_after=10, what="x")
    assert call.calls == 1


@pytest.mark.parametrize(
    "error", [redis_errors.ResponseError("WRONGTYPE Operation against a key"), ValueError("bad")]
)
async def test_other_errors_pass_through_unretried(error: Exception) -> None:
    call = Flaky(error)
    with pytest.raises(type(error)) as caught:
        await retry_transient(call, give_up_after=10, what="x")
    assert caught.value is error and call.calls == 1


async def test_retry_forever_keeps_trying_and_stays_cancellable() -> None:
    """A background connection retries until it works, and its task can be cancelled
    while it waits between attempts."""
    call = Flaky(*[redis_errors.ConnectionError("refused")] * 3)
    assert await retry_forever(call, what="subscribe") == "done"
    assert call.calls == 4

    attempted = asyncio.Event()

    async def down() -> None:
        attempted.set()
        raise redis_errors.ConnectionError("refused")

    task = asyncio.ensure_future(retry_forever(down, what="subscribe"))
    await asyncio.wait_for(attempted.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
