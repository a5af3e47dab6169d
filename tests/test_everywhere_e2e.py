"""Everywhere a member is, end to end through the fake Discord (every request validated against
Discord's spec): installed to a member's account and used in a DM with the bot or in a server
without the bot, under the operator's policy for personal use; results as one components-v2
card; and the member's (and the server's) language."""

from __future__ import annotations

import re
import sqlite3

import pytest

from fakes.discord_fake import (
    EPHEMERAL,
    IS_COMPONENTS_V2,
    MOD_PERMISSIONS,
    CommandNotAvailable,
    custom_ids,
    media_gallery_items,
)
from fakes.fal_fake import JobScript, model_error
from services.config import SettingsError, load_settings
from tests.e2e import admin, button, contents, details, finished, private_answer, shows, text

PERSONAL = {"PERSONAL_USE": "1", "MONTHLY_BUDGET_USD": "5"}


async def kontext_in(world, *, user: str = "alice", **where):
    """/kontext with an image and a prompt, where `where` says (context, guild_id, locale...)."""
    options = {"image": world.input_image(), "prompt": where.pop("prompt", "make the sky purple")}
    options.update(where.pop("options", {}))
    return await world.discord.invoke_slash("kontext", options=options, user=user, **where)


def server_without_the_bot(world, **settings):
    """A server alice is in where only her own install of the app brings it."""
    alone = world.discord.add_guild("Friends", bot=False, **settings)
    world.discord.add_member(world.discord.alice, guild=alone)
    world.discord.authorize_user_install("alice")
    return alone


def bot_posts_in(world, guild) -> list:
    """Everything the bot posted with its own token in a server's channels."""
    return [
        r
        for r in world.discord.requests_to("POST", r"^/channels/\d+/messages$")
        if r.path.split("/")[2] in guild.channels
    ]


def dm_messages(world) -> list:
    """What the bot posted in alice's DM with it."""
    channel = world.discord.dm_channels.get(world.discord.alice["id"])
    return world.discord.channel_messages(channel) if channel else []


async def delivered(world, count: int) -> None:
    """Until `count` jobs are closed in the database (their places given back)."""
    await world.discord.wait_until(lambda: sum(row["delivered_at"] is not None for row in job_rows(world)) == count)


def job_rows(world) -> list[sqlite3.Row]:
    with sqlite3.connect(world.data_dir / "kontext.sqlite3") as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM jobs ORDER BY id").fetchall()


# -- 1. installed to the member's account --------------------------------------------------------


async def test_commands_declare_where_discord_may_offer_them(world):
    await world.start_bot(**PERSONAL)
    commands = world.discord.commands
    for name in ("kontext", "Edit with Kontext"):
        assert commands[name]["integration_types"] == [0, 1] and commands[name]["contexts"] == [0, 1, 2]
    assert commands["kontext-admin"]["integration_types"] == [0] and commands["kontext-admin"]["contexts"] == [0]
    alone = server_without_the_bot(world)
    with pytest.raises(CommandNotAvailable):  # a server's moderation: never where the bot is not
        await world.discord.invoke_slash("kontext-admin show", user="alice", guild_id=alone.id, context="user_guild")
    world.discord.violations.clear()  # the one refused on purpose above


async def test_without_personal_use_the_commands_stay_in_servers(world):
    await world.start_bot()
    assert world.discord.commands["kontext"]["integration_types"] == [0]
    assert world.discord.commands["kontext"]["contexts"] == [0]
    with pytest.raises(CommandNotAvailable):
        await kontext_in(world, context="bot_dm")
    world.discord.violations.clear()


async def test_a_dm_with_the_bot(world):
    await world.start_bot(**PERSONAL)
    handle = await kontext_in(world, context="bot_dm")
    message = await finished(handle)
    assert handle.payload["context"] == 1 and "guild_id" not in handle.payload
    assert text(message) == "✅ Done." and message.flags & IS_COMPONENTS_V2 and len(message.files) == 1
    assert message.channel_id == world.discord.dm_channels[world.discord.alice["id"]]
    (row,) = job_rows(world)
    assert row["place"] == "bot_dm" and row["guild_id"] is None
    # Its buttons work there too: a re-roll is a new job under the same personal policy.
    again = await world.discord.click_button(message.id, button(message, "reroll"), user="alice")
    assert text(await finished(again)).startswith("✅") and [r["place"] for r in job_rows(world)] == ["bot_dm"] * 2


