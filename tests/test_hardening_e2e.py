"""The adversarial review's findings (security-review.md), each shown fixed end to end with the
real bot: nothing leaked, nothing stuck, nothing billed twice, nothing posted where it must not be.
(The "never logged" check runs after every end-to-end test, in conftest.py.)"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import sqlite3
import stat
import subprocess
import sys

from fakes.bot_process import PROJECT_ROOT
from fakes.fal_fake import JobScript, model_error
from fakes.world import FAL_KEY
from tests.e2e import admin, button, fal_job, finished, has_button, private_answer, shows, text

CHANNEL_POST = r"/channels/\d+/messages$"


def rows(world) -> list[sqlite3.Row]:
    with sqlite3.connect(world.data_dir / "kontext.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM jobs ORDER BY id").fetchall()


async def test_answers_fal_sends_that_http_cannot_parse_end_plainly_and_never_log_the_request(world):
    """Finding 1: aiohttp's exception for an answer it cannot parse carries the request, its
    headers (so the fal key) included. Whichever call meets one, the member reads a clear message
    and the log names the error without the request: not the key, not even the header's name
    (which the last-resort filter would leave in place, the key starred out)."""
    await world.start_bot()
    world.fal.fail_next("submit", "malformed")
    assert "cannot tell whether fal received it" in text(await finished(await world.kontext()))
    for ops in (("stream", "status"), ("result",)):  # each status poll follows a broken stream
        for op in ops:
            world.fal.fail_next(op, "malformed", times=10_000)
        # Given up if fal answers the cancel of a job it had not started; one it started (and
        # bills) is asked about until fal answers, the reply saying so.
        handle = await world.kontext()
        await handle.wait_until(lambda h: shows(h, "fal.ai is not answering"), timeout=25)
        for op in ops:
            world.fal._faults[op].clear()
        shown = text(await finished(handle))
        assert shown.startswith(("✅", "❌ fal.ai is not answering right now")), shown
    for op in ("storage_token", "storage_initiate"):  # a large input goes to fal's storage, with the key
        world.fal.fail_next(op, "malformed", times=3)
    large = world.input_image(size=200_000)
    assert text(await finished(await world.kontext(image=large))).startswith(
        "❌ The image could not be handed to fal.ai"
    )
    world.fal.script_next(JobScript(queue_positions=(3, 2, 1, 0), step=1.0))
    handle = await world.kontext()
    await handle.wait_until(lambda h: has_button(h.original, "cancel"))
    world.fal.fail_next("cancel", "malformed")  # then fal answers the cancel asked again
    await world.discord.click_button(handle.original.id, button(handle.original, "cancel"))
    assert text(await finished(handle)).startswith("🚫 Cancelled by")
    await world.bot.stop()
    log = world.bot.log_text()
    met = [line for line in log.splitlines() if "ClientResponseError" in line]
    calls = ("submit outcome unknown", "status stream", "fal status", "fal result", "fal upload", "fal cancel")
    for call in calls:
        assert any(call in line for line in met), call
    assert FAL_KEY not in log and "Authorization" not in log


async def test_a_failure_on_the_bots_side_ends_the_job_plainly_and_frees_the_members_place(world):
    """Finding 2: an error that is not fal's (here the disk: a file stands where the results
    folder was, which no permission lets the bot write through, root included) ends the job with
    a message, frees the member's place for the next edit, and the log says which job."""
    world.fal.default = JobScript(image_size=40_000)
    await world.start_bot(RESULT_MEMORY_BYTES="0")  # every result goes through DATA_DIR
    await admin(world, "limits", member_concurrent=1)
    results = world.data_dir / "results"
    shutil.rmtree(results, ignore_errors=True)
    results.write_bytes(b"")
    failed = await finished(await world.kontext())
    assert text(failed) == "❌ Something went wrong with this edit. Please try again." and has_button(failed, "retry")
    results.unlink()
    assert text(await finished(await world.kontext())).startswith("✅")
    await world.bot.stop()
    assert "job 1 failed on the bot's side" in world.bot.log_text()


async def test_a_second_bot_on_the_same_data_dir_refuses_to_start(world):
    """Finding 3: two processes would both resume, and so submit, every job."""
    await world.start_bot()
    second = world.new_bot()
    await second.start()
    code = await asyncio.wait_for(second.process.wait(), 20)
    assert code == 2
    lines = [line for line in second.log_text().splitlines() if "another Kontext bot is using" in line]
    assert len(lines) == 1
    message = await finished(await world.kontext())  # the first one keeps serving
    assert text(message).startswith("✅")


