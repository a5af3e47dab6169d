"""Several processes on one PostgreSQL database (each a PostgresStore with its own pool, as a
process would have): claims never take a job twice, a stale owner's write is refused, jobs are
handed back and taken over, cancels and changed settings (policies, recipes, members' defaults) reach the other processes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest
import yarl

from services.job import JobState
from services.member_defaults import MemberDefaults
from services.policy import GuildPolicy
from services.postgres_store import PostgresStore
from services.store import CANCEL_TOO_LATE, MIGRATIONS, LeaseLost
from tests.test_store import request


@pytest.fixture
async def processes(database_url: str) -> AsyncIterator[Callable[..., Awaitable[PostgresStore]]]:
    """Opens stores on one database, as bot processes with these INSTANCE_IDs; all closed after."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(slot: str, lease_seconds: float = 60) -> PostgresStore:
            return await stack.enter_async_context(
                PostgresStore(database_url, instance_id=slot, lease_seconds=lease_seconds, connect_timeout=10)
            )

        yield start


async def row(database_url: str, job_id: int) -> asyncpg.Record:
    db = await asyncpg.connect(database_url)
    try:
        found = await db.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)
    finally:
        await db.close()
    assert found is not None
    return found


async def signalled(event: asyncio.Event) -> bool:
    async with asyncio.timeout(5):
        await event.wait()
    return True


async def test_processes_starting_together_migrate_once(database_url: str, processes):
    stores = await asyncio.gather(*(processes(f"bot-{n}") for n in range(4)))
    db = await asyncpg.connect(database_url)
    try:
        assert await db.fetch("SELECT version FROM schema_version") == [(len(MIGRATIONS),)]
    finally:
        await db.close()
    job = await stores[0].create_job(request())
    assert (await stores[3].get_job(job.id)) == job


async def test_two_processes_racing_claim_each_of_200_jobs_once(database_url: str, processes):
    origin = await processes("gone")
    created = [await origin.create_job(request(user_id=n)) for n in range(200)]
    await origin.release()  # all 200 unowned at once
    a, b = await processes("a"), await processes("b")
    rounds = await asyncio.gather(a.claim(), b.claim(), a.claim(), b.claim(), a.claim(), b.claim())
    claimed = [job.id for jobs in rounds for job in jobs]
    assert sorted(claimed) == sorted(job.id for job in created)  # every job, none twice
    by_a = {job.id for jobs in rounds[0::2] for job in jobs}
    db = await asyncpg.connect(database_url)
    try:
        rows = await db.fetch("SELECT id, owner, lease_epoch FROM jobs")
    finally:
        await db.close()
    assert {r["id"]: r["owner"] for r in rows} == {i: "a" if i in by_a else "b" for i in claimed}
    assert {r["lease_epoch"] for r in rows} == {2}  # created (1), then one claim each
    assert await a.claim() == [] and await b.claim() == []  # nothing is left to take


async def test_a_stale_owner_s_write_is_refused_and_it_learns_it_lost_the_job(database_url: str, processes):
    a, b = await processes("a"), await processes("b")
    job = await a.create_job(request())
    job.state = JobState.QUEUED
    await a.save(job)
    db = await asyncpg.connect(database_url)
    try:  # a pauses past its lease
        await db.execute("UPDATE jobs SET lease_until = 0 WHERE id = $1", job.id)
    finally:
        await db.close()
    (taken,) = await b.claim()
    assert taken.id == job.id and taken.state is JobState.QUEUED
    job.state, job.error_code = JobState.FAILED, "internal"
    with pytest.raises(LeaseLost):
        await a.save(job)
    stored = await row(database_url, job.id)
    assert (stored["state"], stored["error_code"], stored["owner"], stored["lease_epoch"]) == ("queued", None, "b", 2)
    assert not a.holds(job) and b.holds(taken)
    with pytest.raises(LeaseLost):  # nor a later write, though it changes nothing the row shows
        await a.save(job)
    taken.state = JobState.RUNNING
    await b.save(taken)