async def test_delete_in_a_dm_removes_every_message_of_the_result(world):
    """A classic result split over messages to fit the DM's upload limit is one result there
    too: the bot may delete its own messages in its DM, so Delete on one part removes them all."""
    world.fal.default = JobScript(image_size=40_000)
    await world.start_bot(**PERSONAL, RESULT_CARDS="0")
    handle = await kontext_in(world, context="bot_dm", options={"num_images": 4}, attachment_size_limit=100_000)
    message = await finished(handle)
    await handle.wait_until(lambda h: len(h.followups) == 1)
    (part,) = handle.followups
    click = await world.discord.click_button(part.id, button(part, "delete"), user="alice")
    await click.wait_for_callback()
    await world.discord.wait_until(lambda: message.deleted and part.deleted, timeout=5)


async def test_delete_in_a_server_without_the_bot_asks_discord_nothing_it_refuses(world):
    """Where only the member's install brings the app, the bot's token may not touch the channel:
    Delete on one part of a result removes that part through the interaction and sends no
    bot-token delete, which Discord would refuse (403 50001, counted as an invalid request)."""
    world.fal.default = JobScript(image_size=40_000)
    await world.start_bot(**PERSONAL, RESULT_CARDS="0")
    alone = server_without_the_bot(world)
    options = {"num_images": 4}
    handle = await kontext_in(
        world, guild_id=alone.id, context="user_guild", options=options, attachment_size_limit=100_000
    )
    message = await finished(handle)
    await handle.wait_until(lambda h: len(h.followups) == 1)
    (part,) = handle.followups
    click = await world.discord.click_button(part.id, button(part, "delete"), user="alice")
    await click.wait_for_callback()
    await world.discord.wait_until(lambda: part.deleted, timeout=5)
    assert not message.deleted  # the bot may not delete it there
    assert world.discord.requests_to("DELETE", r"^/channels/") == []
    assert not any(status == 403 for status, *_ in world.discord.rejections), world.discord.rejections


async def test_an_image_over_a_dm_s_upload_limit_is_linked_as_too_large_for_a_dm(world):
    """The line that links an image over the upload limit names the place it was shown in: in
    the member's DM with the bot there is no server whose limit it could be."""
    world.fal.default = JobScript(image_size=150_000)
    await world.start_bot(**PERSONAL)
    message = await finished(await kontext_in(world, context="bot_dm", attachment_size_limit=100_000))
    assert text(message).startswith("✅ Done.\n📦 Too large to send in a DM: [image 1](http"), text(message)
    assert message.files == {}


async def test_a_server_without_the_bot(world):
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.2)
    await world.start_bot(**PERSONAL)
    alone = server_without_the_bot(world)
    handle = await kontext_in(world, guild_id=alone.id, context="user_guild")
    message = await finished(handle)
    assert handle.owners == {"1": world.discord.alice["id"]} and handle.user_install_only
    assert any("In queue" in c for c in contents(message)) and text(message) == "✅ Done."
    assert message.guild_id == alone.id and message.flags & IS_COMPONENTS_V2
    # Only the interaction shows anything there: no post with the bot's token, no log line.
    assert bot_posts_in(world, alone) == [] and handle.followups == []
    (row,) = job_rows(world)
    assert row["place"] == "external" and row["guild_id"] == int(alone.id)


async def test_in_a_server_without_the_bot_its_moderators_have_no_say_over_a_members_job(world):
    """Only alice's own install brings the app to that server: no server governs her job, and
    its moderators are none of hers. They may not cancel it, nor delete its result; told why."""
    world.fal.default = JobScript(queue_positions=(3, 2, 1, 0), step=0.5)
    await world.start_bot(**PERSONAL)
    alone = server_without_the_bot(world)
    world.discord.add_member(name="nosy", permissions=MOD_PERMISSIONS, guild=alone)
    handle = await kontext_in(world, guild_id=alone.id, context="user_guild")
    await handle.wait_until(lambda h: shows(h, "In queue"))
    cancel = await world.discord.click_button(handle.original.id, button(handle.original, "cancel"), user="nosy")
    await cancel.wait_for_callback()
    assert "for the moderators of a server that added the bot" in private_answer(cancel)
    message = await finished(handle)
    assert text(message) == "✅ Done."
    delete = await world.discord.click_button(message.id, button(message, "delete"), user="nosy")
    await delete.wait_for_callback()
    assert "for the moderators of a server that added the bot" in private_answer(delete)
    assert not message.deleted


