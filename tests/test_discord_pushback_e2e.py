"""How the bot answers Discord pushing back on its final post, end to end: whatever Discord
says, the member's reply ends in the result or a clear message, posted once."""

from __future__ import annotations

import sqlite3

import pytest

from fakes.discord_fake import DEFAULT_SIZE_LIMIT, media_gallery_items
from fakes.fal_fake import JobScript
from tests.e2e import finished, outliving_its_reply, shows, text

WEBHOOK_MESSAGE = r"/webhooks/\d+/[^/]+/messages/"
CHANNEL_POSTS = r"^/channels/\d+/messages$"
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


def late_posts(world) -> list:
    return [m for m in world.discord.channel_messages() if m.interaction is None]


async def test_a_late_post_discord_made_as_the_bot_died_is_not_posted_again(world):
    """After the reply's 15 minutes the bot posts the result itself. Killed while Discord made
    that post (its answer never arrived), the restarted bot posted the result a second time:
    each post had a random nonce. Each part now has its own nonce, the same after a restart,
    and Discord, told to enforce it, returns the message it made the first time."""
    fake = world.discord
    fake.fail_next("POST", CHANNEL_POSTS, status="slow", delay=1.0)
    handle = await outliving_its_reply(world)
    await fake.wait_until(lambda: fake.requests_to("POST", CHANNEL_POSTS), timeout=15)
    await world.bot.kill()
    await fake.wait_until(lambda: late_posts(world), timeout=5)  # Discord carried on with it
    await world.start_bot()
    await fake.wait_until(lambda: db_rows(world)[0]["delivered_at"] is not None, timeout=15)
    assert len(fake.requests_to("POST", CHANNEL_POSTS)) == 2
    (post,) = late_posts(world)
    assert post.files and post.message_reference["message_id"] == handle.original.id
    assert db_rows(world)[0]["posted_message_ids"] == f"[{post.id}]"


@pytest.mark.parametrize("cards", ["1", "0"], ids=["card", "classic"])
async def test_a_reply_edit_discord_made_as_the_bot_died_is_not_posted_again_after_the_token(world, cards):
    """The final edit turns the reply into the result; the bot is killed before it stores that
    (an edit of the reply is not stored: made again, it shows the same). Restarted once the
    token is over, it posted the result a second time, a channel post pinging the member. It
    now sees on the reply, which it reads before posting, that the result is there already."""
    world.settings["RESULT_CARDS"] = cards
    fake = world.discord
    handle = await generating(world)
    fake.fail_next("PATCH", WEBHOOK_MESSAGE, status="slow", delay=1.5)

    def final_edits() -> list:
        return [r for r in fake.requests_to("PATCH", WEBHOOK_MESSAGE) if r.files and handle.token in r.path]

    await fake.wait_until(final_edits, timeout=15)
    await world.bot.kill()
    await fake.wait_until(lambda: text(handle.original).startswith("✅"), timeout=5)  # Discord carried it out
    fake.expire_token(handle.token)
    await world.start_bot()
    await fake.wait_until(lambda: db_rows(world)[0]["delivered_at"] is not None, timeout=15)
    assert late_posts(world) == [], [text(m) for m in late_posts(world)]
    assert text(handle.original).startswith("✅") and len(handle.original.files) == 1
    assert len(final_edits()) == 2  # the one Discord made, and the one the token's end refused
    assert db_rows(world)[0]["posted_message_ids"] == f"[{handle.original.id}]"


async def test_a_final_edit_discord_refuses_for_good_leaves_a_clear_reply(world):
    """Discord refused the result's edit as invalid (400, 50035): the job was closed, and the
    reply went on saying "Generating…" for good. Now it says Discord refused to show it."""
    handle = await generating(world)
    world.discord.fail_next(
        "PATCH", WEBHOOK_MESSAGE, status=400, json={"message": "Invalid Form Body", "code": 50035, "errors": {}}
    )
    message = await finished(handle)
    assert text(message) == "❌ Discord refused to show how this edit ended (error 50035).", text(message)
    assert message.embeds == [] and message.components == [] and message.files == {}
    await world.discord.wait_until(lambda: db_rows(world)[0]["delivered_at"] is not None, timeout=5)
