"""A first-come-first-served limit on jobs at fal, which knows each waiter's place in line."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable


class SlotQueue:
    """Like a FIFO semaphore, but waiters are named so members can be shown their position and a
    waiting job can be withdrawn. `on_reorder(positions)` is called whenever places change, with
    {job_id: place} (1 = next)."""

    def __init__(self, capacity: int, on_reorder: Callable[[dict[int, int]], None]) -> None:
        self._capacity = capacity
        self._in_use = 0
        self._waiters: OrderedDict[int, asyncio.Future[None]] = OrderedDict()
        self._on_reorder = on_reorder

    @property
    def in_use(self) -> int:
        return self._in_use

    def positions(self) -> dict[int, int]:
        return {job_id: place for place, job_id in enumerate(self._waiters, start=1)}

    def must_wait(self) -> bool:
        """Whether `acquire` would wait now."""
        return self._in_use >= self._capacity or bool(self._waiters)

    def take(self) -> None:
        """Occupy a slot without waiting: for resumed jobs that are already at fal."""
        self._in_use += 1

    async def acquire(self, job_id: int) -> None:
        if not self.must_wait():
            self._in_use += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[job_id] = waiter
        self._on_reorder(self.positions())
        try:
            await waiter
        except asyncio.CancelledError:
            if self._waiters.pop(job_id, None) is not None:
                self._on_reorder(self.positions())
            elif waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we gave up: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            _, waiter = self._waiters.popitem(last=False)
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the next in line
                self._on_reorder(self.positions())
                return
        self._in_use -= 1
