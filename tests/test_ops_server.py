"""The ops endpoint over real HTTP on 127.0.0.1, and the rule for fal's health."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services import ops_server
from services.fal_account import AccountGate
from services.fal_queue import FalCalls
from services.metrics import Metrics
from services.ops_server import HealthReport, OpsServer, fal_health

HealthCheck = Callable[[], Awaitable[HealthReport]]


def answering(report: HealthReport) -> HealthCheck:
    async def health() -> HealthReport:
        return report

    return health


ALIVE = answering(HealthReport({"running": True}, []))


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    servers: list[OpsServer] = []

    async def start(health: HealthCheck, metrics: Metrics, liveness: HealthCheck = ALIVE) -> str:
        server = OpsServer("127.0.0.1", 0, metrics, health, liveness)
        await server.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        await server.stop()


async def get(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, response.headers["Content-Type"], await response.text()


async def get_json(url: str) -> tuple[int, object]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()


async def test_healthy_is_200_with_the_checks(serve):
    base = await serve(answering(HealthReport({"discord": True, "fal": True}, [])), Metrics())
    assert await get_json(f"{base}/healthz") == (200, {"status": "ok", "checks": {"discord": True, "fal": True}})


async def test_unhealthy_is_503_with_the_problems(serve):
    report = HealthReport({"discord": False, "fal": True}, ["discord: gateway disconnected for 95s"])
    base = await serve(answering(report), Metrics())
    status, body = await get_json(f"{base}/healthz")
    assert status == 503
    assert body == {
        "status": "unhealthy",
        "problems": ["discord: gateway disconnected for 95s"],
        "checks": {"discord": False, "fal": True},
    }


async def test_liveness_and_readiness_are_answered_each_by_its_own_check(serve):
    """/livez says whether the process works, /healthz whether it can do jobs: fal down fails
    only the second (a restart would not bring fal back), a stopping bot the first."""
    fal_down = HealthReport({"fal": False}, ["fal: the last call failed 3s ago and none succeeded since"])
    base = await serve(answering(fal_down), Metrics())
    assert (await get_json(f"{base}/healthz"))[0] == 503
    assert await get_json(f"{base}/livez") == (200, {"status": "ok", "checks": {"running": True}})
    stopping = HealthReport({"running": False}, ["the bot is stopping"])
    base = await serve(answering(HealthReport({"fal": True}, [])), Metrics(), answering(stopping))
    assert (await get_json(f"{base}/healthz"))[0] == 200
    assert await get_json(f"{base}/livez") == (
        503,
        {"status": "unhealthy", "problems": ["the bot is stopping"], "checks": {"running": False}},
    )


async def test_a_failing_check_alone_makes_it_unhealthy(serve):
    base = await serve(answering(HealthReport({"store": False}, [])), Metrics())
    status, _ = await get_json(f"{base}/healthz")
    assert status == 503


async def test_a_health_check_that_raises_or_hangs_is_a_503(serve, monkeypatch):
    async def broken() -> HealthReport:
        raise RuntimeError("store closed")

    async def hanging() -> HealthReport:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    monkeypatch.setattr(ops_server, "HEALTH_TIMEOUT", 0.05)
    status, body = await get_json(f"{await serve(broken, Metrics())}/healthz")
    assert status == 503
    assert body == {
        "status": "unhealthy",
        "problems": ["the health check failed: RuntimeError: store closed"],
        "checks": {},
    }
    status, body = await get_json(f"{await serve(hanging, Metrics())}/healthz")
    assert status == 503
    assert isinstance(body, dict) and "did not answer" in body["problems"][0]


async def test_metrics_are_served_as_prometheus_text(serve):
    metrics = Metrics()
    metrics.job_accepted()
    metrics.set_live_sources(lambda: {"running": 4}, lambda: 2)
    base = await serve(answering(HealthReport({}, [])), metrics)
    status, content_type, text = await get(f"{base}/metrics")
    assert status == 200
    assert content_type == metrics.content_type
    found = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert found[("kontext_jobs_accepted_total", ())] == 1
    assert found[("kontext_jobs_active", (("state", "running"),))] == 4
    assert found[("kontext_bot_queue_length", ())] == 2


async def test_other_paths_and_methods_are_refused(serve):
    base = await serve(answering(HealthReport({}, [])), Metrics())
    assert (await get(f"{base}/"))[0] == 404
    async with aiohttp.ClientSession() as session, session.post(f"{base}/healthz") as response:
        assert response.status == 405


async def test_a_fixed_port_is_bound_and_released_on_stop():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = OpsServer("127.0.0.1", port, Metrics(), answering(HealthReport({}, [])), ALIVE)
    await server.start()
    assert server.port == port
    assert (await get(f"http://127.0.0.1:{port}/healthz"))[0] == 200
    taken = OpsServer("127.0.0.1", port, Metrics(), answering(HealthReport({}, [])), ALIVE)
    with pytest.raises(OSError):
        await taken.start()
    await server.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(f"http://127.0.0.1:{port}/healthz")


def calls(answered_at: float | None = None, unanswered_at: float | None = None) -> FalCalls:
    record = FalCalls(None)
    record.answered_at, record.unanswered_at = answered_at, unanswered_at
    return record


@pytest.mark.parametrize(
    ("answered_at", "unanswered_at", "ok"),
    [
        (None, None, True),  # nothing asked of fal yet
        (990.0, None, True),
        (None, 950.0, False),  # unanswered within the window, never answered
        (900.0, 950.0, False),  # unanswered after the last answer
        (960.0, 950.0, True),  # answered since
        (950.0, 950.0, True),
        (None, 870.0, True),  # older than the window: no evidence about now
        (100.0, 880.0, False),  # exactly at the window's edge it still counts
    ],
)
def test_fal_health(answered_at, unanswered_at, ok):
    problems = fal_health({"queue": calls(answered_at, unanswered_at)}, AccountGate(30), now=1000.0)
    assert (problems == []) is ok


def test_fal_health_says_which_service_how_long_ago_and_respects_the_window():
    services = {"queue": calls(990.0), "storage": calls(None, 950.0)}
    assert fal_health(services, AccountGate(30), now=1000.0) == [
        "fal: the last call to its storage failed 50s ago and fal has answered none since"
    ]
    assert fal_health(services, AccountGate(30), now=1000.0, window=30.0) == []


def test_fal_health_reports_a_refused_key_until_a_call_with_it_succeeds():
    storage = FalCalls(None)
    storage.answer(401, {"detail": "Invalid authorization credentials"}, {"x-fal-request-id": "r1"})
    storage.answer(200, {}, {}, with_key=False)  # a CDN upload with its own token
    line = "fal: its storage refused FAL_KEY (401) and no call with the key has succeeded since"
    assert fal_health({"storage": storage}, AccountGate(30), now=time.monotonic()) == [line]
    storage.answer(200, {}, {})
    assert fal_health({"storage": storage}, AccountGate(30), now=time.monotonic()) == []


def test_a_refused_upload_token_is_no_refusal_of_the_key():
    storage = FalCalls(None)
    storage.answer(401, {"detail": "token expired"}, {"x-fal-request-id": "r1"}, with_key=False)
    assert storage.key_refused is None and storage.answered_at is not None


def test_fal_health_reports_the_account_s_lock_in_fal_s_words_with_secrets_masked():
    clock = [0.0]
    gate = AccountGate(30, clock=lambda: clock[0])
    gate.locked("User is locked.\nReason: TOP_UP. key-secret-123\x07 " + "x" * 400)
    (line,) = fal_health({}, gate, now=0.0, secrets=["key-secret-123"])
    assert line.startswith(
        "fal: the account is locked, so new jobs are refused for now: User is locked. Reason: TOP_UP. *** x"
    )
    assert line.isprintable() and len(line) < 400 and line.endswith("…")
    clock[0] = 30.0  # the pause is over: the next job finds out
    assert fal_health({}, gate, now=0.0) == []