async def test_a_server_that_keeps_external_apps_private(world):
    """ "Use External Apps" off: Discord makes the reply ephemeral; the card says why."""
    await world.start_bot(**PERSONAL)
    alone = server_without_the_bot(world)
    alone.use_external_apps = False
    message = await finished(await kontext_in(world, guild_id=alone.id, context="user_guild"))
    assert message.flags & EPHEMERAL and message.flags & IS_COMPONENTS_V2
    assert "🔒 Only you can see this" in details(message)


# -- 2. the operator's policy for personal use -------------------------------------------------


async def test_the_operators_policy_allows_clamps_and_refuses(world):
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.5)
    await world.start_bot(**PERSONAL, PERSONAL_DAILY_JOBS="2", PERSONAL_SAFETY_MAXIMUM="3")
    first = await kontext_in(world, context="bot_dm", options={"safety_tolerance": 6})
    await first.wait_until(lambda h: shows(h, "In queue"))
    # One job at a time (PERSONAL_CONCURRENT_JOBS 1), counted across places: a server without the bot too.
    alone = server_without_the_bot(world)
    busy = await kontext_in(world, guild_id=alone.id, context="user_guild")
    await busy.wait_for_callback()
    assert "already have 1 edit running" in private_answer(busy)
    message = await finished(first)
    await delivered(world, 1)
    assert world.fal.submits[0]["safety_tolerance"] == "3"
    assert "limited to 3 by the bot's policy for use outside servers" in details(message)
    assert text(await finished(await kontext_in(world, guild_id=alone.id, context="user_guild"))) == "✅ Done."
    await delivered(world, 2)
    third = await kontext_in(world, context="bot_dm")
    await third.wait_for_callback()
    assert "You've used your 2 edits for today outside servers that added the bot" in private_answer(third)
    # A server that added the bot keeps its own limits: the personal ones do not count there.
    assert text(await finished(await world.kontext())) == "✅ Done."
    assert len(world.fal.submits) == 3


async def test_the_operators_budget_counts_personal_use(world):
    await world.start_bot(PERSONAL_USE="1", MONTHLY_BUDGET_USD="0.16")  # two images at $0.08
    assert text(await finished(await kontext_in(world, context="bot_dm", options={"num_images": 2}))) == "✅ Done."
    await delivered(world, 1)
    refused = await world.kontext()  # in a server: the same budget is used up
    await refused.wait_for_callback()
    assert "The bot's monthly budget of $0.16 would be exceeded" in private_answer(refused)


async def test_personal_use_turned_off_refuses_commands_discord_still_offers(world):
    """The operator turned PERSONAL_USE off but the commands were not synced again
    (SYNC_COMMANDS=never): Discord still offers them in DMs, the bot says no, privately."""
    await world.start_bot(**PERSONAL)
    await world.bot.stop()
    await world.start_bot(PERSONAL_USE="0", SYNC_COMMANDS="never")
    handle = await kontext_in(world, context="bot_dm")
    await handle.wait_for_callback()
    assert private_answer(handle) == "The Kontext bot works only in servers that added it."
    assert world.fal.submits == []


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"PERSONAL_USE": "1"}, "PERSONAL_USE=1 needs MONTHLY_BUDGET_USD"),
        ({"PERSONAL_SAFETY_DEFAULT": "4"}, "PERSONAL_SAFETY_DEFAULT (4) is above PERSONAL_SAFETY_MAXIMUM (2)"),
    ],
)
def test_personal_use_settings_that_would_surprise_the_operator_stop_the_bot(settings, why):
    with pytest.raises(SettingsError, match=re.escape(why)):
        load_settings({"DISCORD_TOKEN": "x", "FAL_KEY": "y", **settings})


# -- 3. a job that outlives the 15-minute reply --------------------------------------------------


