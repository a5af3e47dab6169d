"""Building on an old job (Re-roll, Try again, Edit, the context menu on a result the bot
posted) once the durable copies of its inputs may be gone: fal keeps an uploaded input only for
its lifetime and fetches inputs when a job starts (fal-queue-api.md, part 2), so a copy that
expired must be found afresh or refused at once, never sent to wait in fal's queue and fail."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import urllib.parse

from fakes.fal_fake import JobScript, make_image
from tests.e2e import attachment_bytes, button, finished, private_answer, text


async def answer_to_pressing(world, message, action: str) -> str:
    """The private answer a member gets for pressing the message's `action` button."""
    pressed = await world.discord.click_button(message.id, button(message, action))
    await pressed.wait_for_callback()
    return private_answer(pressed)


def age_staged_inputs(world, seconds: float) -> None:
    """Make the bot's record of its uploads `seconds` older (as if that long had passed)."""
    with sqlite3.connect(world.data_dir / "kontext.sqlite3") as db:
        db.execute("UPDATE staged_inputs SET expires_at = expires_at - ?", (seconds,))


async def test_a_reroll_of_a_job_whose_uploaded_input_expired_is_refused_at_once(world):
    await world.start_bot()
    photo = world.input_image(size=200_000)  # past the inline size: uploaded to fal's storage
    first = await finished(await world.kontext(image=photo))
    assert text(first).startswith("✅")
    a_month_passes(world)
    assert await answer_to_pressing(world, first, "reroll") == (
        "The bot no longer has the image of this job (it keeps copies for 30 days). Please attach the image again."
    )
    assert world.fal.count("submit") == 1  # the first job only


async def test_a_reroll_of_a_combination_names_the_one_image_whose_copy_expired(world):
    """Two uploaded inputs, only the second one's copy gone: the member is told which."""
    await world.start_bot()
    photos = [world.input_image(size=size) for size in (200_000, 210_000)]
    first = await finished(await world.kontext(image=photos[0], image2=photos[1]))
    assert text(first).startswith("✅")
    second_copy = world.fal.submits[0]["image_urls"][1]
    with sqlite3.connect(world.data_dir / "kontext.sqlite3") as db:
        db.execute("UPDATE staged_inputs SET expires_at = ? WHERE url = ?", (time.time() - 60, second_copy))
    world.fal.expire_uploads(second_copy)
    assert await answer_to_pressing(world, first, "reroll") == (
        "The bot no longer has image 2 of this job (it keeps copies for 30 days). Please attach the image again."
    )
    assert world.fal.count("submit") == 1


async def test_a_reroll_of_a_job_whose_copies_still_last_is_sent_from_them(world):
    """A copy close to the end of its lifetime, but not within the margin, is still used."""
    await world.start_bot()
    first = await finished(await world.kontext(image=world.input_image(size=200_000)))
    age_staged_inputs(world, 28 * 86400)
    again = await finished(await world.discord.click_button(first.id, button(first, "reroll")))
    assert text(again).startswith("✅")
    assert len(world.fal.uploads) == 1 and world.fal.submits[1]["image_url"] == world.fal.uploads[0].url


async def test_a_result_the_bot_posted_is_edited_again_a_week_later_from_one_upload(world):
    """The result's images are Discord attachments of the bot's own message: the context menu on
    it, a week on (every link handed out then expired), reads the message again, and a second
    edit of the same picture reuses the copy uploaded for the first."""
    world.fal.fetch_inputs = True
    world.fal.default = JobScript(image_size=150_000)  # past the inline size: uploaded to fal's storage
    await world.start_bot()
    first = await finished(await world.kontext(prompt="a lighthouse", image=None))
    assert text(first).startswith("✅")
    world.discord.advance_cdn_clock(7 * 86400)
    for prompt in ("add snow", "add fog"):
        menu = await world.discord.invoke_message_command("Edit with Kontext", first.id, user="mod")
        assert (await menu.wait_for_callback())["type"] == 9
        edited = await finished(await world.discord.submit_modal(menu, {"prompt": prompt}, user="mod"))
        assert text(edited).startswith("✅"), text(edited)
    (upload,) = world.fal.uploads
    assert [submit.get("image_url") for submit in world.fal.submits[1:]] == [upload.url, upload.url]


