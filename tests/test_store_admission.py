"""Requests racing for the last free place: `JobIntake.start` on real stores admits no more jobs
than the limits allow, whichever process or server each request reaches. A pause between
reading the usage and recording the job (a busy database) makes each race certain."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from cogs.errors import PolicyRefusal
from cogs.intake import JobIntake
from services.config import load_settings
from services.flux_kontext import KontextEdit, KontextOptions
from services.job import Job, JobRequest
from services.policy import GuildPolicy, RefusalReason
from services.postgres_store import POOL_SIZE, PostgresStore
from services.sqlite_store import SqliteStore
from services.store import Store

READ_PAUSE = 0.2


class Runner:
    """What the intake asks of the runner: the real store records the job; nothing runs."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.account = SimpleNamespace(refuses=lambda: False)
        self.started: list[Job] = []

    @contextlib.asynccontextmanager
    async def admission(self) -> AsyncIterator[None]:
        yield

    async def check_inputs_last(self, edit: KontextEdit) -> None:
        """Every edit here is a new request, its image just attached: nothing to refuse."""

    async def accept(self, request: JobRequest) -> Job:
        return await self._store.create_job(request)

    async def start(self, job: Job, *, message_id: int) -> None:
        self.started.append(job)


def slow_usage_reads(store: Store) -> None:
    """Each usage read returns only after READ_PAUSE, leaving every racer time to read it too."""
    for name in ("usage", "personal_usage"):
        read = getattr(store, name)

        async def slow(*args: Any, read: Callable[..., Any] = read, **kwargs: Any) -> Any:
            usage = await read(*args, **kwargs)
            await asyncio.sleep(READ_PAUSE)
            return usage

        setattr(store, name, slow)


def process(store: Store, **env: str) -> tuple[JobIntake, Runner]:
    """One bot process's intake on `store`, with these settings."""
    runner = Runner(store)
    settings = load_settings({"DISCORD_TOKEN": "x", "FAL_KEY": "y", **env})
    return JobIntake(cast(Any, SimpleNamespace(settings=settings, store=store, runner=runner))), runner


def interaction(user_id: int, guild_id: int | None) -> Any:
    """A command from a member: in a server that added the bot, or (no guild) in their DM with it."""

    async def defer(**_: Any) -> Any:
        return SimpleNamespace(message_id=1000 + user_id, is_ephemeral=lambda: False)

    return SimpleNamespace(
        guild_id=guild_id,
        is_guild_integration=lambda: guild_id is not None,
        context=SimpleNamespace(dm_channel=guild_id is None),
        user=SimpleNamespace(id=user_id, roles=()),
        channel=None,
        channel_id=5,
        application_id=4,
        token=f"token-{user_id}",
        created_at=datetime.now(UTC),
        filesize_limit=10 << 20,
        locale=SimpleNamespace(value="en-US"),
        guild_locale=SimpleNamespace(value="en-US") if guild_id is not None else None,
        response=SimpleNamespace(defer=defer),
    )


def edit() -> KontextEdit:
    return KontextEdit("p", ("https://cdn/u.png",), KontextOptions(num_images=1))


async def race(*starts: tuple[JobIntake, Any]) -> tuple[int, list[RefusalReason]]:
    """Start every request at once: how many were admitted, and why the others were refused."""
    results = await asyncio.gather(*(intake.start(where, edit()) for intake, where in starts), return_exceptions=True)
    refusals = [result for result in results if isinstance(result, BaseException)]
    assert all(isinstance(refusal, PolicyRefusal) for refusal in refusals), refusals
    return len(results) - len(refusals), [cast(PolicyRefusal, refusal).refused.reason for refusal in refusals]


@pytest.fixture
async def stores(database_url: str) -> AsyncIterator[Callable[[str], Any]]:
    """Opens PostgreSQL stores on one database, as bot processes with these INSTANCE_IDs."""
    async with contextlib.AsyncExitStack() as stack:

        async def open_store(slot: str) -> PostgresStore:
            return await stack.enter_async_context(
                PostgresStore(database_url, instance_id=slot, lease_seconds=60, connect_timeout=10)
            )

        yield open_store


PERSONAL = {"PERSONAL_USE": "1", "MONTHLY_BUDGET_USD": "100", "PERSONAL_CONCURRENT_JOBS": "1"}


