"""Moderators decide: /kontext-admin end to end, and the policy applied to /kontext."""

from __future__ import annotations

import asyncio

from fakes.discord_fake import EPHEMERAL, MOD_PERMISSIONS, SEND_MESSAGES
from fakes.fal_fake import JobScript, model_error
from tests.e2e import admin, details, finished, private_answer, text


async def refused(world, **options) -> str:
    handle = await world.kontext(**options)
    await handle.wait_for_callback()
    return private_answer(handle)


def policy_note(message) -> str:
    """The result card's policy line, if any."""
    return next((line for line in details(message).splitlines() if line.startswith("**Policy**")), "")


async def test_admin_commands_are_hidden_from_members_by_default(world):
    await world.start_bot()
    command = world.discord.commands["kontext-admin"]
    assert command["default_member_permissions"] in (32, "32")  # Manage Server
    assert command["contexts"] == [0]  # servers only


async def test_maximum_clamps_a_members_request_and_says_so(world):
    await world.start_bot()
    confirmation = await admin(world, "safety", maximum=3)
    assert "Maximum safety tolerance" in confirmation and "2 → 3" in confirmation
    message = await finished(await world.kontext(safety_tolerance=6))
    assert world.fal.submits[-1]["safety_tolerance"] == "3"
    assert "limited to 3" in policy_note(message)


async def test_requests_within_the_maximum_are_untouched(world):
    await world.start_bot()
    message = await finished(await world.kontext(safety_tolerance=1))
    assert world.fal.submits[-1]["safety_tolerance"] == "1"
    assert policy_note(message) == ""


async def test_default_applies_when_the_member_sets_none(world):
    await world.start_bot()
    await admin(world, "safety", default=1)
    await finished(await world.kontext())
    assert world.fal.submits[-1]["safety_tolerance"] == "1"


async def test_nsfw_maximum_applies_only_in_age_restricted_channels(world):
    await world.start_bot()
    await admin(world, "safety", maximum=2, nsfw_maximum=5)
    await finished(await world.kontext(safety_tolerance=6, channel_id=world.discord.nsfw_channel_id))
    assert world.fal.submits[-1]["safety_tolerance"] == "5"
    await finished(await world.kontext(safety_tolerance=6))
    assert world.fal.submits[-1]["safety_tolerance"] == "2"


async def test_members_without_manage_server_cannot_change_policy(world):
    await world.start_bot()
    answer = await admin(world, "safety", user="alice", maximum=6)
    assert "Manage Server" in answer
    await finished(await world.kontext(safety_tolerance=6))
    assert world.fal.submits[-1]["safety_tolerance"] == "2"


async def test_invalid_combinations_are_not_saved(world):
    await world.start_bot()
    answer = await admin(world, "safety", default=5, maximum=3)
    assert answer.startswith("Not saved")
    assert "Default safety tolerance**: 2" in await admin(world, "show")


async def test_cooldown_refuses_with_when_and_submits_nothing(world):
    await world.start_bot()
    await admin(world, "limits", cooldown_seconds=600)
    await finished(await world.kontext())
    answer = await refused(world)
    assert "Slow down" in answer and "<t:" in answer
    assert len(world.fal.submits) == 1


async def test_a_job_whose_acknowledgement_failed_does_not_start_the_cooldown(world):
    """Discord never took the acknowledgement: the bot closed the job unseen and told the member
    something went wrong and to try again. Trying again is not refused as too soon."""
    fake = world.discord
    await world.start_bot()
    await admin(world, "limits", cooldown_seconds=600)
    fake.fail_next("POST", r"/interactions/\d+/[^/]+/callback$", status="hang")
    lost = await world.kontext()
    await fake.wait_until(lambda: fake.hanging == 1)
    fake.release_hangs()
    await fake.wait_until(lambda: "abandoned before it started" in world.bot.log_text())
    await lost.wait_for_callback()
    assert "please try again" in private_answer(lost)
    assert text(await finished(await world.kontext())) == "✅ Done."
    assert "Slow down" in await refused(world)  # the job the member saw paces the next one


async def test_daily_limit_and_member_concurrency(world):
    world.fal.default = JobScript(queue_positions=(0,), step=2.0)
    await world.start_bot()
    await admin(world, "limits", member_concurrent=1)
    first = await world.kontext()
    await first.wait_for_callback()
    assert "already have 1 edit" in await refused(world)
    await finished(first)
    await admin(world, "limits", daily_jobs=1)
    assert "for today" in await refused(world)
    assert len(world.fal.submits) == 1


