"""The SQLite store: migrations keep data, jobs round-trip, usage counts what the policy limits."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
import typing
from pathlib import Path
from typing import Any

import pytest

from services.fal_queue import FalRequest
from services.flux_kontext import KontextEdit, KontextOptions
from services.job import JobRequest, JobResult, JobState, ResultImage
from services.policy import GuildPolicy
from services.store import MIGRATIONS, Store

NOW = time.time()


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


async def test_upgrading_an_old_database_keeps_policies_and_jobs(tmp_path: Path):
    path = tmp_path / "kontext.sqlite3"
    with sqlite3.connect(path) as db:  # a database left by an older release (schema v2)
        for number, script in enumerate(MIGRATIONS[:2], start=1):
            db.executescript(f"{script}\nPRAGMA user_version = {number};")
        db.execute("INSERT INTO guild_policies VALUES (1, '{\"safety_maximum\": 4}', 0, 9)")
    store = await Store(path).open()
    try:
        assert (await store.policy(1)).safety_maximum == 4
        job = await store.create_job(request())
        loaded = await store.get_job(job.id)
        assert loaded is not None and loaded.delivered_parts == 0
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)


async def test_a_job_round_trips_with_everything_it_carries(tmp_path: Path):
    store = await Store(tmp_path / "db.sqlite3").open()
    try:
        job = await store.create_job(request(notes={"safety_limited_to": 3}, parent_job_id=None))
        job.state = JobState.SUCCEEDED
        job.message_id = 77
        job.request = FalRequest("rid", "s", "r", "c")
        job.result = JobResult(5, [ResultImage(10, "image/png", True, 64, 64, "http://cdn/a", on_disk=True)], 1.5)
        job.delivered_in_channel = True
        job.delivered_parts = 2
        await store.save(job)
        loaded = await store.get_job(job.id)
        assert loaded == job
        assert await store.unfinished_jobs(NOW) == [loaded]
    finally:
        await store.close()


async def test_usage_counts_what_the_limits_are_about(tmp_path: Path):
    store = await Store(tmp_path / "db.sqlite3").open()
    try:
        await store.create_job(request())  # still running
        finished = await store.create_job(request())
        finished.state, finished.delivered_at = JobState.SUCCEEDED, NOW
        finished.request = FalRequest("rid", "s", "r", "c")
        await store.save(finished)
        cancelled_in_queue = await store.create_job(request())
        cancelled_in_queue.state, cancelled_in_queue.delivered_at = JobState.CANCELLED, NOW
        cancelled_in_queue.request = FalRequest("rid2", "s", "r", "c")
        await store.save(cancelled_in_queue)
        await store.create_job(request(user_id=8))  # someone else
        usage = await store.usage(1, 3, NOW)
        assert usage.member_jobs_today == 3
        assert usage.member_active_jobs == 1 and usage.guild_active_jobs == 2
        # in flight (reserved) + reached fal; the job cancelled before it started is free
        assert usage.guild_images_this_month == 2 + 2 + 2
        assert usage.member_last_job_at == cancelled_in_queue.created_at
    finally:
        await store.close()


async def test_policies_are_saved_and_read_back(tmp_path: Path):
    path = tmp_path / "db.sqlite3"
    store = await Store(path).open()
    await store.save_policy(1, GuildPolicy(safety_maximum=5, allowed_channel_ids=frozenset({7})), by_user=9, now=NOW)
    await store.close()
    store = await Store(path).open()
    try:
        assert await store.policy(1) == GuildPolicy(safety_maximum=5, allowed_channel_ids=frozenset({7}))
        assert await store.policy(2) == GuildPolicy()
    finally:
        await store.close()


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


async def test_every_policy_field_survives_a_restart(tmp_path: Path):
    """A field the store cannot convert would silently fall back to its default after a restart."""
    hints = typing.get_type_hints(GuildPolicy)
    changed = GuildPolicy(
        **{f.name: non_default_value(f.name, hints[f.name], f.default) for f in dataclasses.fields(GuildPolicy)}
    )
    assert all(getattr(changed, f.name) != f.default for f in dataclasses.fields(GuildPolicy))
    path = tmp_path / "db.sqlite3"
    async with Store(path) as store:
        await store.save_policy(1, changed, by_user=9, now=NOW)
    async with Store(path) as store:
        assert await store.policy(1) == changed


async def test_a_failed_write_is_written_whole_by_the_next_save(tmp_path: Path):
    """A write that failed (disk full) must not leave save() believing the row is stored."""
    async with Store(tmp_path / "db.sqlite3") as store:
        job = await store.create_job(request())
        ((pages,),) = await store._db.execute_fetchall("PRAGMA page_count")
        await store._db.execute(f"PRAGMA max_page_count = {pages}")  # the disk is "full"
        job.state, job.request, job.error_detail = JobState.QUEUED, FalRequest("req-1", "s", "r", "c"), "x" * 200_000
        with pytest.raises(sqlite3.Error):
            await store.save(job)
        await store._db.execute("PRAGMA max_page_count = 1073741823")  # space is back
        job.error_detail, job.queue_position = None, 3
        await store.save(job)
        loaded = await store.get_job(job.id)
        assert loaded is not None and loaded.state is JobState.QUEUED and loaded.request == job.request


async def test_the_write_recording_a_submit_survives_a_power_loss(tmp_path: Path):
    """NORMAL in WAL mode may roll back the last commits on a power loss; a durable save goes
    through the connection that commits with synchronous=FULL (which syncs every earlier commit)."""
    async with Store(tmp_path / "db.sqlite3") as store:
        ((everyday,),) = await store._db.execute_fetchall("PRAGMA synchronous")
        assert store._durable_connection is not None
        ((durable,),) = await store._durable_connection.execute_fetchall("PRAGMA synchronous")
        assert (everyday, durable) == (1, 2)
        job = await store.create_job(request())
        job.state = JobState.SUBMITTING
        await store.save(job, durable=True)
        loaded = await store.get_job(job.id)
        assert loaded is not None and loaded.state is JobState.SUBMITTING
