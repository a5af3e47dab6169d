"""No job lost: restarts (kill -9 and SIGTERM), fal faults and Discord faults, end to end.

Each test drives the real bot process through the fakes and ends the same way: the member sees
the result exactly once or a clear message, fal ran each job once, and the bot keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time

import pytest

from fakes.discord_fake import ATTACH_FILES, EPHEMERAL, READ_MESSAGE_HISTORY, SEND_MESSAGES
from fakes.fal_fake import JobScript, model_error
from services.fal_queue import RESULT_ATTEMPTS
from tests.e2e import admin, button, contents, fal_job, finished, has_button, outliving_its_reply, shows, text

WEBHOOK_MESSAGE = r"/webhooks/\d+/[^/]+/messages/"


# -- helpers ---------------------------------------------------------------------------------


def file_uploads(world, handle) -> list:
    """Every accepted write that put files on the member's reply (interaction edits)."""
    return [
        r
        for r in world.discord.requests_to("PATCH", WEBHOOK_MESSAGE)
        if r.files and r.status == 200 and handle.token in r.path
    ]


def assert_delivered_once(world, handle) -> None:
    message = handle.original
    assert text(message).startswith("✅"), text(message)
    assert len(message.files) == 1, message.files
    assert len(file_uploads(world, handle)) == 1, [r.path for r in file_uploads(world, handle)]
    assert handle.followups == []
    # Nothing but the interaction replies was posted in the channel (no duplicate delivery).
    others = [m for m in world.discord.channel_messages() if m.interaction is None]
    assert others == [], others


def members(world, count: int) -> list[str]:
    """Distinct members (servers cap concurrent jobs per member)."""
    names = [f"member{n}" for n in range(count)]
    for name in names:
        world.discord.add_member(name=name)
    return names


async def still_serving(world) -> None:
    """The bot answers a new /kontext end to end after whatever happened before."""
    before = len(world.fal.jobs)
    world.fal.script_next(JobScript())  # a quick job, whatever the test scripted before
    handle = await world.kontext(prompt="and one more")
    message = await finished(handle)
    assert text(message).startswith("✅"), text(message)
    assert len(world.fal.jobs) == before + 1


async def restart(world, *, kill: bool = True, **settings: str) -> None:
    assert world.bot is not None
    if kill:
        await world.bot.kill()
    else:
        started = time.monotonic()
        assert await world.bot.stop() == 0
        assert time.monotonic() - started < 5
    await world.start_bot(**settings)


def db_rows(world) -> list[sqlite3.Row]:
    with sqlite3.connect(world.data_dir / "kontext.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM jobs ORDER BY id").fetchall()


# -- 1. kill -9 at every stage of a job ---------------------------------------------------------


@pytest.mark.parametrize(
    "script,stage",
    [
        (JobScript(queue_positions=(3, 2, 1, 0), step=0.4, run_time=0.1), "In queue"),
        (JobScript(queue_positions=(0,), step=0.05, run_time=1.0), "Generating"),
    ],
    ids=["queued", "running"],
)
async def test_kill_at_fal_resumes_the_same_request_and_delivers_once(world, script, stage):
    world.fal.default = script
    await world.start_bot()
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, stage))
    await restart(world)
    await finished(handle)
    assert_delivered_once(world, handle)
    assert world.fal.count("submit") == 1
    await still_serving(world)


async def test_kill_before_the_reply_exists_closes_the_job_without_sending_it(world):
    """Accepted (its row written), then killed while Discord holds the acknowledgement: the
    restarted bot has no reply to show the job in, so it closes it, and sends nothing to fal."""
    await world.start_bot()
    world.discord.fail_next("POST", r"/interactions/\d+/[^/]+/callback$", status="hang")
    await world.kontext()
    await world.discord.wait_until(lambda: "accepted" in world.bot.log_text())
    await restart(world)
    await world.discord.wait_until(lambda: "abandoned before it started" in world.bot.log_text())
    with sqlite3.connect(world.data_dir / "kontext.sqlite3") as db:
        assert db.execute("SELECT state, error_code FROM jobs").fetchall() == [("failed", "abandoned")]
    assert world.fal.count("submit") == 0
    await still_serving(world)


async def test_kill_while_discord_takes_the_acknowledgement_says_so_on_the_reply(world):
    """Killed while Discord was taking the acknowledgement, which it then carried out: the
    member's reply says "thinking…". The restarted bot closes the job unsent, as above, and the
    reply says the edit did not start and can be sent again (with Try again), instead of
    thinking until Discord gives up on it."""
    fake = world.discord
    await world.start_bot()
    fake.fail_next("POST", r"/interactions/\d+/[^/]+/callback$", status="slow", delay=1.0)
    handle = await world.kontext()
    await fake.wait_until(lambda: "accepted" in world.bot.log_text())
    await restart(world)
    await world.discord.wait_until(lambda: "abandoned before it started" in world.bot.log_text())
    message = await finished(handle)
    assert text(message).startswith("❌") and "send" in text(message).lower(), text(message)
    assert has_button(message, "retry"), message.components
    assert world.fal.count("submit") == 0
    again = await fake.click_button(message.id, button(message, "retry"), user="alice")
    assert text(await finished(again)).startswith("✅"), again.callbacks
    assert world.fal.count("submit") == 1
    await still_serving(world)


async def test_kill_while_discord_takes_the_acknowledgement_on_postgresql_try_again_works(world, database_url):
    """As above, with the jobs in PostgreSQL, where a process writes only the jobs it holds: the
    reply's id is recorded with the closed job all the same, so its Try again sends the edit."""
    fake = world.discord
    shared = {"DATABASE_URL": database_url, "INSTANCE_ID": "a"}
    await world.start_bot(**shared)
    fake.fail_next("POST", r"/interactions/\d+/[^/]+/callback$", status="slow", delay=1.0)
    handle = await world.kontext()
    await fake.wait_until(lambda: "accepted" in world.bot.log_text())
    await restart(world, **shared)
    await fake.wait_until(lambda: "abandoned before it started" in world.bot.log_text())
    message = await finished(handle)
    assert has_button(message, "retry"), message.components
    again = await fake.click_button(message.id, button(message, "retry"), user="alice")
    assert text(await finished(again)).startswith("✅"), again.callbacks
    assert world.fal.count("submit") == 1
    await still_serving(world)


async def test_an_acknowledgement_whose_connection_drops_closes_the_job_at_once(world):
    """The connection carrying the acknowledgement dropped (no HTTP answer at all, which
    discord.py raises as aiohttp's error, not as an HTTPException): the job is closed as
    abandoned there and then. It stayed under way until the next restart, each one a place of
    the member's concurrent jobs: two such and the member was refused for jobs running."""
    fake = world.discord
    await world.start_bot()
    for attempt in (1, 2):
        fake.fail_next("POST", r"/interactions/\d+/[^/]+/callback$", status="hang")
        handle = await world.kontext()
        await fake.wait_until(lambda: fake.hanging == 1)
        fake.release_hangs()
        await fake.wait_until(lambda n=attempt: world.bot.log_text().count("abandoned before it started") == n)
        # The member is told something went wrong (the dropped acknowledgement never reached
        # Discord); awaited, so the next attempt's fault is not taken by this answer.
        callback = await handle.wait_for_callback()
        assert callback["type"] == 4 and callback["data"]["flags"] & 64, callback
    assert [(row["state"], row["error_code"]) for row in db_rows(world)] == [("failed", "abandoned")] * 2
    await still_serving(world)


