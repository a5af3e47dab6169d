import asyncio
import random

import pytest

from services.retry import Backoff, retrying


def test_backoff_grows_exponentially_within_jitter_and_cap():
    backoff = Backoff(base=0.5, factor=2, cap=4)
    rng = random.Random(7)
    for attempt, raw in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 4.0), (9, 4.0)]:
        for _ in range(50):
            delay = backoff.delay(attempt, rng)
            assert raw * 0.5 <= delay < raw * 1.5


def test_jitter_spreads_retries():
    rng = random.Random(1)
    delays = {round(Backoff().delay(3, rng), 6) for _ in range(20)}
    assert len(delays) == 20


async def test_retrying_retries_transient_errors_until_success():
    calls = []

    async def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("boom")
        return "ok"

    loop = asyncio.get_running_loop()
    result = await retrying(
        flaky,
        retryable=lambda e: isinstance(e, ConnectionError),
        backoff=Backoff(base=0.001),
        deadline=loop.time() + 5,
        what="test",
    )
    assert result == "ok" and len(calls) == 3


async def test_retrying_does_not_retry_permanent_errors():
    calls = []

    async def broken():
        calls.append(1)
        raise ValueError("no")

    loop = asyncio.get_running_loop()
    with pytest.raises(ValueError):
        await retrying(
            broken, retryable=lambda e: False, backoff=Backoff(base=0.001), deadline=loop.time() + 5, what="t"
        )
    assert len(calls) == 1


async def test_retrying_gives_up_when_the_next_wait_would_pass_the_deadline():
    calls = []

    async def down():
        calls.append(1)
        raise ConnectionError("down")

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ConnectionError):
        await retrying(
            down, retryable=lambda e: True, backoff=Backoff(base=0.05, cap=0.05), deadline=started + 0.2, what="t"
        )
    assert loop.time() - started < 0.3
    assert 2 <= len(calls) <= 8