async def test_renewal_reports_jobs_taken_over_and_keeps_the_others(database_url: str, processes):
    a, b = await processes("a", lease_seconds=30), await processes("b")
    kept, lost = await a.create_job(request()), await a.create_job(request())
    db = await asyncpg.connect(database_url)
    try:
        await db.execute("UPDATE jobs SET lease_until = 0 WHERE id = $1", lost.id)
        assert [job.id for job in await b.claim()] == [lost.id]
        before = (await row(database_url, kept.id))["lease_until"]
        report = await a.renew()
        assert report.lost == (lost.id,) and report.cancel_requests == {}
        assert (await row(database_url, kept.id))["lease_until"] > before
    finally:
        await db.close()
    assert a.holds(kept) and not a.holds(lost)
    assert (await a.renew()).lost == ()


async def test_a_holder_stops_acting_once_half_its_lease_passed_unrenewed(processes):
    a = await processes("a", lease_seconds=1)
    job = await a.create_job(request())
    assert a.holds(job)
    await asyncio.sleep(0.6)
    assert not a.holds(job)  # the database still says a's, but a acts on it no more
    await a.renew()
    assert a.holds(job)


async def test_handed_back_jobs_are_taken_at_once_and_the_others_are_woken(processes):
    a, b = await processes("a"), await processes("b")
    released = asyncio.Event()
    b.on_signal("released", released.set)
    jobs = [await a.create_job(request()), await a.create_job(request())]
    assert await b.claim() == []  # a's leases are live
    await a.release()
    assert await signalled(released)
    assert [job.id for job in await b.claim()] == [job.id for job in jobs]
    assert not any(a.holds(job) for job in jobs)


async def test_a_restarted_process_takes_its_own_jobs_back_at_once(processes):
    first = await processes("a")
    job = await first.create_job(request())
    await first.close()  # crashed: no release, the lease runs on
    other = await processes("b")
    assert await other.claim() == []
    again = await processes("a")
    (resumed,) = await again.claim()
    assert resumed.id == job.id and again.holds(resumed)


async def test_a_cancel_asked_in_another_process_reaches_the_owner_and_its_answer_comes_back(
    database_url: str, processes
):
    owner, other = await processes("a"), await processes("b")
    woken = asyncio.Event()
    owner.on_signal("cancel", woken.set)
    job = await owner.create_job(request())
    waiting = asyncio.create_task(other.cancel_answer(job.id, wait=5))
    assert await other.request_cancel(job.id, by_user=9)
    assert await signalled(woken)
    assert (await owner.renew()).cancel_requests == {job.id: 9}
    started = time.monotonic()
    await owner.answer_cancel(job.id, 9, "cancelled")
    assert await waiting == "cancelled" and time.monotonic() - started < ANSWER_WAIT_BOUND
    assert (await owner.renew()).cancel_requests == {}  # answered
    job.state, job.delivered_at = JobState.CANCELLED, time.time()
    await owner.save(job)
    assert not await other.request_cancel(job.id, by_user=9)  # finished: nothing to ask
    assert await other.cancel_answer(job.id + 1, wait=0.1) is None


async def test_a_cancel_asked_as_the_job_is_delivered_elsewhere_is_answered_too_late_at_once(
    database_url: str, processes
):
    """The driving process delivered the job just after the request reached it, so it had no
    job left to cancel and no answer to give: the asking process must not wait out its five
    seconds and then say the edit will be stopped in a moment."""
    owner, other = await processes("a"), await processes("b")
    job = await owner.create_job(request())
    assert await other.request_cancel(job.id, by_user=9)
    waiting = asyncio.create_task(other.cancel_answer(job.id, wait=5))
    job.state, job.delivered_at = JobState.SUCCEEDED, time.time()
    await owner.save(job)
    started = time.monotonic()
    assert await waiting == CANCEL_TOO_LATE
    assert time.monotonic() - started < 1.0