async def test_a_member_refused_for_running_jobs_is_told_how_many_run_not_the_new_limit(world):
    """A moderator lowered the limit while the member's jobs ran: the refusal counts the jobs
    running, not the limit they now exceed (the jobs wait 5 s in fal's line: still running then)."""
    world.fal.default = JobScript(queue_positions=(0,), step=5.0)
    await world.start_bot()
    await admin(world, "limits", member_concurrent=2)
    running = [await world.kontext(), await world.kontext()]
    for handle in running:
        await handle.wait_for_callback()
    await admin(world, "limits", member_concurrent=1)
    assert "You already have 2 edits running" in await refused(world)
    for handle in running:
        assert text(await finished(handle)) == "✅ Done."


async def test_jobs_fal_did_not_run_or_bill_use_up_neither_the_day_nor_the_budget(world):
    """One refused by fal at its result (validation errors come from the result, not the
    submit), one refused at its submit for the account's lock: the member's one job of the day
    and the server's four images are still there for the next job."""
    await world.start_bot(FAL_LOCK_RETRY_SECONDS="0.2")
    await admin(world, "limits", daily_jobs=1, monthly_images=4)
    world.fal.script_next(model_error("image_load_error"))
    assert "refused this edit" in text(await finished(await world.kontext(num_images=4)))
    world.fal.lock_account("Exhausted balance")
    assert "out of credit" in text(await finished(await world.kontext(num_images=4)))
    world.fal.unlock_account()
    assert "0 images, about $0.00 · 0 jobs running now" in await admin(world, "show")
    await asyncio.sleep(0.2)  # the bot lets a job through to fal again
    assert text(await finished(await world.kontext(num_images=4))) == "✅ Done."


async def test_monthly_budget_counts_the_images_asked_for(world):
    await world.start_bot()
    await admin(world, "limits", monthly_images=3)
    await finished(await world.kontext(num_images=2))
    assert "budget of 3 images would be exceeded" in await refused(world, num_images=2)
    await finished(await world.kontext(num_images=1))
    assert "3 images, about $0.24" in await admin(world, "show")


async def test_usd_budget(world):
    await world.start_bot()
    await admin(world, "limits", monthly_usd=0.10)
    await finished(await world.kontext())
    assert "$0.10" in await refused(world)


async def test_access_by_channel_and_role(world):
    await world.start_bot()
    await admin(world, "access channel-add", channel=world.discord.nsfw_channel_id)
    answer = await refused(world)
    assert "isn't enabled in this channel" in answer and f"<#{world.discord.nsfw_channel_id}>" in answer
    await finished(await world.kontext(channel_id=world.discord.nsfw_channel_id))
    await admin(world, "access all-channels")
    artists = world.discord.add_role("artists")
    await world.discord.dispatch("GUILD_ROLE_CREATE", {"guild_id": world.discord.guild_id, "role": artists})
    world.discord.add_member(name="carol", roles=[artists])
    await admin(world, "access role", role=artists)
    assert f"You need the <@&{artists['id']}> role" in await refused(world)
    await finished(await world.kontext(user="carol"))
    assert len(world.fal.submits) == 2


async def test_a_maximum_above_the_nsfw_maximum_is_pointed_out(world):
    """Age-restricted channels have a maximum of their own (4 by default), which replaces the
    ordinary one: raising the ordinary one past it leaves them the stricter, which is allowed
    but rarely what a moderator means, so the confirmation says so."""
    await world.start_bot()
    answer = await admin(world, "safety", maximum=5)
    assert answer.endswith(
        "⚠️ Age-restricted channels keep their own maximum, 4, stricter than the one for other channels: "
        "set `nsfw_maximum` too to allow more there."
    ), answer
    assert "⚠️" not in await admin(world, "safety", nsfw_maximum=5)


async def test_the_last_allowed_channel_is_not_removed_into_every_channel(world):
    """With no channel listed, /kontext is allowed in every channel: removing the only one
    listed would open the bot everywhere (age-restricted channels too), the opposite of what the
    moderator asked. It is refused, saying how to do either."""
    await world.start_bot()
    await admin(world, "access channel-add", channel=world.discord.nsfw_channel_id)
    answer = await admin(world, "access channel-remove", channel=world.discord.nsfw_channel_id)
    assert "is the only channel /kontext is allowed in" in answer and "access all-channels" in answer, answer
    assert "isn't enabled in this channel" in await refused(world)
    assert f"**Allowed channels**: <#{world.discord.nsfw_channel_id}>" in await admin(world, "show")