async def test_old_buttons_never_act_on_an_unrelated_job_after_the_database_is_lost(world):
    """Finding 4: job ids start again at 1 with a new database; a button carries its job's key."""
    await world.start_bot()
    old = await finished(await world.kontext(user="alice", prompt="alice: my cat"))
    await world.bot.stop()
    for name in ("kontext.sqlite3", "kontext.sqlite3-wal", "kontext.sqlite3-shm"):
        (world.data_dir / name).unlink(missing_ok=True)
    await world.start_bot()
    world.discord.add_member(name="bob")
    private = world.discord.add_channel("staff-private")["id"]
    await world.discord.dispatch("CHANNEL_CREATE", world.discord.channels[private])
    await finished(await world.kontext(user="bob", channel_id=private, prompt="bob: confidential mock-up"))
    click = await world.discord.click_button(old.id, button(old, "reroll"), user="mod")
    await click.wait_for_callback()
    assert "no longer knows" in private_answer(click)
    assert len(world.fal.submits) == 2  # nothing re-run


async def test_a_result_the_channel_refuses_ends_its_job_and_leaves_nothing_behind(world):
    """Finding 5: the token expired and the channel refuses posts for good (the bot lost its
    permission), and so does the member's DM the result then goes to: the job is closed, its
    files deleted, and a restart does not try again."""
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.3, run_time=0.2, image_size=40_000)
    world.discord.fail_next(
        "POST", CHANNEL_POST, 403, times=10_000, json={"message": "Missing Permissions", "code": 50013}
    )
    await world.start_bot(RESULT_MEMORY_BYTES="0")
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "In queue"))
    world.discord.expire_token(handle.token)
    await world.discord.wait_until(lambda: rows(world)[0]["delivered_at"] is not None, timeout=10)
    # a 403 is final: the channel asked once, then the DM once
    assert [r.path for r in world.discord.requests_to("POST", CHANNEL_POST)] == [
        f"/channels/{world.discord.channel_id}/messages",
        f"/channels/{world.discord.dm_channels[world.discord.alice['id']]}/messages",
    ]
    await world.discord.wait_until(lambda: not any((world.data_dir / "results").glob("*")), timeout=5)
    await world.bot.stop()
    assert "cannot be shown" in world.bot.log_text()
    await world.start_bot()
    await asyncio.sleep(1)
    assert len(world.discord.requests_to("POST", CHANNEL_POST)) == 2


async def test_a_reply_a_moderator_deleted_is_not_posted_again(world):
    """Finding 9: the job is withdrawn (cancelled at fal while queued) and only the member who
    asked is told, privately; nothing lands in the channel."""
    world.fal.default = JobScript(queue_positions=(3, 2, 1, 0), step=0.5, run_time=0.3)
    await world.start_bot()
    handle = await world.kontext(prompt="something the moderator removed")
    await handle.wait_until(lambda h: shows(h, "In queue"))
    world.discord._delete(handle.original)
    await handle.wait_until(lambda h: bool(h.followups), timeout=10)
    (note,) = handle.followups
    assert note.ephemeral and "reply to your edit was deleted" in text(note)
    assert fal_job(world).cancelled
    assert [m for m in world.discord.channel_messages() if m.interaction is None] == []


async def test_edit_with_kontext_checks_its_image_like_the_command_does(world):
    """Finding 10: the size limit and empty files, and no address an embed points at."""
    await world.start_bot(MAX_INPUT_BYTES="10000")
    big = world.discord.add_cdn_file(b"\x89PNG\r\n\x1a\n" + b"0" * 50_000, "big.png", "image/png", ephemeral=False)
    empty = world.discord.add_cdn_file(b"", "empty.png", "image/png", ephemeral=False)
    for attachment, expected in ((big, "the limit is"), (empty, "is empty")):
        post = world.discord.post_user_message("pic", user="mod", attachments=[attachment])
        menu = await world.discord.invoke_message_command("Edit with Kontext", post.id, user="alice")
        await menu.wait_for_callback()
        assert expected in private_answer(menu)
    linked = world.discord.post_user_message("look", user="mod")
    linked.embeds = [
        {"type": "image", "thumbnail": {"url": "http://10.0.0.1/x.png", "proxy_url": "http://10.0.0.1/x.png"}}
    ]
    menu = await world.discord.invoke_message_command("Edit with Kontext", linked.id, user="alice")
    await menu.wait_for_callback()
    assert "no image" in private_answer(menu)
    assert world.fal.submits == []


