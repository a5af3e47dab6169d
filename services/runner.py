"""The job state machine: drives each job from acceptance to delivery, the same way whether it
was just accepted or found unfinished at start-up (resuming is "load the unfinished rows and
drive them"). It knows nothing of Discord: it reports every change to a listener."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from .fal_account import AccountGate
from .fal_queue import (
    FalAccountLocked,
    FalCancelled,
    FalError,
    FalQueueClient,
    FalRequest,
    FalResultExpired,
    FalUnavailable,
    QueueStatus,
)
from .flux_kontext import KontextEdit, parse_output
from .i18n import texts
from .input_images import InputRejected, InputStager, InputUnavailable
from .job import (
    FAL_SILENT_QUEUED,
    FAL_SILENT_STARTED,
    NOTE_CANCEL_REQUESTED_BY,
    NOTE_FAL_SILENT,
    NOTE_HANDED_BACK,
    NOTE_UNDELIVERABLE,
    NOTE_WITHDRAWN,
    Job,
    JobRequest,
    JobState,
)
from .metrics import Metrics
from .redact import describe_error
from .results import ResultCustody
from .retry import Backoff, retrying
from .scheduler import FairScheduler, Place
from .store import CANCEL_TOO_LATE, LeaseLost, Store, StoreFailed

log = logging.getLogger(__name__)

# Seconds a job resumed at fal is given, past its deadline, for its first status.
FIRST_STATUS_SECONDS = 30.0


class DeliveryProgress(Protocol):
    async def posted(
        self,
        parts: int,
        *,
        message_id: int,
        in_channel: bool,
        repeatable: bool = False,
        image_urls: Sequence[str] = (),
    ) -> None:
        """`parts` of the result's messages are shown, the last as `message_id` (posted in the
        channel, if `in_channel`) with `image_urls` (its images as Discord serves them). Stored at
        once, so a delivery cut short resumes without repeating a message, unless doing it again
        shows the same (`repeatable`: an edit of the reply)."""


class Undeliverable(Exception):
    """The final state cannot be shown at all (the channel is gone, the bot was removed or may
    not post there any more): every retry would fail the same way."""


# A job not shown within this time of its request is given up, across restarts too.
DELIVERY_GIVE_UP_SECONDS = 24 * 3600
# A delivery is retried at the runner's pace this long; then, Discord having an outage (they
# last minutes to hours), less and less often up to this wait, so as not to add to the load it is
# coming back under nor prolong a ban for too many failed requests.
DELIVERY_RETRY_SECONDS = 120.0
DELIVERY_OUTAGE_MAX_WAIT = 300.0
# How long a stop waits for a post under way (four images at a server's upload limit take a
# while): within compose's stop_grace_period (30 s), with room for the rest of the shutdown.
DELIVERY_STOP_SECONDS = 20.0

T = TypeVar("T")


class JobListener(Protocol):
    def job_changed(self, job: Job) -> None:
        """A job's visible state changed. Must return at once (it runs on the runner's path)."""

    async def deliver(self, job: Job, progress: DeliveryProgress) -> None:
        """Show the final state (result, failure, cancellation) to the member; raise on failure
        and it is retried. It resumes from `job.delivered_parts` and `job.delivered_in_channel`
        and reports each message it shows to `progress`."""

    def job_dropped(self, job: Job) -> None:
        """This process stopped driving the job before it was shown (another process took it
        over, or it stops): show nothing more of it from here."""

    async def abandoned(self, job: Job) -> int | None:
        """A job found without its reply at the start was closed unsent (`abandon`): Discord may
        have taken its acknowledgement all the same, the reply "thinking" until the token ends.
        Say there that it did not start, if there is such a reply and it can still be edited;
        the id of the reply that says so (None: there was none); never raises."""


class RunnerStopped(Exception):
    """The bot is shutting down and takes no new jobs."""


class CancelOutcome(enum.Enum):
    CANCELLED = "cancelled"
    REQUESTED = "requested"  # submit in flight: cancelled at fal as soon as it has an id
    # fal had started it: it asked the model to stop, which usually finishes (and bills) anyway,
    # so the member gets the images.
    STARTED = "started"
    TOO_LATE = CANCEL_TOO_LATE  # already finished at fal; the result is on its way
    # Another process drives it and has not answered yet: it stops it when it reads the request.
    FORWARDED = "forwarded"


# How long a cancel asked for a job another process drives waits for that process's answer.
CANCEL_ANSWER_WAIT = 5.0


class JobRunner:
    def __init__(
        self,
        store: Store,
        fal: FalQueueClient,
        listener: JobListener,
        *,
        results: ResultCustody,
        inputs: InputStager,
        account: AccountGate,
        max_concurrent_jobs: int | None,
        places_interval: float,
        job_timeout: float,
        backoff: Backoff,
        metrics: Metrics,
        price_per_image: float,
    ) -> None:
        self._store = store
        self._fal = fal
        self._listener = listener
        self._results = results
        self._inputs = inputs
        self.account = account
        self._job_timeout = job_timeout
        self._backoff = backoff
        self._metrics = metrics
        self._price = price_per_image
        self._scheduler = FairScheduler(
            self._show_places, self._hand_back_soon, cap=max_concurrent_jobs, places_interval=places_interval
        )
        self._jobs: dict[int, Job] = {}
        self._drivers: dict[int, asyncio.Task[None]] = {}
        self._work: dict[int, asyncio.Task[None]] = {}
        self._cancel_requests: dict[int, int] = {}
        self._delivering: set[int] = set()
        # Jobs whose run fal went silent about: their time at fal is no job length.
        self._runs_unseen: set[int] = set()
        # Jobs being handed back from fal's line to the bot's (see FairScheduler), and for those
        # whose cancel is on its way, whether fal took them out of its line.
        self._handing_back: set[int] = set()
        self._hand_back_answers: dict[int, asyncio.Future[bool]] = {}
        # For each job showing a start estimate, the timer that takes it down once it passes.
        self._estimate_expiries: dict[int, asyncio.TimerHandle] = {}
        self._background: set[asyncio.Task[None]] = set()
        # New jobs on their way from their row to `start`, each resolved when it gets there.
        self._admissions: set[asyncio.Future[None]] = set()
        self._stopping = False
        metrics.set_live_sources(self._jobs_by_state, lambda: self._scheduler.waiting)

    def _jobs_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in self._jobs.values():
            counts[job.state.value] = counts.get(job.state.value, 0) + 1
        return counts

    # -- public interface -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admission(self) -> AsyncIterator[None]:
        """A new job's way from its row (`accept`) to `start` (or `abandon`), its reply created
        meanwhile. Raises RunnerStopped once stopping. A stop begun on the way lets it finish
        (within its grace) before it lets the jobs go: the job is then kept with its reply, to be
        resumed like every unfinished job, not closed as abandoned with its reply left thinking,
        nor written after the jobs were handed to the other processes (then held by none until
        its lease ran out)."""
        if self._stopping:
            raise RunnerStopped()
        over = asyncio.get_running_loop().create_future()
        self._admissions.add(over)
        try:
            yield
        finally:
            self._admissions.discard(over)
            over.set_result(None)

    async def check_inputs_last(self, edit: KontextEdit) -> None:
        """Raise InputExpired, before anything is spent, if `edit` is built on a copy of an
        input that no longer lasts (see InputStager.check_lasting)."""
        await self._inputs.check_lasting(edit)

    async def same_inputs(self, one: KontextEdit, other: KontextEdit) -> bool:
        """Whether two edits are built on the same pictures (see InputStager.same_pictures)."""
        return await self._inputs.same_pictures(one, other)

    async def inputs_found_again(
        self, edit: KontextEdit, candidates: Callable[[], Awaitable[Sequence[str]]], *, within: float
    ) -> KontextEdit:
        """`edit` with its copies that no longer last replaced by the same pictures among
        `candidates()`, looked for `within` seconds (see InputStager.found_again)."""
        deadline = asyncio.get_running_loop().time() + within
        try:
            async with asyncio.timeout_at(deadline):
                return await self._inputs.found_again(edit, candidates, deadline=deadline)
        except TimeoutError:
            return edit

    async def accept(self, request: JobRequest) -> Job:
        """Record a new job before anything is spent, within an `admission`; `start` drives it
        once its reply exists."""
        job = await self._store.create_job(request)
        self._metrics.job_accepted()
        log.info(
            "job %d accepted: user %d channel %d endpoint %s",
            job.id,
            job.user_id,
            job.channel_id,
            job.edit.endpoint,
            extra=_ids(job),
        )
        return job

    async def start(self, job: Job, *, message_id: int) -> None:
        """Start driving an accepted job whose reply message is `message_id` (stored with the
        job's next write: before its inputs are staged, at once if it has to wait for a slot, else
        with SUBMITTING). Stopping, only its reply is stored: it resumes at the next start (or in
        another process) from there."""
        job.message_id = message_id
        if self._stopping:
            await self._store.save(job)
            self._store.let_go(job)
            return
        self._start(job)

    async def abandon(self, job: Job, reason: str) -> None:
        """Close an accepted job that never started (its reply could not be created). Counted as
        finished like every closed job, so the accepted jobs minus the finished ones stay those
        under way."""
        log.warning("job %d abandoned before it started: %s", job.id, reason)
        job.error_code = "abandoned"
        job.error_detail = reason
        job.state = JobState.FAILED
        job.delivered_at = time.time()
        await self._store.save(job)
        self._metrics.job_finished(job.state.value, job.error_code)

    async def resume(self) -> int:
        """Drive every job a previous run left unfinished (and, sharing the database, those no
        live process holds); returns how many."""
        jobs = await self._store.claim()
        self._results.sweep(keep={job.id for job in jobs})
        self.adopt(jobs)
        return len(jobs)

    def adopt(self, jobs: list[Job]) -> None:
        """Drive jobs this process just claimed from their stored state, as a restart does."""
        for job in jobs:
            if self._stopping or job.id in self._drivers:
                # Stopping, or its old driver here is still winding down: claimed again later.
                self._store.let_go(job)
                continue
            log.info("job %d resumed in state %s", job.id, job.state.value, extra=_ids(job))
            if job.state.at_fal:
                # Already at fal: it must be followed now, not queued again.
                self._scheduler.resumed_at_fal(job.id, job.guild_id or 0, job.user_id)
                if job.state is JobState.RUNNING:  # stored as fal went silent about it
                    self._runs_unseen.add(job.id)
                    self._scheduler.started(job.id)
            self._start(job)

    def drop(self, job_id: int) -> None:
        """Another process took the job over: stop driving it here at once, a delivery included."""
        task = self._drivers.get(job_id)
        if task is not None:
            log.warning("job %d was taken over by another process; this one stops driving it", job_id)
            task.cancel()

    def active_job(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def jobs_in_channel(self, channel_id: int) -> list[Job]:
        """The jobs this process drives that were asked in that channel or in one of its threads
        (deleting a channel deletes its threads, and Discord then tells only of the channel)."""
        return [job for job in self._jobs.values() if channel_id in (job.channel_id, job.parent_channel_id)]

    async def cancel(self, job_id: int, by_user: int, *, reply_token: tuple[str, float] | None = None) -> CancelOutcome:
        """A member's cancel, wherever the job is driven: here, or (through the database) by
        another process. `reply_token`: the token and creation time of the cancel's own
        interaction, when it was pressed on the job's reply (see `Job.reply_through`)."""
        job = self._jobs.get(job_id)
        if job is not None and reply_token is not None:
            job.reply_through(*reply_token)
        outcome = await self.cancel_here(job_id, by_user)
        if outcome is not None:
            return outcome
        if not await self._store.request_cancel(job_id, by_user):
            return CancelOutcome.TOO_LATE
        answer = await self._store.cancel_answer(job_id, wait=CANCEL_ANSWER_WAIT)
        return CancelOutcome(answer) if answer is not None else CancelOutcome.FORWARDED

    async def cancel_here(self, job_id: int, by_user: int) -> CancelOutcome | None:
        """Cancel a job this process drives; None when it does not drive it."""
        job = self._jobs.get(job_id)
        if job is None or not self._store.holds(job):
            return None
        try:
            return await self._cancel(job, by_user)
        except LeaseLost:
            return None

    async def _cancel(self, job: Job, by_user: int) -> CancelOutcome:
        if job.state.is_final:
            return CancelOutcome.TOO_LATE
        if job.state is JobState.SUBMITTING:
            self._cancel_requests[job.id] = by_user
            return CancelOutcome.REQUESTED
        if job.state.at_fal and not await self._left_fals_line(job):
            answer = await self._ask_fal_to_cancel(job, by_user)
            if answer == "ALREADY_COMPLETED":
                return CancelOutcome.TOO_LATE
            if answer == "CANCELLATION_REQUESTED":
                return CancelOutcome.STARTED
        # Still in the bot, taken out of fal's line by the bot, or removed from fal's queue (OK)
        # or unknown there (NOT_FOUND).
        return await self._stop_work(job, by_user)

    async def withdraw(self, job_id: int, reason: str) -> None:
        """Nothing more of this job is to be shown in the channel (its reply was deleted): stop
        it while it can still be stopped; the member is told privately when it ends."""
        job = self._jobs.get(job_id)
        if job is None or job.state.is_final or NOTE_WITHDRAWN in job.notes:
            return
        job.note(NOTE_WITHDRAWN, reason)
        try:
            await self.cancel_here(job_id, by_user=0)
        except FalError as exc:
            log.warning("job %d: withdrawn, but fal did not take the cancel: %s", job_id, exc)

    async def _ask_fal_to_cancel(self, job: Job, by_user: int) -> str:
        assert job.request is not None
        self._store.ensure_held(job)
        # Noted before asking: fal may end the job (and the stream report it failed) before its
        # answer to the cancel arrives; the work then records a cancel, not a failure.
        self._cancel_requests[job.id] = by_user
        try:
            answer = await self._fal.cancel(job.request)
        except BaseException:
            self._cancel_requests.pop(job.id, None)
            raise
        log.info("job %d: fal answered cancel with %s", job.id, answer)
        if answer == "ALREADY_COMPLETED":
            self._cancel_requests.pop(job.id, None)
        elif answer == "CANCELLATION_REQUESTED":
            # It runs: fal passes the request on, and the model most likely finishes and bills
            # it anyway. Keep following it; the member gets what was paid for (or the cancel,
            # if fal does stop it).
            job.note(NOTE_CANCEL_REQUESTED_BY, by_user)
            self._listener.job_changed(job)
        return answer

    async def _stop_work(self, job: Job, by_user: int) -> CancelOutcome:
        work = self._work.get(job.id)
        # Handed back, a job is between two works: its driver puts it back in line unless it ended.
        between_works = job.id in self._handing_back
        if (work is None or work.done()) and not between_works:
            return CancelOutcome.CANCELLED if job.state is JobState.CANCELLED else CancelOutcome.TOO_LATE
        # State first, then stop the work: the driver delivers as soon as the work ends.
        job.state = JobState.CANCELLED
        job.cancelled_by = by_user
        if work is not None:
            work.cancel()
        await self._transition(job, JobState.CANCELLED)
        return CancelOutcome.CANCELLED

    async def stop(self, grace: float = 3.0, delivery_grace: float = DELIVERY_STOP_SECONDS) -> None:
        """Stop taking jobs and stop driving them, leaving each resumable from its stored state.
        A submit already in flight is allowed to finish (within `grace`) so its id is kept, and a
        post under way (within `delivery_grace`): cut short, one Discord received whole would be
        shown twice after the restart (a follow-up or channel message is not an idempotent edit).
        Not beyond its lease, though: another process may post it then, so an upload still going
        is better cut off. A delivery waiting to try again is stopped at once, like any other. A
        new job whose reply is on its way (an `admission`) is let get it within `grace` too."""
        self._stopping = True
        drivers = dict(self._drivers)
        for job_id, task in drivers.items():
            if job_id not in self._delivering:
                task.cancel()
        admissions = set(self._admissions)  # each ends by storing its job's reply, or abandoning it
        if not drivers and not admissions:
            return
        waited: set[asyncio.Future[None]] = {*drivers.values(), *admissions}
        _, pending = await asyncio.wait(waited, timeout=grace)
        pending -= admissions  # one still waiting for Discord: its job is closed at the next start
        posting = {job_id: task for job_id, task in drivers.items() if task in pending and job_id in self._delivering}
        if posting:
            held = min(self._store.held_for(self._jobs[job_id]) for job_id in posting)
            _, still_posting = await asyncio.wait(posting.values(), timeout=max(0.0, min(delivery_grace - grace, held)))
            pending = (pending - set(posting.values())) | still_posting
        for still_running in pending:
            still_running.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1.0)

    # -- driving ----------------------------------------------------------------------------

    def _start(self, job: Job) -> None:
        self._jobs[job.id] = job
        task = asyncio.create_task(self._drive(job), name=f"job-{job.id}")
        self._drivers[job.id] = task
        task.add_done_callback(lambda done: self._forget(job, done))

    def _forget(self, job: Job, task: asyncio.Task[None]) -> None:
        job_id = job.id
        if self._drivers.get(job_id) is task:
            del self._drivers[job_id]
            self._jobs.pop(job_id, None)
            self._cancel_requests.pop(job_id, None)
            self._stop_estimate_expiry(job_id)
        error = None if task.cancelled() else task.exception()
        # A job finished in memory whose last write failed is unfinished in the database.
        if not job.finished or error is not None:
            self._store.let_go(job)
            self._listener.job_dropped(job)
        if isinstance(error, LeaseLost):
            log.warning("job %d: another process holds it now; this one stopped driving it", job_id)
        elif error is not None:
            # Only the store failing can get here (StoreFailed): the job resumes from its row,
            # sharing the database once its lease runs out (here or elsewhere), else here once
            # the database answers again.
            log.error("job %d stopped unfinished", job_id, exc_info=error)
            if not self._store.shared:
                self._in_background(self._resume_when_the_store_answers(job_id), name=f"job-{job_id}-resume")

    async def _resume_when_the_store_answers(self, job_id: int) -> None:
        """Resume, from its row, a job whose writes failed for longer than the store tries them
        (a full disk, another writer holding the lock): no other process will, and left until
        the next start it would hold its member's place and leave its reply as it was. Read
        again less and less often while the database does not answer."""
        attempt = 0
        while not self._stopping:
            attempt += 1
            await asyncio.sleep(self._backoff.delay(attempt))
            try:
                job = await self._store.get_job(job_id)
            except self._store.transient_errors:
                continue
            if job is not None and not job.finished:
                self.adopt([job])
            return

    async def _drive(self, job: Job) -> None:
        if job.message_id is None:
            # Accepted, then the process stopped before the job's reply was stored, which is
            # before anything was sent to fal: nothing was spent. Discord may have made the reply
            # all the same, which then says so.
            await self.abandon(job, "the bot stopped before the job started")
            reply = await self._listener.abandoned(job)
            if reply is not None:
                # Its buttons (Try again) act only on the job whose reply they are on.
                job.message_id = reply
                await self._store.set_closed_reply(job.id, reply)
            return
        handed_back = False
        while not job.state.is_final:
            work = asyncio.create_task(self._run_at_fal(job, handed_back=handed_back), name=f"job-{job.id}-work")
            self._work[job.id] = work
            try:
                await work
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # shutdown: leave the job as stored, to resume later
                # otherwise the member cancelled it (cancel() recorded that), or it is handed back
            finally:
                self._work.pop(job.id, None)
            # Out of fal's line: the next work puts it back in the bot's, so a member's cancel
            # always finds a work to stop. One that ended meanwhile (cancelled) stays ended.
            handed_back = job.id in self._handing_back and not job.state.is_final
        self._handing_back.discard(job.id)
        if job.state is JobState.SUCCEEDED:
            await self._restore_images(job)
        await self._deliver(job)

    async def _run_at_fal(self, job: Job, *, handed_back: bool = False) -> None:
        """Take the job from where it stands to a final state, whatever goes wrong on the way
        (or, handed back from fal's line, back to the bot's)."""
        if handed_back:
            await self._back_in_line(job)
        deadline = self._deadline(job)
        admitted = job.state.at_fal
        if admitted:
            # Resumed at fal, perhaps past its deadline: its first status is to say whether fal
            # started it (when it started is not stored; fal tells the state again).
            deadline = max(deadline, asyncio.get_running_loop().time() + FIRST_STATUS_SECONDS)
        try:
            if job.state is JobState.PENDING:
                if self.account.refuses():
                    await self._fail(job, FalAccountLocked.code, None)
                    return
                # It takes its place in line at once (first come, first served within a member's
                # turn) and its inputs are made durable while it waits.
                admission = asyncio.ensure_future(self._scheduler.admit(job.id, job.guild_id or 0, job.user_id))
                try:
                    if job.edit.image_urls:
                        # Its reply is recorded before the inputs' fetch and upload, which can
                        # take a while: a job stopped then (this process, or another taking it
                        # over) resumes, where without a reply it would be closed unseen.
                        await self._store.save(job)
                    job.edit = await self._inputs.stage(job.edit, deadline=deadline)
                    if not admission.done():
                        await self._store.save(job)  # its durable inputs, not staged again after a stop
                    async with asyncio.timeout_at(deadline):
                        await admission
                finally:
                    admitted = admission.done() and not admission.cancelled() and admission.exception() is None
                    admission.cancel()
                await self._submit(job, deadline)
            elif job.state is JobState.SUBMITTING:
                # A previous run crashed between sending the submit and recording fal's answer.
                await self._fail(job, "submit_uncertain", None)
                return
            if job.state.at_fal:
                await self._follow(job, deadline)
        except StoreFailed:
            raise  # nothing went wrong with the job itself: it resumes from its stored state
        except FalError as exc:
            await self._failed_at_fal(job, exc)
        except InputRejected as exc:
            log.info("job %d: input refused: %s", job.id, exc)
            await self._fail(job, "bad_input", texts(job.locale).error(exc))  # the bot's words, in the member's
        except InputUnavailable as exc:
            log.info("job %d: input unavailable: %s", job.id, exc)
            await self._fail(job, "input_unavailable", texts(job.locale).error(exc))
        except TimeoutError:  # cancelled at fal by `_follow`, if it was there (as when fal is down)
            log.warning("job %d timed out after %.0fs", job.id, self._job_timeout)
            await self._fail(job, "timeout", None)
        except Exception:
            log.exception("job %d failed on the bot's side", job.id)
            if job.request is not None and job.state.at_fal:
                await self._cancel_quietly(job)
            await self._fail(job, "internal", None)
        finally:
            if admitted:
                ran = self._run_time(job)
                if ran is not None:
                    self._metrics.observe_run_time(ran)
                self._scheduler.left_fal(job.id, ran_for=ran)
            self._runs_unseen.discard(job.id)

    async def _failed_at_fal(self, job: Job, exc: FalError) -> None:
        by_user = self._cancel_requests.get(job.id)
        if by_user is not None and (isinstance(exc, FalCancelled) or job.started_at is None):
            log.info("job %d: fal ended it after the cancel request (%s)", job.id, exc.code)
            job.cancelled_by = by_user
            await self._transition(job, JobState.CANCELLED)
            return
        # fal's answer for a job taken out of its line is not documented, so any error of a job
        # that never started counts once fal said OK to the hand-back (or, the answer lost with
        # a restart, once the bot had asked): it goes back to the bot's line. Not before: a job
        # fal may still hold is not sent again.
        if job.started_at is None and (await self._left_fals_line(job) or NOTE_HANDED_BACK in job.notes):
            self._handing_back.add(job.id)
            return
        if isinstance(exc, FalAccountLocked):
            self.account.locked(exc.reason)
        log.warning("job %d failed: %s (%s)", job.id, exc, exc.code, extra=_ids(job))
        await self._fail(job, exc.code, _describe_detail(exc))

    @property
    def _outage_backoff(self) -> Backoff:
        """Retries through an outage (at fal or Discord, lasting minutes to hours): less and less
        often, from where the runner's own pace stops."""
        return Backoff(base=self._backoff.cap, cap=max(self._backoff.cap, DELIVERY_OUTAGE_MAX_WAIT))

    def _run_time(self, job: Job) -> float | None:
        """How long fal ran the job, as far as the bot saw it whole (not through fal's silence)."""
        if job.completed_at is None or job.started_at is None or job.id in self._runs_unseen:
            return None
        return job.completed_at - job.started_at

    def _deadline(self, job: Job, *, since: float | None = None) -> float:
        """When the job times out, on the loop's clock: JOB_TIMEOUT after it was made (or `since`)."""
        loop = asyncio.get_running_loop()
        return loop.time() + ((job.created_at if since is None else since) + self._job_timeout - time.time())

    async def _submit(self, job: Job, deadline: float) -> None:
        if self.account.refuses():
            # fal refused the last submit with its account lock: this one would fare the same.
            await self._fail(job, FalAccountLocked.code, None)
            return
        job.bot_queue_position = None
        self._store.ensure_held(job)  # about to spend: only while the lease is surely this process's
        # Durable: after a power loss, a lost record of a submit under way would send it again.
        await self._transition(job, JobState.SUBMITTING, durable=True)
        sending = asyncio.ensure_future(self._fal.submit(job.edit.endpoint, job.edit.payload(), deadline=deadline))
        try:
            request, status = await asyncio.shield(sending)
        except asyncio.CancelledError:
            # Shutting down mid-submit: wait for fal's answer so the job stays resumable.
            with contextlib.suppress(Exception):
                await self._record_submission(job, *(await sending))
            raise
        await self._record_submission(job, request, status)
        self.account.accepted()
        by_user = self._cancel_requests.get(job.id)
        if by_user is None:
            return
        answer: str | None
        try:
            answer = await self._ask_fal_to_cancel(job, by_user)
        except FalError as exc:
            # The job is in fal's line, and a cancel asked for it (its member's, a withdrawal):
            # asked until fal answers, or fal would run and bill it unseen.
            log.warning("job %d: fal did not take the cancel asked during its submit: %s", job.id, exc)
            self._cancel_requests[job.id] = by_user
            answer = await self._cancel_until_answered(job)
        if answer in ("OK", "NOT_FOUND"):
            job.cancelled_by = by_user
            await self._transition(job, JobState.CANCELLED)

    async def _record_submission(self, job: Job, request: FalRequest, status: QueueStatus) -> None:
        job.request = request
        job.submitted_at = time.time()
        job.queue_position = status.queue_position
        self._scheduler.submitted(job.id)  # may hand it back, once it is queued (see _hand_back)
        try:
            # Durable as the submit's own write: lost to a power loss, fal's id would leave a job
            # fal runs and bills resumed as one the bot cannot tell it sent, its result never had.
            await self._transition(job, JobState.QUEUED, durable=True)
        except StoreFailed:
            # fal has the job and the database does not: resumed, it would count as lost in its
            # submit. Taken back while queued it costs nothing (no other process knows its id).
            log.warning("job %d: fal request %s could not be recorded; cancelling it", job.id, request.request_id)
            with contextlib.suppress(Exception):
                await self._fal.cancel(request)
            raise
        log.info("job %d submitted: fal request %s", job.id, request.request_id, extra=_ids(job))
        await self._apply_status(job, status)

    async def _follow(self, job: Job, deadline: float) -> None:
        """Follow the job at fal to its result. JOB_TIMEOUT bounds the wait for fal to start it.
        At that deadline, or when fal stops answering, a job fal was not seen starting is
        cancelled at fal (if fal is back, it must not run and bill it unseen), unless fal answers
        that it runs or is done (it started between two statuses). A job fal started is billed
        whatever the bot does, so it is followed until its result is in hand (fal keeps the job,
        and its result, through its own outages; a running job ignores a cancel), or until
        fal still runs it JOB_TIMEOUT after it started."""
        started_unseen = False  # fal answered a cancel: it had started the job between statuses
        asked = 0  # how often fal was asked through its silence about the job: the pace slows
        while True:
            try:
                if not await self._follow_to_result(job, deadline):
                    return  # handed back: the hand-back stops this work, and the result would say "cancelled"
                break
            except (TimeoutError, FalUnavailable) as exc:
                # Billed: seen running, said to have started, or stored running by a previous run.
                if job.started_at is not None or started_unseen or job.state is JobState.RUNNING:
                    asked = await self._pursue_billed(job, exc, asked)
                else:
                    answer = await self._cancel_until_answered(job)
                    if answer not in ("CANCELLATION_REQUESTED", "ALREADY_COMPLETED"):
                        raise
                    started_unseen = True
                    why = "past its deadline" if isinstance(exc, TimeoutError) else "its status unanswered"
                    log.info("job %d: %s, yet fal started it (%s); following it on", job.id, why, answer)
                deadline = self._deadline(job, since=time.time())
        assert job.result is not None
        job.drop_note(NOTE_FAL_SILENT)
        # Stored now only if files in DATA_DIR depend on it; images held in memory are gone
        # after a restart anyway, which then follows the request at fal again.
        on_disk = any(image.on_disk for image in job.result.images)
        await self._transition(job, JobState.SUCCEEDED, store=on_disk)

    async def _follow_to_result(self, job: Job, deadline: float) -> bool:
        """The job's statuses until fal is done with it, then its result taken into custody
        (`job.result`), by `deadline` (moved on once fal starts it); False if it was handed back
        from fal's line meanwhile. Raises TimeoutError at the deadline."""
        assert job.request is not None
        async with asyncio.timeout_at(deadline) as limit:
            # The statuses' own retries are bounded in number; the time, by `limit`.
            async for status in self._fal.statuses(job.request, deadline=math.inf):
                starting = job.started_at is None
                await self._apply_status(job, status)
                if starting and job.started_at is not None:
                    limit.reschedule(max(deadline, self._deadline(job, since=job.started_at)))
            if job.started_at is None:  # it ran between two statuses (or was handed back)
                limit.reschedule(max(deadline, self._deadline(job, since=time.time())))
                if await self._left_fals_line(job):
                    return False
            job.completed_at = time.time()
            fetch_by = limit.when()
            assert fetch_by is not None, "a timeout at a time"
            # Done at fal, whatever the result: its slot there is free now (the next job may be
            # starting), though the result is still to be fetched.
            self._scheduler.left_fal(job.id, ran_for=self._run_time(job))
            output = parse_output(await self._fal.result(job.request, deadline=fetch_by))
            made = len(output.images)
            self._metrics.images_made(made, made * self._price)
            job.result = await self._results.take(job.id, output, deadline=fetch_by)
        return True

    async def _apply_status(self, job: Job, status: QueueStatus) -> None:
        silent = job.notes.get(NOTE_FAL_SILENT)
        # fal answers again. A started job's note stays until its result is in hand: the fetch
        # may meet the same outage, and the reply is not to flicker.
        if silent is not None and not (silent == FAL_SILENT_STARTED and status.state == "COMPLETED"):
            job.drop_note(NOTE_FAL_SILENT)
        for line in status.logs:
            log.debug("job %d fal log: %s", job.id, line)
        if status.state == "IN_QUEUE":
            job.queue_position = status.queue_position
            if status.queue_position is not None:
                self._estimate_start(job, self._scheduler.start_estimate(status.queue_position + 1))
            if job.state is not JobState.QUEUED:
                await self._transition(job, JobState.QUEUED)
            else:
                self._listener.job_changed(job)
        elif status.state == "IN_PROGRESS" and job.state is not JobState.RUNNING:
            job.started_at = time.time()
            job.queue_position = None
            job.starts_at = None
            self._scheduler.started(job.id)
            self._metrics.observe_queue_wait(job.started_at - job.created_at)
            # Not stored: after a restart fal tells the state again, and nothing else needs it.
            await self._transition(job, JobState.RUNNING, store=False)

    async def _restore_images(self, job: Job) -> None:
        """A succeeded job found after a restart whose images are not at hand (held in memory by
        the previous run, or files lost with a cleaned volume): fetch them again from fal's CDN,
        or say plainly that they are lost. fal's CDN not answering is asked again, less and less
        often, until a day after the request: the images were paid for, as a started job is
        followed through fal's outages."""
        assert job.result is not None
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                await self._results.restore(job.id, job.result, deadline=loop.time() + 60)
                return
            except (FalUnavailable, TimeoutError) as exc:
                attempt += 1
                wait = self._outage_backoff.delay(attempt)
                if time.time() + wait < job.created_at + DELIVERY_GIVE_UP_SECONDS:
                    log.info("job %d: fal's CDN did not give the result again (%s); asking again", job.id, exc)
                    await asyncio.sleep(wait)
                    continue
                failure: Exception = exc
            except Exception as exc:
                failure = exc
            log.warning("job %d: result images could not be fetched again: %s", job.id, describe_error(failure))
            self._results.discard(job.id, job.result)
            await self._fail(job, "result_expired" if isinstance(failure, FalResultExpired) else "missing_files", None)
            return

    async def _pursue_billed(self, job: Job, failure: TimeoutError | FalUnavailable, asked: int) -> int:
        """After `failure`, make ready another round of following a job fal started, or raise it:
        fal still runs the job past its deadline (then cancelled, though it rarely stops), or fal
        has not answered about it for a day. `asked`: how often fal was asked about it through
        its silence so far; returns the count now."""
        assert job.request is not None
        silent = isinstance(failure, FalUnavailable)
        if not silent:  # the deadline: a stuck job, or fal not answering (a hang looks the same)
            status = await self._status_if_answered(job)
            if status is not None and status.state != "COMPLETED":
                await self._cancel_quietly(job)
                raise failure
            silent = status is None
            if not silent:
                log.info("job %d: done at fal, its result not in hand by its deadline; fetching it again", job.id)
        if silent:
            answered_after = await self._until_fal_answers(job, asked)
            if answered_after is None:
                raise failure
            asked = answered_after
        if time.time() >= job.created_at + DELIVERY_GIVE_UP_SECONDS:
            raise failure
        return asked

    async def _until_fal_answers(self, job: Job, asked: int) -> int | None:
        """Wait for fal to answer about a job it started, asking its status less and less often
        (at the pace `asked` times before left it), until a day after the request (None then);
        how often it was asked in all. The member's reply says so meanwhile; the job is stored as
        running, so that a restart meanwhile takes it for what it is: billed, not to be cancelled."""
        if job.notes.get(NOTE_FAL_SILENT) != FAL_SILENT_STARTED:
            log.warning("job %d: fal does not answer about a job it started; asking until it does", job.id)
            self._runs_unseen.add(job.id)
            self._scheduler.started(job.id)  # if fal started it between two statuses
            job.note(NOTE_FAL_SILENT, FAL_SILENT_STARTED)
            await self._transition(job, JobState.RUNNING)
        status, asked = await self._asked_until_answered(job, lambda: self._status_if_answered(job), asked)
        if status is None:
            return None
        if status.state != "COMPLETED":
            # It runs: the reply says so again. Done, the note stays until the result is in
            # hand (its fetch may meet the same outage), so the reply does not flicker.
            job.drop_note(NOTE_FAL_SILENT)
            self._listener.job_changed(job)
        return asked

    async def _asked_until_answered(
        self, job: Job, ask: Callable[[], Awaitable[T | None]], asked: int = 0
    ) -> tuple[T | None, int]:
        """`ask` fal again (after `asked` times), less and less often, until it answers (not
        None) or a day after the job's request; its answer (None: none came) and how often it
        was asked in all."""
        while time.time() < job.created_at + DELIVERY_GIVE_UP_SECONDS:
            asked += 1
            await asyncio.sleep(self._outage_backoff.delay(asked))
            answer = await ask()
            if answer is not None:
                return answer, asked
        return None, asked

    async def _status_if_answered(self, job: Job) -> QueueStatus | None:
        """The job's status at fal in one call; None if fal does not answer it."""
        assert job.request is not None
        try:
            return await self._fal.status(job.request, deadline=math.inf, attempts=1)
        except FalUnavailable:
            return None

    async def _cancel_until_answered(self, job: Job) -> str | None:
        """Cancel the job at fal; fal's answer, or None when it never came. One fal was not seen
        starting may still be in its line (fal keeps a queued job through its own outages, and
        runs and bills it later), so while fal answers nothing the cancel is asked again, less
        and less often, until a day after the request, and the member's reply says so. Stopped
        meanwhile, the bot follows the job again at its next start."""
        answer = await self._cancel_quietly(job)
        if answer is not None or job.started_at is not None:
            return answer
        log.warning("job %d: fal answers neither its status nor a cancel; asking until it does", job.id)
        job.note(NOTE_FAL_SILENT, FAL_SILENT_QUEUED)
        self._listener.job_changed(job)
        try:
            answer, _ = await self._asked_until_answered(job, lambda: self._cancel_quietly(job))
        finally:
            job.drop_note(NOTE_FAL_SILENT)
        self._listener.job_changed(job)  # followed on if fal started it: no longer "unbilled"
        return answer

    async def _cancel_quietly(self, job: Job) -> str | None:
        """Cancel the job at fal; fal's answer, or None when it could not be asked."""
        assert job.request is not None
        self._store.ensure_held(job)
        try:
            return await self._fal.cancel(job.request)
        except Exception:
            log.warning("job %d: cancel at fal failed", job.id, exc_info=True)
            return None

    async def _fail(self, job: Job, code: str, detail: str | None) -> None:
        job.error_code = code
        job.error_detail = detail
        await self._transition(job, JobState.FAILED)

    async def _transition(self, job: Job, state: JobState, *, store: bool = True, durable: bool = False) -> None:
        """Move the job on and show it; stored first unless a restart has no use for the state
        (each write costs a trip to the database thread)."""
        job.state = state
        if state.is_final:
            job.queue_position = job.bot_queue_position = None
        if store:
            await self._store.save(job, durable=durable)
        # INFO has a job's three milestones (accepted, submitted, delivered) and its problems;
        # every step is here at DEBUG (each INFO line is CPU spent on every job).
        log.debug(
            "job %d is %s (guild %s, fal request %s)",
            job.id,
            state.value,
            job.guild_id,
            job.request.request_id if job.request else "none",
            extra=_ids(job),
        )
        self._listener.job_changed(job)

    # -- fair sharing -----------------------------------------------------------------------

    def _show_places(self, places: dict[int, Place]) -> None:
        for job_id, place in places.items():
            job = self._jobs.get(job_id)
            if job is None:
                continue
            changed = job.bot_queue_position != place.position
            job.bot_queue_position = place.position
            if self._estimate_start(job, place.starts_at, notify=False) or changed:
                self._listener.job_changed(job)

    def _estimate_start(self, job: Job, starts_at: float | None, *, notify: bool = True) -> bool:
        """Show a new start estimate only when it moved meaningfully (20 s, or a fifth of the
        wait): an estimate that drifts a few seconds is not worth an edit of every reply. The
        estimate shown is taken down if it passes with the job still waiting (the line stalled
        behind a job running long): "starting 5 seconds ago" is no estimate, and the line moving
        again brings a new one."""
        shown = job.starts_at
        if starts_at is None or shown is None:
            moved = starts_at != shown
        else:
            moved = abs(starts_at - shown) > max(20.0, 0.2 * (shown - time.time()))
        if moved:
            job.starts_at = starts_at
            self._stop_estimate_expiry(job.id)
            if starts_at is not None:
                loop = asyncio.get_running_loop()
                self._estimate_expiries[job.id] = loop.call_later(starts_at - time.time(), self._estimate_passed, job)
            if notify:
                self._listener.job_changed(job)
        return moved

    def _estimate_passed(self, job: Job) -> None:
        del self._estimate_expiries[job.id]
        if job.starts_at is not None and job.state in (JobState.PENDING, JobState.QUEUED):
            job.starts_at = None
            self._listener.job_changed(job)

    def _stop_estimate_expiry(self, job_id: int) -> None:
        expiry = self._estimate_expiries.pop(job_id, None)
        if expiry is not None:
            expiry.cancel()

    async def _left_fals_line(self, job: Job) -> bool:
        """Whether fal took this job out of its line as the bot asked; an answer on its way is
        waited for (fal's stream often says COMPLETED before the cancel's answer arrives)."""
        answer = self._hand_back_answers.get(job.id)
        if answer is not None:
            return await asyncio.shield(answer)
        return job.id in self._handing_back

    def _hand_back_soon(self, job_id: int) -> None:
        self._in_background(self._hand_back(job_id), name=f"job-{job_id}-hand-back")

    def _in_background(self, work: Coroutine[Any, Any, None], *, name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _hand_back(self, job_id: int) -> None:
        """Ask fal to take a job out of its line, so it waits its fair turn in the bot's."""
        job = self._jobs.get(job_id)
        work = self._work.get(job_id)
        if job is None or work is None or job.state is not JobState.QUEUED or job.request is None:
            self._scheduler.stay(job_id)
            return
        self._handing_back.add(job_id)
        job.note(NOTE_HANDED_BACK, True)
        answered = self._hand_back_answers[job_id] = asyncio.get_running_loop().create_future()
        answer, asked = "not asked", False
        try:
            await self._store.save(job)  # a restart then takes fal's cancelled answer for a hand-back
            self._store.ensure_held(job)
            asked = True
            answer = await self._fal.cancel(job.request)
        except (FalError, OSError, StoreFailed) as exc:
            answer = f"{'no answer' if asked else 'not asked'} ({describe_error(exc)})"
        except LeaseLost:  # another process drives it now
            self._handing_back.discard(job_id)
            self._scheduler.stay(job_id)
            return
        finally:
            del self._hand_back_answers[job_id]
            answered.set_result(answer == "OK")
        if answer != "OK":  # it started meanwhile, or fal could not be asked: it stays
            self._handing_back.discard(job_id)
            # It runs, or fal never heard of the hand-back; any other answer may hide a lost OK.
            if answer == "CANCELLATION_REQUESTED" or not asked:
                job.drop_note(NOTE_HANDED_BACK)
            self._scheduler.stay(job_id)
            return
        if not job.state.is_final:  # not cancelled by its member meanwhile
            log.info("job %d: handed back from fal's line to take its turn", job_id)
            work.cancel()

    async def _back_in_line(self, job: Job) -> None:
        self._handing_back.discard(job.id)
        job.drop_note(NOTE_HANDED_BACK)
        job.request = None
        job.submitted_at = job.queue_position = job.starts_at = None
        await self._transition(job, JobState.PENDING)

    # -- delivery ---------------------------------------------------------------------------

    async def _deliver(self, job: Job) -> None:
        """Hand the final state to the listener until it is shown, then forget the images."""

        async def attempt() -> None:
            self._store.ensure_held(job)  # nothing is shown by a process that lost the job
            self._delivering.add(job.id)  # from here to its stored end, a stop lets it finish
            try:
                await self._listener.deliver(job, _StoredProgress(self._store, job))
            except Exception:
                self._delivering.discard(job.id)  # nothing in flight until the next try
                # It may take a while or a restart: memory is for passing through.
                if job.result is not None and await self._results.keep_on_disk(job.id, job.result):
                    await self._store.save(job)
                raise

        try:
            try:
                await self._retry_delivery(job, attempt)
            except Undeliverable as exc:
                log.warning("job %d cannot be shown (%s); it is closed", job.id, exc)
                job.note(NOTE_UNDELIVERABLE, str(exc))
            job.delivered_at = time.time()
            job.interaction_token = ""  # of no more use, and not kept where a copy could leak it
            await self._store.save(job)
        finally:
            self._delivering.discard(job.id)
            for image in job.result.images if job.result else ():
                self._results.release(image)
        log.info("job %d delivered (%s)", job.id, job.state.value, extra=_ids(job))
        outcome = "undeliverable" if NOTE_UNDELIVERABLE in job.notes else job.state.value
        self._metrics.job_finished(outcome, job.error_code)
        if job.state is JobState.SUCCEEDED and job.completed_at is not None and outcome != "undeliverable":
            self._metrics.observe_completion_to_posted(job.delivered_at - job.completed_at)
        self._results.discard(job.id, job.result)

    async def _retry_delivery(self, job: Job, attempt: Callable[[], Awaitable[None]]) -> None:
        """Run `attempt` until it succeeds: at the runner's pace for `DELIVERY_RETRY_SECONDS`,
        then (an outage at Discord) less and less often, until a day after the request, when it
        raises Undeliverable. Nothing waits for a restart to try again."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + job.created_at + DELIVERY_GIVE_UP_SECONDS - time.time()
        phases = (
            (self._backoff, min(give_up, loop.time() + DELIVERY_RETRY_SECONDS)),
            (self._outage_backoff, give_up),
        )
        for backoff, deadline in phases:
            if deadline <= loop.time():
                break
            try:
                await retrying(
                    attempt,
                    retryable=lambda exc: not isinstance(exc, Undeliverable | LeaseLost),
                    backoff=backoff,
                    deadline=deadline,
                    what=f"job {job.id} delivery",
                )
                return
            except (Undeliverable, LeaseLost):
                raise
            except Exception as exc:
                if deadline >= give_up:
                    raise Undeliverable(f"not shown within a day of the request: {describe_error(exc)}") from exc
                log.warning("job %d: not shown after %.0fs; trying less often", job.id, DELIVERY_RETRY_SECONDS)
        raise Undeliverable("not shown within a day of the request")


class _StoredProgress:
    """Delivery progress written into the job and stored (see DeliveryProgress)."""

    def __init__(self, store: Store, job: Job) -> None:
        self._store = store
        self._job = job

    async def posted(
        self,
        parts: int,
        *,
        message_id: int,
        in_channel: bool,
        repeatable: bool = False,
        image_urls: Sequence[str] = (),
    ) -> None:
        job = self._job
        job.delivered_parts = parts
        job.delivered_in_channel = in_channel
        if message_id not in job.posted_message_ids:
            job.posted_message_ids = [*job.posted_message_ids, message_id]
            job.posted_image_urls = [*job.posted_image_urls, *image_urls]
        elif image_urls:  # the reply edited again: its images are those of the last edit
            job.posted_image_urls = list(image_urls)
        if repeatable:
            self._store.ensure_held(self._job)  # before the next message is posted
        else:
            await self._store.save(self._job)


def _describe_detail(exc: FalError) -> str | None:
    """fal's own words for a failure, kept to show the member."""
    messages = exc.messages
    return "; ".join(messages)[:500] if messages else None


def _ids(job: Job) -> dict[str, object]:
    """The ids a log line about a job carries as fields (LOG_FORMAT=json)."""
    return {
        "job_id": job.id,
        "guild_id": job.guild_id,
        "request_id": job.request.request_id if job.request else None,
        "state": job.state.value,
    }
