"""The job state machine: drives each job from acceptance to delivery, the same way whether it
was just accepted or found unfinished at start-up (resuming is "load the unfinished rows and
drive them"). It knows nothing of Discord: it reports every change to a listener."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from typing import Protocol

from .fal_queue import FalError, FalQueueClient, FalRequest, FalResultExpired, QueueStatus
from .flux_kontext import parse_output
from .job import Job, JobRequest, JobState
from .results import ResultCustody
from .retry import Backoff, retrying
from .slots import SlotQueue
from .store import Store

log = logging.getLogger(__name__)


class DeliveryProgress(Protocol):
    async def posted(self, parts: int, *, in_channel: bool, repeatable: bool = False) -> None:
        """`parts` of the result's messages are shown (posted in the channel, if `in_channel`).
        Stored at once, so a delivery cut short resumes without repeating a message, unless
        doing it again shows the same (`repeatable`: an edit of the reply)."""


class JobListener(Protocol):
    def job_changed(self, job: Job) -> None:
        """A job's visible state changed. Must return at once (it runs on the runner's path)."""

    async def deliver(self, job: Job, progress: DeliveryProgress) -> None:
        """Show the final state (result, failure, cancellation) to the member; raise on failure
        and it is retried. It resumes from `job.delivered_parts` and `job.delivered_in_channel`
        and reports each message it shows to `progress`."""


class RunnerStopped(Exception):
    """The bot is shutting down and takes no new jobs."""


class CancelOutcome(enum.Enum):
    CANCELLED = "cancelled"
    REQUESTED = "requested"  # submit in flight: cancelled at fal as soon as it has an id
    TOO_LATE = "too_late"  # already finished at fal; the result is on its way


class JobRunner:
    def __init__(
        self,
        store: Store,
        fal: FalQueueClient,
        listener: JobListener,
        *,
        results: ResultCustody,
        max_concurrent_jobs: int,
        job_timeout: float,
        backoff: Backoff,
    ) -> None:
        self._store = store
        self._fal = fal
        self._listener = listener
        self._results = results
        self._job_timeout = job_timeout
        self._backoff = backoff
        self._slots = SlotQueue(max_concurrent_jobs, self._show_bot_queue)
        self._jobs: dict[int, Job] = {}
        self._drivers: dict[int, asyncio.Task[None]] = {}
        self._work: dict[int, asyncio.Task[None]] = {}
        self._cancel_requests: dict[int, int] = {}
        self._delivering: set[int] = set()
        self._stopping = False

    # -- public interface -------------------------------------------------------------------

    async def accept(self, request: JobRequest) -> Job:
        """Record a new job before anything is spent; `start` drives it once its reply exists."""
        if self._stopping:
            raise RunnerStopped()
        job = await self._store.create_job(request)
        log.info(
            "job %d accepted: user %d channel %d endpoint %s", job.id, job.user_id, job.channel_id, job.edit.endpoint
        )
        return job

    def start(self, job: Job, *, message_id: int) -> None:
        """Start driving an accepted job whose reply message is `message_id` (stored with the
        job's next write: at once if it has to wait for a slot, else with SUBMITTING)."""
        job.message_id = message_id
        self._start(job)

    async def abandon(self, job: Job, reason: str) -> None:
        """Close an accepted job that never started (its reply could not be created)."""
        log.warning("job %d abandoned before it started: %s", job.id, reason)
        job.error_code = "abandoned"
        job.error_detail = reason
        job.state = JobState.FAILED
        job.delivered_at = time.time()
        await self._store.save(job)

    async def resume(self) -> int:
        """Drive every job a previous run left unfinished; returns how many."""
        jobs = await self._store.unfinished_jobs()
        for job in jobs:
            log.info("job %d resumed in state %s", job.id, job.state.value)
            if job.state.at_fal:
                self._slots.take()  # already at fal: it must be followed now, not queued again
            self._start(job)
        return len(jobs)

    def active_job(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    async def cancel(self, job_id: int, by_user: int) -> CancelOutcome:
        job = self._jobs.get(job_id)
        if job is None or job.state.is_final:
            return CancelOutcome.TOO_LATE
        if job.state is JobState.SUBMITTING:
            self._cancel_requests[job_id] = by_user
            return CancelOutcome.REQUESTED
        if job.state.at_fal:
            assert job.request is not None
            # Noted before asking fal: fal may end the job (and the status stream report it as
            # failed) before its answer to the cancel arrives; the work then records a cancel.
            self._cancel_requests[job_id] = by_user
            try:
                answer = await self._fal.cancel(job.request)
            except BaseException:
                self._cancel_requests.pop(job_id, None)
                raise
            log.info("job %d: fal answered cancel with %s", job.id, answer)
            if answer == "ALREADY_COMPLETED":
                self._cancel_requests.pop(job_id, None)
                return CancelOutcome.TOO_LATE
        work = self._work.get(job_id)
        if work is None or work.done():
            if job.state is JobState.CANCELLED:
                return CancelOutcome.CANCELLED  # the work saw fal end the job first
            return CancelOutcome.TOO_LATE
        # State first, then stop the work: the driver delivers as soon as the work ends.
        job.state = JobState.CANCELLED
        job.cancelled_by = by_user
        work.cancel()
        await self._transition(job, JobState.CANCELLED)
        return CancelOutcome.CANCELLED

    async def stop(self, grace: float = 3.0) -> None:
        """Stop taking jobs and stop driving them, leaving each resumable from its stored state.
        A submit already in flight is allowed to finish (within `grace`) so its id is kept."""
        self._stopping = True
        drivers = list(self._drivers.values())
        for job_id, task in list(self._drivers.items()):
            # A delivery under way is let finish: cut short, it could be shown twice after the
            # restart (a follow-up or channel message is not an idempotent edit).
            if job_id not in self._delivering:
                task.cancel()
        if drivers:
            _, pending = await asyncio.wait(drivers, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)

    # -- driving ----------------------------------------------------------------------------

    def _start(self, job: Job) -> None:
        self._jobs[job.id] = job
        task = asyncio.create_task(self._drive(job), name=f"job-{job.id}")
        self._drivers[job.id] = task
        task.add_done_callback(lambda _: self._forget(job.id))

    def _forget(self, job_id: int) -> None:
        self._drivers.pop(job_id, None)
        self._jobs.pop(job_id, None)
        self._cancel_requests.pop(job_id, None)

    async def _drive(self, job: Job) -> None:
        if not job.state.is_final:
            work = asyncio.create_task(self._run_at_fal(job), name=f"job-{job.id}-work")
            self._work[job.id] = work
            try:
                await work
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # shutdown: leave the job as stored, to resume later
                # otherwise the member cancelled it: cancel() has already recorded that
            finally:
                self._work.pop(job.id, None)
        if job.state is JobState.SUCCEEDED:
            await self._restore_images(job)
        await self._deliver(job)

    async def _run_at_fal(self, job: Job) -> None:
        deadline = self._deadline(job)
        holding_slot = job.state.at_fal
        try:
            if job.state is JobState.PENDING:
                if self._slots.must_wait():
                    await self._store.save(job)  # its reply must be known if we stop while it waits
                async with asyncio.timeout_at(deadline):
                    await self._slots.acquire(job.id)
                holding_slot = True
                await self._submit(job, deadline)
            elif job.state is JobState.SUBMITTING:
                # A previous run crashed between sending the submit and recording fal's answer.
                await self._fail(job, "submit_uncertain", None)
                return
            if job.state.at_fal:
                await self._follow(job, deadline)
        except FalError as exc:
            by_user = self._cancel_requests.get(job.id)
            if by_user is not None and job.state.at_fal:
                # fal ended the job because the member cancelled it (its result says "cancelled").
                log.info("job %d: fal ended it after the cancel request (%s)", job.id, exc)
                job.cancelled_by = by_user
                await self._transition(job, JobState.CANCELLED)
                return
            log.warning("job %d failed: %s (%s)", job.id, exc, exc.code)
            await self._fail(job, exc.code, _describe_detail(exc))
        except TimeoutError:
            log.warning("job %d timed out after %.0fs", job.id, self._job_timeout)
            if job.request is not None:
                await self._cancel_quietly(job)
            await self._fail(job, "timeout", None)
        finally:
            if holding_slot:
                self._slots.release()

    def _deadline(self, job: Job) -> float:
        loop = asyncio.get_running_loop()
        return loop.time() + (job.created_at + self._job_timeout - time.time())

    async def _submit(self, job: Job, deadline: float) -> None:
        job.bot_queue_position = None
        await self._transition(job, JobState.SUBMITTING)
        sending = asyncio.ensure_future(self._fal.submit(job.edit.endpoint, job.edit.payload(), deadline=deadline))
        try:
            request, status = await asyncio.shield(sending)
        except asyncio.CancelledError:
            # Shutting down mid-submit: wait for fal's answer so the job stays resumable.
            with contextlib.suppress(Exception):
                await self._record_submission(job, *(await sending))
            raise
        await self._record_submission(job, request, status)
        by_user = self._cancel_requests.pop(job.id, None)
        if by_user is not None:
            await self._fal.cancel(request)
            job.cancelled_by = by_user
            await self._transition(job, JobState.CANCELLED)

    async def _record_submission(self, job: Job, request: FalRequest, status: QueueStatus) -> None:
        job.request = request
        job.submitted_at = time.time()
        job.queue_position = status.queue_position
        log.info("job %d submitted as fal request %s", job.id, request.request_id)
        await self._transition(job, JobState.QUEUED)
        await self._apply_status(job, status)

    async def _follow(self, job: Job, deadline: float) -> None:
        assert job.request is not None
        async with asyncio.timeout_at(deadline):
            async for status in self._fal.statuses(job.request, deadline=deadline):
                await self._apply_status(job, status)
            output = parse_output(await self._fal.result(job.request, deadline=deadline))
            job.completed_at = time.time()
            job.result = await self._results.take(job.id, output, deadline=deadline)
        # Stored now only if files in DATA_DIR depend on it; images held in memory are gone
        # after a restart anyway, which then follows the request at fal again.
        on_disk = any(image.on_disk for image in job.result.images)
        await self._transition(job, JobState.SUCCEEDED, store=on_disk)

    async def _apply_status(self, job: Job, status: QueueStatus) -> None:
        for line in status.logs:
            log.debug("job %d fal log: %s", job.id, line)
        if status.state == "IN_QUEUE":
            job.queue_position = status.queue_position
            if job.state is not JobState.QUEUED:
                await self._transition(job, JobState.QUEUED)
            else:
                self._listener.job_changed(job)
        elif status.state == "IN_PROGRESS" and job.state is not JobState.RUNNING:
            job.started_at = time.time()
            job.queue_position = None
            # Not stored: after a restart fal tells the state again, and nothing else needs it.
            await self._transition(job, JobState.RUNNING, store=False)

    async def _restore_images(self, job: Job) -> None:
        """A succeeded job found after a restart whose images are not at hand (held in memory by
        the previous run, or files lost with a cleaned volume): fetch them again from fal's CDN,
        or say plainly that they are lost."""
        assert job.result is not None
        deadline = asyncio.get_running_loop().time() + 60
        try:
            await self._results.restore(job.id, job.result, deadline=deadline)
        except Exception as exc:
            log.warning("job %d: result images could not be fetched again: %s", job.id, exc)
            self._results.discard(job.id, job.result)
            await self._fail(job, "result_expired" if isinstance(exc, FalResultExpired) else "missing_files", None)

    async def _cancel_quietly(self, job: Job) -> None:
        assert job.request is not None
        try:
            await self._fal.cancel(job.request)
        except Exception:
            log.warning("job %d: cancel at fal failed", job.id, exc_info=True)

    async def _fail(self, job: Job, code: str, detail: str | None) -> None:
        job.error_code = code
        job.error_detail = detail
        await self._transition(job, JobState.FAILED)

    async def _transition(self, job: Job, state: JobState, *, store: bool = True) -> None:
        """Move the job on and show it; stored first unless a restart has no use for the state
        (each write costs a trip to the database thread)."""
        job.state = state
        if state.is_final:
            job.queue_position = job.bot_queue_position = None
        if store:
            await self._store.save(job)
        self._listener.job_changed(job)

    def _show_bot_queue(self, positions: dict[int, int]) -> None:
        for job_id, place in positions.items():
            job = self._jobs.get(job_id)
            if job is not None and job.bot_queue_position != place:
                job.bot_queue_position = place
                self._listener.job_changed(job)

    # -- delivery ---------------------------------------------------------------------------

    async def _deliver(self, job: Job) -> None:
        """Hand the final state to the listener until it is shown, then forget the images."""
        loop = asyncio.get_running_loop()

        async def attempt() -> None:
            try:
                await self._listener.deliver(job, _StoredProgress(self._store, job))
            except Exception:
                # It may take a while or a restart: memory is for passing through.
                if job.result is not None and await self._results.keep_on_disk(job.id, job.result):
                    await self._store.save(job)
                raise

        self._delivering.add(job.id)
        try:
            try:
                await retrying(
                    attempt,
                    retryable=lambda exc: True,  # any failure to show it is worth another try
                    backoff=self._backoff,
                    deadline=loop.time() + 120,
                    what=f"job {job.id} delivery",
                )
            except Exception:
                log.exception("job %d could not be delivered; it will be tried again at the next start", job.id)
                return
            job.delivered_at = time.time()
            await self._store.save(job)
        finally:
            self._delivering.discard(job.id)
            for image in job.result.images if job.result else ():
                self._results.release(image)
        log.info("job %d delivered (%s)", job.id, job.state.value)
        self._results.discard(job.id, job.result)


class _StoredProgress:
    """Delivery progress written into the job and stored (see DeliveryProgress)."""

    def __init__(self, store: Store, job: Job) -> None:
        self._store = store
        self._job = job

    async def posted(self, parts: int, *, in_channel: bool, repeatable: bool = False) -> None:
        self._job.delivered_parts = parts
        self._job.delivered_in_channel = in_channel
        if not repeatable:
            await self._store.save(self._job)


def _describe_detail(exc: FalError) -> str | None:
    messages = getattr(exc, "messages", None)
    if messages:
        return "; ".join(messages)[:500]
    return None
