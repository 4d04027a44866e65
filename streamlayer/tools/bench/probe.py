"""Probes: the bench's handshake before a clock starts.

channels_redis' Pub/Sub layer subscribes without waiting for Redis to confirm
(redis-py writes ``SUBSCRIBE`` and returns) and publishes on another connection, so
Redis may run a ``PUBLISH`` sent right after ``new_channel()`` or ``group_add()``
before the subscription, and the message reaches nobody. A CI run's fan-out once
waited out its whole minute for such a message. A real app subscribes long before
its traffic comes, so the bench does not time that race: before a scenario's clock
starts, it sends probes until every reader has heard one. Readers skip probes
(a late or repeated one may still arrive); none is counted or timed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import tenacity

from .errors import BenchError

__all__ = ["PROBE", "NotHeard", "heard", "probing", "receive", "until_heard"]

#: The probe message; nothing else the bench sends has its type.
PROBE = {"type": "bench.probe"}
#: How long probing may take in all before the layer is declared broken.
_GIVE_UP = 60.0
#: The first wait for the readers after a probe; each next wait doubles, up to the last.
_FIRST_WAIT = 0.05
_LAST_WAIT = 1.0


class NotHeard(BenchError):
    """Some readers heard no probe in ``_GIVE_UP`` seconds."""


async def receive(layer: Any, channel: str) -> Any:
    """The next message on ``channel`` that is not a probe."""
    while True:
        message = await layer.receive(channel)
        if message.get("type") != PROBE["type"]:
            return message


async def heard(layer: Any, channel: str) -> None:
    """Returns once ``channel`` received a probe (nothing else is sent to it yet)."""
    while (await layer.receive(channel)).get("type") != PROBE["type"]:
        pass


class _Unanswered(Exception):
    """Some readers have not heard a probe yet (probe again)."""


async def probing(
    probe: Callable[[], Awaitable[object]], answers: Collection[Awaitable[Any]]
) -> None:
    """Call ``probe`` until every one of ``answers`` finished: after each probe, wait
    for them a while, twice as long each time (a big group takes a while to hear).

    Raises :class:`NotHeard` after ``_GIVE_UP`` seconds; an answer that raised
    raises here."""
    pending: set[asyncio.Future[Any]] = {asyncio.ensure_future(a) for a in answers}
    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type(_Unanswered),
        stop=tenacity.stop_after_delay(_GIVE_UP),
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                await probe()
                waited = min(
                    _LAST_WAIT, _FIRST_WAIT * 2 ** (attempt.retry_state.attempt_number - 1)
                )
                done, pending = await asyncio.wait(pending, timeout=waited)
                for answer in done:
                    answer.result()
                if pending:
                    raise _Unanswered(len(pending))
    except _Unanswered as exc:
        raise NotHeard(f"{exc.args[0]} readers heard no probe in {_GIVE_UP:.0f} s") from None
    finally:
        for answer in pending:
            answer.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def until_heard(layer: Any, channels: Collection[str], group: str | None = None) -> None:
    """Probe until every one of ``channels`` (of this process) heard one: through
    ``group_send`` to ``group`` when given (the path the scenario's messages take),
    else a ``send`` to each channel. Nothing else may be sent to them meanwhile."""
    hearing = {channel: asyncio.ensure_future(heard(layer, channel)) for channel in channels}

    async def probe() -> None:
        if group is not None:
            await layer.group_send(group, PROBE)
            return
        for channel, task in hearing.items():
            if not task.done():
                await layer.send(channel, PROBE)

    await probing(probe, hearing.values())
