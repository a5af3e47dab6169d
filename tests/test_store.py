"""The store on both engines (SQLite, and a real PostgreSQL server): migrations keep data, jobs
round-trip, usage counts what the policy limits. What only one engine has is tested on it (SQLite's
two connections and disk errors here; PostgreSQL's leases in test_store_leases.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import sqlite3
import time
import typing
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.fal_queue import FalRequest
from services.flux_kontext import KontextEdit, KontextOptions
from services.job import Job, JobPlace, JobRequest, JobResult, JobState, ResultImage
from services.member_defaults import MemberDefaults
from services.policy import GuildPolicy, month_start
from services.postgres_store import PostgresStore
from services.sqlite_store import SqliteStore
from services.store import _SPENT, MIGRATIONS, Store, StoreFailed, _to_row, migration_text

NOW = time.time()

Opener = Callable[[], Store]


def request(user_id: int = 3, **changes) -> JobRequest:
    values: dict[str, Any] = dict(
        guild_id=1,
        channel_id=2,
        user_id=user_id,
        application_id=4,
        interaction_token="tok",
        interaction_created_at=NOW,
        message_id=None,
        channel_nsfw=False,
        upload_limit=10 << 20,
        edit=KontextEdit("p", ("https://cdn/u.png",), KontextOptions(num_images=2, safety_tolerance=3)),
    )
    values.update(changes)
    return JobRequest(**values)


@pytest.fixture(params=["sqlite", "postgres"])
async def new_store(request, tmp_path: Path) -> Opener:
    """Opens a store on this test's database, as a (re)started bot would: SQLite in DATA_DIR, or
    PostgreSQL as the same INSTANCE_ID (a restart of the same process)."""
    if request.param == "sqlite":
        return lambda: SqliteStore(tmp_path / "db.sqlite3")
    url = await request.getfixturevalue("postgres_server").new_database()
    return lambda: PostgresStore(url, instance_id="bot-0", lease_seconds=60, connect_timeout=10)


async def test_upgrading_an_old_sqlite_database_keeps_policies_and_jobs(tmp_path: Path):
    path = tmp_path / "kontext.sqlite3"
    with sqlite3.connect(path) as db:  # a database left by an older release (schema v2)
        for number, migration in enumerate(MIGRATIONS[:2], start=1):
            db.executescript(f"{migration_text(migration, 'sqlite')}\nPRAGMA user_version = {number};")
        db.execute("INSERT INTO guild_policies VALUES (1, '{\"safety_maximum\": 4}', 0, 9)")
    store = await SqliteStore(path).open()
    try:
        assert (await store.policy(1)).safety_maximum == 4
        job = await store.create_job(request())
        loaded = await store.get_job(job.id)
        assert loaded is not None and loaded.delivered_parts == 0
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)


async def test_upgrading_an_old_postgres_database_keeps_policies_and_jobs(database_url: str):
    db = await asyncpg.connect(database_url)
    try:  # schema v6: before leases
        await db.execute(
            "CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (6)"
        )
        for migration in MIGRATIONS[:6]:
            await db.execute(migration_text(migration, "postgres"))
        await db.execute("INSERT INTO guild_policies VALUES (1, '{\"safety_maximum\": 4}', 0, 9)")
    finally:
        await db.close()
    async with PostgresStore(database_url, instance_id="bot-0", lease_seconds=60, connect_timeout=10) as store:
        assert (await store.policy(1)).safety_maximum == 4
        job = await store.create_job(request(guild_id=1 << 60))  # a snowflake needs 64 bits
        loaded = await store.get_job(job.id)
        assert loaded is not None and loaded.guild_id == 1 << 60 and loaded.delivered_parts == 0
    db = await asyncpg.connect(database_url)
    try:
        assert await db.fetchval("SELECT version FROM schema_version") == len(MIGRATIONS)
    finally:
        await db.close()


async def test_a_job_round_trips_with_everything_it_carries_and_resumes_after_a_restart(new_store: Opener):
    async with new_store() as store:
        job = await store.create_job(
            request(
                notes={"safety_limited_to": 3},
                parent_job_id=None,
                guild_locale="fr",
                parent_channel_id=1 << 60,
                private_thread=True,
            )
        )
        job.state = JobState.SUCCEEDED
        job.message_id = 77
        job.request = FalRequest("rid", "s", "r", "c")
        job.result = JobResult(5, [ResultImage(10, "image/png", True, 64, 64, "http://cdn/a", on_disk=True)], 1.5)
        job.delivered_in_channel = True
        job.delivered_parts = 2
        await store.save(job)
        loaded = await store.get_job(job.id)
        assert loaded == job
    async with new_store() as store:
        assert await store.claim() == [loaded]


async def test_usage_counts_what_the_limits_are_about(new_store: Opener):
    async with new_store() as store:
        await store.create_job(request())  # still running
        finished = await store.create_job(request())
        finished.state, finished.delivered_at = JobState.SUCCEEDED, NOW
        finished.request = FalRequest("rid", "s", "r", "c")
        await store.save(finished)
        cancelled_in_queue = await store.create_job(request())
        cancelled_in_queue.state, cancelled_in_queue.delivered_at = JobState.CANCELLED, NOW
        cancelled_in_queue.request = FalRequest("rid2", "s", "r", "c")
        await store.save(cancelled_in_queue)
        failed_at_fal = await store.create_job(request())  # fal's own 5xx: not billed
        failed_at_fal.state, failed_at_fal.delivered_at, failed_at_fal.error_code = JobState.FAILED, NOW, "fal_failed"
        failed_at_fal.request, failed_at_fal.started_at = FalRequest("rid3", "s", "r", "c"), NOW
        await store.save(failed_at_fal)
        await store.create_job(request(user_id=8))  # someone else
        await store.create_job(request(guild_id=5))  # another server
        usage = await store.usage(1, 3, NOW)
        # A member's day counts what ran or runs: a job that cost nothing (cancelled before it
        # started, failed on fal's side) does not use it up.
        assert usage.member_jobs_today == 2
        assert usage.member_active_jobs == 1 and usage.guild_active_jobs == 2
        # in flight (reserved) + reached fal; the job cancelled before it started is free
        assert usage.guild_images_this_month == 2 + 2 + 2
        assert usage.member_last_job_at == failed_at_fal.created_at
        assert (await store.usage(1, 3, NOW, all_servers=True)).all_images_this_month == 2 + 2 + 2 + 2


async def test_the_cooldown_leaves_out_a_job_the_bot_closed_before_it_was_acknowledged(new_store: Opener):
    """The member was told something went wrong on the bot's side and to try again: that job,
    in a server or outside one, does not start their cooldown; one they saw does."""
    async with new_store() as store:
        seen = await store.create_job(request())
        seen.state, seen.delivered_at, seen.error_code = JobState.FAILED, NOW, "bad_input"
        await store.save(seen)
        for place in (JobPlace.SERVER, JobPlace.BOT_DM):
            abandoned = await store.create_job(request(place=place))
            abandoned.state, abandoned.delivered_at, abandoned.error_code = JobState.FAILED, NOW, "abandoned"
            await store.save(abandoned)
        assert (await store.usage(1, 3, NOW)).member_last_job_at == seen.created_at
        assert (await store.personal_usage(3, NOW)).member_last_job_at is None


async def test_the_monthly_counters_follow_every_transition_as_a_sum_over_the_jobs_would(new_store: Opener):
    """Budgets read counters the database keeps with each job write; whatever jobs go through
    (billed or not, moved to another month, personal), they equal the sum they replace."""
    rng = random.Random(7)
    month = month_start(NOW)
    spent_sql = f"SELECT COALESCE(SUM(images), 0) FROM jobs WHERE created_at >= :month AND {_SPENT}"
    async with new_store() as store:
        jobs = []
        for _ in range(60):
            guild = rng.choice((1, 2))
            place = rng.choice((JobPlace.SERVER, JobPlace.SERVER, JobPlace.BOT_DM))
            options = KontextOptions(num_images=rng.randint(1, 4))
            edit = KontextEdit("p", ("https://cdn/u.png",), options)
            jobs.append(await store.create_job(request(guild_id=guild, place=place, edit=edit)))
        for _ in range(300):
            job = rng.choice(jobs)
            job.state = rng.choice(list(JobState))
            job.started_at = rng.choice((None, month + 5))
            job.request = rng.choice((None, FalRequest("rid", "s", "r", "c")))
            job.error_code = rng.choice((None, "fal_rejected", "fal_failed", "timeout", "result_expired", "bad_output"))
            if rng.random() < 0.1:  # another month, before or into this one
                job.created_at = rng.choice((month - 86400, month + 3600))
            await store.save(job)
        for guild in (1, 2):
            usage = await store.usage(guild, 3, NOW, all_servers=True)
            args = {"month": month, "guild": guild}
            (row,) = await store._fetch(f"{spent_sql} AND guild_id = :guild AND place = 'server'", args)
            assert usage.guild_images_this_month == row[0]
            (row,) = await store._fetch(spent_sql, args)
            assert usage.all_images_this_month == row[0] > 0


async def test_the_monthly_counters_start_from_the_jobs_an_upgraded_database_holds(tmp_path: Path, database_url: str):
    """The migrations that add the counters, then count the images of jobs that failed once
    fal made them, count the jobs already there: one succeeded, one whose result expired while
    the bot was stopped (fal billed it, though the bot never saw it start)."""
    counters = next(i for i, m in enumerate(MIGRATIONS) if "monthly_images" in migration_text(m, "sqlite"))
    jobs = [Job(**{f.name: getattr(request(), f.name) for f in dataclasses.fields(JobRequest)}) for _ in range(2)]
    jobs[0].state, jobs[0].request, jobs[0].started_at = JobState.SUCCEEDED, FalRequest("rid", "s", "r", "c"), NOW
    jobs[1].state, jobs[1].request = JobState.FAILED, FalRequest("r2", "s", "r", "c")
    jobs[1].error_code = "result_expired"
    path = tmp_path / "kontext.sqlite3"
    with sqlite3.connect(path) as db:
        for number, migration in enumerate(MIGRATIONS[:counters], start=1):
            db.executescript(f"{migration_text(migration, 'sqlite')}\nPRAGMA user_version = {number};")
        columns = [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
        rows = [{name: value for name, value in _to_row(job).items() if name in columns} for job in jobs]
        for number, row in enumerate(rows, start=1):
            row["id"] = number
            db.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join(':' + n for n in row)})", row)
    pg = await asyncpg.connect(database_url)
    try:
        await pg.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        await pg.execute("INSERT INTO schema_version VALUES ($1)", counters)
        for migration in MIGRATIONS[:counters]:
            await pg.execute(migration_text(migration, "postgres"))
        for row in rows:
            row = {name: value for name, value in row.items() if name != "id"}
            await pg.execute(
                f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join(f'${i}' for i in range(1, len(row) + 1))})",
                *row.values(),
            )
    finally:
        await pg.close()
    for store in (
        SqliteStore(path),
        PostgresStore(database_url, instance_id="bot-0", lease_seconds=60, connect_timeout=10),
    ):
        async with store:
            usage = await store.usage(1, 3, NOW, all_servers=True)
            assert (usage.guild_images_this_month, usage.all_images_this_month) == (4, 4)


async def test_daily_images_are_counted_per_utc_day(new_store: Opener):
    day = datetime(2026, 3, 4, tzinfo=UTC).timestamp()
    async with new_store() as store:
        for created_at in (day + 1, day + 86399.9, day + 86400.2):
            job = await store.create_job(request())
            job.created_at = created_at
            await store.save(job)
        counts = await store.daily_images(1, since=day - 86400)
    assert counts == {datetime(2026, 3, 4).date(): 4, datetime(2026, 3, 5).date(): 2}


async def test_policies_are_saved_and_read_back(new_store: Opener):
    async with new_store() as store:
        await store.save_policy(
            1, GuildPolicy(safety_maximum=5, allowed_channel_ids=frozenset({7})), by_user=9, now=NOW
        )
    async with new_store() as store:
        assert await store.policy(1) == GuildPolicy(safety_maximum=5, allowed_channel_ids=frozenset({7}))
        assert await store.policy(2) == GuildPolicy()


async def test_settings_read_before_a_change_are_read_again_after_it(new_store: Opener):
    """The store caches policies, recipes and members' defaults; its own writes refresh them."""
    async with new_store() as store:
        assert await store.policy(1) == GuildPolicy()
        assert await store.recipes(1) == []
        assert await store.member_defaults(5) == MemberDefaults()
        await store.save_policy(1, GuildPolicy(safety_maximum=5), by_user=9, now=NOW)
        await store.add_recipe(1, "noir", "{prompt}, film noir", by_user=9, now=NOW)
        await store.save_member_defaults(5, MemberDefaults(num_images=2), now=NOW)
        assert (await store.policy(1)).safety_maximum == 5
        assert [recipe.name for recipe in await store.recipes(1)] == ["noir"]
        assert (await store.member_defaults(5)).num_images == 2
        assert await store.remove_recipe(1, "noir")
        await store.save_member_defaults(5, MemberDefaults(), now=NOW)
        assert await store.recipes(1) == [] and await store.member_defaults(5) == MemberDefaults()