@pytest.mark.parametrize("dms_open", [True, False], ids=["dm", "dms-closed"])
async def test_a_job_outliving_its_reply_where_the_bot_cannot_post_comes_by_dm(world, dms_open):
    world.fal.default = JobScript(queue_positions=(6, 5, 4, 3, 2, 1, 0), step=1.0)
    await world.start_bot(**PERSONAL)
    alone = server_without_the_bot(world)
    if not dms_open:
        world.discord.dms_closed.add(world.discord.alice["id"])
    handle = await kontext_in(world, guild_id=alone.id, context="user_guild")
    await handle.wait_until(lambda h: shows(h, "In queue"))
    await world.bot.kill()
    with sqlite3.connect(world.data_dir / "kontext.sqlite3") as db:  # 13.5 minutes old, as the bot sees it
        db.execute("UPDATE jobs SET interaction_created_at = interaction_created_at - 810")
    await world.start_bot(**PERSONAL)
    # Before its token ends, the reply says where the result will go...
    await handle.wait_until(lambda h: shows(h, "the result will come in a DM from the bot"), timeout=10)
    world.discord.age_interactions(16 * 60)  # ...then the token dies
    if not dms_open:  # nowhere left to show it: the job is closed, with the reason logged
        await world.discord.wait_until(lambda: job_rows(world)[0]["delivered_at"] is not None, timeout=15)
        assert "job 1 cannot be shown (Discord refused the bot's post: 403 50007)" in world.bot.log_text()
        assert dm_messages(world) == [] and bot_posts_in(world, alone) == []
        return
    await world.discord.wait_until(lambda: dm_messages(world), timeout=15)
    (card,) = dm_messages(world)
    link = f"https://discord.com/channels/{alone.id}/{handle.channel_id}/{handle.original.id}"
    assert (
        text(card)
        == f"📬 Your edit from {link} is ready: the reply there could only be updated for 15 minutes.\n✅ Done."
    )
    assert card.flags & IS_COMPONENTS_V2 and len(media_gallery_items(card)) == 1 and len(card.files) == 1
    assert bot_posts_in(world, alone) == [] and world.fal.count("submit") == 1
    # The card's buttons work in the DM, on the job they were posted for.
    delete = await world.discord.click_button(card.id, button(card, "delete"), user="alice")
    await delete.wait_for_callback()
    await world.discord.wait_until(lambda: card.deleted, timeout=5)


async def test_a_failure_outliving_its_reply_is_not_announced_as_ready(world):
    """fal refuses the job after the reply's token ended: the DM tells the failure, with Try
    again, and does not announce a result that is not there."""
    world.fal.default = model_error("downstream_service_error", "BFL could not do it", queue_positions=(1, 0), step=0.4)
    await world.start_bot(**PERSONAL)
    alone = server_without_the_bot(world)
    handle = await kontext_in(world, guild_id=alone.id, context="user_guild")
    await handle.wait_until(lambda h: shows(h, "In queue"))
    world.discord.expire_token(handle.token)
    await world.discord.wait_until(lambda: dm_messages(world), timeout=15)
    (news,) = dm_messages(world)
    link = f"https://discord.com/channels/{alone.id}/{handle.channel_id}/{handle.original.id}"
    assert text(news) == (
        f"📬 An update on your edit from {link}: the reply there could only be updated for 15 minutes.\n"
        "❌ FLUX.1 Kontext refused this edit: BFL could not do it"
    )
    assert button(news, "retry") and bot_posts_in(world, alone) == []


async def test_the_follow_up_limit_of_an_app_the_server_has_not_added(world):
    """Classic results split over messages: if Discord refuses a follow-up (an interaction of a
    user-installed app gets at most 5), the rest comes by DM, nothing twice."""
    world.fal.default = JobScript(image_size=40_000)
    await world.start_bot(**PERSONAL, RESULT_CARDS="0")
    alone = server_without_the_bot(world)
    world.discord.fail_next(
        "POST",
        r"/webhooks/\d+/[^/]+$",
        status=400,
        json={"message": "This interaction has hit the maximum number of follow up messages", "code": 40094},
    )
    handle = await world.discord.invoke_slash(
        "kontext",
        options={"image": world.input_image(), "prompt": "four", "num_images": 4},
        user="alice",
        guild_id=alone.id,
        context="user_guild",
        attachment_size_limit=100_000,
    )
    await finished(handle)
    await world.discord.wait_until(lambda: dm_messages(world), timeout=15)
    assert sorted(handle.original.files) == ["kontext-1-1.jpg", "kontext-1-2.jpg"]
    (rest,) = dm_messages(world)
    assert text(rest).startswith("📬 Your edit from https://discord.com/channels/")
    assert sorted(rest.files) == ["kontext-1-3.jpg", "kontext-1-4.jpg"] and handle.followups == []


