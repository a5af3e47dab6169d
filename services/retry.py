"""Exponential backoff with jitter, bounded by a deadline."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from .redact import describe_error

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Delay before retry n (1-based): base * factor**(n-1), capped, times a jitter in [0.5, 1.5).

    The jitter spreads retries of many jobs that failed together (a fal outage) so they do not
    come back as one burst.
    """

    base: float = 0.5
    factor: float = 2.0
    cap: float = 10.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        raw = min(self.cap, self.base * self.factor ** (attempt - 1))
        return raw * (rng or random).uniform(0.5, 1.5)


async def retrying(
    call: Callable[[], Awaitable[T]],
    *,
    retryable: Callable[[BaseException], bool],
    backoff: Backoff,
    deadline: float,
    what: str,
    attempts: int | None = None,
) -> T:
    """Run `call` until it succeeds, a non-retryable error occurs, `attempts` calls were made
    (if given) or the next wait would pass `deadline` (an event-loop time); the last error is
    re-raised."""
    loop = asyncio.get_running_loop()
    attempt = 0
    while True:
        try:
            return await call()
        except Exception as exc:
            attempt += 1
            if not retryable(exc) or (attempts is not None and attempt >= attempts):
                raise
            wait = backoff.delay(attempt)
            if loop.time() + wait > deadline:
                raise
            log.warning("%s failed (%s); retry %d in %.2fs", what, describe_error(exc), attempt, wait)
            await asyncio.sleep(wait)