def non_default_value(name: str, annotation: object, default: object) -> Any:
    """A value of the field's type that differs from its default."""
    samples: dict[object, Any] = {
        int: 5,
        int | None: 7,
        float | None: 12.5,
        frozenset[int]: frozenset({11, 12}),
    }
    if annotation not in samples:
        raise AssertionError(f"add a sample value for GuildPolicy.{name} ({annotation})")
    value = samples[annotation]
    return value if value != default else 6


async def test_every_policy_field_survives_a_restart(new_store: Opener):
    """A field the store cannot convert would silently fall back to its default after a restart."""
    hints = typing.get_type_hints(GuildPolicy)
    changed = GuildPolicy(
        **{f.name: non_default_value(f.name, hints[f.name], f.default) for f in dataclasses.fields(GuildPolicy)}
    )
    assert all(getattr(changed, f.name) != f.default for f in dataclasses.fields(GuildPolicy))
    async with new_store() as store:
        await store.save_policy(1 << 62, changed, by_user=1 << 61, now=NOW)
    async with new_store() as store:
        assert await store.policy(1 << 62) == changed


async def test_meta_and_staged_inputs_are_kept(new_store: Opener):
    async with new_store() as store:
        await store.set_meta("synced", "a")
        await store.set_meta("synced", "b")
        await store.record_staged_input("cdn/x.png", "https://fal/x", expires_at=NOW + 60)
        await store.record_staged_input("cdn/x.png", "https://fal/y", expires_at=NOW + 120)
    async with new_store() as store:
        assert await store.meta("synced") == "b" and await store.meta("other") is None
        assert await store.staged_input("cdn/x.png", now=NOW + 90) == "https://fal/y"
        assert await store.staged_input("cdn/x.png", now=NOW + 121) is None
        # The first copy is still listed: a job built on it can use it until it expires.
        assert await store.staged_url_lasts("https://fal/x", now=NOW + 30)
        assert await store.staged_source("https://fal/x") == "cdn/x.png"


