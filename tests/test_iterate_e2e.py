"""Iterating together: re-roll, edit a result, edit any image in chat, combine images."""

from __future__ import annotations

import asyncio

import pytest

from fakes.discord_fake import EPHEMERAL, SEND_MESSAGES, USE_APPLICATION_COMMANDS, custom_ids
from fakes.fal_fake import JobScript, model_error
from tests.e2e import admin, button, data_uri, details, finished, private_answer, text

# An interaction's acknowledgement or answer (receiving-and-responding.mdx).
CALLBACK = r"/interactions/\d+/[^/]+/callback$"


async def first_result(world, **options):
    handle = await world.kontext(**options)
    message = await finished(handle)
    assert text(message).startswith("✅"), text(message)
    return message


def footer(message) -> str:
    """The result card's last line: the job's number (and the job it came from)."""
    return details(message).splitlines()[-1].removeprefix("-# ")


async def test_result_carries_one_row_of_buttons(world):
    await world.start_bot()
    message = await first_result(world)
    ids = custom_ids(message.components)  # one action row, at the foot of the card
    assert [i.rsplit(":", 1)[0] for i in ids] == ["kontext:reroll:1", "kontext:edit:1", "kontext:delete:1"]
    assert len({i.rsplit(":", 1)[1] for i in ids}) == 1  # the job's key, the same on each


async def test_reroll_reuses_the_inputs_with_a_new_seed(world):
    await world.start_bot()
    message = await first_result(world, prompt="a red scarf", seed=7, aspect_ratio="1:1", safety_tolerance=1)
    click = await world.discord.click_button(message.id, button(message, "reroll"), user="alice")
    again = await finished(click)
    first, second = world.fal.submits
    assert "seed" not in second
    assert {k: v for k, v in first.items() if k != "seed"} == second
    assert footer(again) == "Job #2 · from job #1"
    assert again.id != message.id  # a new reply; the first result stays


async def test_only_the_requester_or_a_moderator_may_reroll_or_delete(world):
    await world.start_bot()
    message = await first_result(world)
    world.discord.add_member(name="bob")
    for action in ("reroll", "delete"):
        click = await world.discord.click_button(message.id, button(message, action), user="bob")
        await click.wait_for_callback()
        assert "Only the member who asked" in private_answer(click)
    assert len(world.fal.submits) == 1 and not message.deleted
    moderator = await world.discord.click_button(message.id, button(message, "reroll"), user="mod")
    await finished(moderator)
    assert len(world.fal.submits) == 2
    delete = await world.discord.click_button(message.id, button(message, "delete"), user="alice")
    await delete.wait_for_callback()
    await world.discord.wait_until(lambda: message.deleted)


async def test_anyone_can_edit_a_result_through_a_modal(world):
    world.fal.fetch_inputs = True  # fal really fetches the result image from Discord's CDN
    await world.start_bot()
    message = await first_result(world, num_images=2, aspect_ratio="3:4")
    world.discord.add_member(name="bob")
    click = await world.discord.click_button(message.id, button(message, "edit"), user="bob")
    modal = (await click.wait_for_callback())["data"]
    assert (await click.wait_for_callback())["type"] == 9
    assert "job #1" in modal["title"]
    submitted = await world.discord.submit_modal(click, {"prompt": "now at night", "image": ["1"]}, user="bob")
    edited = await finished(submitted)
    second_image = data_uri(world, message.attachments[1], "image/jpeg")  # the bytes of image 2, durable
    submit = world.fal.submits[-1]
    assert submit["image_url"] == second_image and submit["prompt"] == "now at night"
    assert submit["aspect_ratio"] == "3:4" and "num_images" not in submit
    assert footer(edited) == "Job #2 · from job #1"
    assert "**Requested by** <@" in details(edited)


