"""/kontext without an image: made from the prompt with Kontext Max's text-to-image endpoint, end
to end, through the same policy, runner, card and buttons as an edit."""

from __future__ import annotations

from fakes.fal_fake import ENDPOINT_T2I, JobScript
from tests.e2e import admin, button, data_uri, details, fal_job, finished, private_answer, shows, text
from tests.test_resilience_e2e import assert_delivered_once, restart


async def test_a_prompt_alone_makes_an_image_with_the_result_buttons(world):
    await world.start_bot()
    handle = await world.kontext(image=None, prompt="a lighthouse at dusk", aspect_ratio="16:9")
    message = await finished(handle)
    assert text(message).startswith("✅"), text(message)
    assert fal_job(world).endpoint == ENDPOINT_T2I
    # No image field; the server's default safety tolerance applies as to an edit.
    assert world.fal.submits == [{"prompt": "a lighthouse at dusk", "aspect_ratio": "16:9", "safety_tolerance": "2"}]
    assert "Made from text · Aspect ratio 16:9" in details(message)
    for action in ("reroll", "edit", "delete"):
        button(message, action)


async def test_edit_on_a_text_result_feeds_its_image_into_an_edit(world):
    world.fal.fetch_inputs = True
    await world.start_bot()
    made = await finished(await world.kontext(image=None, prompt="a red fox"))
    click = await world.discord.click_button(made.id, button(made, "edit"), user="alice")
    assert (await click.wait_for_callback())["type"] == 9  # the modal
    edited = await finished(await world.discord.submit_modal(click, {"prompt": "now in winter"}, user="alice"))
    assert text(edited).startswith("✅"), text(edited)
    submit = world.fal.submits[-1]
    assert fal_job(world, 1).endpoint != ENDPOINT_T2I
    assert submit["image_url"] == data_uri(world, made.attachments[0], "image/jpeg")
    assert submit["prompt"] == "now in winter"
    assert "from job #1" in details(edited)


async def test_reroll_of_a_text_job_makes_it_again_from_text(world):
    await world.start_bot()
    made = await finished(await world.kontext(image=None, prompt="a red fox", seed=3))
    again = await finished(await world.discord.click_button(made.id, button(made, "reroll"), user="alice"))
    assert text(again).startswith("✅")
    assert world.fal.submits[-1] == {"prompt": "a red fox", "safety_tolerance": "2"}
    assert fal_job(world, 1).endpoint == ENDPOINT_T2I


async def test_the_servers_policy_governs_text_jobs(world):
    await world.start_bot()
    await admin(world, "limits", daily_jobs=1)
    await admin(world, "safety", maximum=2)
    made = await finished(await world.kontext(image=None, prompt="a castle", safety_tolerance=5))
    assert world.fal.submits[-1]["safety_tolerance"] == "2"
    assert "limited to 2" in details(made)
    refused = await world.kontext(image=None, prompt="another castle")
    await refused.wait_for_callback()
    assert "for today" in private_answer(refused)
    assert len(world.fal.submits) == 1


async def test_a_text_job_resumes_after_a_restart(world):
    world.fal.default = JobScript(queue_positions=(2, 1, 0), step=0.4, run_time=0.1)
    await world.start_bot()
    handle = await world.kontext(image=None, prompt="a quiet harbour")
    await handle.wait_until(lambda h: shows(h, "In queue"))
    await restart(world)
    await finished(handle)
    assert_delivered_once(world, handle)
    assert world.fal.count("submit") == 1


async def test_extra_images_without_the_first_are_refused(world):
    await world.start_bot()
    handle = await world.kontext(image=None, image2=world.input_image())
    await handle.wait_for_callback()
    assert "Attach the first image as `image`" in private_answer(handle)
    assert world.fal.submits == []