async def test_a_sigterm_while_discord_takes_the_acknowledgement_resumes_the_job(world):
    """Accepted, and stopped while Discord takes its time over the acknowledgement that creates
    the reply: the stop lets that admission finish and keeps its reply, so the restarted bot
    delivers the job there. It closed it as abandoned, the reply left thinking for good (and, in
    a process sharing the database, counting toward the member's jobs until its lease ran out)."""
    fake = world.discord
    await world.start_bot()
    fake.fail_next("POST", r"/interactions/\d+/[^/]+/callback$", status="slow", delay=1.0)
    handle = await world.kontext()
    await fake.wait_until(lambda: "accepted" in world.bot.log_text())
    await restart(world, kill=False)
    await finished(handle)
    assert_delivered_once(world, handle)
    assert world.fal.count("submit") == 1
    await still_serving(world)


@pytest.mark.parametrize("kill", [True, False], ids=["kill", "sigterm"])
async def test_a_stop_while_the_input_goes_to_fal_s_storage_resumes_the_job(world, kill):
    """Stopped while the member's photo is on its way to fal's storage (before anything was
    submitted): its reply exists, so after the restart the input is staged again and the
    result delivered once, not the job closed with the reply left thinking for good."""
    await world.start_bot()
    world.fal.fail_next("storage_token", status="hang")
    handle = await world.kontext(image=world.input_image(size=200_000))
    await world.discord.wait_until(lambda: world.fal.count("storage_token") == 1)
    await restart(world, kill=kill)
    await finished(handle)
    assert_delivered_once(world, handle)
    assert world.fal.count("submit") == 1
    await still_serving(world)


async def test_a_job_running_when_the_bot_restarts_past_its_timeout_is_delivered(world):
    """JOB_TIMEOUT bounds the wait for fal to start a job. Resumed past it, a job fal started
    (when, the bot did not store) is given its first status to say so, then followed."""
    world.fal.default = JobScript(queue_positions=(1, 0), step=1.2, run_time=2.5)
    await world.start_bot(JOB_TIMEOUT="3")
    sent = time.monotonic()
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "Generating"))
    await asyncio.sleep(max(0.0, 3.2 - (time.monotonic() - sent)))
    await restart(world, JOB_TIMEOUT="3")
    assert text(await finished(handle, timeout=20)).startswith("✅")
    assert world.fal.count("submit") == 1 and world.fal.count("cancel") == 0


async def test_kill_while_downloading_the_result(world):
    """Completed at fal, the result file download in flight: fetched again after the restart."""
    await world.start_bot()
    world.fal.fail_next("file", status="hang")
    handle = await world.kontext()
    await world.discord.wait_until(lambda: world.fal.count("file") >= 1)
    await restart(world)
    await finished(handle)
    assert_delivered_once(world, handle)
    assert world.fal.count("submit") == 1 and world.fal.count("file") == 2
    await still_serving(world)


def result_files(world) -> list:
    results = world.data_dir / "results"
    return sorted(results.iterdir()) if results.exists() else []


async def kill_while_posting(world, *, refuse_first_post: bool = False, **settings: str):
    """Start a job and kill the bot while Discord holds its final edit (the upload), after
    refusing a first attempt if asked."""
    world.fal.default = JobScript(queue_positions=(0,), step=0.05, run_time=0.5)
    await world.start_bot(**settings)
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "Generating"))
    if refuse_first_post:
        # discord.py retries 5xx itself and a 400 is final; Cloudflare's 429 (no Via header)
        # reaches the bot's own retry at once.
        world.discord.fail_next("PATCH", WEBHOOK_MESSAGE, status=429, headers={"Via": ""})
    world.discord.fail_next("PATCH", WEBHOOK_MESSAGE, status="hang")
    await world.discord.wait_until(lambda: world.discord.hanging == 1)
    await world.bot.kill()
    world.discord.release_hangs()
    return handle


async def test_kill_while_posting_a_result_held_in_memory(world):
    """By default the image goes from fal to Discord in memory and is never written: after the
    restart the bot follows the same request at fal, fetches the image again and posts it once."""
    handle = await kill_while_posting(world)
    (row,) = db_rows(world)
    assert row["state"] in ("queued", "running") and row["delivered_at"] is None
    assert result_files(world) == []
    await world.start_bot()
    await finished(handle)
    assert_delivered_once(world, handle)
    assert world.fal.count("submit") == 1 and world.fal.count("file") == 2
    await still_serving(world)


@pytest.mark.parametrize("lose_files", [False, True])
async def test_kill_while_posting_a_result_kept_in_data_dir(world, lose_files):
    """With no memory for results (RESULT_MEMORY_BYTES=0) they pass through DATA_DIR and are
    recorded as succeeded: posted once after the restart from there, or fetched again from fal
    if the files were lost."""
    handle = await kill_while_posting(world, RESULT_MEMORY_BYTES="0")
    (row,) = db_rows(world)
    assert row["state"] == "succeeded" and row["delivered_at"] is None
    assert len(result_files(world)) == 1
    if lose_files:
        for path in result_files(world):
            path.unlink()
    await world.start_bot(RESULT_MEMORY_BYTES="0")
    await finished(handle)
    assert_delivered_once(world, handle)
    assert world.fal.count("submit") == 1
    assert world.fal.count("file") == (2 if lose_files else 1)
    await still_serving(world)
    # posted files are cleaned up
    await world.discord.wait_until(lambda: result_files(world) == [], timeout=5)


async def test_a_failed_post_moves_the_result_to_data_dir(world):
    """A first posting attempt that fails writes the images held in memory to DATA_DIR and
    records them, so neither the retries nor a restart depend on fal still having them."""
    handle = await kill_while_posting(world, refuse_first_post=True)
    (row,) = db_rows(world)
    assert row["state"] == "succeeded" and row["delivered_at"] is None
    assert len(result_files(world)) == 1
    await world.start_bot()
    await finished(handle)
    assert_delivered_once(world, handle)
    assert world.fal.count("submit") == 1 and world.fal.count("file") == 1
    await world.discord.wait_until(lambda: result_files(world) == [], timeout=5)
    await still_serving(world)


async def test_the_start_sweeps_leftovers_out_of_data_dir_and_keeps_what_a_job_still_needs(world):
    """Files no unfinished job needs (a job delivered just before a crash, partial files, anything
    else) are deleted at start; the image of the job not yet shown is kept and posted from there,
    though fal no longer has it."""
    handle = await kill_while_posting(world, RESULT_MEMORY_BYTES="0")
    (kept,) = result_files(world)
    leftovers = [kept.with_name("job-7-1"), kept.with_name(kept.name + ".part"), kept.with_name("notes.txt")]
    for path in leftovers:
        path.write_bytes(b"left over")
    world.fal.expire_files()
    await world.start_bot(RESULT_MEMORY_BYTES="0")
    await finished(handle)
    assert_delivered_once(world, handle)
    assert world.fal.count("file") == 1
    assert [path for path in leftovers if path.exists()] == []


