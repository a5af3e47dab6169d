"""What operators and moderators get, from the real bot process: /healthz and /metrics on
HTTP_PORT, JSON logs that carry the ids, and the moderators' usage chart."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import sqlite3

import aiohttp
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from fakes.fal_fake import JobScript, model_error
from tests.e2e import admin, finished, text
from tests.test_dockerfile import run_check


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_move_by_exactly_the_jobs_run(world):
    port = free_port()
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.2, run_time=0.2)
    await world.start_bot(HTTP_PORT=str(port))
    status, before = await get(port, "/metrics")
    assert status == 200
    for _ in range(2):
        assert text(await finished(await world.kontext(num_images=2))).startswith("✅")
    world.fal.default = JobScript(
        result_status=422, result_body={"detail": [{"msg": "no", "type": "image_load_error"}]}
    )
    assert text(await finished(await world.kontext(user="mod"))).startswith("❌")
    was = samples(before)
    for _ in range(50):  # the reply shows before the job is closed and counted
        _, after = await get(port, "/metrics")
        now = samples(after)
        finished_jobs = sum(v for (name, _), v in now.items() if name == "kontext_jobs_finished_total")
        if finished_jobs - sum(v for (name, _), v in was.items() if name == "kontext_jobs_finished_total") >= 3:
            break
        await asyncio.sleep(0.05)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return now.get(key, 0.0) - was.get(key, 0.0)

    assert moved("kontext_jobs_accepted_total") == 3
    assert moved("kontext_jobs_finished_total", outcome="succeeded", error_code="none") == 2
    assert moved("kontext_jobs_finished_total", outcome="failed", error_code="fal_rejected") == 1
    assert moved("kontext_images_generated_total") == 4
    assert abs(moved("kontext_estimated_spend_usd_total") - 4 * 0.08) < 1e-9
    assert moved("kontext_completion_to_posted_seconds_count") == 2
    assert moved("kontext_job_run_seconds_count") == 3
    assert moved("kontext_progress_edits_total") >= 1
    assert now[("kontext_bot_queue_length", ())] == 0
    assert not any(name[0].startswith("kontext_") and "guild" in dict(name[1]) for name in now)


@pytest.mark.parametrize("level", ["ERROR", "CRITICAL"])
async def test_every_429_is_counted_whatever_the_log_level(world, level):
    """LOG_LEVEL chooses what is logged: at ERROR the metric, counted from discord.py's
    warnings, stayed at 0 (the `discord` logger dropped them before any handler saw them)."""
    port = free_port()
    await world.start_bot(HTTP_PORT=str(port), LOG_LEVEL=level)
    world.discord.fail_next("PATCH", r"/webhooks/\d+/[^/]+/messages/", status=429)
    assert text(await finished(await world.kontext())).startswith("✅")
    _, metrics = await get(port, "/metrics")
    assert samples(metrics)[("kontext_discord_rate_limited_total", ())] == 1
    assert "rate limited" not in world.bot.log_text()


async def test_a_job_whose_reply_discord_refused_is_counted_as_finished(world):
    """Accepted, then Discord refused the acknowledgement (too late: 10062 Unknown interaction):
    the job is closed as abandoned, and counted as finished as well as accepted, so accepted
    minus finished stays the jobs under way."""
    port = free_port()
    await world.start_bot(HTTP_PORT=str(port))
    was = samples((await get(port, "/metrics"))[1])
    world.discord.fail_next(
        "POST",
        r"/interactions/\d+/[^/]+/callback$",
        status=404,
        json={"message": "Unknown interaction", "code": 10062},
    )
    await world.kontext()
    await world.discord.wait_until(lambda: "abandoned before it started" in world.bot.log_text())
    # The line is logged before the job is saved and counted: read /metrics until it shows it.
    finished = ("kontext_jobs_finished_total", (("error_code", "abandoned"), ("outcome", "failed")))
    async with asyncio.timeout(10):
        while (now := samples((await get(port, "/metrics"))[1])).get(finished) == was.get(finished):  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.02)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return now.get(key, 0.0) - was.get(key, 0.0)

    assert moved("kontext_jobs_accepted_total") == 1
    assert moved("kontext_jobs_finished_total", outcome="failed", error_code="abandoned") == 1
    assert world.fal.count("submit") == 0


@pytest.mark.parametrize("fault", ["ingress_503", "hang", "drop", "refused"])
async def test_healthz_follows_fal(world, fault):
    """fal failing each way the bot meets: its front proxy answering 503, no answer until the read
    timeout, connections dropped, connections refused (the host is down)."""
    port = free_port()
    await world.start_bot(HTTP_PORT=str(port), JOB_TIMEOUT="3")
    status, body = await get(port, "/healthz")
    assert status == 200, body
    assert json.loads(body)["checks"] == {"discord": True, "database": True, "fal": True}
    if fault == "refused":
        await world.fal.refuse_connections()
    for op in ("submit", "status", "stream", "result"):
        if fault != "refused":
            world.fal.fail_next(op, status=fault, times=10_000)
    await finished(await world.kontext(), timeout=20)
    status, body = await get(port, "/healthz")
    assert status == 503
    report = json.loads(body)
    assert report["checks"]["fal"] is False and any(p.startswith("fal:") for p in report["problems"])
    if fault == "refused":
        await world.fal.accept_connections()
    for op in ("submit", "status", "stream", "result"):
        world.fal._faults[op].clear()
    assert text(await finished(await world.kontext(user="mod"))).startswith("✅")
    status, _ = await get(port, "/healthz")
    assert status == 200


async def test_the_image_s_health_check_fails_a_hung_bot_but_not_one_riding_out_a_fal_outage(world):
    """The Dockerfile's HEALTHCHECK, as Docker runs it, against the real bot: what acts on it
    restarts the container, which would cut off the jobs in flight and bring fal back no sooner.
    So it passes while fal is down (and /healthz, the readiness, says so), and fails once the
    process no longer answers."""
    port = free_port()
    await world.start_bot(HTTP_PORT=str(port), JOB_TIMEOUT="3")
    for op in ("submit", "status", "stream", "result"):
        world.fal.fail_next(op, status="ingress_503", times=10_000)
    await finished(await world.kontext(), timeout=20)
    assert (await get(port, "/healthz"))[0] == 503
    status, body = await get(port, "/livez")
    assert (status, json.loads(body)) == (200, {"status": "ok", "checks": {"running": True}})
    assert await run_check(port) == 0
    assert world.bot is not None
    os.kill(world.bot.pid, signal.SIGSTOP)  # a hung process: its event loop answers nothing
    try:
        assert await run_check(port) == 1
    finally:
        os.kill(world.bot.pid, signal.SIGCONT)
    assert await run_check(port) == 0


async def test_a_job_the_model_failed_leaves_fal_healthy_and_is_counted_as_such(world):
    """A 504 generation_timeout carries x-fal-request-id: fal's app answered, so fal is up (a quiet
    bot would otherwise be unhealthy for two minutes); the call is counted as fal_failed."""
    port = free_port()
    await world.start_bot(HTTP_PORT=str(port))
    was = samples((await get(port, "/metrics"))[1])
    world.fal.default = model_error("generation_timeout", "The generation took too long")
    assert text(await finished(await world.kontext())).startswith("❌")
    status, body = await get(port, "/healthz")
    assert status == 200, body
    now = samples((await get(port, "/metrics"))[1])

    def moved(kind: str) -> float:
        key = ("kontext_fal_errors_total", (("kind", kind),))
        return now[key] - was[key]

    assert (moved("fal_failed"), moved("transport"), moved("ingress")) == (1, 0, 0)


STORAGE_OPS = ("storage_token", "storage_initiate", "upload", "upload_put")


@pytest.mark.parametrize(("fault", "kind"), [("ingress_503", "ingress"), ("drop", "transport")])
async def test_healthz_and_metrics_report_fal_s_storage_down(world, fault, kind):
    """fal's storage (its REST host and CDN) failing while its queue works: every job with an
    input over the 64 KiB sent inline fails to upload it. /healthz says fal is down, naming its
    storage, every failed call is counted, and an upload that goes through ends it."""
    port = free_port()
    await world.start_bot(HTTP_PORT=str(port), JOB_TIMEOUT="5")
    was = samples((await get(port, "/metrics"))[1])
    for op in STORAGE_OPS:
        world.fal.fail_next(op, status=fault, times=10_000)
    reply = await finished(await world.kontext(image=world.input_image(size=200_000)), timeout=30)
    assert text(reply).startswith("❌") and world.fal.count("submit") == 0, text(reply)
    status, body = await get(port, "/healthz")
    report = json.loads(body)
    assert (status, report["checks"]["fal"]) == (503, False), body
    assert [p.split(" failed ")[0] for p in report["problems"]] == ["fal: the last call to its storage"], report
    now = samples((await get(port, "/metrics"))[1])
    moved = {
        dict(labels)["kind"]: now[name, labels] - was.get((name, labels), 0)
        for name, labels in now
        if name == "kontext_fal_errors_total"
    }
    calls = sum(world.fal.count(op) for op in STORAGE_OPS)
    assert moved == {**dict.fromkeys(moved, 0), kind: calls} and calls > 1, (moved, calls)
    world.fal.clear_faults(*STORAGE_OPS)
    assert text(await finished(await world.kontext(image=world.input_image(size=200_000)))).startswith("✅")
    assert (await get(port, "/healthz"))[0] == 200


@pytest.mark.parametrize("input_size", [4096, 200_000], ids=["at_the_queue", "at_the_storage"])
async def test_healthz_reports_a_refused_fal_key_until_fal_takes_it(world, input_size):
    """fal refusing FAL_KEY (revoked, or mistyped) makes every job fail, whichever of fal's
    services refused it first: /healthz names the setting until a call with the key succeeds."""
    port = free_port()
    await world.start_bot(HTTP_PORT=str(port), FAL_KEY="not-the-key")
    assert (await get(port, "/healthz"))[0] == 200  # nothing asked of fal yet
    reply = await finished(await world.kontext(image=world.input_image(size=input_size)))
    assert "fal.ai key was refused" in text(reply), text(reply)
    status, body = await get(port, "/healthz")
    report = json.loads(body)
    assert (status, report["checks"]["fal"]) == (503, False), body
    assert any(p.startswith("fal: ") and "refused FAL_KEY" in p for p in report["problems"]), report
    assert "not-the-key" not in body
    world.fal.key = "not-the-key"  # the key works again at fal
    assert text(await finished(await world.kontext(user="mod", image=world.input_image(size=input_size)))).startswith(
        "✅"
    )
    assert (await get(port, "/healthz"))[0] == 200


async def test_healthz_reports_a_locked_fal_account_in_fal_s_words(world):
    """fal locked the account (out of credit): the bot refuses new jobs for a while. /healthz says
    so with fal's reason, and is healthy again once the pause is over."""
    port = free_port()
    await world.start_bot(HTTP_PORT=str(port), FAL_LOCK_RETRY_SECONDS="1")
    world.fal.lock_account("Exhausted balance")
    reply = await finished(await world.kontext())
    assert "out of credit or locked" in text(reply), text(reply)
    status, body = await get(port, "/healthz")
    report = json.loads(body)
    assert (status, report["checks"]["fal"]) == (503, False), body
    assert report["problems"] == [
        "fal: the account is locked, so new jobs are refused for now: User is locked. Reason: Exhausted balance. "
        "Top up your balance at fal.ai/dashboard/billing."
    ]
    world.fal.unlock_account()
    await until_status(port, 200)
    assert text(await finished(await world.kontext(user="mod"))).startswith("✅")