async def test_try_again_of_a_job_whose_discord_link_expired_is_refused_at_once(world):
    """A job that failed before the bot made its copy (fal's storage down) keeps Discord's signed
    link, which expires: a Try again after that is refused privately at once, with nothing
    posted in the channel, rather than acknowledged in public to fail at the download."""
    await world.start_bot()
    data, width, height = make_image("png", 200_000, 64, 64)
    photo = world.discord.add_cdn_file(data, "input.png", "image/png", width=width, height=height, lifetime=2)
    for op in ("storage_token", "storage_initiate"):
        world.fal.fail_next(op, 500, times=3)
    failed = await finished(await world.kontext(image=photo))
    assert text(failed).startswith("❌ The image could not be handed to fal.ai")
    expires = int(urllib.parse.parse_qs(urllib.parse.urlsplit(photo["url"]).query)["ex"][0], 16)
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.05)
    assert await answer_to_pressing(world, failed, "retry") == (
        "Discord no longer has `input.png` (the link expired or the message is gone). Please attach the image again."
    )
    assert world.fal.count("submit") == 0


def a_month_passes(world) -> None:
    """31 days on: fal deleted the uploads (their lifetime ran out), Discord's links expired."""
    age_staged_inputs(world, 31 * 86400)
    world.fal.expire_uploads()
    world.discord.advance_cdn_clock(31 * 86400)


async def a_result_and_its_edit_form(world, *, edits_make_other_pictures: bool = False):
    """A result the bot made from a prompt alone (its image past the inline size, so edits of it
    are uploaded to fal's storage), and the ✏️ Edit form opened on it: (result, form)."""
    world.fal.fetch_inputs = True
    world.fal.default = JobScript(image_size=150_000)
    await world.start_bot()
    made = await finished(await world.kontext(prompt="a lighthouse", image=None))
    if edits_make_other_pictures:
        world.fal.default = JobScript(image_size=160_000)
    form = await world.discord.click_button(made.id, button(made, "edit"))
    await form.wait_for_callback()
    return made, form


async def edit_of_a_result_a_month_old(world):
    """A result the bot made, then an ✏️ Edit of it; then 31 days pass: fal deleted the copy of
    the result's image the edit was sent from. Returns the result, the edit and that copy."""
    made, form = await a_result_and_its_edit_form(world)
    edited = await finished(await world.discord.submit_modal(form, {"prompt": "add snow"}))
    assert text(edited).startswith("✅")
    (old_copy,) = world.fal.uploads
    a_month_passes(world)
    return made, edited, old_copy


async def test_a_reroll_of_an_edit_of_a_result_whose_copy_expired_copies_the_result_again(world):
    """The result's message is still there: the bot reads it again and copies the same picture
    afresh, and a re-roll of that re-roll uses the new copy."""
    _, edited, old_copy = await edit_of_a_result_a_month_old(world)
    again = await finished(await world.discord.click_button(edited.id, button(edited, "reroll")))
    assert text(again).startswith("✅"), text(again)
    fresh_copy = world.fal.uploads[-1]
    assert fresh_copy.data == old_copy.data and fresh_copy.url != old_copy.url
    assert world.fal.submits[-1]["image_url"] == fresh_copy.url
    again_again = await finished(await world.discord.click_button(again.id, button(again, "reroll")))
    assert text(again_again).startswith("✅")
    assert world.fal.uploads[-1] is fresh_copy and world.fal.submits[-1]["image_url"] == fresh_copy.url


async def test_a_reroll_of_an_edit_of_a_result_deleted_since_is_refused_at_once(world):
    made, edited, _ = await edit_of_a_result_a_month_old(world)
    world.discord.messages[made.id].deleted = True
    assert await answer_to_pressing(world, edited, "reroll") == (
        "The bot no longer has the image of this job (it keeps copies for 30 days). Please attach the image again."
    )
    assert world.fal.count("submit") == 2


async def test_try_again_of_an_edit_of_a_result_whose_discord_link_expired_reads_the_result_again(world):
    """An ✏️ Edit that failed before its copy was made keeps the result's Discord link; once that
    expired, Try again reads the result's message again for the same image, signed afresh."""
    world.fal.default = JobScript(image_size=150_000)  # past the inline size: uploaded to fal's storage
    world.discord.upload_url_lifetime = 2  # seconds, on the clocks of both Discord and the bot
    await world.start_bot()
    made = await finished(await world.kontext(prompt="a lighthouse", image=None))
    form = await world.discord.click_button(made.id, button(made, "edit"))
    await form.wait_for_callback()
    for op in ("storage_token", "storage_initiate"):
        world.fal.fail_next(op, 500, times=3)
    failed = await finished(await world.discord.submit_modal(form, {"prompt": "add snow"}))
    assert text(failed).startswith("❌ The image could not be handed to fal.ai")
    link = made.attachments[0]["url"]
    expires = int(urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["ex"][0], 16)
    await asyncio.sleep(max(0.0, expires - time.time()) + 1.05)  # every link signed by then expired
    again = await finished(await world.discord.click_button(failed.id, button(failed, "retry")))
    assert text(again).startswith("✅"), text(again)
    (upload,) = world.fal.uploads
    assert upload.data == attachment_bytes(world, made.attachments[0])
    assert world.fal.submits[-1]["image_url"] == upload.url