async def test_a_result_not_shown_within_a_day_is_given_up_once_with_its_files(world):
    """A result Discord would not take for a day is closed at the next start, its reason logged
    and its files deleted, not tried again at every start."""
    handle = await kill_while_posting(world, RESULT_MEMORY_BYTES="0")
    assert len(result_files(world)) == 1
    with sqlite3.connect(world.data_dir / "kontext.sqlite3") as db:
        db.execute("UPDATE jobs SET created_at = created_at - 86400 - 60")
    edits = len([r for r in world.discord.requests_to("PATCH", WEBHOOK_MESSAGE) if handle.token in r.path])
    await world.start_bot(RESULT_MEMORY_BYTES="0")
    await world.discord.wait_until(lambda: db_rows(world)[0]["delivered_at"] is not None, timeout=10)
    assert result_files(world) == []
    await restart(world, kill=False)
    await still_serving(world)
    await world.bot.stop()
    assert len([r for r in world.discord.requests_to("PATCH", WEBHOOK_MESSAGE) if handle.token in r.path]) == edits
    log = world.bot.log_text()
    assert log.count("job 1 cannot be shown (not shown within a day of the request); it is closed") == 1
    assert log.count("job 1 resumed") == 1


# -- 2. a submit in flight at the crash ---------------------------------------------------------


async def test_submit_in_flight_at_the_crash_is_not_resent(world):
    await world.start_bot(FAL_READ_TIMEOUT="10")
    world.fal.fail_next("submit", status="hang")
    handle = await world.kontext()
    await world.discord.wait_until(lambda: world.fal.count("submit") == 1)
    await world.bot.kill()
    (row,) = db_rows(world)
    assert row["state"] == "submitting"
    await world.start_bot()
    message = await finished(handle)
    assert text(message).startswith("❌")
    assert "cannot tell whether fal received it" in text(message)
    assert "press Try again" in text(message) and has_button(message, "retry")
    assert world.fal.count("submit") == 1
    await still_serving(world)


# -- 3. the 15-minute interaction token ----------------------------------------------------------


def channel_replies(world, handle) -> list:
    return [
        m
        for m in world.discord.channel_messages()
        if m.interaction is None and (m.message_reference or {}).get("message_id") == handle.original.id
    ]


def bot_posts(world) -> list:
    """Every message the bot posted with its own token, anywhere (channels and DMs)."""
    return [
        m
        for m in world.discord.messages.values()
        if m.interaction is None and m.author["id"] == world.discord.bot_user["id"]
    ]


def assert_posted_as_reply(world, handle) -> None:
    alice = world.discord.alice["id"]
    (reply,) = channel_replies(world, handle)
    assert reply.type == 19  # a reply
    assert text(reply).startswith(f"<@{alice}>") and "✅" in text(reply), text(reply)
    assert len(reply.files) == 1
    mentions = reply.allowed_mentions
    assert mentions is not None and [str(u) for u in mentions.get("users", [])] == [alice], mentions
    assert not {"everyone", "roles", "users"} & set(mentions.get("parse", [])), mentions
    assert not mentions.get("roles")
    # The reply itself shows no result; nothing was posted twice.
    assert not handle.original.files and handle.followups == []


async def test_token_expired_mid_job_posts_a_reply_in_the_channel(world):
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.3, run_time=0.2)
    await world.start_bot()
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "In queue"))
    world.discord.expire_token(handle.token)
    await world.discord.wait_until(lambda: channel_replies(world, handle), timeout=15)
    assert_posted_as_reply(world, handle)
    assert any(r[0] == 401 and r[1]["code"] == 50027 for r in world.discord.rejections)
    await still_serving(world)


async def test_a_cancel_pressed_after_the_token_shows_on_the_reply_it_was_pressed_on(world):
    """Past its 15 minutes the reply showed its last place in line, with Cancel. The press is a
    new interaction, answered as an update of that reply, whose token edits it: the reply shows
    the job cancelled, without Cancel. It went on saying "In queue" with a Cancel that answered
    "already finished", and the bot posted the cancel in the channel, pinging the member about
    their own press."""
    handle = await outliving_its_reply(world, script=JobScript(queue_positions=(3, 2, 1, 0), step=2.0))
    reply = handle.original
    press = await world.discord.click_button(reply.id, button(reply, "cancel"), user="alice")
    assert (await press.wait_for_callback())["type"] == 6
    cancelled = await finished(handle)
    assert text(cancelled).startswith("🚫") and not has_button(cancelled, "cancel"), text(cancelled)
    assert bot_posts(world) == []
    assert world.fal.count("cancel") == 1
    await still_serving(world)


async def a_job_restarted_as_its_token_nears_its_end(world):
    """A job in fal's line, the bot restarted as its reply's token has 90 s left (13.5 minutes
    old, as the bot sees it); returns the job's interaction."""
    await world.start_bot()
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "In queue"))
    await world.bot.kill()
    with sqlite3.connect(world.data_dir / "kontext.sqlite3") as db:
        db.execute("UPDATE jobs SET interaction_created_at = interaction_created_at - 810")
    await world.start_bot()
    return handle


async def test_a_reply_about_to_lose_its_token_says_the_result_will_be_posted_in_the_channel(world):
    """A job still in line as its reply's 15 minutes end: the reply can show nothing after them
    (its queue position and start estimate stay as they were, the estimate soon "ago"), so it
    says in time that the result will be posted in the channel, and it is, replying to it."""
    world.fal.default = JobScript(queue_positions=(6, 5, 4, 3, 2, 1, 0), step=1.0)
    fake = world.discord
    handle = await a_job_restarted_as_its_token_nears_its_end(world)
    await handle.wait_until(lambda h: shows(h, "the result will be posted in this channel"), timeout=10)
    assert shows(handle, "In queue")
    fake.age_interactions(16 * 60)
    await fake.wait_until(lambda: bot_posts(world), timeout=15)
    (post,) = bot_posts(world)
    assert post.channel_id == fake.channel_id and post.message_reference is not None, post
    assert text(post).startswith(f"<@{fake.alice['id']}> ✅") and len(post.files) == 1, text(post)
    assert world.fal.count("submit") == 1