async def test_an_unreadable_row_is_closed_at_the_next_start(new_store: Opener):
    async with new_store() as store:
        broken = await store.create_job(request())
        kept = await store.create_job(request())
        await store._execute("UPDATE jobs SET state = 'melted' WHERE id = :id", {"id": broken.id})
    async with new_store() as store:
        assert [job.id for job in await store.claim()] == [kept.id]
        closed = await store._fetch("SELECT * FROM jobs WHERE id = :id", {"id": broken.id})
        assert closed[0]["error_code"] == "unreadable" and closed[0]["delivered_at"] is not None
        assert closed[0]["interaction_token"] == ""


async def test_a_store_keeps_nothing_of_the_jobs_it_let_go(new_store: Opener):
    """A long-running process lets go of jobs unfinished (another process took them, the
    database failed their write, it is stopping) as well as finished: none of them may stay in
    its memory (claimed again, a job's row is read afresh)."""
    async with new_store() as store:
        finished, unfinished = await store.create_job(request()), await store.create_job(request(user_id=4))
        for job in (finished, unfinished):
            job.state = JobState.QUEUED
            await store.save(job)
        finished.state, finished.delivered_at = JobState.SUCCEEDED, time.time()
        await store.save(finished)
        store.let_go(unfinished)
        assert store._written == {} and store._writes == {}