async def test_edit_with_kontext_context_menu_uses_the_messages_first_image(world):
    world.fal.fetch_inputs = True  # fal really fetches the image URL it is given
    await world.start_bot()
    photo = world.input_image()
    post = world.discord.post_user_message("look at this", user="mod", attachments=[photo])
    menu = await world.discord.invoke_message_command("Edit with Kontext", post.id, user="alice")
    assert (await menu.wait_for_callback())["type"] == 9
    submitted = await world.discord.submit_modal(menu, {"prompt": "add a rainbow"}, user="alice")
    await finished(submitted)
    image = data_uri(world, photo)
    assert world.fal.submits[-1] == {"prompt": "add a rainbow", "image_url": image, "safety_tolerance": "2"}


async def test_an_edit_with_kontext_form_open_across_a_restart_reads_the_message_again(world):
    await world.start_bot()
    photo = world.input_image()
    post = world.discord.post_user_message("look at this", user="mod", attachments=[photo])
    menu = await world.discord.invoke_message_command("Edit with Kontext", post.id, user="alice")
    assert (await menu.wait_for_callback())["type"] == 9
    assert await world.bot.stop() == 0
    await world.start_bot()
    submitted = await world.discord.submit_modal(menu, {"prompt": "add a rainbow"}, user="alice")
    assert (await submitted.wait_for_callback(timeout=5))["type"] == 5
    assert text(await finished(submitted)).startswith("✅")
    assert world.fal.submits[-1]["image_url"] == data_uri(world, photo)


async def test_an_edit_with_kontext_form_sent_after_its_image_link_expired_reads_the_message_again(world):
    """A form left open past the life of the image's signed link (about a day): the bot reads
    the message again for a fresh link rather than fetch the one it was opened with, which
    Discord's CDN no longer serves."""
    await world.start_bot()
    photo = world.input_image()
    post = world.discord.post_user_message("look at this", user="mod", attachments=[photo])
    menu = await world.discord.invoke_message_command("Edit with Kontext", post.id, user="alice")
    assert (await menu.wait_for_callback())["type"] == 9
    world.discord.expire_cdn_urls()
    submitted = await world.discord.submit_modal(menu, {"prompt": "add a rainbow"}, user="alice")
    assert text(await finished(submitted)).startswith("✅"), text(submitted.original)
    assert world.fal.submits[-1]["image_url"] == data_uri(world, photo)


@pytest.mark.parametrize("discord_answers", ["slowly", "with two 502s"])
async def test_an_edit_with_kontext_form_is_answered_in_time_when_discord_is_slow_to_return_the_message(
    world, discord_answers
):
    """The bot reads the message again before it acknowledges the form: Discord slow to return
    it (discord.py retries a 502 after 1 s, then 3 s) must not cost the member the 3 seconds
    the form has to be answered in, with the prompt they typed. The image the form was opened
    with stands in."""
    await world.start_bot()
    photo = world.input_image()
    post = world.discord.post_user_message("look at this", user="mod", attachments=[photo])
    menu = await world.discord.invoke_message_command("Edit with Kontext", post.id, user="alice")
    assert (await menu.wait_for_callback())["type"] == 9
    message = r"^/channels/\d+/messages/\d+$"
    if discord_answers == "slowly":
        world.discord.fail_next("GET", message, status="slow", delay=3.2)
    else:
        world.discord.fail_next("GET", message, status=502, times=2)
    submitted = await world.discord.submit_modal(menu, {"prompt": "add a rainbow"}, user="alice")
    assert (await submitted.wait_for_callback(timeout=3))["type"] == 5
    assert text(await finished(submitted)).startswith("✅")
    assert world.fal.submits[-1]["image_url"] == data_uri(world, photo)


async def test_an_edit_with_kontext_form_whose_message_is_gone_after_a_restart_says_so(world):
    await world.start_bot()
    post = world.discord.post_user_message("look at this", user="mod", attachments=[world.input_image()])
    menu = await world.discord.invoke_message_command("Edit with Kontext", post.id, user="alice")
    await menu.wait_for_callback()
    assert await world.bot.stop() == 0
    post.deleted = True  # its author deleted it meanwhile
    await world.start_bot()
    submitted = await world.discord.submit_modal(menu, {"prompt": "add a rainbow"}, user="alice")
    await submitted.wait_for_callback(timeout=5)
    assert "was deleted" in private_answer(submitted)
    assert world.fal.submits == []