@pytest.mark.parametrize(
    "denied", [SEND_MESSAGES, ATTACH_FILES, READ_MESSAGE_HISTORY], ids=["no-send", "no-attach", "no-history"]
)
async def test_a_late_result_where_the_bot_may_not_post_comes_by_dm(world, denied):
    """The bot may not send messages (or upload files) in the channel, where members may still
    use its commands, or not read its history (without which it can neither reply to the reply
    nor see that a moderator deleted it): the reply says in time that the result will come by
    DM, and it does."""
    world.fal.default = JobScript(queue_positions=(6, 5, 4, 3, 2, 1, 0), step=1.0)
    fake = world.discord
    fake.set_permission_overwrite(fake.channel_id, fake.default_guild.bot_role_id, deny=denied)
    handle = await a_job_restarted_as_its_token_nears_its_end(world)
    await handle.wait_until(lambda h: shows(h, "the result will come in a DM from the bot"), timeout=10)
    fake.age_interactions(16 * 60)
    await fake.wait_until(lambda: bot_posts(world), timeout=15)
    (card,) = bot_posts(world)
    assert card.channel_id == fake.dm_channels[fake.alice["id"]]
    link = f"https://discord.com/channels/{fake.guild_id}/{fake.channel_id}/{handle.original.id}"
    assert text(card).startswith(f"📬 Your edit from {link} is ready") and len(card.files) == 1, text(card)
    assert world.fal.count("submit") == 1
    assert not any(status == 403 for status, *_ in fake.rejections), fake.rejections


async def test_a_late_result_from_a_private_thread_the_bot_is_not_in_comes_by_dm(world):
    """A member uses /kontext in a private thread the bot was never added to: Discord answers the
    interaction there, but a private thread is "only viewable by those invited" (channel.mdx), so
    the bot's cache never had it and Discord refuses the bot's own post (50001). A result that
    outlives its reply comes by DM instead of being lost."""
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.3, run_time=0.2)
    fake = world.discord
    thread = fake.add_thread(fake.channel_id, "alice's corner", owner="alice", type=12)
    await world.start_bot()
    handle = await world.kontext(channel_id=thread["id"])
    await handle.wait_until(lambda h: shows(h, "In queue"))
    fake.expire_token(handle.token)
    await fake.wait_until(lambda: bot_posts(world), timeout=15)
    (card,) = bot_posts(world)
    assert card.channel_id == fake.dm_channels[fake.alice["id"]]
    link = f"https://discord.com/channels/{fake.guild_id}/{thread['id']}/{handle.original.id}"
    assert text(card).startswith(f"📬 Your edit from {link} is ready") and len(card.files) == 1, text(card)
    assert world.fal.count("submit") == 1


async def test_a_late_result_the_channel_refused_goes_on_by_dm_after_a_discord_outage(world):
    """Four images in two classic messages, after the reply's token: the bot's cache says it may
    post in the channel, Discord refuses (403), and the result goes by DM. Its second message
    meets an outage at Discord (503): the retry went back to the channel, was refused again and
    took that for final, as if part of the result were there; images 3 and 4 never came. The
    rest now follows the first part by DM, and the channel is asked once."""
    world.settings["RESULT_CARDS"] = "0"  # the classic message, split to fit the upload limit
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.3, run_time=0.2, image_size=40_000)
    fake = world.discord
    await world.start_bot()
    handle = await fake.invoke_slash(
        "kontext",
        options={"image": world.input_image(), "prompt": "four", "num_images": 4},
        attachment_size_limit=100_000,
    )
    await handle.wait_until(lambda h: shows(h, "In queue"))
    fake.expire_token(handle.token)
    channel_posts = rf"^/channels/{fake.channel_id}/messages$"
    refused = {"message": "Missing Permissions", "code": 50013}
    fake.fail_next("POST", channel_posts, status=403, json=refused, times=10_000)
    fake.fail_next("POST", rf"^/channels/(?!{fake.channel_id})\d+/messages$", status=503, times=2, skip=1)
    await fake.wait_until(lambda: db_rows(world)[0]["delivered_at"] is not None, timeout=20)
    first, rest = bot_posts(world)
    assert {first.channel_id, rest.channel_id} == {fake.dm_channels[fake.alice["id"]]}
    assert [sorted(m.files) for m in (first, rest)] == [
        ["kontext-1-1.jpg", "kontext-1-2.jpg"],
        ["kontext-1-3.jpg", "kontext-1-4.jpg"],
    ]
    assert text(first).startswith("📬 Your edit from"), text(first)
    assert "undeliverable" not in db_rows(world)[0]["notes"]
    assert len(fake.requests_to("POST", channel_posts)) == 1


async def test_a_late_failure_where_the_bot_may_not_upload_is_said_in_the_channel(world):
    """The bot may send messages but not upload files in the channel: a job that fails after its
    token has nothing to upload, so the member learns it there, replying to the reply, not by DM."""
    refused = model_error("content_policy_violation", "flagged for graphic violence.", queue_positions=(1, 0), step=0.3)
    await outliving_its_reply(world, bot_denied=ATTACH_FILES, script=refused)
    fake = world.discord
    await fake.wait_until(lambda: bot_posts(world), timeout=15)
    (post,) = bot_posts(world)
    assert post.channel_id == fake.channel_id and post.message_reference is not None, post
    assert text(post).startswith(f"<@{fake.alice['id']}>") and not post.files, text(post)
    assert not any(status == 403 for status, *_ in fake.rejections), fake.rejections


async def test_a_reply_deleted_while_generating_is_not_posted_again_after_its_token(world):
    """A moderator deletes the reply while it shows "Generating…" (no progress edit follows to
    notice) and the job outlives its token: the job is withdrawn, nothing lands in the channel."""
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.3, run_time=3.0)
    await world.start_bot()
    handle = await world.kontext(prompt="something the moderator removed")
    await handle.wait_until(lambda h: shows(h, "Generating"), timeout=10)
    world.discord._delete(handle.original)
    world.discord.expire_token(handle.token)
    await world.discord.wait_until(lambda: db_rows(world)[0]["delivered_at"] is not None, timeout=20)
    assert [m for m in world.discord.channel_messages() if m.interaction is None] == []
    assert "withdrawn" in db_rows(world)[0]["notes"]
    await still_serving(world)


async def test_a_reply_deleted_where_the_bot_may_not_read_history_is_not_posted_again(world):
    """As above, where the bot's role may not Read Message History: it cannot read the reply to
    see that it is gone, nor reply to it, and the result came back as a new channel post, prompt
    and all, pinging the member. It now comes by DM, to the member alone."""
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.3, run_time=3.0)
    fake = world.discord
    fake.set_permission_overwrite(fake.channel_id, fake.default_guild.bot_role_id, deny=READ_MESSAGE_HISTORY)
    await world.start_bot()
    handle = await world.kontext(prompt="something the moderator removed")
    await handle.wait_until(lambda h: shows(h, "Generating"), timeout=10)
    fake._delete(handle.original)
    fake.expire_token(handle.token)
    await fake.wait_until(lambda: db_rows(world)[0]["delivered_at"] is not None, timeout=20)
    assert [m for m in fake.channel_messages() if m.interaction is None] == []
    (card,) = bot_posts(world)
    assert card.channel_id == fake.dm_channels[fake.alice["id"]]
    assert text(card).startswith("📬 Your edit from") and len(card.files) == 1, text(card)


