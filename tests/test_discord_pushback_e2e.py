"""How the bot answers Discord pushing back on its final post, end to end: whatever Discord
says, the member's reply ends in the result or a clear message, posted once."""

from __future__ import annotations

import sqlite3

from fakes.discord_fake import DEFAULT_SIZE_LIMIT, media_gallery_items
from fakes.fal_fake import JobScript
from tests.e2e import finished, shows, text

WEBHOOK_MESSAGE = r"/webhooks/\d+/[^/]+/messages/"
TOO_LARGE = {"message": "Request entity too large", "code": 40005}


def db_rows(world) -> list[sqlite3.Row]:
    with sqlite3.connect(world.data_dir / "kontext.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM jobs ORDER BY id").fetchall()


def accepted_uploads(world, handle) -> list:
    return [
        r
        for r in world.discord.requests_to("PATCH", WEBHOOK_MESSAGE)
        if r.files and r.status == 200 and handle.token in r.path
    ]


async def generating(world, **invoke):
    world.fal.default = JobScript(queue_positions=(0,), step=0.05, run_time=0.5)
    await world.start_bot()
    handle = await world.discord.invoke_slash(
        "kontext", options={"image": world.input_image(), "prompt": "make the sky purple"}, **invoke
    )
    await handle.wait_until(lambda h: shows(h, "Generating"))
    return handle


async def test_an_upload_discord_refuses_as_too_large_is_posted_within_discord_s_default(world):
    """The interaction announced a member's Nitro limit (50 MiB) and Discord refused the bot's
    upload anyway (413, 40005): the card was left saying "Generating…" and the result lost.
    Now it is posted once within Discord's default limit, which the image fits."""
    handle = await generating(world, attachment_size_limit=5 * DEFAULT_SIZE_LIMIT)
    world.discord.fail_next("PATCH", WEBHOOK_MESSAGE, status=413, json=TOO_LARGE)
    message = await finished(handle)
    assert text(message).startswith("✅"), text(message)
    assert len(message.files) == 1 and len(media_gallery_items(message)) == 1
    assert len(accepted_uploads(world, handle)) == 1
    assert db_rows(world)[0]["upload_limit"] == DEFAULT_SIZE_LIMIT


async def test_an_upload_discord_keeps_refusing_as_too_large_links_the_image(world):
    """Refused again within Discord's default: the card is shown with the image linked."""
    handle = await generating(world)
    world.discord.fail_next("PATCH", WEBHOOK_MESSAGE, status=413, json=TOO_LARGE)
    message = await finished(handle)
    assert text(message).startswith("✅"), text(message)
    assert "Too large for this server's upload limit: [image 1](http" in text(message), text(message)
    assert message.files == {} and media_gallery_items(message) == []
