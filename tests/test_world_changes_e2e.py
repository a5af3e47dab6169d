"""The Discord world changing under a job in flight: the place it was asked in deleted, archived
or refused to the bot, the bot's gateway session lost. Each job still ends (a result, or a clear
message where one can still be seen), frees its member's place, and is not retried for ever."""

from __future__ import annotations

import sqlite3

import pytest

from fakes.fal_fake import JobScript
from tests.e2e import fal_job, shows, text

WEBHOOK = r"/webhooks/\d+/[^/]+"


def db_rows(world) -> list[sqlite3.Row]:
    with sqlite3.connect(world.data_dir / "kontext.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM jobs ORDER BY id").fetchall()


def refused(world, code: int) -> list:
    return [r for r in world.discord.rejections if r[1] and r[1].get("code") == code]


@pytest.mark.parametrize("where", ["thread", "channel", "unseen"])
async def test_a_channel_deleted_while_its_job_waits_stops_the_job_and_frees_the_members_place(world, where):
    """A moderator deletes the thread (a forum post) or channel a job was asked in while it waits
    in fal's queue: the reply went with it, so nothing of the job can be shown any more. The job
    is taken out of fal's queue (nothing billed) and closed at once, so the member may start
    another, on THREAD_DELETE or CHANNEL_DELETE, or (the event missed while the gateway was down)
    at the first progress edit Discord refuses with 10003 Unknown Channel; the bot does not go
    on editing a reply that is gone."""
    world.fal.default = JobScript(queue_positions=tuple(range(30, -1, -1)), step=0.5, run_time=0.2)
    fake = world.discord
    if where == "channel":
        asked_in = fake.add_channel("requests")
    else:
        asked_in = fake.add_thread(fake.channel_id, "alice's post", owner="alice")
    await world.start_bot(EDIT_INTERVAL="0.2")
    handle = await world.kontext(channel_id=asked_in["id"])
    await handle.wait_until(lambda h: shows(h, "In queue"))
    if where == "unseen":
        await fake.start_gateway_outage()
    await fake.delete_channel(asked_in["id"])
    await fake.wait_until(lambda: db_rows(world)[0]["delivered_at"] is not None, timeout=8)
    assert fal_job(world).cancelled
    assert len(refused(world, 10003)) <= 2, refused(world, 10003)
    tried = len(fake.requests_to("PATCH", WEBHOOK)) + len(fake.requests_to("POST", WEBHOOK))
    fake.end_gateway_outage()
    await world.bot.stop()
    assert len(fake.requests_to("PATCH", WEBHOOK)) + len(fake.requests_to("POST", WEBHOOK)) == tried
    job_id = db_rows(world)[0]["id"]
    assert f"job {job_id}: its channel was deleted" in world.bot.log_text()


async def test_a_job_withdrawn_during_its_submit_is_taken_out_of_fals_line_once_fal_takes_the_cancel(world):
    """The channel is deleted while the job's submit is on its way (fal answers 429 a few times
    first), and fal's cancel endpoint then fails for a while: the job is in fal's line, so the
    cancel is asked again until fal takes it, and nothing runs unseen. The job was closed as
    failed (fal_unavailable) at the first failed cancel, and fal ran and billed it."""
    world.fal.default = JobScript(queue_positions=tuple(range(40, -1, -1)), step=0.5, run_time=0.2)
    fake = world.discord
    asked_in = fake.add_channel("requests")
    await world.start_bot()
    world.fal.fail_next("submit", 429, times=25)  # the submit is retried for a few seconds
    world.fal.fail_next("cancel", "ingress_503", times=1000)
    await world.kontext(channel_id=asked_in["id"])
    await world.fal.wait_for_requests("submit", 2, timeout=10)
    await fake.delete_channel(asked_in["id"])
    # The cancel's own retries (15 s) run out; before, the job was then closed as failed.
    await fake.wait_until(
        lambda: "did not take the cancel" in world.bot.log_text() or db_rows(world)[0]["delivered_at"] is not None,
        timeout=30,
    )
    assert db_rows(world)[0]["delivered_at"] is None, tuple(db_rows(world)[0])
    world.fal.clear_faults()  # fal's cancel endpoint is back
    await fake.wait_until(lambda: db_rows(world)[0]["delivered_at"] is not None, timeout=30)
    assert fal_job(world).cancelled
    assert db_rows(world)[0]["state"] == "cancelled"