async def test_a_late_reply_links_an_image_over_the_servers_upload_limit(world):
    """The interaction could upload 50 MiB (a member's Nitro), the bot's own post only what the
    server allows (10 MiB): the late reply links the 11 MiB image instead of being refused."""
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.3, run_time=0.2, image_size=11 * 1024 * 1024)
    await world.start_bot()
    handle = await world.discord.invoke_slash(
        "kontext", options={"image": world.input_image(), "prompt": "a big one"}, attachment_size_limit=50 << 20
    )
    await handle.wait_until(lambda h: shows(h, "In queue"))
    world.discord.expire_token(handle.token)
    await world.discord.wait_until(lambda: channel_replies(world, handle), timeout=30)
    (reply,) = channel_replies(world, handle)
    assert reply.files == {} and "Too large for this server's upload limit: [image 1](" in text(reply), text(reply)


async def test_a_late_card_with_a_long_markdown_prompt_fits_discords_text_limit(world):
    """The late lead (`<@member>`) is added to the status line after rendering: the prompt is
    cut to the room left, and the reply is posted, not refused as over 4,000 characters."""
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.3, run_time=0.2)
    await world.start_bot()
    handle = await world.kontext(prompt="__" * 1000)  # 2,000 characters; escaped, twice as long
    await handle.wait_until(lambda h: shows(h, "In queue"))
    world.discord.expire_token(handle.token)
    await world.discord.wait_until(lambda: channel_replies(world, handle), timeout=15)
    assert_posted_as_reply(world, handle)


async def test_token_expired_while_the_bot_was_down(world):
    world.fal.default = JobScript(queue_positions=(2, 1, 0), step=0.3, run_time=0.2)
    await world.start_bot()
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "In queue"))
    await world.bot.kill()
    world.discord.age_interactions(16 * 60)
    await world.start_bot()
    await world.discord.wait_until(lambda: channel_replies(world, handle), timeout=15)
    assert_posted_as_reply(world, handle)
    assert world.fal.count("submit") == 1
    await still_serving(world)


async def test_bot_knows_an_old_token_is_dead_and_does_not_try_it(world):
    """Back after more than 15 minutes: the bot reads the interaction's age from the job row and
    goes straight to the channel, without one request on the dead token."""
    world.fal.default = JobScript(queue_positions=(2, 1, 0), step=0.3, run_time=0.2)
    await world.start_bot()
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "In queue"))
    await world.bot.kill()
    world.discord.age_interactions(16 * 60)
    with sqlite3.connect(world.data_dir / "kontext.sqlite3") as db:
        db.execute("UPDATE jobs SET interaction_created_at = interaction_created_at - 960")
    await world.start_bot()
    await world.discord.wait_until(lambda: channel_replies(world, handle), timeout=15)
    assert_posted_as_reply(world, handle)
    assert not any(status == 401 for status, *_ in world.discord.rejections), world.discord.rejections
    await still_serving(world)


async def test_kill_between_split_messages_resumes_after_the_last_one_posted(world):
    """Four images, one per message (reply + three follow-ups); killed while the third message is
    in flight: after the restart the second is not posted again and the rest once each."""
    world.settings["RESULT_CARDS"] = "0"  # the classic message, split to fit the upload limit
    world.fal.default = JobScript(image_size=40_000)
    await world.start_bot()
    followup = r"/webhooks/\d+/[^/]+$"
    world.discord.fail_next("POST", followup, status="hang", skip=1)
    handle = await world.discord.invoke_slash(
        "kontext",
        options={"image": world.input_image(), "prompt": "four", "num_images": 4},
        attachment_size_limit=50_000,
    )
    await world.discord.wait_until(lambda: world.discord.hanging == 1)
    await world.bot.kill()
    world.discord.release_hangs()
    await world.start_bot()
    await world.discord.wait_until(lambda: db_rows(world)[0]["delivered_at"] is not None)
    assert [sorted(m.files) for m in handle.followups] == [[f"kontext-1-{i}.jpg"] for i in (2, 3, 4)]
    assert sorted(handle.original.files) == ["kontext-1-1.jpg"]
    await still_serving(world)


async def test_token_expiring_between_split_messages_posts_only_the_rest(world):
    """Four images over two messages: the reply is edited with the first two, then the token dies
    before the follow-up; only the other two go to the channel (nothing posted twice)."""
    world.settings["RESULT_CARDS"] = "0"  # the classic message, split to fit the upload limit
    world.fal.default = JobScript(image_size=40_000)
    await world.start_bot()
    world.discord.fail_next(
        "POST", r"/webhooks/\d+/[^/]+$", status=401, json={"message": "Invalid Webhook Token", "code": 50027}
    )
    handle = await world.discord.invoke_slash(
        "kontext",
        options={"image": world.input_image(), "prompt": "four", "num_images": 4},
        attachment_size_limit=100_000,
    )
    await finished(handle)
    await world.discord.wait_until(lambda: channel_replies(world, handle))
    assert sorted(handle.original.files) == ["kontext-1-1.jpg", "kontext-1-2.jpg"]
    (rest,) = channel_replies(world, handle)
    assert sorted(rest.files) == ["kontext-1-3.jpg", "kontext-1-4.jpg"]
    assert handle.followups == []
    await still_serving(world)


# -- 4. fal no longer has the result ------------------------------------------------------------


async def test_result_expired_during_a_restart(world):
    ttl = 0.2
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.3, run_time=0.1, result_ttl=ttl)
    await world.start_bot()
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "In queue"))
    await world.bot.kill()
    job = fal_job(world)
    while job.completed_at is None or time.monotonic() < job.completed_at + ttl + 0.05:  # noqa: ASYNC110 - fal's clock
        await asyncio.sleep(0.05)
    await world.start_bot()
    message = await finished(handle)
    assert "no longer has this result" in text(message), text(message)
    assert world.fal.count("submit") == 1
    # fal made the image and billed it, though the bot never saw it start: it counts.
    assert "1 image, about $0.08" in await admin(world, "show")
    await still_serving(world)


async def test_result_files_gone_from_the_cdn(world):
    world.fal.default = JobScript(queue_positions=(0,), step=0.1, run_time=0.1)
    await world.start_bot()
    handle = await world.kontext()
    await world.fal.wait_for_submits(1)
    world.fal.expire_files()
    message = await finished(handle)
    assert "no longer has this result" in text(message), text(message)
    assert "1 image, about $0.08" in await admin(world, "show")
    await still_serving(world)


async def test_a_paid_result_fetched_again_after_a_restart_rides_out_a_short_cdn_outage(world):
    """A succeeded job whose files are gone after a restart (a cleaned volume, another process
    taking it over) is fetched again from fal's CDN, which answers 503 for a few seconds: asked
    again until it is back, as a running job is followed through fal's outages. The paid result
    was lost at the first failed fetch ("The result files were lost…")."""
    handle = await kill_while_posting(world, RESULT_MEMORY_BYTES="0")
    for path in result_files(world):
        path.unlink()
    world.fal.fail_next("file", "ingress_503", times=1000)
    await world.start_bot(RESULT_MEMORY_BYTES="0")
    # More than a fetch's own retries: the result was given up when they ran out.
    await world.fal.wait_for_requests("file", 2 * RESULT_ATTEMPTS, timeout=30)
    world.fal.clear_faults()
    await finished(handle, timeout=20)
    assert_delivered_once(world, handle)


