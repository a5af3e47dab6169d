"""The runner when the database fails one of its writes, on a real SQLite store with its write
made to fail: what is left in memory must still tell the truth about fal."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any, cast

from services.fal_account import AccountGate
from services.fal_queue import FalRequest
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
