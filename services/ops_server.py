"""The operators' HTTP endpoint: `/livez` and `/healthz` for Docker and orchestrators, `/metrics`
for Prometheus. It runs in the bot's own event loop, so the health checks see the bot as it is
(an event loop that hangs answers nothing) and the metrics' live gauges are read on the loop's
thread."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from aiohttp import web

from .fal_account import AccountGate
from .fal_queue import FalCalls
from .metrics import Metrics
from .redact import describe_error, one_line

log = logging.getLogger(__name__)

# A health check that has not answered by then counts as a failure: Docker's HEALTHCHECK gives
# up after its own timeout, and a hung check must read as unhealthy, not as no answer.
HEALTH_TIMEOUT = 3.0


@dataclass(frozen=True)
class HealthReport:
    """Each check by name (True: passing) and, for those failing, a line saying why."""

    checks: dict[str, bool]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems and all(self.checks.values())


def fal_health(
    services: Mapping[str, FalCalls],
    account: AccountGate,
    now: float,
    *,
    secrets: Iterable[str] = (),
    window: float = 120.0,
) -> list[str]:
    """What stands between fal and the bot's jobs, one line each (none: fal counts as up), from
    the calls to each of its `services` by name and the account's gate.

    A service is down only when a call to it went unanswered within the last `window` seconds
    and fal answered none since: an unanswered call followed by an answer (its own retry's, or
    any other call's) is over, an old one with no call since is no evidence about fal now, and
    a bot that asked fal nothing has nothing against it. A refused FAL_KEY counts until a call
    with the key succeeds, and a locked account while the gate refuses new jobs, in fal's words
    (with `secrets` masked)."""
    problems = []
    for name, calls in services.items():
        if calls.key_refused is not None:
            problems.append(
                f"fal: its {name} refused FAL_KEY ({calls.key_refused}) and no call with the key has succeeded since"
            )
        failed = calls.unanswered_at
        if failed is None or now - failed > window:
            continue
        if calls.answered_at is not None and calls.answered_at >= failed:
            continue
        problems.append(
            f"fal: the last call to its {name} failed {now - failed:.0f}s ago and fal has answered none since"
        )
    if account.refuses():
        reason = one_line(account.locked_reason or "", secrets)
        problems.append(f"fal: the account is locked, so new jobs are refused for now: {reason}")
    return problems


HealthCheck = Callable[[], Awaitable[HealthReport]]


class OpsServer:
    """`GET /livez` and `GET /healthz` (200 or 503, JSON) and `GET /metrics` on `host:port`; port
    0 binds a free port, then found in `.port`.

    Two checks, because they answer two questions: `liveness` whether this process works at all
    (restarting it is the cure when it does not), `health` whether it is ready to do jobs, the
    services it needs included (an outage at fal or Discord, which a restart does not cure)."""

    def __init__(self, host: str, port: int, metrics: Metrics, health: HealthCheck, liveness: HealthCheck) -> None:
        self._host = host
        self.port = port
        self._metrics = metrics
        self._health = health
        self._liveness = liveness
        app = web.Application()
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics_page)
        # No access log: a scrape every few seconds would drown the bot's own lines.
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> None:
        """Bind and serve; raises OSError when the address is taken."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self.port)
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        self.port = self._runner.addresses[0][1]
        log.info("ops endpoint on http://%s:%d (/livez, /healthz, /metrics)", self._host, self.port)

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _livez(self, request: web.Request) -> web.Response:
        return await self._answer(self._liveness)

    async def _healthz(self, request: web.Request) -> web.Response:
        return await self._answer(self._health)

    async def _answer(self, check: HealthCheck) -> web.Response:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                report = await check()
        except TimeoutError:
            report = HealthReport({}, [f"the health check did not answer within {HEALTH_TIMEOUT:.0f}s"])
        except Exception as exc:
            log.exception("health check failed")
            report = HealthReport({}, [f"the health check failed: {describe_error(exc)}"])
        if report.ok:
            return web.json_response({"status": "ok", "checks": report.checks})
        body = {"status": "unhealthy", "problems": report.problems, "checks": report.checks}
        return web.json_response(body, status=503)

    async def _metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.exposition(), headers={"Content-Type": self._metrics.content_type})
