"""Prometheus metrics for operators: what the bot did (jobs, images, spend, errors) and how long
it took, exposed through `exposition()` for the ops server's `/metrics`.

Every label takes its values from a fixed set and anything else is counted as "other": ids of
servers, members or jobs never become labels, so the number of series stays small whatever the
bot sees. Gauges of live state are read from callbacks at scrape time, so the runner's hot path
never updates them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from .job import JobState

log = logging.getLogger(__name__)

OTHER = "other"
NO_ERROR = "none"

OUTCOMES = frozenset({"succeeded", "failed", "cancelled", "undeliverable"})
JOB_STATES = frozenset(state.value for state in JobState)

# Every `Job.error_code` the bot writes (fal's error classes, the runner's own failures, the
# store's unreadable rows).
KNOWN_ERROR_CODES = frozenset(
    {
        "fal_rejected",
        "content_policy",
        "fal_failed",
        "fal_auth",
        "fal_account_locked",
        "fal_cancelled",
        "fal_unavailable",
        "submit_uncertain",
        "result_expired",
        "bad_output",
        "result_refused",
        "timeout",
        "missing_files",
        "bad_input",
        "input_unavailable",
        "upload_failed",
        "internal",
        "abandoned",
        "unreadable",
    }
)

# Calls to fal (its queue and its storage) that did not succeed: fal's app answered with an
# error (the code of its error class: fal is up), or it never answered: a connection or read
# that failed (transport), an answer from before fal took the call (ingress: 408, 409, 429, or a
# 5xx from the proxy in front of fal's app, without x-fal-request-id).
FAL_ERROR_KINDS = frozenset(
    {
        "fal_rejected",
        "content_policy",
        "fal_failed",
        "fal_cancelled",
        "fal_auth",
        "fal_account_locked",
        "transport",
        "ingress",
    }
)

# Failures talking to Discord. forbidden and not_found (403, 404: the bot lost access, the
# message or channel is gone) are apart from the other 4xx (a request Discord found wrong);
# rate_limited is discord.py giving up on a 429 whose wait was too long (every 429 seen is
# counted by `discord_rate_limited`).
DISCORD_ERROR_KINDS = frozenset(
    {"http_4xx", "http_5xx", "forbidden", "not_found", "rate_limited", "transport", "timeout"}
)

# Seconds from acceptance to the start of generation: the bot's own queue plus fal's.
QUEUE_WAIT_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800)
# Seconds of generation at fal: Kontext takes a few seconds per image; JOB_TIMEOUT is 10 min.
RUN_TIME_BUCKETS = (1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 120, 300, 600)
# Seconds from fal's COMPLETED to the result shown: tens of milliseconds when all is well,
# up to a minute through Discord's retries.
COMPLETION_TO_POSTED_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def _bounded(value: str | None, known: frozenset[str]) -> str:
    if value is None:
        return NO_ERROR
    return value if value in known else OTHER


class Metrics:
    """The bot's metrics, in a registry of their own (several instances never collide).

    `exposition()` must run on the bot's event loop thread: the live gauges' callbacks read
    the runner's state, which only that thread changes.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # The standard process_* metrics (CPU, memory, open files, start time), unprefixed so
        # the usual dashboards and alerts apply.
        ProcessCollector(registry=self.registry)
        self._live = _LiveState()
        self.registry.register(self._live)
        self._accepted = Counter(
            "kontext_jobs_accepted", "Jobs accepted (recorded, before anything was spent).", registry=self.registry
        )
        self._finished = Counter(
            "kontext_jobs_finished",
            "Jobs closed, by outcome and error code (none when it did not fail).",
            ["outcome", "error_code"],
            registry=self.registry,
        )
        self._queue_wait = Histogram(
            "kontext_job_queue_wait_seconds",
            "From acceptance to the start of generation (the bot's queue and fal's).",
            buckets=QUEUE_WAIT_BUCKETS,
            registry=self.registry,
        )
        self._run_time = Histogram(
            "kontext_job_run_seconds", "Generation time at fal.", buckets=RUN_TIME_BUCKETS, registry=self.registry
        )
        self._completion_to_posted = Histogram(
            "kontext_completion_to_posted_seconds",
            "From fal reporting a job completed to its result shown in Discord.",
            buckets=COMPLETION_TO_POSTED_BUCKETS,
            registry=self.registry,
        )
        self._images = Counter("kontext_images_generated", "Images fal made for the bot.", registry=self.registry)
        self._spend = Counter(
            "kontext_estimated_spend_usd", "Estimated spend at fal in US dollars.", registry=self.registry
        )
        self._fal_errors = Counter(
            "kontext_fal_errors", "Failed calls to fal, by kind.", ["kind"], registry=self.registry
        )
        self._discord_errors = Counter(
            "kontext_discord_errors", "Failed calls to Discord, by kind.", ["kind"], registry=self.registry
        )
        self._rate_limited = Counter(
            "kontext_discord_rate_limited",
            "429 answers from Discord (discord.py waits and retries).",
            registry=self.registry,
        )
        self._progress_edits = Counter(
            "kontext_progress_edits", "Progress edits sent to Discord.", registry=self.registry
        )
        self._taken_over = Counter(
            "kontext_jobs_taken_over",
            "Jobs this process took over from a process that died or handed them back (shared database).",
            registry=self.registry,
        )
        self._leases_lost = Counter(
            "kontext_job_leases_lost",
            "Jobs another process took over from this one while it drove them (it paused or lost the database).",
            registry=self.registry,
        )
        # Zero from the start, so an alert on their increase works from the first error.
        for kind in sorted(FAL_ERROR_KINDS | {OTHER}):
            self._fal_errors.labels(kind)
        for kind in sorted(DISCORD_ERROR_KINDS | {OTHER}):
            self._discord_errors.labels(kind)

    def job_accepted(self) -> None:
        """A job was recorded."""
        self._accepted.inc()

    def job_finished(self, outcome: str, error_code: str | None) -> None:
        """A job was closed. Values outside OUTCOMES and KNOWN_ERROR_CODES count as "other",
        so a new code shows up without adding series for every stray string."""
        self._finished.labels(_bounded(outcome, OUTCOMES), _bounded(error_code, KNOWN_ERROR_CODES)).inc()

    def observe_queue_wait(self, seconds: float) -> None:
        """Time from acceptance to the start of generation. Wall-clock differences can come out
        below zero after a clock step; they count as zero."""
        self._queue_wait.observe(max(seconds, 0.0))

    def observe_run_time(self, seconds: float) -> None:
        """Generation time at fal."""
        self._run_time.observe(max(seconds, 0.0))

    def observe_completion_to_posted(self, seconds: float) -> None:
        """Time from fal's COMPLETED to the result shown in Discord."""
        self._completion_to_posted.observe(max(seconds, 0.0))

    def images_made(self, count: int, usd: float) -> None:
        """fal made `count` images, estimated to cost `usd`."""
        self._images.inc(count)
        self._spend.inc(usd)

    def fal_error(self, kind: str) -> None:
        """A call to fal failed; kinds outside FAL_ERROR_KINDS count as "other"."""
        self._fal_errors.labels(_bounded(kind, FAL_ERROR_KINDS)).inc()

    def discord_error(self, kind: str) -> None:
        """A call to Discord failed; kinds outside DISCORD_ERROR_KINDS count as "other"."""
        self._discord_errors.labels(_bounded(kind, DISCORD_ERROR_KINDS)).inc()

    def discord_rate_limited(self) -> None:
        """Discord answered 429 (see RateLimitCounter)."""
        self._rate_limited.inc()

    def progress_edit(self) -> None:
        """A progress edit was sent."""
        self._progress_edits.inc()

    def jobs_taken_over(self, count: int) -> None:
        """This process claimed `count` jobs no live process held."""
        self._taken_over.inc(count)

    def lease_lost(self) -> None:
        """Another process took over a job this one was driving."""
        self._leases_lost.inc()

    def set_live_sources(
        self, jobs_by_state: Callable[[], dict[str, int]], bot_queue_length: Callable[[], int]
    ) -> None:
        """Where the live gauges are read at each scrape: the jobs the bot is driving, by state,
        and the jobs waiting in its own queue for a slot at fal."""
        self._live.sources = (jobs_by_state, bot_queue_length)

    def exposition(self) -> bytes:
        """Every metric in Prometheus' text format (served with `content_type`)."""
        return generate_latest(self.registry)