async def test_two_moderators_changing_the_policy_at_once_keep_both_changes(world):
    """Each change is made to the policy as the one before left it, not as both read it."""
    fake = world.discord
    fake.add_member(name="mod2", permissions=MOD_PERMISSIONS)
    channels = [fake.add_channel(f"art-{i}")["id"] for i in range(4)]
    await world.start_bot()
    pressed = [
        await fake.invoke_slash("kontext-admin access channel-add", options={"channel": channel}, user=user)
        for channel, user in zip(channels, ["mod", "mod2"] * 2, strict=True)
    ]
    await asyncio.gather(*(handle.wait_for_callback() for handle in pressed))
    shown = await admin(world, "show")
    assert all(f"<#{channel}>" in shown for channel in channels), shown


async def test_a_server_with_many_allowed_channels_can_still_be_moderated(world):
    channels = [world.discord.add_channel(f"art-{i}")["id"] for i in range(50)]
    await world.start_bot()
    answers = [await admin(world, "access channel-add", channel=c) for c in channels]
    failed = [i + 1 for i, a in enumerate(answers) if "Allowed channels" not in a]
    shown = await admin(world, "show")
    assert failed == [] and "Allowed channels" in shown, (failed, shown)


async def test_a_channel_change_says_which_channel_and_long_lists_are_cut(world):
    channels = [world.discord.add_channel(f"art-{i}")["id"] for i in range(12)]
    await world.start_bot()
    for channel in channels[:-1]:
        await admin(world, "access channel-add", channel=channel)
    added = await admin(world, "access channel-add", channel=channels[-1])
    assert added == f"**Allowed channels**: added <#{channels[-1]}> (12 channels now)"
    removed = await admin(world, "access channel-remove", channel=channels[0])
    assert removed == f"**Allowed channels**: removed <#{channels[0]}> (11 channels now)"
    assert "<#" + channels[10] + "> and 1 more" in await admin(world, "show")
    assert "and 1 more." in await refused(world)
    everywhere = await admin(world, "access all-channels")
    assert everywhere.endswith(f"<#{channels[10]}> and 1 more → every channel")


async def test_reset_restores_the_default(world):
    await world.start_bot()
    await admin(world, "limits", cooldown_seconds=600)
    answer = await admin(world, "reset", setting="cooldown_seconds")
    assert "600 s → none" in answer
    await finished(await world.kontext())
    await finished(await world.kontext())


async def test_policy_survives_a_restart(world):
    await world.start_bot()
    await admin(world, "safety", maximum=4)
    await admin(world, "limits", daily_jobs=5)
    assert await world.bot.stop() == 0
    await world.start_bot()
    shown = await admin(world, "show")
    assert "Maximum safety tolerance**: 4" in shown and "Daily jobs per member**: 5" in shown
    await finished(await world.kontext(safety_tolerance=6))
    assert world.fal.submits[-1]["safety_tolerance"] == "4"


async def test_changes_and_jobs_are_posted_in_the_log_channel(world):
    await world.start_bot()
    channel = world.discord.add_channel("kontext-log")
    await world.discord.dispatch("CHANNEL_CREATE", channel)
    log_channel = channel["id"]
    await admin(world, "log-channel", channel=log_channel)
    await admin(world, "safety", maximum=3)
    message = await finished(await world.kontext(prompt="a hat @everyone", safety_tolerance=5))
    await world.discord.wait_until(lambda: len(world.discord.channel_messages(log_channel)) >= 3)
    change, job_line = [text(m) for m in world.discord.channel_messages(log_channel)][-2:]
    assert "Maximum safety tolerance" in change
    # the prompt as plain text: a mention in it is shown, defused (a zero-width space after the @)
    assert "a hat @\u200beveryone" in job_line and "tolerance 3" in job_line and message.id in job_line
    assert all(m.allowed_mentions == {"parse": []} for m in world.discord.channel_messages(log_channel))
    assert not any(m.flags & EPHEMERAL for m in world.discord.channel_messages(log_channel))


async def test_moving_or_turning_off_the_log_channel_is_noted_in_the_old_one(world):
    """The moderators reading the log see where it went: a log moved to a channel only one of
    them sees, or turned off, before other changes, would leave them none the wiser."""
    fake = world.discord
    first, second = fake.add_channel("kontext-log"), fake.add_channel("mods-only")
    await world.start_bot()
    await admin(world, "log-channel", channel=first["id"])
    await admin(world, "log-channel", channel=second["id"])
    await fake.wait_until(lambda: f"<#{second['id']}>" in text(fake.channel_messages(first["id"])[-1]))
    assert f"<#{first['id']}> → <#{second['id']}>" in text(fake.channel_messages(second["id"])[-1])
    await admin(world, "reset", setting="log_channel_id")
    await fake.wait_until(lambda: "→ not set" in text(fake.channel_messages(second["id"])[-1]))
    assert len(fake.channel_messages(first["id"])) == 2