# -- 5. fal faults of every kind -----------------------------------------------------------------


@pytest.mark.parametrize(
    "op,status,times",
    [
        ("submit", 429, 2),
        ("submit", "ingress_502", 2),  # fal's front proxy answered: nothing was recorded
        ("stream", 503, 1),  # the stream refused: polled instead
        ("stream", "drop", 2),
        ("stream", "hang", 1),  # no answer at all: the stall timeout fires
        ("result", 429, 2),
        ("result", "ingress_504", 2),
        ("result", "drop", 2),
        ("result", "hang", 1),
        ("file", 503, 2),
        ("file", "drop", 2),
        ("file", "hang", 1),
    ],
)
async def test_fal_fault_is_ridden_out(world, op, status, times):
    await world.start_bot()
    world.fal.fail_next(op, status=status, times=times)
    handle = await world.kontext()
    await finished(handle)
    assert_delivered_once(world, handle)
    assert world.fal.count("submit") == (times + 1 if op == "submit" else 1)
    assert len(world.fal.jobs) == 1
    await still_serving(world)


async def test_hanging_status_poll_times_out_and_is_retried(world):
    # The stream's one event before it drops must not already say COMPLETED, which it would if
    # a loaded machine opened it after the job ended: the job lasts 1.2 s, far past that.
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.5, run_time=0.2, stream_mode="drop")
    await world.start_bot()
    world.fal.fail_next("status", status="hang")
    handle = await world.kontext()
    await finished(handle)
    assert_delivered_once(world, handle)
    assert world.fal.count("status") >= 2  # the poll that hung, and the one that replaced it
    await still_serving(world)


async def test_stalled_status_stream_is_given_up(world):
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.2, run_time=0.2, stream_mode="stall")
    await world.start_bot()
    handle = await world.kontext()
    await finished(handle)
    assert_delivered_once(world, handle)
    await still_serving(world)


async def test_hanging_submit_ends_in_a_clear_message(world):
    await world.start_bot()
    world.fal.fail_next("submit", status="hang")
    message = await finished(await world.kontext())
    assert "cannot tell whether fal received it" in text(message)
    assert world.fal.count("submit") == 1
    await still_serving(world)


@pytest.mark.parametrize("fault", ["ingress_503", "drop", "hang"])
async def test_fal_down_about_queued_jobs_ends_in_a_clear_message(world, fault):
    """Whatever the outage looks like, jobs fal had not started end with a clear message and
    free the member's places (the default allows 2 jobs at once per member)."""
    # Queued for longer than the bot waits, and the stream's one event before it drops says so.
    world.fal.default = JobScript(queue_positions=(3, 2, 1, 0), step=10, stream_mode="drop")
    await world.start_bot(JOB_TIMEOUT="3")
    world.fal.fail_next("status", status=fault, times=100_000)
    world.fal.fail_next("cancel", status=fault, times=100_000)  # so fal is silent about them
    handles = [await world.kontext(), await world.kontext()]  # the member's two places
    # fal may still hold the jobs, and would run them: the bot keeps asking, and says so, until
    # fal answers (test_fal_behaviour_e2e.py shows a job fal ran meanwhile delivered).
    for handle in handles:
        await handle.wait_until(lambda h: shows(h, "fal.ai is not answering. Your edit may still be"), timeout=25)
    world.fal.clear_faults()
    for handle in handles:
        message = await finished(handle, timeout=20)
        assert text(message).startswith("❌")
        assert "fal.ai is not answering" in text(message) or "took too long" in text(message), text(message)
    assert all(job.cancelled for job in world.fal.jobs.values()), world.fal.jobs  # never run unseen
    await still_serving(world)  # the places were given back


@pytest.mark.parametrize(
    "ops",
    [
        ("status",),  # while the job runs
        ("status", "result"),  # fal's queue host down once it is done
        ("file",),  # fal's CDN down: the result is known, its images are not at hand
    ],
    ids=["running", "done", "cdn"],
)
@pytest.mark.parametrize("fault", ["ingress_503", "drop", "hang"])
async def test_a_job_fal_started_is_delivered_once_fal_is_back(world, ops, fault):
    """fal bills a job it started whatever the bot does, and keeps it and its result through its
    own outage: whatever the outage looks like and wherever it hits, the bot keeps asking (and
    says so where fal is silent) and delivers once fal is back."""
    # Seen running at once (the stream's one event before it drops), done a second later.
    world.fal.default = JobScript(queue_positions=(0,), step=0, run_time=1.0, stream_mode="drop")
    await world.start_bot(JOB_TIMEOUT="3")
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "Generating"))
    for op in ops:
        world.fal.fail_next(op, status=fault, times=100_000)
    if ops == ("file",) and fault == "hang":
        # fal answers the status: each round ends at the deadline, then the files are asked again.
        await world.discord.wait_until(lambda: "fetching it again" in world.bot.log_text(), timeout=25)
    else:
        await handle.wait_until(lambda h: shows(h, "fal.ai is not answering. It has started your edit"), timeout=25)
    if ops == ("file",) and fault == "ingress_503":
        # fal answers each status, the files fail round after round: the reply keeps saying so
        # (it used to switch back to "Generating…" at every status fal answered).
        rounds_from = world.fal.count("file")
        await world.discord.wait_until(lambda: world.fal.count("file") >= rounds_from + 24, timeout=30)
        shown = [f"{state['content']}{state['embeds']}{state['components']}" for state in handle.original.history]
        since_silent = shown[next(i for i, state in enumerate(shown) if "It has started your edit" in state) :]
        assert not any("Generating" in state for state in since_silent), since_silent
    world.fal.clear_faults()
    await finished(handle, timeout=20)
    assert_delivered_once(world, handle)
    assert world.fal.count("submit") == 1
    await still_serving(world)


async def test_a_job_fal_started_is_still_billed_after_a_restart_while_fal_is_silent(world):
    """A restart while fal answers nothing about a job it runs: the running state is stored as
    fal goes silent, so the restarted bot keeps asking for the result, as its reply says, never
    cancelling the job nor telling the member it was not billed."""
    world.fal.default = JobScript(queue_positions=(0,), step=0, run_time=3.0, stream_mode="drop")
    await world.start_bot(JOB_TIMEOUT="3")
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "Generating"))
    world.fal.fail_next("status", status="drop", times=100_000)
    world.fal.fail_next("cancel", status="drop", times=100_000)
    await handle.wait_until(lambda h: shows(h, "fal.ai is not answering. It has started your edit"), timeout=25)
    assert db_rows(world)[0]["state"] == "running"
    await restart(world, JOB_TIMEOUT="3")
    await world.discord.wait_until(
        lambda: "fal does not answer about a job it started" in world.bot.log_text(), timeout=25
    )
    world.fal.clear_faults()
    await finished(handle, timeout=20)
    assert_delivered_once(world, handle)
    assert world.fal.count("cancel") == 0  # the queued job's path: cancelled, said to be "unbilled"


# -- 6. Discord 5xx on the final edit -------------------------------------------------------------


