"""The metrics as Prometheus reads them: parsed back with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator

import aiohttp
import discord
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

import services.fal_storage  # noqa: F401  (its FalUploadFailed among FalError's subclasses)
from services.fal_queue import FalError
from services.metrics import KNOWN_ERROR_CODES, Metrics, RateLimitCounter
from services.redact import RedactingFilter

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(metrics: Metrics) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for sample in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def test_counters_move_by_exactly_what_was_recorded():
    metrics = Metrics()
    for _ in range(3):
        metrics.job_accepted()
    metrics.images_made(2, 0.16)
    metrics.images_made(1, 0.08)
    for _ in range(4):
        metrics.progress_edit()
    metrics.discord_rate_limited()
    found = samples(metrics)
    assert value(found, "kontext_jobs_accepted_total") == 3
    assert value(found, "kontext_images_generated_total") == 3
    assert value(found, "kontext_estimated_spend_usd_total") == pytest.approx(0.24)
    assert value(found, "kontext_progress_edits_total") == 4
    assert value(found, "kontext_discord_rate_limited_total") == 1


def test_finished_jobs_keep_to_known_outcomes_and_error_codes():
    metrics = Metrics()
    metrics.job_finished("succeeded", None)
    metrics.job_finished("failed", "timeout")
    metrics.job_finished("failed", "timeout")
    metrics.job_finished("failed", "something new from fal")
    metrics.job_finished("exploded", "internal")
    found = samples(metrics)
    finished = {labels: v for (name, labels), v in found.items() if name == "kontext_jobs_finished_total"}
    assert finished == {
        frozenset({("outcome", "succeeded"), ("error_code", "none")}): 1,
        frozenset({("outcome", "failed"), ("error_code", "timeout")}): 2,
        frozenset({("outcome", "failed"), ("error_code", "other")}): 1,
        frozenset({("outcome", "other"), ("error_code", "internal")}): 1,
    }


def fal_error_codes() -> set[str]:
    """The code of every FalError a job can fail with (not the base class's, nor the client's
    private retry signal)."""
    classes, found = [FalError], set()
    while classes:
        for sub in classes.pop().__subclasses__():
            classes.append(sub)
            if not sub.__name__.startswith("_"):
                found.add(sub.code)
    return found


def test_every_code_the_runner_and_store_write_is_known():
    codes = fal_error_codes() | {"timeout", "missing_files", "bad_input", "input_unavailable", "internal"}
    codes |= {"abandoned", "unreadable"}  # the runner's and the store's own
    assert "fal_cancelled" in codes and "upload_failed" in codes
    assert codes == KNOWN_ERROR_CODES


def test_error_kinds_are_counted_by_kind_and_unknown_ones_as_other():
    metrics = Metrics()
    metrics.fal_error("transport")
    metrics.fal_error("ingress")
    metrics.fal_error("ingress")
    metrics.fal_error("guild 1234")
    metrics.discord_error("http_5xx")
    metrics.discord_error("teapot")
    found = samples(metrics)
    assert value(found, "kontext_fal_errors_total", kind="transport") == 1
    assert value(found, "kontext_fal_errors_total", kind="ingress") == 2
    assert value(found, "kontext_fal_errors_total", kind="other") == 1
    assert value(found, "kontext_fal_errors_total", kind="fal_auth") == 0  # present before it ever happens
    assert value(found, "kontext_discord_errors_total", kind="http_5xx") == 1
    assert value(found, "kontext_discord_errors_total", kind="other") == 1
    kinds = {dict(labels)["kind"] for name, labels in found if name == "kontext_fal_errors_total"}
    assert "guild 1234" not in kinds


def test_histograms_count_each_observation_in_its_bucket():
    metrics = Metrics()
    metrics.observe_queue_wait(45)
    metrics.observe_queue_wait(1500)
    metrics.observe_run_time(4)
    metrics.observe_completion_to_posted(0.02)
    metrics.observe_completion_to_posted(-0.5)  # a clock step: counted as zero
    found = samples(metrics)
    assert value(found, "kontext_job_queue_wait_seconds_bucket", le="30.0") == 0
    assert value(found, "kontext_job_queue_wait_seconds_bucket", le="60.0") == 1
    assert value(found, "kontext_job_queue_wait_seconds_bucket", le="1800.0") == 2
    assert value(found, "kontext_job_queue_wait_seconds_sum") == 1545
    assert value(found, "kontext_job_run_seconds_bucket", le="3.0") == 0
    assert value(found, "kontext_job_run_seconds_bucket", le="5.0") == 1
    assert value(found, "kontext_completion_to_posted_seconds_bucket", le="0.005") == 1
    assert value(found, "kontext_completion_to_posted_seconds_bucket", le="0.025") == 2
    assert value(found, "kontext_completion_to_posted_seconds_sum") == pytest.approx(0.02)


def test_live_gauges_are_read_from_their_sources_at_each_scrape():
    metrics = Metrics()
    assert not any(name == "kontext_jobs_active" for name, _ in samples(metrics))  # no sources yet
    jobs = {"queued": 2, "running": 1}
    calls: list[str] = []

    def jobs_by_state() -> dict[str, int]:
        calls.append("jobs")
        return dict(jobs)

    def bot_queue_length() -> int:
        calls.append("queue")
        return 7

    metrics.set_live_sources(jobs_by_state, bot_queue_length)
    assert calls == []  # nothing read until a scrape
    found = samples(metrics)
    assert calls == ["jobs", "queue"]
    assert value(found, "kontext_jobs_active", state="queued") == 2
    assert value(found, "kontext_jobs_active", state="running") == 1
    assert value(found, "kontext_jobs_active", state="pending") == 0
    assert value(found, "kontext_bot_queue_length") == 7

    jobs.update(queued=0, mystery=3)
    found = samples(metrics)
    assert value(found, "kontext_jobs_active", state="queued") == 0
    assert value(found, "kontext_jobs_active", state="other") == 3


def test_a_failing_source_costs_only_the_live_gauges(caplog):
    metrics = Metrics()
    metrics.job_accepted()

    def broken() -> dict[str, int]:
        raise RuntimeError("runner gone")

    metrics.set_live_sources(broken, lambda: 0)
    with caplog.at_level(logging.ERROR, logger="services.metrics"):
        found = samples(metrics)
    assert value(found, "kontext_jobs_accepted_total") == 1
    assert not any(name in ("kontext_jobs_active", "kontext_bot_queue_length") for name, _ in found)
    assert "live metrics could not be read" in caplog.text


def test_instances_do_not_share_their_metrics():
    first, second = Metrics(), Metrics()
    first.job_accepted()
    assert value(samples(first), "kontext_jobs_accepted_total") == 1
    assert value(samples(second), "kontext_jobs_accepted_total") == 0


def test_the_bot_s_metric_names_are_prefixed_and_carry_units():
    metrics = Metrics()
    metrics.set_live_sources(dict, lambda: 0)
    names = {family.name for family in text_string_to_metric_families(metrics.exposition().decode())}
    ours = {name for name in names if not name.startswith("process_")}
    assert ours and all(name.startswith("kontext_") for name in ours)
    assert "kontext_estimated_spend_usd" in names  # exposed as ..._usd_total
    assert "kontext_job_run_seconds" in names
    assert metrics.content_type.startswith("text/plain; version=")


# --- the rate-limit log handler ----------------------------------------------------------------


@pytest.fixture
def counted() -> Iterator[Metrics]:
    metrics = Metrics()
    handler = RateLimitCounter(metrics)
    logger = logging.getLogger("discord")
    logger.addHandler(handler)
    try:
        yield metrics
    finally:
        logger.removeHandler(handler)


def rate_limited_count(metrics: Metrics) -> float:
    return value(samples(metrics), "kontext_discord_rate_limited_total")


def test_counts_only_discord_s_rate_limit_warnings(counted):
    logging.getLogger("discord.http").warning(
        "We are being rate limited. %s %s responded with 429. Retrying in %.2f seconds.", "GET", "/x", 0.5
    )
    logging.getLogger("discord.http").warning(
        "We are being rate limited. %s %s responded with 429. Timeout of %.2f was too long, erroring instead.",
        "GET",
        "/x",
        90.0,
    )
    logging.getLogger("discord.webhook.async_").warning(
        "Webhook ID %s is rate limited. Retrying in %.2f seconds.", 123, 0.25
    )
    assert rate_limited_count(counted) == 3
    # The same 429 again, a debug line about rate limits, and the same words from another logger.
    logging.getLogger("discord.http").warning("Global rate limit has been hit. Retrying in %.2f seconds.", 1.0)
    logging.getLogger("discord.http").debug("Done sleeping for the rate limit. Retrying...")
    logging.getLogger("discord.gateway").warning("We are being rate limited. GET /x responded with 429.")
    logging.getLogger("kontext").warning("We are being rate limited. GET /x responded with 429.")
    assert rate_limited_count(counted) == 3


class _RateLimitingDiscord:
    """A Discord REST stand-in answering each route's first request with a 429 as Discord does
    (discord.py retries only a 429 that came through Discord's proxy: `Via` header, JSON body)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.app = web.Application()
        self.app.router.add_route("*", "/api/v10/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path not in self.seen:
            self.seen.add(request.path)
            body = {"message": "You are being rate limited.", "retry_after": 0.01, "global": False}
            # Exactly `application/json`: discord.py reads any other content type as text.
            headers = {"Via": "1.1 google", "Content-Type": "application/json"}
            return web.Response(body=json.dumps(body).encode(), status=429, headers=headers)
        if "/webhooks/" in request.path:
            return web.Response(status=204)
        user = {"id": "1", "username": "bot", "discriminator": "0", "avatar": None}
        return web.Response(body=json.dumps(user).encode(), headers={"Content-Type": "application/json"})


@pytest.fixture
async def discord_base(monkeypatch) -> AsyncIterator[str]:
    fake = _RateLimitingDiscord()
    runner = web.AppRunner(fake.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}/api/v10"
    monkeypatch.setattr(discord.http.Route, "BASE", base)
    try:
        yield base
    finally:
        await runner.cleanup()


async def test_counts_the_429s_discord_py_itself_retries(counted, discord_base):
    client = discord.http.HTTPClient(asyncio.get_running_loop())
    try:
        await client.static_login("token")
    finally:
        await client.close()
    assert rate_limited_count(counted) == 1
    # Interaction replies and follow-ups go through discord.py's webhook adapter.
    async with aiohttp.ClientSession() as session:
        await discord.Webhook.partial(42, "t" * 68, session=session).send("hi")
    assert rate_limited_count(counted) == 2


def test_counts_a_warning_whose_token_was_redacted_first(counted):
    redacting = logging.StreamHandler(io.StringIO())
    redacting.addFilter(RedactingFilter([]))
    http_logger = logging.getLogger("discord.http")
    http_logger.addHandler(redacting)  # runs before the handlers of its parent, `discord`
    try:
        http_logger.warning(
            "We are being rate limited. %s %s responded with 429. Retrying in %.2f seconds.",
            "PATCH",
            "https://discord.com/api/v10/webhooks/1234/" + "t" * 68 + "/messages/@original",
            0.5,
        )
    finally:
        http_logger.removeHandler(redacting)
    assert "t" * 68 not in redacting.stream.getvalue()
    assert rate_limited_count(counted) == 1