async def test_a_failed_write_is_written_whole_by_the_next_save(tmp_path: Path):
    """A write that failed (disk full) must not leave save() believing the row is stored."""
    async with SqliteStore(tmp_path / "db.sqlite3") as store:
        store.write_retry_seconds = 0  # no retries: the disk stays full
        job = await store.create_job(request())
        ((pages,),) = await store._db.execute_fetchall("PRAGMA page_count")
        await store._db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is "full"
        job.state, job.request, job.error_detail = JobState.QUEUED, FalRequest("req-1", "s", "r", "c"), "x" * 200_000
        with pytest.raises(StoreFailed) as failed:
            await store.save(job)
        assert isinstance(failed.value.__cause__, sqlite3.OperationalError)
        await store._db.execute("PRAGMA max_page_count = 1073741823")  # space is back
        job.error_detail, job.queue_position = None, 3
        await store.save(job)
        loaded = await store.get_job(job.id)
        assert loaded is not None and loaded.state is JobState.QUEUED and loaded.request == job.request


def fail_the_next_write(store: SqliteStore, meanwhile: Callable[[Job], None] = lambda job: None) -> None:
    """The database fails the store's next write of a job (after `meanwhile` changed the job)."""
    update = store._update_job
    failures = [sqlite3.OperationalError("disk I/O error")]

    async def failing_once(job: Job, changed: dict[str, Any], *, durable: bool) -> None:
        if failures:
            meanwhile(job)
            raise failures.pop()
        await update(job, changed, durable=durable)

    store._update_job = failing_once  # type: ignore[method-assign]