# Woken by NOTIFY, a waiter answers well before its next poll of the row.
ANSWER_WAIT_BOUND = 0.4


async def test_settings_changed_in_one_process_are_seen_by_the_others(processes):
    a, b = await processes("a"), await processes("b")
    # Read (and cached) in process a...
    assert await a.policy(1) == GuildPolicy()
    assert await a.recipes(1) == []
    assert await a.member_defaults(5) == MemberDefaults()
    # ...changed in process b.
    await b.save_policy(1, GuildPolicy(safety_maximum=5), by_user=9, now=time.time())
    await b.add_recipe(1, "noir", "{prompt}, film noir", by_user=9, now=time.time())
    await b.save_member_defaults(5, MemberDefaults(num_images=2), now=time.time())

    async def seen_by_a() -> bool:
        return (
            (await a.policy(1)).safety_maximum == 5
            and [recipe.name for recipe in await a.recipes(1)] == ["noir"]
            and (await a.member_defaults(5)).num_images == 2
        )

    for _ in range(250):  # the NOTIFY takes a moment to arrive
        if await seen_by_a():
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("process a still shows the old settings")


class SilentDropPath:
    """The way to the database over TCP (as most deployments reach it), where a connection can be
    dropped silently: forwarded no more either way, with no FIN or RST, as a NAT table or a load
    balancer's idle timeout forgets it."""

    def __init__(self, database_url: str) -> None:
        url = yarl.URL(database_url)
        self._socket = f"{url.query['host']}/.s.PGSQL.5432"
        self._database = url.path
        self._silenced: set[int] = set()  # the client ports whose connection is dropped
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"postgresql://postgres@127.0.0.1:{port}{self._database}"

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()

    def drop(self, connection: asyncpg.Connection) -> None:
        transport = connection._transport  # type: ignore[attr-defined]  # asyncpg keeps its socket private
        self._silenced.add(transport.get_extra_info("sockname")[1])

    async def _forward(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        port = client_out.get_extra_info("peername")[1]
        server_in, server_out = await asyncio.open_unix_connection(self._socket)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                if port not in self._silenced:
                    sink.write(data)
            sink.close()

        with contextlib.suppress(OSError):
            await asyncio.gather(pump(client_in, server_out), pump(server_in, client_out))


async def test_settings_reach_a_process_whose_notification_connection_was_dropped_silently(database_url: str):
    path = SilentDropPath(database_url)
    async with (
        path as url,
        PostgresStore(url, instance_id="a", lease_seconds=60, connect_timeout=10, listener_check_seconds=0.2) as a,
        PostgresStore(database_url, instance_id="b", lease_seconds=60, connect_timeout=10) as b,
    ):
        assert await a.member_defaults(5) == MemberDefaults()
        assert a._listener is not None
        path.drop(a._listener)
        await b.save_member_defaults(5, MemberDefaults(num_images=2), now=time.time())
        for _ in range(250):
            if (await a.member_defaults(5)).num_images == 2:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("process a still shows the member's old defaults")


async def test_turns_are_taken_one_interval_apart_across_processes(processes):
    a, b = await processes("a"), await processes("b")
    assert await a.take_turn("identify:0", 0.5) == 0
    started = time.monotonic()
    waited = await b.take_turn("identify:0", 0.5)
    assert 0.3 < waited <= 0.5 and time.monotonic() - started >= waited
    assert await a.take_turn("identify:1", 0.5) == 0  # another bucket: its own turns


async def test_an_exclusive_section_is_held_by_one_process_at_a_time(processes):
    a, b = await processes("a"), await processes("b")
    inside: list[str] = []

    async def section(store: PostgresStore, name: str) -> None:
        async with store.exclusive("sync_commands"):
            inside.append(f"{name} in")
            await asyncio.sleep(0.1)
            inside.append(f"{name} out")

    await asyncio.gather(section(a, "a"), section(b, "b"))
    assert inside in (["a in", "a out", "b in", "b out"], ["b in", "b out", "a in", "a out"])