async def test_a_log_channel_that_does_not_answer_does_not_hold_the_job_open(world):
    """The log line is the moderators' side note: the job is done once its member has the
    result, however long the log channel takes (here: the post is lost in flight)."""
    await world.start_bot()
    channel = world.discord.add_channel("kontext-log")
    await world.discord.dispatch("CHANNEL_CREATE", channel)
    await admin(world, "log-channel", channel=channel["id"])
    world.discord.fail_next("POST", rf"^/channels/{channel['id']}/messages$", status="hang")
    message = await finished(await world.kontext())
    assert text(message).startswith("✅")
    await world.discord.wait_until(lambda: "delivered (succeeded)" in world.bot.log_text(), timeout=5)
    world.discord.release_hangs()  # the post fails: a warning, nothing more
    await world.discord.wait_until(lambda: "could not post to log channel" in world.bot.log_text(), timeout=5)
    await finished(await world.kontext(prompt="and the next one"))


async def test_a_forum_can_be_allowed_and_its_posts_follow_it(world):
    """Forum posts are threads whose parent is the forum: allowing the forum allows them, as a
    text channel's threads follow it."""
    fake = world.discord
    forum = fake.add_channel("art-forum", type=15)
    post = fake.add_thread(forum["id"], "my cat, but a wizard")
    await world.start_bot()
    added = await admin(world, "access channel-add", channel=forum["id"])
    assert added == f"**Allowed channels**: every channel → <#{forum['id']}>"
    message = await finished(await world.kontext(channel_id=post["id"]))
    assert text(message).startswith("✅")
    assert "isn't enabled in this channel" in await refused(world)
    assert f"<#{forum['id']}>" in await admin(world, "show")
    await admin(world, "access all-channels")
    assert "every channel" in await admin(world, "show")


async def test_a_log_channel_the_bot_may_not_post_in_is_refused(world):
    """The log is best-effort (a failed post is only a warning in the bot's log), so a channel the
    bot's role may not post in would take every line in silence: the moderator is told instead."""
    fake = world.discord
    channel = fake.add_channel("kontext-log")
    fake.set_permission_overwrite(channel["id"], fake.default_guild.bot_role_id, deny=SEND_MESSAGES)
    await world.start_bot()
    answer = await admin(world, "log-channel", channel=channel["id"])
    assert answer.startswith(f"The bot may not post in <#{channel['id']}>"), answer
    assert "**Log channel**: not set" in await admin(world, "show")


async def test_a_limit_set_to_0_is_told_as_a_pause(world):
    """Moderators may set a limit of jobs to 0 and so turn /kontext off: members read that, not
    that they have jobs running (they have none) or used up a day they never started."""
    await world.start_bot()
    await admin(world, "limits", member_concurrent=0)
    answer = await refused(world)
    assert answer == "`/kontext` is paused in this server: its moderators set “Concurrent jobs per member” to 0."
    me = await world.discord.invoke_slash("kontext-me")
    await me.wait_for_callback()
    assert me.callback["data"]["embeds"][0]["description"] == answer  # /kontext-me says it as /kontext does
    await admin(world, "reset", setting="concurrent_jobs_per_member")
    await admin(world, "limits", daily_jobs=0)
    assert "moderators set “Daily jobs per member” to 0" in await refused(world)
    assert world.fal.submits == []


async def test_a_pause_is_told_before_a_limit_that_waiting_frees(world):
    """A member in their cooldown when moderators set daily jobs to 0 is told of the pause, not
    to come back when the cooldown ends (only to be told of the pause then)."""
    await world.start_bot()
    await admin(world, "limits", cooldown_seconds=600)
    await finished(await world.kontext())
    await admin(world, "limits", daily_jobs=0)
    answer = await refused(world)
    assert answer == "`/kontext` is paused in this server: its moderators set “Daily jobs per member” to 0.", answer
    assert len(world.fal.submits) == 1


async def test_kontext_me_does_not_promise_a_paused_limit_frees_up(world):
    """/kontext-me's line for a limit set to 0 says it is paused, not that it frees up when a job
    finishes or resets at midnight: neither lets a job start."""
    await world.start_bot()
    await admin(world, "limits", member_concurrent=0, daily_jobs=0)
    me = await world.discord.invoke_slash("kontext-me")
    await me.wait_for_callback()
    fields = {field["name"]: field["value"] for field in me.callback["data"]["embeds"][0]["fields"]}
    assert fields["⛔ Your jobs running"] == "0 of 0 · paused by the moderators", fields
    assert fields["⛔ Your jobs today"] == "0 of 0 · paused by the moderators", fields