async def test_an_edit_with_kontext_form_whose_message_was_deleted_meanwhile_edits_nothing(world):
    """A moderator deletes a message while a member has its form open: Discord says the message
    is gone (Unknown Message), and the image the form remembered is not edited and posted again
    (its signed link may outlive the message at Discord's CDN). The link remembered stands in
    only where the bot cannot read the message."""
    await world.start_bot()
    world.discord.add_member(name="bob")
    post = world.discord.post_user_message("look at this", user="alice", attachments=[world.input_image()])
    menu = await world.discord.invoke_message_command("Edit with Kontext", post.id, user="bob")
    assert (await menu.wait_for_callback())["type"] == 9
    world.discord._delete(post)  # a moderator removed it
    submitted = await world.discord.submit_modal(menu, {"prompt": "post it again"}, user="bob")
    await submitted.wait_for_callback(timeout=5)
    assert "was deleted" in private_answer(submitted)
    assert world.fal.submits == []


async def test_an_edit_with_kontext_form_naming_another_channel_reads_nothing_from_it(world):
    """A form's custom_id is the member's to send: Discord validates the custom_ids of a clicked
    message component against the message, and documents no such check for a modal's. A form
    submitted in one channel that names a message in another (a staff channel, another server
    with the bot) must not make the bot read that message's image for the member."""
    await world.start_bot()
    elsewhere = world.discord.add_guild("staff server")
    secret = world.discord.post_user_message(
        "confidential", user="mod", channel_id=elsewhere.channel_id, attachments=[world.input_image()]
    )
    forged = f"kontext:menu:{secret.channel_id}:{secret.id}"
    submitted = await world.discord.submit_modal(
        forged, {"prompt": "show me"}, user="alice", channel_id=world.discord.channel_id
    )
    await submitted.wait_for_callback(timeout=5)
    assert "open it again" in private_answer(submitted)
    assert world.fal.submits == []
    assert not [r for r in world.discord.requests_to("GET", r"/messages/") if secret.id in r.path]


async def test_context_menu_on_a_message_without_an_image(world):
    await world.start_bot()
    post = world.discord.post_user_message("no pictures here")
    menu = await world.discord.invoke_message_command("Edit with Kontext", post.id)
    await menu.wait_for_callback()
    assert "no image" in private_answer(menu)


async def test_several_images_are_combined_with_the_multi_endpoint(world):
    await world.start_bot()
    hat, person = world.input_image(), world.input_image(fmt="jpeg")
    await first_result(
        world, image=person, image2=hat, prompt="put the hat from image 2 on the person", enhance_prompt=True
    )
    (job,) = world.fal.jobs.values()
    assert job.endpoint == "fal-ai/flux-pro/kontext/max/multi"
    images = [data_uri(world, person, "image/jpeg"), data_uri(world, hat)]
    assert job.payload["image_urls"] == images and "image_url" not in job.payload
    assert job.payload["enhance_prompt"] is True


async def pressed_under_a_cooldown(world, action: str):
    """A result's `action` button pressed by its member while the server's cooldown runs."""
    world.fal.default = JobScript()
    await world.start_bot()
    await admin(world, "limits", cooldown_seconds=600)
    message = await first_result(world)
    click = await world.discord.click_button(message.id, button(message, action), user="alice")
    await click.wait_for_callback()
    return click


async def test_iteration_respects_the_servers_limits(world):
    click = await pressed_under_a_cooldown(world, "reroll")
    assert "Slow down" in private_answer(click)
    assert len(world.fal.submits) == 1


@pytest.mark.parametrize(
    "words",
    ["now at night, with `ticks` and ```fences``` and <@123>", "a run of ```` four and `````` six ticks"],
    ids=["fences", "longer-runs"],
)
async def test_a_refused_edit_form_gives_the_member_their_words_back(world, words):
    """Discord cannot answer a form with a form, so a refused one (here: the server's cooldown)
    would lose what the member typed; the private answer carries it, ready to copy, with no run
    of three backticks inside that would close its code block early."""
    click = await pressed_under_a_cooldown(world, "edit")
    submitted = await world.discord.submit_modal(click, {"prompt": words}, user="alice")
    callback = await submitted.wait_for_callback()
    assert callback["data"]["flags"] & EPHEMERAL and "Slow down" in callback["data"]["content"]
    (kept,) = callback["data"]["embeds"]
    assert kept["description"].startswith("```\n") and kept["description"].endswith("\n```")
    assert kept["description"][4:-4].replace("\u200b", "") == words
    assert "```" not in kept["description"][4:-4]
    assert len(world.fal.submits) == 1