# -- 4. results as one card --------------------------------------------------------------------


async def test_a_card_with_two_images_one_of_them_flagged(world):
    world.fal.default = JobScript(nsfw=(False, True))
    await world.start_bot()
    prompt = "put a neon *crown* on the cat " + "and more " * 200  # long: the alt text is cut to fit
    handle = await world.kontext(prompt=prompt.strip(), num_images=2, channel_id=world.discord.nsfw_channel_id)
    message = await finished(handle)
    assert message.flags & IS_COMPONENTS_V2 and message.content == "" and message.embeds == []
    (container,) = message.components
    assert container["type"] == 17 and [c["type"] for c in container["components"]] == [10, 12, 10, 14, 1]
    items = media_gallery_items(message)
    assert [item["filename"] for item in items] == ["kontext-1-1.jpg", "kontext-1-2.jpg"]
    assert [item["spoiler"] for item in items] == [False, True]  # only the one fal flagged
    alt = " ".join(prompt.split())
    assert all(item["description"] == alt[:1023] + "…" for item in items) and len(items[0]["description"]) == 1024
    assert text(message) == "⚠️ Flagged by the safety checker: shown behind a spoiler."
    assert "> put a neon \\*crown\\* on the cat" in details(message) and "-# Job #1" in details(message)
    assert [i.rsplit(":", 2)[0] for i in custom_ids(message.components)] == [
        "kontext:reroll",
        "kontext:edit",
        "kontext:delete",
    ]
    # The buttons outlive the process, like the classic ones.
    await world.bot.stop()
    await world.start_bot()
    click = await world.discord.click_button(message.id, button(message, "edit"), user="alice")
    modal = (await click.wait_for_callback())["data"]
    assert "job #1" in modal["title"]


# -- 5. languages ---------------------------------------------------------------------------


async def test_a_german_member_reads_german(world):
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.3, run_time=0.3)
    await world.start_bot()
    localized = world.discord.commands["kontext"]
    assert localized["name"] == "kontext" and not localized.get("name_localizations")  # names stay English
    assert (
        localized["description_localizations"]["de"]
        == "Ein Bild bearbeiten oder aus Text erstellen, mit FLUX.1 Kontext [max]"
    )
    prompt = {o["name"]: o for o in localized["options"]}["prompt"]
    assert prompt["description_localizations"]["fr"].startswith("Ce qu’il faut changer")
    handle = await kontext_in(world, locale="de", options={"seed": 7})
    message = await finished(handle)
    shown = contents(message)
    assert any(c.startswith("🕒 In der Warteschlange, Position **") for c in shown), shown
    assert any(c.startswith("🎨 Wird erstellt …") for c in shown), shown
    assert text(message) == "✅ Fertig."
    card = details(message)
    assert "**Angefordert von** <@" in card and "**Seed** 7" in card and "-# Auftrag #1" in card
    labels = [b["label"] for b in message.components[0]["components"][-1]["components"]]
    assert labels == ["Neu würfeln", "Bearbeiten", "Löschen"]
    # Refusals and errors too, in the language of whoever asks.
    world.discord.add_member(name="bob")
    stranger = await world.discord.click_button(message.id, button(message, "delete"), user="bob", locale="de")
    await stranger.wait_for_callback()
    assert private_answer(stranger) == (
        "Nur das Mitglied, das diese Bearbeitung angefordert hat, oder ein Moderator kann sie löschen."
    )
    blank = await kontext_in(world, prompt="   ", locale="de")
    await blank.wait_for_callback()
    assert private_answer(blank) == "Beschreibe bitte in `prompt`, was geändert werden soll."


