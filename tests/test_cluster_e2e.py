"""Two real `bot.py` processes on two shards, one PostgreSQL database and the fakes: each serves
the server on its shard; a job whose process dies (kill -9, SIGTERM, in the middle of its fal
submit or of its input's upload) is finished by the other, once, with one fal submit; a Cancel
pressed in a server the other process serves reaches the job through the database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from fakes.bot_process import BotProcess
from fakes.discord_fake import FakeGuild, shard_of
from fakes.fal_fake import JobScript
from fakes.world import World
from tests.e2e import admin, button, fal_job, finished, has_button, shows
from tests.test_resilience_e2e import assert_delivered_once

# Short leases, so a takeover after a crash takes seconds (each is an ordinary setting); long
# enough that a busy machine's slow heartbeat never costs a process its job (it stops acting on
# a job after half a lease without a renewal).
LEASE_SECONDS = 4
FAST_LEASES = {"LEASE_SECONDS": str(LEASE_SECONDS), "HEARTBEAT_SECONDS": "0.5", "CLAIM_INTERVAL": "0.3"}
SLOW_QUEUE = JobScript(queue_positions=(3, 2, 1, 0), step=0.5, run_time=0.1)


async def newest_job(database_url: str) -> asyncpg.Record:
    """The newest job's row."""
    db = await asyncpg.connect(database_url)
    try:
        row = await db.fetchrow("SELECT * FROM jobs ORDER BY id DESC LIMIT 1")
    finally:
        await db.close()
    assert row is not None
    return row


@dataclass
class Cluster:
    world: World
    database_url: str
    # The default guild's shard and the other guild's; `a` runs the first, `b` the second.
    shard_a: int
    shard_b: int
    guild_b: FakeGuild
    a: BotProcess
    b: BotProcess

    def new_process(self, name: str, **settings: str) -> BotProcess:
        shard = self.shard_a if name == "a" else self.shard_b
        data_dir = self.world.data_dir if name == "a" else self.world.data_dir.with_name("data-b")
        return self.world.new_bot(
            data_dir,
            DATABASE_URL=self.database_url,
            SHARD_COUNT="2",
            SHARD_IDS=str(shard),
            DISCORD_GATEWAY_URL=self.world.discord.gateway_url,
            INSTANCE_ID=name,
            **{**FAST_LEASES, **settings},
        )

    async def identified(self, shard: int, times: int = 1) -> None:
        """Until the fake Discord accepted `times` IDENTIFYs for this shard (processes take turns,
        one per 5 seconds, as Discord allows)."""
        discord = self.world.discord
        await discord.wait_until(lambda: len(discord.identifies_by_shard.get(shard, [])) >= times, timeout=20)

    async def job_row(self) -> asyncpg.Record:
        return await newest_job(self.database_url)

    async def settled_row(self, column: str = "delivered_at") -> asyncpg.Record:
        """The newest job's row once `column` is written (a reply shows the result a moment
        before the process records it as delivered)."""
        for _ in range(100):
            row = await self.job_row()
            if row[column] is not None:
                return row
            await asyncio.sleep(0.05)
        raise AssertionError(f"the job's {column} was never written: {dict(row)}")


@pytest.fixture
async def cluster(world: World, database_url: str, request) -> AsyncIterator[Cluster]:
    """Processes a and b started, a connected (b's IDENTIFY waits its turn, 5 s later)."""
    discord = world.discord
    discord.shard_count = 2
    shard_a = shard_of(discord.guild_id, 2)
    shard_b = 1 - shard_a
    guild_b = discord.add_guild("Other server", shard=(shard_b, 2))
    discord.add_member(discord.alice, guild=guild_b)
    settings = getattr(request, "param", {})
    c = Cluster(world, database_url, shard_a, shard_b, guild_b, None, None)  # type: ignore[arg-type]
    c.a, c.b = c.new_process("a", **settings), c.new_process("b", **settings)
    world.bot = c.a
    await c.a.start()
    await c.identified(shard_a)
    await c.b.start()
    yield c


def accepted_shards(world: World) -> list[int]:
    return sorted(record["shard"][0] for record in world.discord.identifies if record["accepted"])