async def test_jobs_fal_rejects_for_their_input_do_not_use_up_the_budget(world):
    """Finding 8: fal does not charge for an input it rejects before any GPU time."""
    world.fal.default = model_error("image_load_error", "Could not read the image")
    await world.start_bot()
    await admin(world, "limits", monthly_images=8)
    for _ in range(2):
        message = await finished(await world.kontext(num_images=4))
        assert text(message).startswith("❌")
    world.fal.default = JobScript()
    message = await finished(await world.kontext(user="mod"))
    assert text(message).startswith("✅")


async def test_the_database_and_result_files_are_the_bots_alone_and_tokens_are_dropped(world):
    """Finding 13."""
    world.fal.default = JobScript(queue_positions=(0,), step=0.05, run_time=0.5, image_size=40_000)
    os.umask(0o022)  # what a shell usually gives
    await world.start_bot(RESULT_MEMORY_BYTES="0")
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "Generating"))
    # The first post fails (Cloudflare's 429, without Via, reaches the bot at once): files kept.
    world.discord.fail_next("PATCH", r"/webhooks/.*/messages/", status=429, headers={"Via": ""})
    await world.discord.wait_until(lambda: any((world.data_dir / "results").glob("job-*")), timeout=10)
    for path in (world.data_dir / "results").glob("job-*"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    await finished(handle)
    assert stat.S_IMODE(world.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((world.data_dir / "kontext.sqlite3").stat().st_mode) == 0o600
    await world.discord.wait_until(lambda: rows(world)[0]["delivered_at"] is not None)
    assert rows(world)[0]["interaction_token"] == ""


def run_bot_once(world) -> subprocess.CompletedProcess:
    bot = world.new_bot()
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "bot.py")],
        cwd=world.data_dir,
        env=bot.env,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_a_database_from_a_newer_version_stops_the_bot_with_one_line(world):
    """Finding 14: an older build after a rollback must not write rows without the newer columns."""
    await world.start_bot()
    await world.bot.stop()
    with sqlite3.connect(world.data_dir / "kontext.sqlite3") as db:
        db.execute("PRAGMA user_version = 99")
    done = await asyncio.to_thread(run_bot_once, world)
    assert done.returncode == 2
    assert "written by a newer version of the bot (schema 99" in done.stderr + done.stdout


async def test_one_unreadable_row_does_not_keep_the_bot_from_starting(world):
    """Finding 15."""
    world.fal.default = JobScript(queue_positions=(3, 2, 1, 0), step=1.0)
    await world.start_bot()
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "In queue"))
    await world.bot.kill()
    with sqlite3.connect(world.data_dir / "kontext.sqlite3") as db:
        db.execute("UPDATE jobs SET state = 'paused'")
    await world.start_bot()
    await world.discord.wait_until(lambda: rows(world)[0]["error_code"] == "unreadable", timeout=5)
    message = await finished(await world.kontext(user="mod"))
    assert text(message).startswith("✅")


async def test_progress_survives_a_connection_lost_on_an_edit(world):
    """Finding 17: a network error on one progress edit does not end the progress."""
    world.fal.default = JobScript(queue_positions=(3, 2, 1, 0), step=0.6, run_time=0.3)
    await world.start_bot()
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "In queue"))
    world.discord.fail_next("PATCH", r"/webhooks/.*/messages/", status="hang")
    await world.discord.wait_until(lambda: world.discord.hanging == 1, timeout=5)
    world.discord.release_hangs()  # the connection drops without an answer
    message = await finished(handle)
    assert text(message).startswith("✅")
    assert any("position **1**" in (s.get("content") or "") for s in message.history)


async def test_every_part_of_a_result_carries_buttons_and_delete_removes_them_all(world):
    """Finding 18: a result split over several messages (the upload limit) is one result."""
    world.fal.default = JobScript(image_size=40_000)
    await world.start_bot(RESULT_CARDS="0")  # the classic message, split to fit the upload limit
    handle = await world.discord.invoke_slash(
        "kontext",
        options={"image": world.input_image(), "prompt": "four", "num_images": 4},
        attachment_size_limit=100_000,
    )
    message = await finished(handle)
    await handle.wait_until(lambda h: len(h.followups) == 1)
    (part,) = handle.followups
    assert has_button(message, "delete") and has_button(part, "delete")
    click = await world.discord.click_button(part.id, button(part, "delete"), user="alice")
    await click.wait_for_callback()
    await world.discord.wait_until(lambda: message.deleted and part.deleted, timeout=5)