class _LiveState:
    """The gauges read through callbacks when scraped. A failing callback costs its own gauges
    for that scrape (logged), never the rest of the metrics."""

    def __init__(self) -> None:
        self.sources: tuple[Callable[[], dict[str, int]], Callable[[], int]] | None = None

    def describe(self) -> Iterable[Metric]:
        return [self._jobs_family(), self._queue_family()]

    def collect(self) -> Iterable[Metric]:
        if self.sources is None:
            return []
        jobs_by_state, bot_queue_length = self.sources
        try:
            by_state = jobs_by_state()
            queued = bot_queue_length()
        except Exception:
            log.exception("live metrics could not be read")
            return []
        # Every state every time, so a state's series does not vanish when no job is in it.
        counts = dict.fromkeys(sorted(JOB_STATES) + [OTHER], 0)
        for state, count in by_state.items():
            counts[_bounded(state, JOB_STATES)] += count
        jobs = self._jobs_family()
        for state, count in counts.items():
            jobs.add_metric([state], count)
        queue = self._queue_family()
        queue.add_metric([], queued)
        return [jobs, queue]

    @staticmethod
    def _jobs_family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "kontext_jobs_active", "Jobs the bot is driving (accepted, not yet shown), by state.", labels=["state"]
        )

    @staticmethod
    def _queue_family() -> GaugeMetricFamily:
        return GaugeMetricFamily("kontext_bot_queue_length", "Jobs waiting in the bot's own queue for a slot at fal.")


# discord.py's warnings for a 429 (discord/http.py, discord/webhook/async_.py), matched on the
# formatted message: RedactingFilter may have replaced the template with it (its URL carries
# an interaction token). "Global rate limit has been hit" follows one of these for the same 429.
_RATE_LIMIT_MESSAGES = {
    "discord.http": re.compile(r"We are being rate limited\. "),
    "discord.webhook.async_": re.compile(r"Webhook ID \S+ is rate limited\. "),
}


class RateLimitCounter(logging.Handler):
    """Counts the 429s discord.py handles by itself, which the bot never sees, from the warning
    it logs for each. Add it to the `discord` logger (or the root logger)."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(logging.WARNING)
        self._metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        pattern = _RATE_LIMIT_MESSAGES.get(record.name)
        if pattern is not None and pattern.match(record.getMessage()):
            self._metrics.discord_rate_limited()