async def test_a_killed_process_s_job_is_delivered_once_by_the_other(cluster: Cluster):
    world = cluster.world
    world.fal.default = SLOW_QUEUE
    handle = await world.kontext()  # in the server on a's shard
    await handle.wait_until(lambda h: shows(h, "In queue"))
    await cluster.a.kill()
    killed_at = time.monotonic()
    await finished(handle, timeout=20)
    assert time.monotonic() - killed_at < LEASE_SECONDS + 5  # the lease, a claim and the rest of the job
    assert_delivered_once(world, handle)
    assert world.fal.count("submit") == 1
    row = await cluster.settled_row()
    assert (row["state"], row["owner"], row["lease_epoch"]) == ("succeeded", "b", 2)
    assert row["interaction_token"] == ""
    # b never had a connection for a's shard: it delivered through the interaction's webhook.
    assert accepted_shards(world).count(cluster.shard_a) == 1
    # Both processes started with the same commands: one synced them, the other saw it done.
    assert len(world.discord.requests_to("PUT", r"/applications/\d+/commands$")) == 1


async def stopped_and_finished_by_b(cluster: Cluster, handle):
    """a stops (SIGTERM) and b finishes the job, once, long before its lease; its settled row."""
    stopped_at = time.monotonic()
    assert await cluster.a.stop() == 0
    await finished(handle, timeout=15)
    assert time.monotonic() - stopped_at < 10
    assert_delivered_once(cluster.world, handle)
    assert cluster.world.fal.count("submit") == 1
    return await cluster.settled_row()


@pytest.mark.parametrize("cluster", [{"LEASE_SECONDS": "30"}], indirect=True)
async def test_a_stopped_process_hands_its_job_over_at_once(cluster: Cluster):
    """SIGTERM: a hands its jobs back as it stops, so b takes over long before the 30 s lease."""
    world = cluster.world
    world.fal.default = SLOW_QUEUE
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "In queue"))
    row = await stopped_and_finished_by_b(cluster, handle)
    assert (row["state"], row["owner"], row["lease_epoch"]) == ("succeeded", "b", 2)
    assert "are handed to the other processes" in cluster.a.log_text()


@pytest.mark.parametrize("cluster", [{"FAL_READ_TIMEOUT": "10"}], indirect=True)
async def test_a_process_killed_during_its_submit_is_not_submitted_again_by_the_other(cluster: Cluster):
    world = cluster.world
    world.fal.fail_next("submit", status="hang")
    handle = await world.kontext()
    await world.discord.wait_until(lambda: world.fal.count("submit") == 1)
    await cluster.a.kill()
    assert (await cluster.job_row())["state"] == "submitting"
    message = await finished(handle, timeout=20)
    assert message.content.startswith("❌") and "cannot tell whether fal received it" in message.content
    assert has_button(message, "retry")
    assert world.fal.count("submit") == 1
    row = await cluster.settled_row()
    assert (row["error_code"], row["owner"], row["lease_epoch"]) == ("submit_uncertain", "b", 2)


async def job_in_b_s_server_driven_by_a(cluster: Cluster):
    """A job in b's server, taken over by a when b stopped; b back and serving its server again
    (its buttons arrive at b), without taking back what a holds. Returns the job's reply."""
    world = cluster.world
    await cluster.identified(cluster.shard_b)
    world.fal.default = JobScript(queue_positions=tuple(range(15, -1, -1)), step=1.0, run_time=0.1)
    handle = await world.kontext(channel_id=cluster.guild_b.channel_id)
    await handle.wait_until(lambda h: shows(h, "In queue"))
    assert await cluster.b.stop() == 0
    await world.discord.wait_until(lambda: cluster.a.log_text().count("resumed in state queued") == 1, timeout=10)
    cluster.b = cluster.new_process("b")
    await cluster.b.start()
    await cluster.identified(cluster.shard_b, times=2)
    assert (await cluster.job_row())["owner"] == "a"
    return handle


async def assert_cancelled_once(cluster: Cluster, handle, press, owner: str) -> None:
    world = cluster.world
    await press.wait_for_callback()
    message = await finished(handle, timeout=15)
    assert message.content.startswith("🚫"), message.content
    assert fal_job(world).cancelled and world.fal.count("submit") == 1
    assert press.callback is not None and press.callback["type"] == 6  # deferred update
    await cluster.settled_row()
    row = await cluster.settled_row("cancel_answer")
    assert (row["state"], row["owner"], row["cancel_answer"]) == ("cancelled", owner, "cancelled")
    assert row["cancelled_by"] == int(world.discord.alice["id"])


async def test_cancel_pressed_in_a_server_another_process_serves_reaches_the_job(cluster: Cluster):
    """b asks a through the database; a cancels at fal and shows it; b's answer to the press
    says nothing more, as when the press reaches the driving process itself."""
    handle = await job_in_b_s_server_driven_by_a(cluster)
    press = await cluster.world.discord.click_button(handle.original.id, button(handle.original, "cancel"))
    await assert_cancelled_once(cluster, handle, press, owner="a")
    assert press.followups == []
    answered = "cancel asked in another process: cancelled"
    await cluster.world.discord.wait_until(lambda: answered in cluster.a.log_text(), timeout=5)


