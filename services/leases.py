"""This process's share of the jobs in a database several processes use (PostgreSQL).

It renews the leases of the jobs this process drives (one statement every HEARTBEAT_SECONDS),
drops the jobs another process took over, takes over the jobs whose process died or handed them
back (every CLAIM_INTERVAL, and at once when a process hands its jobs back), and answers the
cancels members asked for in another process. Signals from other processes only wake it; each
round reads the rows, so a lost signal delays work and never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from .fal_queue import FalError
from .metrics import Metrics
from .redact import describe_error
from .runner import JobRunner
from .store import Store

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(
        self, store: Store, runner: JobRunner, *, heartbeat_seconds: float, claim_interval: float, metrics: Metrics
    ) -> None:
        self._store = store
        self._runner = runner
        self._heartbeat_seconds = heartbeat_seconds
        self._claim_interval = claim_interval
        self._metrics = metrics
        self._renew_now = asyncio.Event()
        self._claim_now = asyncio.Event()
        self._answering: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        store.on_signal("cancel", self._renew_now.set)
        store.on_signal("released", self._claim_now.set)

    def start(self) -> None:
        for loop in (self._heartbeats(), self._claims()):
            self._spawn(loop)

    async def stop(self) -> None:
        """Renew and claim no more (the runner then stops, and the store hands the jobs back)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _wait(event: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()
        event.clear()

    async def _heartbeats(self) -> None:
        while True:
            await self._wait(self._renew_now, self._heartbeat_seconds)
            try:
                report = await self._store.renew()
            except Exception as exc:
                # The database is away: the jobs' own writes fail too, and past half the lease
                # this process stops acting on them (Store.holds) until a renewal gets through.
                log.warning("could not renew this process's job leases: %s", describe_error(exc))
                continue
            for job_id in report.lost:
                self._metrics.lease_lost()
                self._runner.drop(job_id)
            for job_id, by_user in report.cancel_requests.items():
                if job_id not in self._answering:
                    self._answering.add(job_id)
                    self._spawn(self._answer_cancel(job_id, by_user))

    async def _claims(self) -> None:
        while True:
            await self._wait(self._claim_now, self._claim_interval)
            try:
                jobs = await self._store.claim()
            except Exception as exc:
                log.warning("could not look for jobs to take over: %s", describe_error(exc))
                continue
            if jobs:
                log.info("took over %d job(s) no live process held: %s", len(jobs), ", ".join(str(j.id) for j in jobs))
                self._metrics.jobs_taken_over(len(jobs))
                self._runner.adopt(jobs)
                self._renew_now.set()  # a cancel may have been asked for them meanwhile

    async def _answer_cancel(self, job_id: int, by_user: int) -> None:
        """A member pressed Cancel in a server another process serves: cancel the job here, as a
        press in this process would, and tell that process what came of it."""
        try:
            outcome = await self._runner.cancel_here(job_id, by_user)
            if outcome is not None:
                await self._store.answer_cancel(job_id, by_user, outcome.value)
                log.info("job %d: cancel asked in another process: %s", job_id, outcome.value)
        except FalError as exc:
            # The request stays in the row: the next heartbeat asks again.
            log.warning("job %d: fal did not take the cancel asked in another process: %s", job_id, exc)
        except Exception as exc:
            log.warning("job %d: could not answer the cancel asked in another process: %s", job_id, describe_error(exc))
        finally:
            self._answering.discard(job_id)