async def test_discord_5xx_on_the_final_edit_still_delivers_once(world):
    world.fal.default = JobScript(queue_positions=(0,), step=0.05, run_time=0.5)
    await world.start_bot()
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "Generating"))
    world.discord.fail_next("PATCH", WEBHOOK_MESSAGE, status=500, times=1)
    await finished(handle)
    assert_delivered_once(world, handle)
    assert any(r[0] == 500 for r in world.discord.rejections)
    await still_serving(world)


async def test_a_final_edit_discord_refuses_as_invalid_ends_the_job_at_once(world):
    """A 400 is the request itself refused: sent again it is refused again, so the job is closed
    after one attempt (with a logged reason) instead of retried."""
    world.fal.default = JobScript(queue_positions=(0,), step=0.05, run_time=0.5)
    await world.start_bot()
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "Generating"))
    world.discord.fail_next("PATCH", WEBHOOK_MESSAGE, status=400)
    await world.discord.wait_until(lambda: db_rows(world)[0]["delivered_at"] is not None, timeout=10)
    assert len([r for r in world.discord.requests_to("PATCH", WEBHOOK_MESSAGE) if r.files]) == 1
    assert "job 1 cannot be shown (Discord refused the bot's post: 400 0)" in world.bot.log_text()
    await still_serving(world)


# -- 7. Cancel after a restart ---------------------------------------------------------------------


@pytest.mark.parametrize("kill", [False, True])
async def test_cancel_button_works_after_a_restart(world, kill):
    world.fal.default = JobScript(queue_positions=(5, 4, 3, 2, 1, 0), step=1.0)
    await world.start_bot()
    handle = await world.kontext()
    await handle.wait_until(lambda h: has_button(h.original, "cancel"))
    await restart(world, kill=kill)
    click = await world.discord.click_button(handle.original.id, button(handle.original, "cancel"), user="alice")
    message = await finished(handle)
    assert text(message).startswith("🚫 Cancelled by"), text(message)
    assert (await click.wait_for_callback())["type"] == 6
    assert world.fal.count("cancel") == 1 and fal_job(world).cancelled
    assert world.fal.count("submit") == 1
    await still_serving(world)


@pytest.mark.parametrize("faults", [[(503, 1), ("drop", 2)], [("drop_after", 3)]])
async def test_cancel_survives_a_flaky_cancel_call(world, faults):
    """fal's answer to the cancel fails or is lost (with "drop_after" fal has cancelled the job
    and says so on the status stream before the bot hears back): still shown as cancelled."""
    world.fal.default = JobScript(queue_positions=(5, 4, 3, 2, 1, 0), step=1.0)
    await world.start_bot()
    handle = await world.kontext()
    await handle.wait_until(lambda h: has_button(h.original, "cancel"))
    for status, times in faults:
        world.fal.fail_next("cancel", status=status, times=times)
    await world.discord.click_button(handle.original.id, button(handle.original, "cancel"), user="alice")
    message = await finished(handle)
    assert text(message).startswith("🚫 Cancelled by"), text(message)
    assert fal_job(world).cancelled
    await still_serving(world)


# -- 8. SIGTERM with jobs in flight --------------------------------------------------------------


async def test_sigterm_with_jobs_running_exits_cleanly_and_they_finish(world):
    # By prompt: the two submits may reach fal in either order.
    scripts = {
        "first": JobScript(queue_positions=(2, 1, 0), step=0.4, run_time=0.2),
        "second": JobScript(queue_positions=(0,), step=0.05, run_time=1.0),
    }
    world.fal.script_for(lambda payload: scripts.get(payload.get("prompt")))
    await world.start_bot()
    queued = await world.kontext(prompt="first")
    running = await world.kontext(prompt="second")
    await queued.wait_until(lambda h: shows(h, "In queue"))
    await running.wait_until(lambda h: shows(h, "Generating"))
    await restart(world, kill=False)
    for handle in (queued, running):
        await finished(handle)
        assert_delivered_once(world, handle)
    assert world.fal.count("submit") == 2
    await still_serving(world)


async def test_sigterm_while_discord_takes_its_time_over_a_post_lets_it_finish_once(world):
    """The result's post is slow at Discord (a big upload): a SIGTERM meanwhile waits for its
    answer rather than cutting it off, which left the message Discord created unknown to the bot,
    posted a second time after the restart."""
    fake = world.discord
    handle = await outliving_its_reply(world)
    posts = r"^/channels/\d+/messages$"
    fake.fail_next("POST", posts, status="slow", delay=5.0)
    await fake.wait_until(lambda: fake.requests_to("POST", posts), timeout=15)
    assert await world.bot.stop(timeout=15) == 0
    assert len(channel_replies(world, handle)) == 1
    await world.start_bot()
    await still_serving(world)
    assert_posted_as_reply(world, handle)
    assert db_rows(world)[0]["delivered_at"] is not None


async def test_sigterm_during_a_hanging_submit_exits_promptly(world):
    await world.start_bot(FAL_STREAM_STALL_TIMEOUT="30")
    world.fal.fail_next("submit", status="hang")
    handle = await world.kontext()
    await world.discord.wait_until(lambda: world.fal.count("submit") == 1)
    await restart(world, kill=False)
    message = await finished(handle)
    assert "cannot tell whether fal received it" in text(message)
    assert world.fal.count("submit") == 1
    await still_serving(world)


# -- 9. overload: the bot's own queue --------------------------------------------------------------


async def test_overload_shows_places_in_line_and_delivers_all(world):
    world.fal.default = JobScript(queue_positions=(0,), step=0.05, run_time=1.0)
    await world.start_bot(MAX_CONCURRENT_JOBS="1")
    handles = [await world.kontext(user=user, prompt=f"job {n}") for n, user in enumerate(members(world, 3))]
    for handle in handles:
        await finished(handle)
        assert_delivered_once(world, handle)
    # The two that waited took the line in the order they reached it (each reply's own round trip
    # decides which first); the second in line moved up to first.
    waited = sorted((contents(h.original) for h in handles[1:]), key=lambda shown: any("**#2**" in c for c in shown))
    assert any("**#1** in line" in c for c in waited[0]), waited
    assert any("**#2** in line" in c for c in waited[1]) and any("**#1** in line" in c for c in waited[1]), waited
    # never more than one job at fal at once
    spans = sorted((j.submitted_at, j.completed_at) for j in world.fal.jobs.values())
    assert all(later[0] >= earlier[1] - 0.01 for earlier, later in zip(spans, spans[1:], strict=False)), spans


async def test_overload_queue_survives_a_restart(world):
    world.fal.default = JobScript(queue_positions=(0,), step=0.05, run_time=1.0)
    await world.start_bot(MAX_CONCURRENT_JOBS="1")
    handles = [await world.kontext(user=user, prompt=f"job {n}") for n, user in enumerate(members(world, 3))]
    await world.discord.wait_until(lambda: any(shows(h, "**#2** in line") for h in handles))
    await world.bot.kill()
    await world.start_bot(MAX_CONCURRENT_JOBS="1")
    for handle in handles:
        await finished(handle)
        assert_delivered_once(world, handle)
    assert world.fal.count("submit") == 3