async def test_buttons_work_after_a_restart(world):
    await world.start_bot()
    message = await first_result(world)
    assert await world.bot.stop() == 0
    await world.start_bot()
    click = await world.discord.click_button(message.id, button(message, "reroll"), user="alice")
    assert text(await finished(click)).startswith("✅")
    assert len(world.fal.submits) == 2


async def test_an_edit_form_open_across_a_restart_is_still_answered(world):
    """The form is read back from its custom_id: nothing of it lives in the bot's memory, so a
    restart (a deploy) or a member taking longer than any timeout loses nothing."""
    await world.start_bot()
    message = await first_result(world, num_images=2)
    click = await world.discord.click_button(message.id, button(message, "edit"), user="alice")
    modal = await click.wait_for_callback()
    assert modal["type"] == 9
    assert modal["data"]["custom_id"] == button(message, "edit").replace(":edit:", ":form:")
    assert await world.bot.stop() == 0
    await world.start_bot()
    submitted = await world.discord.submit_modal(click, {"prompt": "now at night", "image": ["1"]}, user="alice")
    assert (await submitted.wait_for_callback(timeout=5))["type"] == 5  # acknowledged once, in time
    edited = await finished(submitted)
    submit = world.fal.submits[-1]
    assert submit["prompt"] == "now at night"
    assert submit["image_url"] == data_uri(world, message.attachments[1], "image/jpeg")
    assert footer(edited) == "Job #2 · from job #1"


async def test_an_edit_form_for_a_job_the_bot_no_longer_knows_is_answered_privately(world):
    await world.start_bot()
    message = await first_result(world)
    stale = button(message, "edit").replace(":edit:", ":form:").rsplit(":", 1)[0] + ":0badc0de"  # another key
    submitted = await world.discord.submit_modal(stale, {"prompt": "now at night"}, message_id=message.id)
    await submitted.wait_for_callback()
    assert "no longer knows" in private_answer(submitted)
    assert len(world.fal.submits) == 1


async def test_try_again_repeats_a_failed_job_as_it_was_its_seed_too(world):
    """A failed job made nothing: Try again sends what the member asked for, the seed they
    chose included (a re-roll of a result is what asks for a new seed)."""
    world.fal.default = model_error("downstream_service_unavailable", "The partner API is unavailable")
    await world.start_bot()
    failed = await finished(await world.kontext(prompt="a red scarf", seed=7, aspect_ratio="1:1"))
    assert text(failed).startswith("❌")
    world.fal.default = JobScript()
    again = await finished(await world.discord.click_button(failed.id, button(failed, "retry"), user="alice"))
    assert text(again).startswith("✅"), text(again)
    first, second = world.fal.submits
    assert second == first and second["seed"] == 7
    assert "**Seed** 7" in details(again)
    assert footer(again) == "Job #2 · from job #1"


async def the_one_started(presses):
    """Of presses made at once, the one that started the job; the other is told privately that
    it is already being started."""
    for press in presses:
        await press.wait_for_callback()
    started, pending = sorted(presses, key=lambda press: press.callback["type"] == 4)
    assert "already being started" in private_answer(pending)
    return started