async def test_a_reroll_of_a_combination_of_one_picture_twice_is_sent_from_its_copies(world):
    """The same picture attached twice (two files with the same bytes) is uploaded for both at
    once: each copy lasts its lifetime at fal, and a Re-roll is sent from them, not refused."""
    await world.start_bot()
    data, width, height = make_image("png", 200_000, 64, 64)  # past the inline size: uploaded
    photos = [
        world.discord.add_cdn_file(data, name, "image/png", width=width, height=height)
        for name in ("front.png", "again.png")
    ]
    first = await finished(await world.kontext(image=photos[0], image2=photos[1]))
    assert text(first).startswith("✅")
    press = await world.discord.click_button(first.id, button(first, "reroll"))
    assert (await press.wait_for_callback())["type"] != 4, private_answer(press)
    again = await finished(press)
    assert text(again).startswith("✅"), text(again)
    assert world.fal.submits[1]["image_urls"] == world.fal.submits[0]["image_urls"]


async def test_a_reroll_of_an_edit_whose_copy_an_earlier_version_recorded_copies_the_result_again(world):
    """Versions before the copies were keyed by their bytes recorded them by the attachment's
    link without its signature: such a copy that expired is found again on the result as well."""
    made, edited, old_copy = await edit_of_a_result_a_month_old(world)
    link = made.attachments[0]["url"]
    with sqlite3.connect(world.data_dir / "kontext.sqlite3") as db:
        db.execute("UPDATE staged_inputs SET source = ?", (link.split("?", 1)[0],))
    again = await finished(await world.discord.click_button(edited.id, button(edited, "reroll")))
    assert text(again).startswith("✅"), text(again)
    fresh_copy = world.fal.uploads[-1]
    assert fresh_copy.data == old_copy.data and world.fal.submits[-1]["image_url"] == fresh_copy.url


async def test_a_reroll_of_a_reroll_that_copied_the_result_again_does_so_once_more_a_month_on(world):
    """The re-roll that copied the result afresh is still a re-roll of the edit: once its own
    copy expired too, its re-roll reads the same result again rather than being refused."""
    made, form = await a_result_and_its_edit_form(world, edits_make_other_pictures=True)
    edited = await finished(await world.discord.submit_modal(form, {"prompt": "add snow"}))
    assert text(edited).startswith("✅")
    for _ in range(2):  # a month on, each time
        a_month_passes(world)
        press = await world.discord.click_button(edited.id, button(edited, "reroll"))
        assert (await press.wait_for_callback())["type"] != 4, private_answer(press)
        edited = await finished(press)
        assert text(edited).startswith("✅"), text(edited)
    assert [upload.data for upload in world.fal.uploads] == [attachment_bytes(world, made.attachments[0])] * 3
    assert world.fal.submits[-1]["image_url"] == world.fal.uploads[-1].url


async def test_a_reroll_of_a_try_again_of_an_edit_a_month_on_copies_the_result_edited(world):
    """A failed ✏️ Edit has no result of its own to have been edited: a Re-roll of its Try again,
    once that one's copy expired, reads the result the edit was made on."""
    made, form = await a_result_and_its_edit_form(world, edits_make_other_pictures=True)
    for op in ("storage_token", "storage_initiate"):
        world.fal.fail_next(op, 500, times=3)
    failed = await finished(await world.discord.submit_modal(form, {"prompt": "add snow"}))
    assert text(failed).startswith("❌ The image could not be handed to fal.ai")
    again = await finished(await world.discord.click_button(failed.id, button(failed, "retry")))
    assert text(again).startswith("✅"), text(again)
    a_month_passes(world)
    press = await world.discord.click_button(again.id, button(again, "reroll"))
    assert (await press.wait_for_callback())["type"] != 4, private_answer(press)
    assert text(await finished(press)).startswith("✅")
    assert [upload.data for upload in world.fal.uploads] == [attachment_bytes(world, made.attachments[0])] * 2