async def test_healthz_follows_the_gateway(world):
    port = free_port()
    # After a failed resume discord.py reconnects to its built-in gateway address: point it here.
    await world.start_bot(HTTP_PORT=str(port), DISCORD_GATEWAY_URL=world.discord.gateway_url)
    assert (await get(port, "/healthz"))[0] == 200
    await world.discord.start_gateway_outage()
    status, body = await until_status(port, 503)
    assert "discord: not connected to the gateway" in json.loads(body)["problems"]
    # Still 503 while discord.py's attempts to come back are refused...
    await world.discord.wait_until(lambda: any(k == "gateway_refused" for _, k, _ in world.discord.events), timeout=30)
    assert (await get(port, "/healthz"))[0] == 503
    world.discord.end_gateway_outage()
    await until_status(port, 200, timeout=60)  # ...and 200 once it reconnected, with its own back-off
    assert text(await finished(await world.kontext())).startswith("✅")


async def test_healthz_reports_a_database_that_takes_no_writes(world):
    """A database that still answers reads but takes no writes (a full disk, a file system
    remounted read-only, another writer holding its lock) makes every job fail: /healthz says so,
    and is healthy again once writes go through."""
    port = free_port()
    await world.start_bot(HTTP_PORT=str(port))
    assert (await get(port, "/healthz"))[0] == 200
    other = sqlite3.connect(world.data_dir / "kontext.sqlite3", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another connection holds the write lock
        assert other.execute("SELECT count(*) FROM jobs").fetchone() == (0,)  # reads still answer
        _, body = await until_status(port, 503)
        report = json.loads(body)
        assert report["checks"]["database"] is False
        assert any(problem.startswith("database: ") for problem in report["problems"]), report
        other.execute("ROLLBACK")
    finally:
        other.close()
    await until_status(port, 200, timeout=15)
    assert text(await finished(await world.kontext())).startswith("✅")


async def until_status(port: int, status: int, timeout: float = 10) -> tuple[int, str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        answer = await get(port, "/healthz")
        if answer[0] == status or loop.time() > deadline:
            assert answer[0] == status, answer
            return answer
        await asyncio.sleep(0.1)


async def test_json_logs_parse_and_carry_the_ids(world):
    await world.start_bot(LOG_FORMAT="json", LOG_LEVEL="INFO")
    await finished(await world.kontext())
    await world.bot.stop()
    lines = [line for line in world.bot.log_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    # At INFO a job's milestones, each with the job's ids as fields.
    job_lines = [e for e in entries if e.get("job_id") == 1]
    assert [(e["message"].split(":")[0], e["state"]) for e in job_lines] == [
        ("job 1 accepted", "pending"),
        ("job 1 submitted", "queued"),
        ("job 1 delivered (succeeded)", "succeeded"),
    ]
    submitted = job_lines[1]
    assert submitted["guild_id"] == int(world.discord.guild_id)
    assert submitted["request_id"] == next(iter(world.fal.jobs)) and submitted["request_id"] in submitted["message"]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)


async def test_moderators_get_a_chart_of_the_last_30_days(world):
    await world.start_bot()
    await finished(await world.kontext(num_images=3))
    handle = await world.discord.invoke_slash("kontext-admin usage", user="mod")
    callback = await handle.wait_for_callback()
    assert callback["type"] == 4 and callback["data"]["flags"] & 64
    summary = callback["data"]["content"]
    assert "3 images in 30 days" in summary and "$0.24 of the $20.00 monthly budget" in summary
    (name, data) = next(iter(handle.callback_files.values()))
    assert name == "kontext-usage.png"
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.text["days"] == "30"  # type: ignore[attr-defined]
    (attachment,) = callback["data"]["attachments"]
    assert attachment["description"] == summary[:1024]


async def test_the_chart_shows_the_budget_that_stops_jobs_first(world):
    await world.start_bot()
    await admin(world, "limits", monthly_usd=50)  # the 250 images of a new server still apply: $20
    await finished(await world.kontext(num_images=3))
    handle = await world.discord.invoke_slash("kontext-admin usage", user="mod")
    await handle.wait_for_callback()
    assert "$0.24 of the $20.00 monthly budget" in handle.callback["data"]["content"]
    await admin(world, "limits", monthly_images=1000)  # $80: now the dollars stop jobs first
    handle = await world.discord.invoke_slash("kontext-admin usage", user="mod")
    await handle.wait_for_callback()
    assert "$0.24 of the $50.00 monthly budget" in handle.callback["data"]["content"]