async def test_a_retried_write_stores_the_job_as_it_is_when_retried(tmp_path: Path):
    """The database failed a write once (a dropped connection): the retry writes the whole row as
    the job is by then, so a change made meanwhile is stored and nothing older overwrites it."""
    async with SqliteStore(tmp_path / "db.sqlite3") as store:
        job = await store.create_job(request())

        def meanwhile(job: Job) -> None:
            job.queue_position = 2  # fal reported a new place

        fail_the_next_write(store, meanwhile)
        job.state = JobState.QUEUED
        await store.save(job)
        loaded = await store.get_job(job.id)
        assert loaded is not None and (loaded.state, loaded.queue_position) == (JobState.QUEUED, 2)


async def test_a_save_made_while_another_is_retried_is_not_overwritten_by_the_retry(tmp_path: Path):
    """A cancel's write fails once; the delivery saves meanwhile. The saves of one job run in
    order, each as the job is when it runs, so the retry cannot put back what the delivery moved on."""
    async with SqliteStore(tmp_path / "db.sqlite3") as store:
        job = await store.create_job(request())
        fail_the_next_write(store)
        job.state = JobState.CANCELLED
        cancel = asyncio.create_task(store.save(job))
        await asyncio.sleep(0.01)  # the cancel's write failed, its retry waits
        job.delivered_parts, job.delivered_at = 1, time.time()
        await store.save(job)
        await cancel
        loaded = await store.get_job(job.id)
        assert loaded is not None and (loaded.state, loaded.delivered_parts) == (JobState.CANCELLED, 1)
        assert loaded.delivered_at is not None


async def test_the_write_recording_a_submit_survives_a_power_loss(tmp_path: Path):
    """NORMAL in WAL mode may roll back the last commits on a power loss; a durable save commits
    with synchronous=FULL (which syncs every earlier commit), then the connection goes back."""
    async with SqliteStore(tmp_path / "db.sqlite3") as store:
        statements: list[str] = []
        await store._db.set_trace_callback(statements.append)
        job = await store.create_job(request())
        job.state = JobState.SUBMITTING
        await store.save(job, durable=True)
        job.state = JobState.QUEUED
        await store.save(job)
        # (SQLite reports a statement again for each trigger program it runs)
        writes = [s.split(" SET")[0] for s in dict.fromkeys(statements) if not s.startswith(("INSERT", "SELECT"))]
        assert writes == ["PRAGMA synchronous=FULL", "UPDATE jobs", "PRAGMA synchronous=NORMAL", "UPDATE jobs"]
        ((mode,),) = await store._db.execute_fetchall("PRAGMA synchronous")
        assert mode == 1  # NORMAL
        loaded = await store.get_job(job.id)
        assert loaded is not None and loaded.state is JobState.QUEUED