async def test_the_moderators_log_follows_the_servers_language(world):
    world.discord.default_guild.preferred_locale = "fr"
    await world.start_bot()
    channel = world.discord.add_channel("journal-kontext")
    await world.discord.dispatch("CHANNEL_CREATE", channel)
    answer = await admin(world, "log-channel", channel=channel["id"])  # the moderator reads English
    assert answer.startswith("**Log channel**: not set → <#")
    await finished(await world.kontext(prompt="un chat bleu"))
    await world.discord.wait_until(lambda: len(world.discord.channel_messages(channel["id"])) == 2)
    change, job_line = [m.content for m in world.discord.channel_messages(channel["id"])]
    assert change.startswith(f"🛠️ <@{world.discord.mod['id']}> a modifié les règles de Kontext :\n**Salon de journal**")
    assert job_line.startswith(f"✅ Tâche n° 1 de <@{world.discord.alice['id']}> dans <#")
    assert "· tolérance 2 · réussie · « un chat bleu » ·" in job_line


async def test_a_job_resumed_before_its_server_is_cached_is_logged_in_the_servers_language(world):
    """A restart resumes jobs before the gateway sends the servers (here it is down: the cache
    stays empty): the log line of a job finished then is in the server's language all the same."""
    world.discord.default_guild.preferred_locale = "fr"
    world.fal.default = JobScript(queue_positions=(3, 2, 1, 0), step=0.4, run_time=0.1)
    await world.start_bot()
    channel = world.discord.add_channel("journal-kontext")
    await world.discord.dispatch("CHANNEL_CREATE", channel)
    await admin(world, "log-channel", channel=channel["id"])
    handle = await world.kontext(prompt="un chat bleu")
    await handle.wait_until(lambda h: shows(h, "In queue"))
    await world.bot.kill()
    await world.discord.start_gateway_outage()
    world.bot = world.new_bot()
    await world.bot.start()
    assert text(await finished(handle)).startswith("✅")
    await world.discord.wait_until(lambda: len(world.discord.channel_messages(channel["id"])) == 2)
    assert world.discord.identify_count == 1  # the restarted bot never had the server in its cache
    job_line = world.discord.channel_messages(channel["id"])[-1].content
    assert job_line.startswith(f"✅ Tâche n° 1 de <@{world.discord.alice['id']}> dans <#"), job_line
    world.discord.end_gateway_outage()


async def test_a_result_discord_kept_private_shown_again_says_so_only_where_it_is(world):
    """Show here of a job whose reply Discord made private: in a server that added the bot the
    copy is for everyone and says nothing of privacy; back where Discord keeps the app's replies
    private, the copy is private again and says why."""
    await world.start_bot(**PERSONAL)
    alone = server_without_the_bot(world)
    alone.use_external_apps = False
    kept = await finished(await kontext_in(world, guild_id=alone.id, context="user_guild"))
    assert "🔒 Only you can see this" in details(kept)
    for guild_id, context, private in ((world.discord.guild_id, None, False), (alone.id, "user_guild", True)):
        where = {"context": context} if context else {}
        page = await world.discord.invoke_slash("kontext-history", user="alice", guild_id=guild_id, **where)
        await page.wait_for_callback()
        (show,) = [c for c in custom_ids(page.original.components) if c.startswith("kh:show:")]
        shown = await finished(await world.discord.click_button(page.original.id, show, user="alice"))
        assert bool(shown.flags & EPHEMERAL) == private
        assert ("🔒 Only you can see this" in details(shown)) == private, details(shown)


async def test_a_private_first_result_is_not_shared_where_discord_keeps_the_app_s_replies_private(world):
    """Share posts through the interaction, which Discord makes private in a server that keeps
    the replies of apps it has not added private: the member is told it cannot be shared there,
    and the result stays unshared instead of counting as shared while only they see it."""
    await world.start_bot(**PERSONAL)
    chosen = await world.discord.invoke_slash("kontext-settings", options={"results": "private_first"}, user="alice")
    await chosen.wait_for_callback()
    alone = server_without_the_bot(world)
    alone.use_external_apps = False
    private = await finished(await kontext_in(world, guild_id=alone.id, context="user_guild"))
    assert private.flags & EPHEMERAL
    for _ in range(2):  # the second press meets the same answer: nothing was recorded as shared
        click = await world.discord.click_button(private.id, button(private, "share"), user="alice")
        await click.wait_for_callback()
        await click.wait_until(lambda h: shows(h, "can't be shared"))
        assert click.original.flags & EPHEMERAL and not media_gallery_items(click.original)
    assert "Only you can see this until you share it" in details(private)