# -- 10. the database after kill -9 -----------------------------------------------------------------


async def test_database_is_consistent_after_kill(world):
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.2, run_time=0.3)
    await world.start_bot()
    handles = [await world.kontext(user=user, prompt=f"job {n}") for n, user in enumerate(members(world, 4))]
    for handle in handles:  # each recorded as at fal (a kill mid-submit is another test)
        await handle.wait_until(lambda h: shows(h, "In queue"))
    await world.bot.kill()
    with sqlite3.connect(world.data_dir / "kontext.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 4
    await world.start_bot()
    for handle in handles:
        await finished(handle)
        assert_delivered_once(world, handle)
    assert world.fal.count("submit") == 4
    assert await world.bot.stop() == 0
    rows = db_rows(world)
    assert [r["state"] for r in rows] == ["succeeded"] * 4
    assert all(r["delivered_at"] is not None for r in rows)


async def test_a_progress_edit_discord_carries_out_late_never_lands_after_the_result(world):
    """Discord takes its time over a progress edit, and the job finishes meanwhile: the result
    must not be sent until that edit has landed. Sent at once, the result landed first and the
    old progress edit after it, on a reply that had become the card (content on a
    components-v2 message, which Discord refuses; on a classic reply it would have put
    "Generating…" back over the result)."""
    fake = world.discord
    world.fal.default = JobScript(queue_positions=(0,), step=0.2, run_time=0.3)
    await world.start_bot()
    edits = r"^/webhooks/\d+/[^/]+/messages/\d+$"
    fake.fail_next("PATCH", edits, status="slow", delay=1.5)  # the first progress edit
    handle = await world.kontext()
    await finished(handle, timeout=15)
    await fake.wait_until(lambda: all(r.status for r in fake.requests_to("PATCH", edits)))
    assert shows(handle, "Done"), contents(handle)
    assert_delivered_once(world, handle)


# -- 11. Discord's 3 seconds, whatever the intake waits for ----------------------------------------


@contextlib.contextmanager
def database_write_locked(world):
    """Another connection holds SQLite's write lock (a slow disk's fsync, a long checkpoint):
    the bot's writes wait for it (its busy timeout) until the block ends."""
    db = sqlite3.connect(world.data_dir / "kontext.sqlite3", isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        db.execute("COMMIT")
        db.close()


async def waiting_for_the_lock(world, user: str):
    """A /kontext whose job's row waits for the lock: the bot's one connection to the database
    is busy with it, so whatever the next interaction reads waits behind it."""
    handle = await world.kontext(user=user)
    await handle.wait_until(lambda h: h.age > 0.5)
    return handle


async def test_a_database_slow_to_write_does_not_cost_the_member_their_3_seconds(world):
    """The job's row waits for the database, longer than Discord's 3 seconds: the interaction
    is acknowledged in time all the same (public, as the member's replies are), and the job runs
    once the row is written. It used to be acknowledged after the row only: Discord said "The
    application did not respond", and the bot's answers after it were refused (10062)."""
    await world.start_bot()
    with database_write_locked(world):
        handle = await world.kontext()
        assert await handle.wait_for_callback(timeout=3) == {"type": 5}
        await asyncio.sleep(3.5 - handle.age)
    assert text(await finished(handle)) == "✅ Done."
    assert world.fal.count("submit") == 1
    assert world.discord.violations == []


async def test_a_refusal_after_an_early_acknowledgement_reaches_the_member_alone(world):
    """Acknowledged before the database let the policy decide, and then refused (the cooldown):
    the "thinking…" it showed the channel is withdrawn, and the refusal is the member's alone."""
    await world.start_bot()
    await admin(world, "limits", cooldown_seconds=600)
    await finished(await world.kontext())
    world.discord.add_member(name="bob")
    with database_write_locked(world):
        bob = await waiting_for_the_lock(world, "bob")
        alice = await world.kontext()
        assert await alice.wait_for_callback(timeout=3) == {"type": 5}
        await asyncio.sleep(3.5 - bob.age)
    await alice.wait_until(lambda h: bool(h.followups))
    (refusal,) = alice.followups
    assert "Slow down" in refusal.content and refusal.flags & EPHEMERAL, refusal
    assert alice.original is not None and alice.original.deleted
    assert text(await finished(bob)) == "✅ Done."
    assert world.fal.count("submit") == 2


async def test_a_member_whose_settings_are_not_read_in_time_gets_their_result_privately_first(world):
    """Acknowledged before even the member's settings were read (behind another member's job
    waiting for the database): the reply is private, as the member may want their results so,
    and their result can be shared from it."""
    await world.start_bot()
    world.discord.add_member(name="bob")
    with database_write_locked(world):
        alice = await waiting_for_the_lock(world, "alice")
        bob = await world.kontext(user="bob")
        callbacks = [await handle.wait_for_callback(timeout=3) for handle in (alice, bob)]
        await asyncio.sleep(3.5 - alice.age)
    assert callbacks == [{"type": 5}, {"type": 5, "data": {"flags": EPHEMERAL}}], callbacks
    assert text(await finished(alice)) == "✅ Done."
    assert has_button(await finished(bob), "share")


# -- 12. a database that takes the connection and says nothing -----------------------------------


class SilentDatabase:
    """What DATABASE_URL may reach: a host that takes the connection and never answers (a server
    still starting, a firewall dropping the packets, a load balancer with nothing behind it)."""

    def __init__(self) -> None:
        self.connections: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> SilentDatabase:
        self._server = await asyncio.start_server(self._take, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for connection in self.connections:
            connection.close()

    async def _take(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.append(writer)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"postgresql://kontext:pw@127.0.0.1:{self._server.sockets[0].getsockname()[1]}/kontext"


async def test_a_sigterm_while_the_database_does_not_answer_stops_the_bot_at_once(world):
    """`docker stop` (and Kubernetes) send SIGKILL 30 s after SIGTERM: the bot waited for the
    database's answer first, for asyncpg's 60 s, and was killed."""
    async with SilentDatabase() as database:
        bot = world.new_bot(DATABASE_URL=database.url, DATABASE_CONNECT_TIMEOUT="60", LOG_LEVEL="INFO")
        await bot.start()
        await world.discord.wait_until(lambda: bool(database.connections), timeout=20)
        started = time.monotonic()
        assert await bot.stop(timeout=20) == 0
        assert time.monotonic() - started < 5
    assert bot.log_text().strip().splitlines()[-1].endswith("stopping during the start-up")


async def test_a_database_that_does_not_answer_stops_the_bot_with_a_line_naming_it(world):
    async with SilentDatabase() as database:
        bot = world.new_bot(DATABASE_URL=database.url, DATABASE_CONNECT_TIMEOUT="0.5", LOG_LEVEL="INFO")
        await bot.start()
        assert bot.process is not None
        code = await asyncio.wait_for(bot.process.wait(), 20)
    last = bot.log_text().strip().splitlines()[-1]
    assert code == 2 and "the database in DATABASE_URL did not answer within 0.5s" in last, (code, last)
