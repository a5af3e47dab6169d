"""A member's history in the store, on both engines: keyset pages, the chain of edits, results
shown again; and the indexes that keep the pages cheap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg

from services.job import Job
from services.postgres_store import PostgresStore, _positional
from services.sqlite_store import SqliteStore
from services.store import Store
from tests import test_store
from tests.test_store import NOW, Opener, request

new_store = test_store.new_store  # the fixture that opens each engine's store


async def jobs_at(store: Store, times: list[float], **changes: Any) -> list[Job]:
    made = []
    for at in times:
        job = await store.create_job(request(**changes))
        job.created_at = at
        await store.save(job)
        made.append(job)
    return made


def ids(jobs: list[Job]) -> list[int]:
    return [job.id for job in jobs]


async def test_pages_walk_a_members_jobs_both_ways_by_keyset(new_store: Opener):
    async with new_store() as store:
        # Two jobs at the same instant are told apart by their ids.
        a, b, c, d, e = await jobs_at(store, [NOW - 50, NOW - 40, NOW - 40, NOW - 20, NOW - 10])
        await jobs_at(store, [NOW - 30], user_id=8)  # someone else's
        (elsewhere,) = await jobs_at(store, [NOW - 15], guild_id=5)
        first = await store.member_jobs(3, guild_id=1, after=None, newer=False, limit=2)
        assert ids(first) == [e.id, d.id]
        second = await store.member_jobs(3, guild_id=1, after=(d.created_at, d.id), newer=False, limit=2)
        assert ids(second) == [c.id, b.id]
        last = await store.member_jobs(3, guild_id=1, after=(b.created_at, b.id), newer=False, limit=2)
        assert ids(last) == [a.id]
        back = await store.member_jobs(3, guild_id=1, after=(c.created_at, c.id), newer=True, limit=2)
        assert ids(back) == [d.id, e.id]  # walking back: oldest first
        everywhere = await store.member_jobs(3, guild_id=None, after=None, newer=False, limit=3)
        assert ids(everywhere) == [e.id, elsewhere.id, d.id]


async def test_the_chain_of_edits_and_shown_results(new_store: Opener):
    async with new_store() as store:
        (source,) = await jobs_at(store, [NOW - 30])
        first, second = await jobs_at(store, [NOW - 20, NOW - 10], parent_job_id=source.id)
        await jobs_at(store, [NOW - 5], parent_job_id=source.id, user_id=8)  # bob edited it too
        assert ids(await store.jobs_made_from(source.id, 3, limit=5)) == [second.id, first.id]
        assert await store.made_from_counts([source.id, first.id], 3) == {source.id: 2}
        assert await store.made_from_counts([], 3) == {}
        assert await store.shown_job(999) is None
        await store.record_shown(999, source.id, channel_id=7, by_user=3, now=NOW)
        assert await store.shown_job(999) == (source.id, 7)
        first.posted_image_urls = ["https://cdn.example/a.png?ex=1"]
        await store.save(first)
        await store.set_posted_image_urls(
            first.id, ["https://cdn.example/a.png?ex=2"]
        )  # unfinished: its driver writes it
        second.delivered_at = NOW
        await store.save(second)
        await store.set_posted_image_urls(second.id, ["https://cdn.example/b.png?ex=2"])
    async with new_store() as store:
        loaded, finished = await store.get_job(first.id), await store.get_job(second.id)
        assert loaded is not None and loaded.posted_image_urls == ["https://cdn.example/a.png?ex=1"]
        assert finished is not None and finished.posted_image_urls == ["https://cdn.example/b.png?ex=2"]


async def page_statement(store: Store, guild_id: int | None, after: Job) -> tuple[str, dict[str, Any]]:
    """The statement the store runs for a page, to ask the engine how it would run it."""
    ran: list[tuple[str, dict[str, Any]]] = []
    fetch = store._fetch

    async def recording(sql: str, args: Any) -> Any:
        ran.append((sql, dict(args)))
        return await fetch(sql, args)

    store._fetch = recording  # type: ignore[method-assign]
    try:
        await store.member_jobs(3, guild_id=guild_id, after=(after.created_at, after.id), newer=False, limit=5)
    finally:
        del store._fetch
    ((sql, args),) = ran
    return sql, args


async def test_sqlite_reads_a_page_through_an_index(tmp_path: Path):
    async with SqliteStore(tmp_path / "db.sqlite3") as store:
        (job,) = await jobs_at(store, [NOW])
        for guild_id in (None, 1):
            sql, args = await page_statement(store, guild_id, job)
            plan = " ".join(str(row[3]) for row in await store._fetch(f"EXPLAIN QUERY PLAN {sql}", args))
            assert "USING INDEX" in plan and "TEMP B-TREE" not in plan, plan  # no scan, no sort


async def test_postgres_reads_a_page_through_an_index(database_url: str):
    async with PostgresStore(database_url, instance_id="bot-0", lease_seconds=60, connect_timeout=10) as store:
        (job,) = await jobs_at(store, [NOW])
        sql, args = await page_statement(store, None, job)
    text, names = _positional(sql)
    db = await asyncpg.connect(database_url)
    try:
        await db.execute("SET enable_seqscan = off")  # a tiny table: ask whether an index serves it
        plan = "\n".join(row[0] for row in await db.fetch(f"EXPLAIN {text}", *(args[name] for name in names)))
    finally:
        await db.close()
    assert "jobs_history" in plan and "Sort" not in plan, plan
