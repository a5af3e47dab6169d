"""/kontext-settings end to end: a member's defaults fill what /kontext leaves out (and say so),
explicit options win, the server's policy still caps them, and private-first results are shared
to the channel with a button that survives a restart."""

from __future__ import annotations

import asyncio

from fakes.discord_fake import EPHEMERAL, IS_COMPONENTS_V2, SEND_MESSAGES, VIEW_CHANNEL
from fakes.fal_fake import JobScript
from services.member_defaults import DEFAULTABLE
from tests.e2e import admin, button, details, finished, has_button, private_answer, shows, text
from tests.test_everywhere_e2e import dm_messages
from tests.test_resilience_e2e import restart


async def settings(world, user: str = "alice", **options) -> dict:
    """The private answer to /kontext-settings: its embed's fields by name, and its texts."""
    handle = await world.discord.invoke_slash("kontext-settings", options=options, user=user)
    callback = await handle.wait_for_callback()
    assert callback["type"] == 4 and callback["data"]["flags"] & EPHEMERAL, callback
    (embed,) = callback["data"]["embeds"]
    shown = {f["name"]: f["value"] for f in embed["fields"]}
    shown["_heading"] = embed["description"]
    shown["_footer"] = embed["footer"]["text"]
    return shown


def options_line(message) -> str:
    return next(line for line in details(message).splitlines() if line.startswith("**Options**"))


async def test_without_options_it_shows_that_nothing_is_set(world):
    await world.start_bot()
    shown = await settings(world)
    assert shown["_heading"] == "Your defaults for /kontext, wherever you use the bot:"
    assert shown["Aspect ratio"] == "not set" and shown["Results"] == "posted in the channel"


async def test_defaults_fill_what_the_command_leaves_out_and_the_reply_says_so(world):
    await world.start_bot()
    saved = await settings(world, aspect_ratio="16:9", num_images=2, output_format="png")
    assert saved["_heading"].startswith("Saved.")
    assert (saved["Aspect ratio"], saved["Images"], saved["Format"]) == ("16:9", "2", "PNG")
    message = await finished(await world.kontext(image=None, prompt="a fox", num_images=1))
    submit = world.fal.submits[-1]
    assert (submit["aspect_ratio"], submit["num_images"], submit["output_format"]) == ("16:9", 1, "png")
    line = options_line(message)
    assert "Aspect ratio 16:9 (your default)" in line and "Format png (your default)" in line
    assert "Images 1 ·" in line or line.endswith("Images 1")  # given explicitly: no mark
    assert "Images 1 (your default)" not in line
    # Another member's jobs are untouched by alice's defaults.
    world.discord.add_member(name="bob")
    await finished(await world.kontext(user="bob", image=None, prompt="a fox"))
    assert "aspect_ratio" not in world.fal.submits[-1]


async def test_a_default_above_the_servers_maximum_is_lowered_and_said(world):
    await world.start_bot()
    saved = await settings(world, safety_tolerance=5)
    assert "Here the safety tolerance is at most 2: your jobs here use 2." in saved["_footer"]
    message = await finished(await world.kontext())
    assert world.fal.submits[-1]["safety_tolerance"] == "2"
    assert "Safety tolerance limited to 2 by this server's policy." in details(message)


async def test_reset_forgets_one_default_or_all(world):
    await world.start_bot()
    await settings(world, aspect_ratio="4:3", enhance_prompt=True, results="private_first")
    after = await settings(world, reset="aspect_ratio")
    assert after["Aspect ratio"] == "not set" and after["Enhanced prompt"] == "on"
    cleared = await settings(world, reset="everything")
    assert cleared["Enhanced prompt"] == "not set" and cleared["Results"] == "posted in the channel"
    await finished(await world.kontext())
    assert "enhance_prompt" not in world.fal.submits[-1]


async def test_every_reset_the_command_offers_is_one_it_can_do(world):
    await world.start_bot()
    (reset,) = [o for o in world.discord.commands["kontext-settings"]["options"] if o["name"] == "reset"]
    offered = {choice["value"]: choice["name"] for choice in reset["choices"]}
    for value, name in offered.items():
        handle = await world.discord.invoke_slash("kontext-settings", options={"reset": value}, user="alice")
        callback = await handle.wait_for_callback()
        assert callback["data"].get("embeds"), (name, callback["data"].get("content"))
    # Each default the member can set, their choice of where results go, and all of them.
    assert list(offered) == [*DEFAULTABLE, "private_first", "everything"]