async def test_a_members_personal_use_reached_through_two_processes_admits_one_job(stores):
    # Their DM with the bot on one shard, a server without the bot on the other.
    store_a, store_b = await stores("a"), await stores("b")
    for store in (store_a, store_b):
        slow_usage_reads(store)
    (a, runner_a), (b, runner_b) = process(store_a, **PERSONAL), process(store_b, **PERSONAL)
    admitted, refused = await race((a, interaction(7, None)), (b, interaction(7, None)))
    assert (admitted, refused) == (1, [RefusalReason.MEMBER_CONCURRENCY])
    assert len(runner_a.started) + len(runner_b.started) == 1


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        opened: Store = SqliteStore(tmp_path / "db.sqlite3")
    else:
        url = await request.getfixturevalue("postgres_server").new_database()
        opened = PostgresStore(url, instance_id="bot-0", lease_seconds=60, connect_timeout=10)
    async with opened:
        yield opened


async def test_the_operators_budget_shared_by_servers_admits_what_it_allows(store: Store):
    # Three images' worth at the default $0.08, asked for at once by members of four servers.
    intake, runner = process(store, MONTHLY_BUDGET_USD="0.24")
    slow_usage_reads(store)
    admitted, refused = await race(*((intake, interaction(user, guild_id=user)) for user in range(1, 5)))
    assert (admitted, refused) == (3, [RefusalReason.OPERATOR_BUDGET])
    assert len(runner.started) == 3


async def test_admissions_leave_no_lock_behind_for_the_servers_and_members_they_served(store: Store):
    """Each admission locks its server (or member) and the budget while it waits or runs; a bot
    in thousands of servers meets millions of them, so none is kept after."""
    intake, _ = process(store, MONTHLY_BUDGET_USD="100", PERSONAL_USE="1")
    slow_usage_reads(store)
    admitted, _ = await race(
        *((intake, interaction(user, guild_id=user % 3 or None)) for user in range(1, 7)),
    )
    assert admitted == 6 and store._local_locks == {}


async def test_a_burst_larger_than_the_pool_is_admitted_in_full(stores):
    # Every accept waits for the operator's budget: the waiters must not hold the connections
    # the accept under way needs.
    intake, runner = process(await stores("a"), MONTHLY_BUDGET_USD="100")
    requests = [(intake, interaction(user, guild_id=user % 3 + 1)) for user in range(1, 4 * POOL_SIZE)]
    async with asyncio.timeout(20):
        admitted, refused = await race(*requests)
    assert (admitted, refused) == (len(requests), [])
    assert len(runner.started) == len(requests)


async def test_a_heartbeat_during_an_admission_keeps_the_job_it_inserts(stores):
    """Until the admission commits, no other connection sees the new row: a heartbeat then must
    not report its lease lost (the job would be dropped as soon as it is accepted)."""
    store = await stores("a")
    intake, runner = process(store)
    renewals = []

    async def heartbeat_after_the_insert(request: JobRequest) -> Job:
        job = await store.create_job(request)
        # The heartbeat is another task, outside the admission's transaction.
        renewals.append(await asyncio.create_task(store.renew(), context=contextvars.Context()))
        return job

    runner.accept = heartbeat_after_the_insert  # type: ignore[method-assign]
    await intake.start(interaction(7, guild_id=1), edit())
    (job,) = runner.started
    assert renewals[0].lost == () and store.holds(job)


async def test_a_servers_daily_limit_raced_through_two_processes_admits_what_is_left(stores):
    """One member's burst in a server whose commands reach two processes (two shards): the day's
    last two places go to two of the requests, whichever process took them."""
    store_a, store_b = await stores("a"), await stores("b")
    await store_a.save_policy(
        1, GuildPolicy(daily_jobs_per_member=2, concurrent_jobs_per_member=None), by_user=9, now=0
    )
    for store in (store_a, store_b):
        slow_usage_reads(store)
    (a, runner_a), (b, runner_b) = process(store_a), process(store_b)
    admitted, refused = await race(*((intake, interaction(7, guild_id=1)) for intake in (a, b, a, b)))
    assert (admitted, refused) == (2, [RefusalReason.DAILY_LIMIT] * 2)
    assert len(runner_a.started) + len(runner_b.started) == 2