# A lease well within the 5 s a press waits for its answer.
@pytest.mark.parametrize("cluster", [{"LEASE_SECONDS": "2.5", "HEARTBEAT_SECONDS": "0.4"}], indirect=True)
async def test_a_cancel_whose_process_died_is_carried_out_by_the_one_taking_the_job_over(cluster: Cluster):
    """The request waits in the row: b, taking the job over from the killed a, finds it and
    cancels (within the wait of the press, so the member is told as usual)."""
    handle = await job_in_b_s_server_driven_by_a(cluster)
    await cluster.a.kill()
    press = await cluster.world.discord.click_button(handle.original.id, button(handle.original, "cancel"))
    await assert_cancelled_once(cluster, handle, press, owner="b")
    assert press.followups == []
    answered = "cancel asked in another process: cancelled"
    await cluster.world.discord.wait_until(lambda: answered in cluster.b.log_text(), timeout=5)


@pytest.mark.parametrize("end", ["kill", "stop"])
async def test_a_job_whose_process_ends_while_its_input_uploads_is_finished_by_the_other(cluster: Cluster, end: str):
    """The reply exists (the member sees it) but its id was not stored yet while the input image
    went to fal's storage: the other process still finishes the job in that reply, once."""
    world = cluster.world
    world.fal.fail_next("upload", status="hang")
    handle = await world.kontext(image=world.input_image(size=200_000))  # too big to send inline
    await world.discord.wait_until(lambda: world.fal.count("upload") == 1)
    assert await getattr(cluster.a, end)() in (0, -9)
    await finished(handle, timeout=20)
    assert_delivered_once(world, handle)
    assert world.fal.count("submit") == 1
    row = await cluster.settled_row()
    assert (row["state"], row["owner"]) == ("succeeded", "b")


@pytest.mark.parametrize("cluster", [{"LEASE_SECONDS": "30"}], indirect=True)
async def test_a_job_admitted_as_its_process_stops_is_finished_by_the_other_at_once(cluster: Cluster):
    """SIGTERM while Discord takes its time over a new job's acknowledgement: a lets the
    admission finish, stores the job's reply and hands the job over with the others, so b
    finishes it in that reply long before the 30 s lease (it closed it as abandoned, the reply
    left thinking)."""
    world = cluster.world
    world.discord.fail_next("POST", r"/interactions/\d+/[^/]+/callback$", status="slow", delay=1.0)
    handle = await world.kontext()
    await world.discord.wait_until(lambda: "accepted" in cluster.a.log_text())
    row = await stopped_and_finished_by_b(cluster, handle)
    assert (row["state"], row["owner"]) == ("succeeded", "b")


async def test_a_stopping_process_waits_for_a_slow_post_only_while_the_job_s_lease_lasts(cluster: Cluster):
    """A stop lets a post under way finish (Discord may have it whole), but not past the job's
    lease: the other process may take the job over then, and an upload still going is better
    cut off than finished twice."""
    world = cluster.world
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.3, run_time=0.2)
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "In queue"))
    world.discord.expire_token(handle.token)  # the result is then the bot's own post
    posts = r"^/channels/\d+/messages$"
    world.discord.fail_next("POST", posts, status="slow", delay=3 * LEASE_SECONDS)
    await world.discord.wait_until(lambda: bool(world.discord.requests_to("POST", posts)), timeout=15)
    started = time.monotonic()
    assert await cluster.a.stop(timeout=3 * LEASE_SECONDS) == 0
    assert time.monotonic() - started < LEASE_SECONDS + 2


async def test_a_job_taken_over_is_logged_in_its_servers_language(cluster: Cluster):
    """b does not have a's server in its cache (another shard's): the moderators' log line it
    writes for the job it took over is still in the server's language, as a's would have been."""
    world = cluster.world
    fake = world.discord
    await fake.set_preferred_locale(fake.default_guild, "fr")
    channel = fake.add_channel("journal-kontext")
    await fake.dispatch("CHANNEL_CREATE", channel)
    await admin(world, "log-channel", channel=channel["id"])
    world.fal.default = SLOW_QUEUE
    handle = await world.kontext(prompt="un chat bleu")
    await handle.wait_until(lambda h: shows(h, "In queue"))
    await cluster.a.kill()
    await finished(handle, timeout=20)
    await fake.wait_until(lambda: len(fake.channel_messages(channel["id"])) == 2, timeout=10)
    job_line = fake.channel_messages(channel["id"])[-1].content
    assert (await cluster.settled_row())["owner"] == "b"
    assert job_line.startswith(f"✅ Tâche n° 1 de <@{fake.alice['id']}> dans <#"), job_line