async def test_private_first_results_are_shared_to_the_channel_after_a_restart(world):
    await world.start_bot()
    await settings(world, results="private_first")
    handle = await world.kontext(image=None, prompt="a secret garden")
    assert (await handle.wait_for_callback())["data"]["flags"] & EPHEMERAL  # thinking, privately
    private = await finished(handle)
    assert private.ephemeral and text(private).startswith("✅")
    assert "Only you can see this until you share it" in details(private)
    assert [m for m in world.discord.channel_messages() if not m.ephemeral] == []
    await restart(world)  # the button still works: it is bound to the job, not to the process
    world.discord.add_member(name="bob")
    stranger = await world.discord.click_button(private.id, button(private, "share"), user="bob")
    await stranger.wait_for_callback()
    assert "Only the member who asked" in private_answer(stranger)
    share = await world.discord.click_button(private.id, button(private, "share"), user="alice")
    shared = await finished(share)
    assert not shared.ephemeral and shared.flags & IS_COMPONENTS_V2
    assert sorted(shared.files) == sorted(private.files)
    assert list(shared.files.values()) == list(private.files.values())  # the same bytes
    assert not has_button(shared, "share") and "Only you can see this" not in details(shared)
    for action in ("reroll", "edit", "delete"):
        button(shared, action)
    again = await world.discord.click_button(private.id, button(private, "share"), user="alice")
    await again.wait_for_callback()
    assert "Already shared" in private_answer(again)
    # The shared card's buttons act on the job: Delete removes it from the channel.
    delete = await world.discord.click_button(shared.id, button(shared, "delete"), user="alice")
    await delete.wait_for_callback()
    await world.discord.wait_until(lambda: shared.deleted)


async def test_a_member_muted_in_the_channel_cannot_share_a_private_result_there(world):
    """Moderators take Send Messages from alice in the channel after her private-first result
    came: Share, still pressable on it, would have the bot post it there for her. Refused
    privately, as Re-roll and Edit are (test_iterate_e2e); nothing is posted."""
    fake = world.discord
    await world.start_bot()
    await settings(world, results="private_first")
    private = await finished(await world.kontext(image=None, prompt="a secret garden"))
    fake.set_permission_overwrite(fake.channel_id, fake.alice, deny=SEND_MESSAGES)
    share = await fake.click_button(private.id, button(private, "share"), user="alice")
    await share.wait_for_callback()
    assert "can't post or use app commands in this channel" in private_answer(share)
    assert [m for m in fake.channel_messages() if not m.ephemeral and m.flags & IS_COMPONENTS_V2] == []


async def test_a_double_click_on_share_posts_the_result_once(world):
    await world.start_bot()
    await settings(world, results="private_first")
    private = await finished(await world.kontext(image=None, prompt="a secret garden"))
    share = button(private, "share")
    clicks = await asyncio.gather(*(world.discord.click_button(private.id, share, user="alice") for _ in range(2)))
    for click in clicks:
        await click.wait_for_callback()
    shared, pending = sorted(clicks, key=lambda click: click.callback["type"] == 4)
    assert "already being shared" in private_answer(pending)
    await finished(shared)

    def cards():
        return [m for m in world.discord.channel_messages() if not m.ephemeral and m.flags & IS_COMPONENTS_V2]

    await world.discord.wait_until(lambda: len(cards()) == 1)
    again = await world.discord.click_button(private.id, share, user="alice")
    await again.wait_for_callback()
    assert "Already shared" in private_answer(again) and len(cards()) == 1


async def test_share_of_a_classic_result_keeps_its_flagged_image_behind_a_spoiler(world):
    world.fal.default = JobScript(nsfw=(True, False))
    await world.start_bot(RESULT_CARDS="0")
    await settings(world, results="private_first")
    adult = world.discord.nsfw_channel_id
    private = await finished(await world.kontext(channel_id=adult, num_images=2))
    assert sorted(private.files) == ["SPOILER_kontext-1-1.jpg", "kontext-1-2.jpg"]
    share = await world.discord.click_button(private.id, button(private, "share"), user="alice")
    await finished(share)
    (shared,) = [m for m in world.discord.channel_messages(adult) if not m.ephemeral]
    assert sorted(shared.files) == sorted(private.files)