async def test_a_double_click_on_try_again_starts_the_failed_job_once(world):
    """Two presses of 🔁 Try again at once (a double tap on mobile) are one press: fal runs and
    bills the job again once, and the second press is told so privately. Pressed again later, on
    purpose, it starts again (as Re-roll does: re-rolling many times is the point)."""
    world.fal.default = JobScript(result_status=500, result_body=model_error("internal_server_error"))
    await world.start_bot()
    failed = await finished(await world.kontext(prompt="a red scarf"))
    assert text(failed).startswith("❌"), text(failed)
    world.fal.default = model_error("downstream_service_unavailable", "The partner API is unavailable")
    retry = button(failed, "retry")
    world.discord.fail_next("POST", CALLBACK, status="slow", delay=0.5, times=2)  # Discord's round trips
    clicks = await asyncio.gather(*(world.discord.click_button(failed.id, retry, user="alice") for _ in range(2)))
    assert text(await finished(await the_one_started(clicks))).startswith("❌")
    assert len(world.fal.submits) == 2
    world.fal.default = JobScript()
    again = await finished(await world.discord.click_button(failed.id, retry, user="alice"))
    assert text(again).startswith("✅") and len(world.fal.submits) == 3


async def test_re_roll_pressed_again_once_the_first_has_started_rolls_again(world):
    """Only presses at once are one press: re-rolling many times is the point."""
    await world.start_bot()
    message = await first_result(world)
    rolls = []
    for _ in range(2):
        rolls.append(await world.discord.click_button(message.id, button(message, "reroll"), user="alice"))
        assert (await rolls[-1].wait_for_callback())["type"] == 5
    for roll in rolls:
        assert text(await finished(roll)).startswith("✅")
    assert len(world.fal.submits) == 3


async def test_an_edit_form_sent_twice_at_once_starts_one_edit(world):
    """A double click on the ✏️ Edit form's Submit: one edit, and the second submit told so."""
    await world.start_bot()
    message = await first_result(world)
    opened = await world.discord.click_button(message.id, button(message, "edit"), user="alice")
    await opened.wait_for_callback()
    world.discord.fail_next("POST", CALLBACK, status="slow", delay=0.5, times=2)  # Discord's round trips
    submits = await asyncio.gather(
        *(world.discord.submit_modal(opened, {"prompt": "now at night"}, user="alice") for _ in range(2))
    )
    assert text(await finished(await the_one_started(submits))).startswith("✅")
    assert len(world.fal.submits) == 2


@pytest.mark.parametrize("denied", [SEND_MESSAGES, USE_APPLICATION_COMMANDS], ids=["send", "commands"])
async def test_a_member_muted_in_the_channel_cannot_start_edits_there_through_buttons(world, denied):
    """The moderators take Send Messages (or Use Application Commands) from alice in the channel:
    Discord no longer lets her post or run /kontext there, but buttons stay pressable
    (discord-api-docs#7900). The bot starts nothing there for her that she could not ask for
    herself: Re-roll, Edit and an Edit form she opened before are refused privately. Deleting
    her own result posts nothing and still works."""
    fake = world.discord
    await world.start_bot()
    message = await first_result(world)
    opened = await fake.click_button(message.id, button(message, "edit"), user="alice")
    assert (await opened.wait_for_callback())["type"] == 9
    fake.set_permission_overwrite(fake.channel_id, fake.alice, deny=denied)
    for action in ("reroll", "edit"):
        click = await fake.click_button(message.id, button(message, action), user="alice")
        await click.wait_for_callback()
        assert "can't post or use app commands in this channel" in private_answer(click)
    submitted = await fake.submit_modal(opened, {"prompt": "now at night"}, user="alice")
    await submitted.wait_for_callback()
    assert "can't post or use app commands in this channel" in private_answer(submitted)
    assert len(world.fal.submits) == 1
    delete = await fake.click_button(message.id, button(message, "delete"), user="alice")
    await delete.wait_for_callback()
    await fake.wait_until(lambda: message.deleted)


async def test_an_edit_of_a_result_image_over_the_input_limit_is_refused_before_it_starts(world):
    """The result's image is checked as an attached one is, when the form is sent: refused
    privately, nothing acknowledged, recorded or sent to fal."""
    world.fal.default = JobScript(image_size=60_000)
    await world.start_bot(MAX_INPUT_BYTES="50000")
    message = await first_result(world)
    assert message.attachments[0]["size"] > 50_000
    click = await world.discord.click_button(message.id, button(message, "edit"), user="alice")
    await click.wait_for_callback()
    submitted = await world.discord.submit_modal(click, {"prompt": "now at night"}, user="alice")
    await submitted.wait_for_callback()
    assert "the limit is" in private_answer(submitted)
    assert len(world.fal.submits) == 1 and len(world.fal.jobs) == 1