async def test_a_job_in_a_private_thread_goes_with_the_channel_deleted_under_it(world):
    """A member's job in a private thread the bot was never added to (the bot's cache never had
    it), then a moderator deletes the thread's channel: Discord sends CHANNEL_DELETE for the
    channel alone, and the job is withdrawn then, not at its next progress edit (here half a
    minute away) with the member's place held meanwhile."""
    world.fal.default = JobScript(queue_positions=tuple(range(30, -1, -1)), step=0.5, run_time=0.2)
    fake = world.discord
    channel = fake.add_channel("requests")
    thread = fake.add_thread(channel["id"], "alice's corner", owner="alice", type=12)
    await world.start_bot(EDIT_INTERVAL="30")
    await world.kontext(channel_id=thread["id"])
    await world.fal.wait_for_submits(1)
    await fake.delete_channel(channel["id"])
    await fake.wait_until(lambda: db_rows(world)[0]["delivered_at"] is not None, timeout=8)
    assert fal_job(world).cancelled
    assert not [r for r in refused(world, 10003) if r[2].startswith("PATCH")]  # no progress edit found it


async def test_a_result_whose_thread_was_closed_meanwhile_is_posted_there_not_lost(world):
    """The member closes (archives) their forum post while the job waits at fal: Discord refuses
    every edit of a message in an archived thread (50083), so the reply cannot become the result.
    A new message reopens the thread, as Discord does for any message there: the result is posted
    as the bot's reply to the reply, mentioning the member, once."""
    world.fal.default = JobScript(queue_positions=(3, 2, 1, 0), step=0.5, run_time=0.2)
    fake = world.discord
    thread = fake.add_thread(fake.channel_id, "alice's post", owner="alice")
    await world.start_bot()
    handle = await world.kontext(channel_id=thread["id"])
    await handle.wait_until(lambda h: shows(h, "In queue"))
    await fake.archive_thread(thread["id"])
    await fake.wait_until(lambda: db_rows(world)[0]["delivered_at"] is not None, timeout=15)
    posts = [m for m in fake.channel_messages(thread["id"]) if m.interaction is None]
    assert len(posts) == 1, posts
    (post,) = posts
    assert text(post).startswith(f"<@{fake.alice['id']}>") and len(post.files) == 1, text(post)
    assert post.message_reference is not None and post.message_reference["message_id"] == handle.original.id
    assert not thread["thread_metadata"]["archived"]
    assert world.fal.count("submit") == 1
    # One progress edit refused, then the final one: the bot does not keep editing a closed thread.
    assert len(refused(world, 50083)) <= 2, refused(world, 50083)


async def test_a_token_discord_ended_early_is_not_tried_again_for_every_progress_step(world):
    """Discord ends the reply's token before the bot's clock says so (the host's clock runs
    late, or the interaction reached the bot late) while the job waits in a long line: the first
    progress edit refused with 401 50027 is the last (each 401 counts towards the invalid
    requests Discord bans an IP for), and the result still comes, as the bot's reply to the reply."""
    world.fal.default = JobScript(queue_positions=tuple(range(12, -1, -1)), step=0.3, run_time=0.2)
    fake = world.discord
    await world.start_bot(EDIT_INTERVAL="0.2")
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "In queue"))
    fake.expire_token(handle.token)
    await fake.wait_until(lambda: db_rows(world)[0]["delivered_at"] is not None, timeout=15)
    progress = [r for r in refused(world, 50027) if r[2].startswith("PATCH")]
    assert len(progress) <= 2, progress  # one progress edit, and the final edit that finds the token over
    (post,) = [m for m in fake.channel_messages() if m.interaction is None]
    assert text(post).startswith(f"<@{fake.alice['id']}> ✅") and len(post.files) == 1, text(post)