async def private_result_in_two_messages(world):
    """Four images over the channel's upload limit, seen privately first: the reply and a followup."""
    world.fal.default = JobScript(image_size=40_000)
    await world.start_bot(RESULT_CARDS="0")
    await settings(world, results="private_first")
    handle = await world.discord.invoke_slash(
        "kontext",
        options={"image": world.input_image(), "prompt": "four", "num_images": 4},
        attachment_size_limit=100_000,
    )
    reply = await finished(handle)
    await handle.wait_until(lambda h: len(h.followups) == 1)
    (part,) = handle.followups
    return reply, part


async def test_a_private_first_result_in_several_messages_stays_private_in_all(world):
    """Four images over the channel's upload limit go in two messages; each followup is private
    in its own right, like the reply."""
    reply, part = await private_result_in_two_messages(world)
    assert reply.ephemeral and part.ephemeral
    assert len(reply.files) + len(part.files) == 4
    assert not [m for m in world.discord.channel_messages() if not m.ephemeral and m.files]


async def test_a_private_first_result_in_several_messages_is_shared_a_part_at_a_time(world):
    """Each part has its Share: the first share used to count for the whole result, the other
    part's Share then answering "Already shared" with half of the images never in the channel."""
    reply, part = await private_result_in_two_messages(world)
    public = lambda: [m for m in world.discord.channel_messages() if not m.ephemeral and m.files]  # noqa: E731
    for count, message in enumerate((reply, part), start=1):
        share = await world.discord.click_button(message.id, button(message, "share"), user="alice")
        await share.wait_for_callback()
        await world.discord.wait_until(lambda n=count: len(public()) == n)
    assert sorted(name for m in public() for name in m.files) == sorted([*reply.files, *part.files])
    again = await world.discord.click_button(part.id, button(part, "share"), user="alice")
    await again.wait_for_callback()
    assert private_answer(again).startswith("Already shared: https://discord.com/channels/")
    assert len(public()) == 2


async def test_a_share_that_fails_tells_its_member_privately(world):
    """Share answers "thinking…" in the channel; when the share then fails, that placeholder goes
    and the member alone reads why (a followup would have replaced it, in public)."""
    await world.start_bot()
    await settings(world, results="private_first")
    private = await finished(await world.kontext(image=None, prompt="a secret garden"))
    world.discord.fail_next("PATCH", r"/webhooks/.*/messages/@original", status=400)
    share = await world.discord.click_button(private.id, button(private, "share"), user="alice")
    await share.wait_for_callback()
    await share.wait_until(lambda h: any(m.content for m in h.followups))
    (told,) = share.followups
    assert told.ephemeral and "Something went wrong" in told.content
    assert share.original is None or share.original.deleted
    assert not [m for m in world.discord.channel_messages() if not m.ephemeral]


async def test_share_applies_the_channels_policy_as_it_is_now(world):
    await world.start_bot()
    await settings(world, results="private_first")
    adult = world.discord.nsfw_channel_id
    private = await finished(await world.kontext(channel_id=adult, safety_tolerance=4))
    assert world.fal.submits[-1]["safety_tolerance"] == "4"
    await admin(world, "safety", nsfw_maximum=3)  # the moderators lower the maximum afterwards
    refused = await world.discord.click_button(private.id, button(private, "share"), user="alice")
    await refused.wait_for_callback()
    assert "made at a higher safety tolerance than this channel allows (at most 3)" in private_answer(refused)
    assert [m for m in world.discord.channel_messages(adult) if not m.ephemeral] == []
    await admin(world, "safety", nsfw_maximum=4)
    shared = await finished(await world.discord.click_button(private.id, button(private, "share"), user="alice"))
    assert not shared.ephemeral and shared.channel_id == adult


async def private_result_by_dm(world, **options):
    """A private first result that outlived its reply's token: the card the bot sent by DM."""
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.3, run_time=0.2)
    await world.start_bot()
    await settings(world, results="private_first")
    handle = await world.kontext(**options)
    await handle.wait_until(lambda h: shows(h, "In queue"))
    world.discord.expire_token(handle.token)
    await world.discord.wait_until(lambda: dm_messages(world), timeout=15)
    (card,) = dm_messages(world)
    return card