async def test_two_members_editing_one_message_where_the_bot_cannot_read_it_both_get_their_edit(world):
    """In a server without the bot the form's image is only in the bot's memory: the first
    member's submit must not take it from the second's open form."""
    await world.start_bot(PERSONAL_USE="1", MONTHLY_BUDGET_USD="5")
    alone = world.discord.add_guild("Friends", bot=False)
    for member in (world.discord.alice, world.discord.add_member(name="bob")):
        world.discord.add_member(member, guild=alone)
        world.discord.authorize_user_install(member)
    post = world.discord.post_user_message(
        "look", user="bob", channel_id=alone.channel_id, attachments=[world.input_image()]
    )
    menus = {}
    for name in ("alice", "bob"):
        menus[name] = await world.discord.invoke_message_command("Edit with Kontext", post.id, user=name)
        assert (await menus[name].wait_for_callback())["type"] == 9
    for name, prompt in (("alice", "add a rainbow"), ("bob", "add a moon")):
        submitted = await world.discord.submit_modal(menus[name], {"prompt": prompt}, user=name)
        assert (await submitted.wait_for_callback())["type"] == 5, (name, submitted.callback)
        assert text(await finished(submitted)).startswith("✅")
    assert [s["prompt"] for s in world.fal.submits] == ["add a rainbow", "add a moon"]


async def test_edit_with_kontext_on_a_forwarded_image_edits_that_image(world):
    """A forward carries the image in its snapshot of the original message, not as its own."""
    world.fal.fetch_inputs = True
    await world.start_bot()
    photo = world.input_image()
    original = world.discord.post_user_message("look at this", user="mod", attachments=[photo])
    forward = world.discord.forward_message(original, user="mod")
    assert forward.attachments == []
    menu = await world.discord.invoke_message_command("Edit with Kontext", forward.id, user="alice")
    assert (await menu.wait_for_callback())["type"] == 9, menu.callback
    submitted = await world.discord.submit_modal(menu, {"prompt": "add a rainbow"}, user="alice")
    assert text(await finished(submitted)).startswith("✅")
    assert world.fal.submits[-1]["image_url"] == data_uri(world, photo)


async def test_a_member_who_may_not_use_kontext_here_is_told_before_writing_a_prompt(world):
    """A role the server requires: told on pressing ✏️ Edit or picking Edit with Kontext, not
    after typing the prompt into a form that could never be sent."""
    await world.start_bot()
    message = await first_result(world)
    artists = world.discord.add_role("artists")
    await world.discord.dispatch("GUILD_ROLE_CREATE", {"guild_id": world.discord.guild_id, "role": artists})
    await admin(world, "access role", role=artists)
    world.discord.add_member(name="bob")
    post = world.discord.post_user_message("pic", user="mod", attachments=[world.input_image()])
    for handle in (
        await world.discord.click_button(message.id, button(message, "edit"), user="bob"),
        await world.discord.invoke_message_command("Edit with Kontext", post.id, user="bob"),
    ):
        await handle.wait_for_callback()
        assert f"You need the <@&{artists['id']}> role" in private_answer(handle)
    assert len(world.fal.submits) == 1


async def test_edit_with_kontext_on_a_picture_of_a_kind_kontext_cannot_read_says_so(world):
    """Discord shows an AVIF photo like any other: "no image" would be wrong, the kind is."""
    await world.start_bot()
    avif = world.discord.add_cdn_file(
        b"\x00\x00\x00\x1cftypavif" + b"0" * 100, "photo.avif", "image/avif", ephemeral=False
    )
    post = world.discord.post_user_message("pic", user="mod", attachments=[avif])
    menu = await world.discord.invoke_message_command("Edit with Kontext", post.id, user="alice")
    await menu.wait_for_callback()
    assert "`photo.avif` is not an image Kontext can read" in private_answer(menu)
