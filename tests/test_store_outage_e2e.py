"""The database failing under a job (one bot process on a real PostgreSQL server): a connection
dropped in the middle of a job's write (a failover, a restart of the server, an administrator's
pg_terminate_backend) is retried, and a write that keeps failing leaves the job to resume from its
row. Neither is a failure of the job: fal's job is not cancelled, the member is not told it failed.
"""

from __future__ import annotations

import asyncio

import asyncpg

from fakes.fal_fake import JobScript
from fakes.world import World
from tests.e2e import admin, fal_job, finished, has_button, text
from tests.test_cluster_e2e import LEASE_SECONDS, SLOW_QUEUE, newest_job

SHORT_LEASES = {"LEASE_SECONDS": str(LEASE_SECONDS), "HEARTBEAT_SECONDS": "0.5", "CLAIM_INTERVAL": "0.3"}


async def drop_connections_on(database_url: str, condition: str, *, times: int | None = 1) -> None:
    """Every UPDATE of a job row matching `condition` (on OLD and NEW) kills the connection
    writing it, the first `times` times (None: until `stop_dropping`), as a server going away does."""
    limit = "TRUE" if times is None else f"nextval('drops') <= {times}"
    db = await asyncpg.connect(database_url)
    try:
        await db.execute(f"""
            CREATE SEQUENCE drops;
            CREATE FUNCTION drop_connection() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF {limit} THEN
                    PERFORM pg_terminate_backend(pg_backend_pid());
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER drop_connection BEFORE UPDATE ON jobs FOR EACH ROW
                WHEN ({condition}) EXECUTE FUNCTION drop_connection();
        """)
    finally:
        await db.close()


async def stop_dropping(database_url: str) -> None:
    db = await asyncpg.connect(database_url)
    try:
        await db.execute("DROP TRIGGER drop_connection ON jobs")
    finally:
        await db.close()


async def test_a_connection_dropped_while_fal_s_answer_is_written_is_retried(world: World, database_url: str):
    world.fal.default = SLOW_QUEUE
    bot = await world.start_bot(DATABASE_URL=database_url, **SHORT_LEASES)
    await drop_connections_on(database_url, "OLD.state = 'submitting' AND NEW.state = 'queued'")
    message = await finished(await world.kontext(), timeout=20)
    assert text(message).startswith("✅"), text(message)
    assert len(world.fal.submits) == 1 and not fal_job(world).cancelled
    assert "failed on the bot's side" not in bot.log_text()
    assert "write failed" in bot.log_text()  # the retry, with the job's id


async def test_a_job_whose_last_write_keeps_failing_is_let_go_and_finished_again(world: World, database_url: str):
    world.fal.default = SLOW_QUEUE
    bot = await world.start_bot(DATABASE_URL=database_url, **SHORT_LEASES)
    await drop_connections_on(database_url, "OLD.delivered_at IS NULL AND NEW.delivered_at IS NOT NULL", times=None)
    await admin(world, "limits", member_concurrent=1)
    handle = await world.kontext()
    message = await finished(handle, timeout=20)
    assert text(message).startswith("✅"), text(message)
    # Its write of "delivered" fails for as long as its lease lasts: the process lets it go
    # (it used to keep renewing the lease of a job it no longer drove, for good).
    await world.discord.wait_until(lambda: "stopped unfinished" in bot.log_text(), timeout=3 * LEASE_SECONDS)
    await stop_dropping(database_url)
    # Claimed again once its lease ran out, it is shown again (the same reply) and recorded.
    for _ in range(200):
        row = await newest_job(database_url)
        if row["delivered_at"] is not None:
            break
        await asyncio.sleep(0.05)
    assert row["delivered_at"] is not None and row["state"] == "succeeded", dict(row)
    assert text(handle.original).startswith("✅") and handle.followups == []
    assert len(world.fal.submits) == 1
    # The member's one job at a time is free again.
    second = await finished(await world.kontext(prompt="and now at night"), timeout=20)
    assert text(second).startswith("✅"), text(second)


async def test_a_submit_whose_answer_cannot_be_recorded_is_taken_back_from_fal(world: World, database_url: str):
    """fal has the job, the database never learns its id: resumed, the job could only say it lost
    track of it. Taken back from fal's queue (still there once the write gave up), it costs nothing."""
    world.fal.default = JobScript(queue_positions=(4, 3, 2, 1, 0), step=2.0, run_time=0.1)
    bot = await world.start_bot(DATABASE_URL=database_url, **SHORT_LEASES)
    await drop_connections_on(database_url, "OLD.state = 'submitting' AND NEW.state = 'queued'", times=None)
    handle = await world.kontext()
    await world.discord.wait_until(lambda: "stopped unfinished" in bot.log_text(), timeout=3 * LEASE_SECONDS)
    await stop_dropping(database_url)
    message = await finished(handle, timeout=20)
    assert "Try again" in text(message) or has_button(message, "retry"), text(message)
    assert len(world.fal.submits) == 1 and fal_job(world).cancelled
