"""The one retry policy of streamlayer: transient Redis errors are retried with
exponential backoff and jitter for at most ``retry_timeout`` seconds.

redis-py's own connection-level retries are switched off in
:mod:`streamlayer.connections`, so this is the only place where a command is
repeated and the bound a user configures is the bound they get.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import tenacity
from redis import exceptions as redis_errors

from .exceptions import RedisAccessDenied, RedisOutOfMemory, RedisUnavailable

__all__ = [
    "ACCESS_ERRORS",
    "DEFAULT_MAX_WAIT",
    "READER_MAX_WAIT",
    "TRANSIENT_ERRORS",
    "access_denied",
    "is_out_of_memory",
    "out_of_memory",
    "retry_after",
    "retry_forever",
    "retry_transient",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Errors that say "the server is not reachable right now", not "the command is wrong".
#: ReadOnlyError is what a demoted master answers during a Sentinel failover;
#: BusyLoadingError (a ConnectionError) is a restarted server loading its data;
#: CLUSTERDOWN, TRYAGAIN and an uncovered slot are a Redis Cluster mid-failover.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.SlotNotCoveredError,
    ConnectionError,
    TimeoutError,
)

#: Errors that say "this user may not": WRONGPASS / NOAUTH (redis-py makes those a
#: ConnectionError, so they are told apart first) and NOPERM. Never retried.
ACCESS_ERRORS: tuple[type[BaseException], ...] = (
    redis_errors.AuthenticationError,
    redis_errors.AuthenticationWrongNumberOfArgsError,
    redis_errors.NoPermissionError,
)


def access_denied(what: str, error: BaseException) -> RedisAccessDenied:
    """The error a caller sees for an ACCESS_ERRORS one (chain it with ``from``)."""
    return RedisAccessDenied(
        f"{what}: Redis refused access ({error}); check the password or ACL user in "
        "hosts (python -m streamlayer doctor lists what the user lacks)"
    )


def out_of_memory(what: str, error: BaseException) -> RedisOutOfMemory:
    """The error a caller sees for Redis's OOM refusal (chain it with ``from``)."""
    return RedisOutOfMemory(
        f"{what}: Redis is at its memory limit (maxmemory) and stored nothing; "
        f"messages already accepted are still delivered and free memory as they are "
        f"received ({error})"
    )


def is_out_of_memory(error: BaseException) -> bool:
    """Redis's OOM refusal: redis-py's OutOfMemoryError, or (Redis 6.2, from inside a
    script) a ResponseError that quotes it."""
    return isinstance(error, redis_errors.OutOfMemoryError) or (
        isinstance(error, redis_errors.ResponseError) and "OOM command not allowed" in str(error)
    )


def _retryable(error: BaseException) -> bool:
    return isinstance(error, TRANSIENT_ERRORS) and not isinstance(error, ACCESS_ERRORS)


_INITIAL_WAIT = 0.05
DEFAULT_MAX_WAIT = 1.0
#: An inbox reader that lost Redis retries sooner: when Redis comes back empty, the
#: reader is what restores its process's group memberships, and every group send
#: that reaches the empty Redis before it does finds those members gone.
READER_MAX_WAIT = 0.2
#: A background connection (a Pub/Sub subscriber) waits longer between attempts:
#: nobody is blocked on it, and a server that is down is not hammered.
_MAX_WAIT_FOREVER = 2.0


def _backoff(max_wait: float) -> tenacity.wait.wait_base:
    """Exponential backoff with full jitter, from 50 ms up to ``max_wait``."""
    return tenacity.wait_random_exponential(multiplier=_INITIAL_WAIT, max=max_wait)


async def retry_transient(
    call: Callable[[], Awaitable[T]],
    *,
    give_up_after: float,
    what: str,
    on_retry: Callable[[BaseException], None] | None = None,
    max_wait: float = DEFAULT_MAX_WAIT,
) -> T:
    """Await ``call()``, retrying transient errors for up to ``give_up_after`` seconds
    (backoff with jitter from 50 ms up to ``max_wait`` between attempts).

    The first attempt is a plain await: the happy path costs one frame and nothing
    else (it is every send's and every read's). ``what`` names the operation and
    the server in the final error message. ``on_retry`` is told about each
    transient failure (used to report disconnects). Refused credentials
    or permissions and a full Redis are never retried: they surface at once as
    RedisAccessDenied / RedisOutOfMemory, whichever attempt met them (the one place
    they are told apart from a blip).
    """
    try:
        return await call()
    except Exception as first:
        return await retry_after(first, call, give_up_after, what, on_retry, max_wait)


async def retry_after(
    first: Exception,
    call: Callable[[], Awaitable[T]],
    give_up_after: float,
    what: str,
    on_retry: Callable[[BaseException], None] | None,
    max_wait: float = DEFAULT_MAX_WAIT,
) -> T:
    """What :func:`retry_transient` does once ``call()`` failed with ``first``: raise it
    (as the caller should see it) unless it is transient, else retry."""
    try:
        return await _retried(first, call, give_up_after, what, on_retry, max_wait)
    except ACCESS_ERRORS as denied:
        raise access_denied(what, denied) from denied
    except redis_errors.ResponseError as refused:
        if is_out_of_memory(refused):
            raise out_of_memory(what, refused) from refused
        raise


async def _retried(
    first: Exception,
    call: Callable[[], Awaitable[T]],
    give_up_after: float,
    what: str,
    on_retry: Callable[[BaseException], None] | None,
    max_wait: float,
) -> T:
    if not _retryable(first):
        raise first
    if on_retry is not None:
        on_retry(first)
    logger.info("retrying %s after %s: %s", what, type(first).__name__, first)

    def _notify(state: tenacity.RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            error = state.outcome.exception()
            if error is not None:
                on_retry(error)

    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(_retryable),
        wait=_backoff(max_wait),
        stop=tenacity.stop_after_delay(give_up_after),
        after=_notify,
        reraise=False,
    )
    try:
        async for attempt in retrying:
            with attempt:
                return await call()
    except tenacity.RetryError as exc:
        cause = exc.last_attempt.exception()
        raise RedisUnavailable(
            f"{what}: Redis still unreachable after retrying for {give_up_after:g}s "
            f"(retry_timeout): {cause}"
        ) from cause
    raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover


async def retry_forever(call: Callable[[], Awaitable[T]], *, what: str) -> T:
    """Await ``call()``, retrying transient errors with the same backoff until it works
    (or the task is cancelled): for background connections that must come back."""

    def _log(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        logger.info("retrying %s: %s", what, error)

    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(_retryable),
        wait=_backoff(_MAX_WAIT_FOREVER),
        stop=tenacity.stop_never,
        before_sleep=_log,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await call()
    raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover
