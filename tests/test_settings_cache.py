"""The store's cache of what moderators and members set: kept until forgotten, never keeping a
value read while a change was signalled, bounded."""

from __future__ import annotations

import asyncio

from services.settings_cache import SettingsCache


class Reads:
    """A database read that returns the current value and counts how often it was asked."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.count = 0

    async def __call__(self) -> str:
        self.count += 1
        return self.value


async def test_a_value_is_read_once_until_it_is_forgotten():
    cache, reads = SettingsCache(), Reads("v1")
    assert [await cache.get("policy", 1, reads) for _ in range(3)] == ["v1"] * 3
    assert reads.count == 1
    reads.value = "v2"
    cache.forget("policy", 1)
    assert await cache.get("policy", 1, reads) == "v2" and reads.count == 2
    cache.forget("recipes", 1)  # another kind, or another key, leaves it alone
    cache.forget("policy", 2)
    assert await cache.get("policy", 1, reads) == "v2" and reads.count == 2


async def test_a_value_read_while_a_change_is_signalled_is_not_kept():
    cache = SettingsCache()
    started, finish = asyncio.Event(), asyncio.Event()

    async def slow_read() -> str:
        started.set()
        await finish.wait()
        return "old"  # what the row held when the read began

    reading = asyncio.create_task(cache.get("defaults", 7, slow_read))
    await started.wait()
    cache.forget("defaults", 7)  # the change's notification arrives before the read's answer
    finish.set()
    assert await reading == "old"
    assert await cache.get("defaults", 7, Reads("new")) == "new"


async def test_forget_all_and_the_bound():
    cache = SettingsCache(max_entries=2)
    for key in (1, 2, 3):
        await cache.get("recipes", key, Reads(f"r{key}"))
    recount = Reads("again")
    assert await cache.get("recipes", 1, recount) == "again"  # the oldest made room
    assert await cache.get("recipes", 3, recount) == "r3" and recount.count == 1
    cache.forget_all()
    assert await cache.get("recipes", 3, recount) == "again" and recount.count == 2