async def test_a_servers_result_in_the_dm_is_re_rolled_and_edited_only_in_the_server(world):
    """Pressed in the DM, Re-roll, Edit or Try again would start a job under the rules for
    personal use (off by default: "works only in servers"), not the server's: the DM copy of a
    server's job carries none, and such a button on an older copy says where to press it."""
    card = await private_result_by_dm(world)
    assert has_button(card, "share") and has_button(card, "delete")
    assert not has_button(card, "reroll") and not has_button(card, "edit"), card.components
    job_id, key = button(card, "share").split(":")[2:]
    reroll = f"kontext:reroll:{job_id}:{key}"
    world.discord.messages[card.id].components.append(
        {"type": 1, "components": [{"type": 2, "style": 1, "label": "Re-roll", "custom_id": reroll}]}
    )
    pressed = await world.discord.click_button(card.id, reroll, user="alice")
    await pressed.wait_for_callback()
    assert private_answer(pressed) == (
        f"This edit was made in a server and follows its rules: re-roll or edit it there, <#{world.discord.channel_id}>."
    )
    assert world.fal.count("submit") == 1


async def test_share_from_the_dm_applies_the_policy_of_the_channel_it_posts_in(world):
    adult = world.discord.nsfw_channel_id
    card = await private_result_by_dm(world, channel_id=adult, safety_tolerance=4)
    await admin(world, "safety", nsfw_maximum=3)
    refused = await world.discord.click_button(card.id, button(card, "share"), user="alice")
    await refused.wait_for_callback()
    assert "made at a higher safety tolerance than this channel allows (at most 3)" in private_answer(refused)
    await admin(world, "safety", nsfw_maximum=4)
    del world.discord.get_guild(None).members[world.discord.alice["id"]]  # alice left the server
    gone = await world.discord.click_button(card.id, button(card, "share"), user="alice")
    await gone.wait_for_callback()
    assert "no longer in the server of this result" in private_answer(gone)
    assert [m for m in world.discord.channel_messages(adult) if not m.ephemeral] == []


async def test_an_explicit_image_edit_uses_the_defaults_too_and_the_policy_still_counts(world):
    await world.start_bot()
    await admin(world, "limits", daily_jobs=1)
    await settings(world, num_images=3)
    await finished(await world.kontext())
    assert world.fal.submits[-1]["num_images"] == 3 and "image_url" in world.fal.submits[-1]
    refused = await world.kontext()
    await refused.wait_for_callback()
    assert "for today" in private_answer(refused)


async def test_a_private_result_outliving_its_reply_comes_by_dm_and_is_shared_from_there(world):
    card = await private_result_by_dm(world)
    assert [m for m in world.discord.channel_messages() if not m.ephemeral] == []  # never the channel
    share = await world.discord.click_button(card.id, button(card, "share"), user="alice")
    await share.wait_for_callback()
    await world.discord.wait_until(lambda: [m for m in world.discord.channel_messages() if m.flags & IS_COMPONENTS_V2])
    (shared,) = [m for m in world.discord.channel_messages() if m.flags & IS_COMPONENTS_V2]
    assert not shared.ephemeral and list(shared.files.values()) == list(card.files.values())
    await share.wait_until(
        lambda h: h.original is not None and "Shared: https://discord.com/channels/" in h.original.content
    )
    button(shared, "reroll")


async def test_a_late_private_result_over_the_dm_upload_limit_is_linked(world):
    """The interaction may upload 50 MiB (a member's Nitro, a boosted server), the bot's own DM
    10 MiB: an 11 MiB image is linked in the DM, not refused with a 413 and lost."""
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.3, run_time=0.2, image_size=11 * 1024 * 1024)
    await world.start_bot()
    await settings(world, results="private_first")
    handle = await world.discord.invoke_slash(
        "kontext", options={"image": world.input_image(), "prompt": "a big one"}, attachment_size_limit=50 << 20
    )
    await handle.wait_until(lambda h: shows(h, "In queue"))
    world.discord.expire_token(handle.token)
    await world.discord.wait_until(lambda: dm_messages(world), timeout=30)
    (card,) = dm_messages(world)
    assert card.files == {} and "📦 Too large to send in a DM: [image 1](" in text(card), text(card)


async def test_the_member_commands_are_offered_wherever_kontext_is(world):
    await world.start_bot(PERSONAL_USE="1", MONTHLY_BUDGET_USD="10")
    synced = world.discord.commands
    for name in ("kontext-me", "kontext-settings"):
        assert sorted(synced[name]["integration_types"]) == sorted(synced["kontext"]["integration_types"]) == [0, 1]
        assert sorted(synced[name]["contexts"]) == sorted(synced["kontext"]["contexts"]) == [0, 1, 2]
    handle = await world.discord.invoke_slash("kontext-settings", options={"num_images": 2}, guild=False)
    assert (await handle.wait_for_callback())["data"]["flags"] & EPHEMERAL  # in the DM with the bot too
    await finished(await world.discord.invoke_slash("kontext", options={"prompt": "a kite"}, guild=False))
    assert world.fal.submits[-1]["num_images"] == 2