async def test_results_posted_in_the_channel_carry_buttons(world):
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.3, run_time=0.2)
    await world.start_bot()
    handle = await world.kontext()
    await handle.wait_until(lambda h: shows(h, "In queue"))
    world.discord.expire_token(handle.token)
    await world.discord.wait_until(
        lambda: any(m.interaction is None and m.files for m in world.discord.channel_messages()), timeout=10
    )
    (post,) = [m for m in world.discord.channel_messages() if m.interaction is None and m.files]
    assert has_button(post, "reroll") and has_button(post, "delete")
    again = await world.discord.click_button(post.id, button(post, "reroll"), user="alice")
    assert text(await finished(again)).startswith("✅")


async def test_servers_outside_the_allowlist_are_refused_and_left(world):
    """Finding 7: anyone can add a public bot, and the operator pays."""
    await world.start_bot(ALLOWED_GUILD_IDS="1234")
    await world.discord.wait_until(lambda: world.discord.bot_left_guild, timeout=10)
    handle = await world.kontext()
    await handle.wait_for_callback()
    assert "not enabled for this server" in private_answer(handle)
    assert world.fal.submits == []


async def test_a_job_larger_than_what_is_left_of_the_operators_budget_is_not_told_it_is_used_up(world):
    """Two images are left and four asked for: the member is told the job would pass the budget,
    not that it is used up until next month, when a smaller job starts at once."""
    await world.start_bot(MONTHLY_BUDGET_USD="0.32")  # four images at $0.08
    await finished(await world.kontext(num_images=2))
    handle = await world.kontext(num_images=4)
    await handle.wait_for_callback()
    refusal = private_answer(handle)
    assert refusal.startswith("The bot's monthly budget of $0.32 would be exceeded. It resets <t:"), refusal
    assert text(await finished(await world.kontext(num_images=2))).startswith("✅")


async def test_the_operators_monthly_budget_binds_every_server(world):
    await world.start_bot(MONTHLY_BUDGET_USD="0.16")  # two images at $0.08
    assert text(await finished(await world.kontext(num_images=2))).startswith("✅")
    handle = await world.kontext(user="mod")
    await handle.wait_for_callback()
    assert "The bot's monthly budget of $0.16 would be exceeded" in private_answer(handle)


async def test_a_server_added_while_a_shard_identifies_again_is_left_too(world):
    """With several shards, one shard whose session Discord invalidated IDENTIFYs again alone: a
    server outside ALLOWED_GUILD_IDS that added the bot meanwhile comes only in that shard's new
    READY (then its GUILD_CREATE, as "available"), not as a join, and discord.py dispatches no
    on_ready for one shard of several. It is left all the same."""
    fake = world.discord
    fake.shard_count = 2  # GET /gateway/bot recommends two shards
    fake.enforce_identify_limit = False  # discord.py's own 5 s pacing is not what this is about
    # After op 9 discord.py connects to DEFAULT_GATEWAY (wss://gateway.discord.gg): here instead.
    await world.start_bot(ALLOWED_GUILD_IDS=fake.guild_id, DISCORD_GATEWAY_URL=fake.gateway_url)
    await fake.wait_until(lambda: fake.identify_count == 2, timeout=20)
    other = 1 - fake.shard_for(fake.default_guild)
    await fake.invalidate_session(shard=other)
    await fake.wait_until(lambda: fake._route(None, shard=other) is None)
    stranger = fake.add_guild("Stranger", shard=(other, 2))  # no session for its shard: READY lists it
    await fake.wait_until(lambda: fake.identify_count == 3, timeout=20)
    await fake.wait_until(lambda: stranger.bot_left, timeout=10)
    assert not fake.default_guild.bot_left


async def test_servers_outside_the_allowlist_are_left_one_at_a_time(world):
    """Each server a READY lists comes as its own event: a bot in many servers outside
    ALLOWED_GUILD_IDS (a public bot given the list later) leaves them one request after the
    other, not all at once against Discord's global limit of 50 requests a second."""
    fake = world.discord
    strangers = [fake.add_guild(f"Stranger {n}") for n in range(3)]
    fake.fail_next("DELETE", r"^/users/@me/guilds/", status="slow", delay=0.3, times=len(strangers))
    await world.start_bot(ALLOWED_GUILD_IDS=fake.guild_id)
    await fake.wait_until(lambda: all(g.bot_left for g in strangers), timeout=10)
    arrivals = [r.time for r in fake.requests if r.method == "DELETE" and r.path.startswith("/users/@me/guilds/")]
    assert len(arrivals) == len(strangers)
    # each sent once Discord answered the one before (0.3 s after it arrived)
    assert all(later - earlier >= 0.3 for earlier, later in itertools.pairwise(arrivals)), arrivals
    assert not fake.default_guild.bot_left
