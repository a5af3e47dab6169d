"""The runner when the database fails one of its writes, on a real SQLite store with its write
made to fail: what is left in memory must still tell the truth about fal."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any, cast

from services.fal_account import AccountGate
from services.fal_queue import FalRequest, QueueStatus
from services.job import NOTE_HANDED_BACK, Job, JobState
from services.metrics import Metrics
from services.retry import Backoff
from services.runner import CancelOutcome, JobRunner
from services.sqlite_store import SqliteStore
from tests.test_store import request


class Fal:
    """The one call these paths make of fal: a cancel, which fal answers OK (removed from its queue)."""

    def __init__(self) -> None:
        self.cancels: list[str] = []

    async def cancel(self, fal_request: FalRequest) -> str:
        self.cancels.append(fal_request.request_id)
        return "OK"


class Listener:
    def job_changed(self, job: Job) -> None:
        pass

    def job_dropped(self, job: Job) -> None:
        pass


def runner(store: SqliteStore, fal: Fal) -> JobRunner:
    return JobRunner(
        store,
        cast(Any, fal),
        cast(Any, Listener()),
        results=cast(Any, None),
        inputs=cast(Any, None),
        account=AccountGate(30),
        max_concurrent_jobs=None,
        places_interval=1.0,
        job_timeout=600,
        backoff=Backoff(),
        metrics=Metrics(),
        price_per_image=0.08,
    )


async def test_a_hand_back_whose_write_failed_leaves_the_job_in_fals_line_for_a_cancel(tmp_path: Path):
    """The hand-back's note could not be stored, so fal was never asked: the job is still in
    fal's line, and a member's Cancel must take it out of there, not only out of the bot."""
    async with SqliteStore(tmp_path / "db.sqlite3") as store:
        store.write_retry_seconds = 0
        job = await store.create_job(request(message_id=5))
        job.state, job.request = JobState.QUEUED, FalRequest("req-1", "s", "r", "c")
        await store.save(job)
        fal = Fal()
        jobs = runner(store, fal)
        jobs._jobs[job.id] = job
        work = jobs._work[job.id] = asyncio.create_task(asyncio.sleep(3600))
        update = store._update_job

        async def database_down(*args: Any, **kwargs: Any) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        store._update_job = database_down  # type: ignore[method-assign]
        await jobs._hand_back(job.id)
        assert fal.cancels == [] and NOTE_HANDED_BACK not in job.notes
        store._update_job = update  # type: ignore[method-assign]
        assert await jobs.cancel_here(job.id, by_user=7) is CancelOutcome.CANCELLED
        assert fal.cancels == ["req-1"]
        work.cancel()


class Results:
    """Result custody for a job with no images: nothing to keep, release or discard."""

    async def keep_on_disk(self, job_id: int, result: object) -> bool:
        return False

    def release(self, image: object) -> None:
        pass

    def discard(self, job_id: int, result: object) -> None:
        pass


async def test_a_delivery_rides_out_a_discord_outage_of_hours_without_a_restart(tmp_path: Path):
    """Discord answering 5xx for a long while (its outages last minutes to hours): the bot tries
    again, less often as it lasts, and shows the job once Discord is back, up to a day after
    the request. It gave up after two minutes and left the reply showing its progress until the
    bot happened to restart. The event loop's clock is moved on by ten minutes at each refusal."""
    loop = asyncio.get_running_loop()
    real_time = loop.time
    ahead = 0.0

    class Outage(Listener):
        refusals = 12

        async def deliver(self, job: Job, progress: object) -> None:
            nonlocal ahead
            if self.refusals:
                self.refusals -= 1
                ahead += 600
                raise ConnectionResetError("Discord is down")

    async with SqliteStore(tmp_path / "db.sqlite3") as store:
        job = await store.create_job(request(message_id=5))
        job.state, job.error_code = JobState.FAILED, "fal_failed"
        await store.save(job)
        listener = Outage()
        jobs = runner(store, Fal())
        jobs._listener = cast(Any, listener)
        jobs._results = cast(Any, Results())
        jobs._backoff = Backoff(base=0.001, cap=0.002)
        loop.time = lambda: real_time() + ahead  # type: ignore[method-assign]
        try:
            await jobs._deliver(job)  # no timeout: the loop's clock runs ahead
        finally:
            loop.time = real_time  # type: ignore[method-assign]
        assert listener.refusals == 0 and job.delivered_at is not None
        stored = await store.get_job(job.id)
        assert stored is not None and stored.delivered_at is not None


async def test_the_write_recording_fals_id_for_a_job_survives_a_power_loss(tmp_path: Path):
    """fal's id for a job is what the bot follows it, and fetches its billed result, by: its
    write commits with synchronous=FULL, as the submit's does (see test_store), not only after
    the next job's durable write, which on a quiet bot may be minutes away."""
    async with SqliteStore(tmp_path / "db.sqlite3") as store:
        job = await store.create_job(request())
        job.state = JobState.SUBMITTING
        await store.save(job, durable=True)
        statements: list[str] = []
        await store._db.set_trace_callback(statements.append)
        status = QueueStatus("IN_QUEUE", queue_position=0)
        await runner(store, Fal())._record_submission(job, FalRequest("req-1", "s", "r", "c"), status)
        writes = [s.split(" SET")[0] for s in dict.fromkeys(statements) if not s.startswith("SELECT")]
        assert writes == ["PRAGMA synchronous=FULL", "UPDATE jobs", "PRAGMA synchronous=NORMAL"]
        loaded = await store.get_job(job.id)
        assert loaded is not None and loaded.state is JobState.QUEUED and loaded.request == job.request


async def test_a_job_let_go_as_the_database_failed_its_writes_is_resumed_once_they_go_through(tmp_path: Path):
    """Its writes failed for longer than the store tries them (a full disk): on SQLite no other
    process takes the job over, so this one resumes it from its row once the database answers,
    rather than leave it until the next start, holding its member's place with its reply as it
    was. Here its delivery's write fails three times over."""

    class Delivering(Listener):
        async def deliver(self, job: Job, progress: object) -> None:
            shown.append(job.id)
            if failures == 0:
                last_try.set()

    shown: list[int] = []
    last_try = asyncio.Event()
    async with SqliteStore(tmp_path / "db.sqlite3") as store:
        store.write_retry_seconds = 0
        job = await store.create_job(request(message_id=5))
        job.state, job.error_code = JobState.FAILED, "fal_failed"
        await store.save(job)
        jobs = runner(store, Fal())
        jobs._listener = cast(Any, Delivering())
        jobs._results = cast(Any, Results())
        jobs._backoff = Backoff(base=0.01, cap=0.02)
        update, failures = store._update_job, 3

        async def disk_full_for_a_while(*args: Any, **kwargs: Any) -> None:
            nonlocal failures
            if failures:
                failures -= 1
                raise sqlite3.OperationalError("database or disk is full")
            await update(*args, **kwargs)

        store._update_job = disk_full_for_a_while  # type: ignore[method-assign]
        jobs.adopt([job])
        await asyncio.wait_for(last_try.wait(), 5)
        async with asyncio.timeout(5):
            while busy := {*jobs._drivers.values(), *jobs._background}:  # the drivers, the resumes
                await asyncio.wait(busy)
        assert shown == [job.id] * 4 and jobs.active_job(job.id) is None
        stored = await store.get_job(job.id)
        assert stored is not None and stored.delivered_at is not None