async def test_share_from_the_dm_to_a_channel_the_bot_may_not_post_in_says_so(world):
    """The bot's role may not send messages in the result's channel: Share from the DM the
    result came in tells the member why, instead of an error "on the bot's side", and asks
    Discord nothing it would refuse (403s count towards its invalid-request limit)."""
    card = await private_result_by_dm(world)
    fake = world.discord
    fake.set_permission_overwrite(fake.channel_id, fake.default_guild.bot_role_id, deny=SEND_MESSAGES)
    await asyncio.sleep(0.2)  # the bot gets CHANNEL_UPDATE
    share = await fake.click_button(card.id, button(card, "share"), user="alice")
    await share.wait_for_callback()
    assert f"The bot may not post images in <#{fake.channel_id}>" in private_answer(share)
    assert [m for m in fake.channel_messages() if not m.ephemeral] == []
    assert not any(status == 403 for status, *_ in fake.rejections), fake.rejections
    assert "unexpected error" not in world.bot.log_text()


async def test_share_withholds_flagged_images_from_a_channel_no_longer_age_restricted(world):
    """A flagged image a private result showed behind a spoiler in an age-restricted channel is
    withheld when it is shared after the channel lost that setting, as Show here withholds it."""
    world.fal.default = JobScript(nsfw=(True, False))
    await world.start_bot()
    await settings(world, results="private_first")
    adult = world.discord.nsfw_channel_id
    private = await finished(await world.kontext(channel_id=adult, num_images=2))
    assert sorted(private.files) == ["kontext-1-1.jpg", "kontext-1-2.jpg"]  # the flagged one behind a spoiler
    channel = world.discord.channels[adult]
    channel["nsfw"] = False  # the moderators make the channel an ordinary one
    await world.discord.dispatch("CHANNEL_UPDATE", channel)
    shared = await finished(await world.discord.click_button(private.id, button(private, "share"), user="alice"))
    assert not shared.ephemeral and shared.channel_id == adult
    assert sorted(shared.files) == ["kontext-1-2.jpg"]
    assert "1 of 2 image was flagged by the safety checker and is not shown" in text(shared)


async def test_share_from_the_dm_needs_the_member_still_able_to_post_in_the_channel(world):
    """From the DM the bot posts with its own token, so it checks what Discord would check of the
    member: a member who may no longer see or post in the channel cannot have the bot post there."""
    card = await private_result_by_dm(world)
    # The moderators shut alice out of the channel.
    world.discord.set_permission_overwrite(
        world.discord.channel_id, world.discord.alice, deny=VIEW_CHANNEL | SEND_MESSAGES
    )
    await asyncio.sleep(0.2)  # the bot gets CHANNEL_UPDATE
    refused = await world.discord.click_button(card.id, button(card, "share"), user="alice")
    await refused.wait_for_callback()
    assert "can no longer post in the channel of this result" in private_answer(refused)
    assert [m for m in world.discord.channel_messages() if not m.ephemeral] == []


async def test_share_from_the_dm_to_a_private_thread_the_bot_is_not_in_says_so(world):
    """A private result from a private thread the bot was never added to came by DM: the bot may
    not see that thread (Discord answers 403 50001 to its fetch), so Share says the bot cannot post
    there and how to let it, instead of an error "on the bot's side"."""
    fake = world.discord
    thread = fake.add_thread(fake.channel_id, "alice's corner", owner="alice", type=12)
    card = await private_result_by_dm(world, channel_id=thread["id"])
    share = await fake.click_button(card.id, button(card, "share"), user="alice")
    await share.wait_for_callback()
    answer = private_answer(share)
    assert answer.startswith("The bot can't see the channel of this result, so it can't be shared there."), answer
    assert [m for m in fake.channel_messages(thread["id"]) if not m.ephemeral] == []
    assert "unexpected error" not in world.bot.log_text()
    fake.add_thread_member(thread["id"], fake.bot_user)  # alice mentions the bot in the thread
    shared = await fake.click_button(card.id, button(card, "share"), user="alice")
    await shared.wait_for_callback()
    await fake.wait_until(lambda: [m for m in fake.channel_messages(thread["id"]) if m.flags & IS_COMPONENTS_V2])
