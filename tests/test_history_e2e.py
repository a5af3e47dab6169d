"""/kontext-history: a member's own jobs, privately; pages, the chain of edits, Show here."""

from __future__ import annotations

import asyncio
import time
import urllib.parse

from fakes.discord_fake import (
    ATTACH_FILES,
    EPHEMERAL,
    IS_COMPONENTS_V2,
    MANAGE_MESSAGES,
    MANAGE_THREADS,
    MOD_PERMISSIONS,
    READ_MESSAGE_HISTORY,
    VIEW_CHANNEL,
    media_gallery_items,
    text_displays,
    walk_components,
)
from fakes.fal_fake import JobScript
from tests import test_cluster_e2e
from tests.e2e import admin, button, details, finished, has_button, outliving_its_reply, private_answer, text
from tests.test_cluster_e2e import Cluster
from tests.test_member_settings_e2e import settings
from tests.test_resilience_e2e import restart

cluster = test_cluster_e2e.cluster  # two processes, each serving the server on its shard


async def results(world, count: int, user: str = "alice", **options) -> list:
    messages = []
    for n in range(count):
        message = await finished(await world.kontext(user=user, prompt=f"edit number {n + 1}", **options))
        assert text(message).startswith("✅"), text(message)
        messages.append(message)
    return messages


async def history(world, user: str = "alice", **options):
    """Open /kontext-history; returns the interaction (its ephemeral reply is `original`)."""
    handle = await world.discord.invoke_slash("kontext-history", options=options, user=user)
    callback = await handle.wait_for_callback()
    if callback["type"] == 4 and handle.original is not None and handle.original.flags & IS_COMPONENTS_V2:
        assert handle.original.flags & EPHEMERAL
    return handle


def listed(message) -> list[int]:
    """The job numbers a history message lists, in order."""
    return [int(t.split("**", 2)[1].lstrip("#")) for t in text_displays(message.components) if t.startswith("**#")]


def buttons(message) -> dict[str, dict]:
    """The message's buttons by label."""
    return {c["label"]: c for c in walk_components(message.components) if c.get("type") == 2}


def entry_button(message, action: str, job_id: int) -> str:
    """The custom_id of a listed job's button (kh:<action>:<owner>:<subject>:<scope>:<job id>)."""
    (found,) = [
        c["custom_id"]
        for c in walk_components(message.components)
        if c.get("custom_id", "").startswith(f"kh:{action}:") and c["custom_id"].endswith(f":{job_id}")
    ]
    return found


async def press(world, message, label_or_id: str, user: str = "alice"):
    custom_id = buttons(message)[label_or_id]["custom_id"] if label_or_id in buttons(message) else label_or_id
    click = await world.discord.click_button(message.id, custom_id, user=user)
    await click.wait_for_callback()
    return click


async def test_history_pages_through_the_members_jobs_newest_first(world):
    await world.start_bot()
    await results(world, 9)
    await results(world, 1, user="mod")  # someone else's job is never listed
    page = (await history(world)).original
    assert listed(page) == [9, 8, 7, 6]
    shown = "\n".join(text_displays(page.components))
    assert "edit number 9" in shown and "<t:" in shown and "✅" in shown
    assert buttons(page)["Previous"].get("disabled") and not buttons(page)["Next"].get("disabled")
    # The first image of each job, as Discord serves it, and a link to the result.
    thumbnails = [c["media"]["url"] for c in walk_components(page.components) if c["type"] == 11]
    assert len(thumbnails) == 4 and all(u.startswith(world.discord.base_url + "/cdn/") for u in thumbnails)
    assert buttons(page)["Open"]["url"].startswith("https://discord.com/channels/")
    await press(world, page, "Next")
    assert listed(page) == [5, 4, 3, 2]
    await press(world, page, "Next")
    assert listed(page) == [1] and buttons(page)["Next"].get("disabled")
    await press(world, page, "Previous")
    assert listed(page) == [5, 4, 3, 2]
    await press(world, page, "Previous")
    assert listed(page) == [9, 8, 7, 6] and buttons(page)["Previous"].get("disabled")


async def test_history_filters_this_server_or_everywhere(world):
    other = world.discord.add_guild("Other server")
    world.discord.add_member(user_id=world.discord.alice, guild=other)
    await world.start_bot()
    await results(world, 2)
    elsewhere = await finished(await world.kontext(channel_id=other.channel_id, prompt="far away"))
    assert text(elsewhere).startswith("✅")
    everywhere = (await history(world)).original
    assert listed(everywhere) == [3, 2, 1]
    here = (await history(world, where="s")).original
    assert listed(here) == [2, 1]
    await press(world, here, "Everywhere")
    assert listed(here) == [3, 2, 1]
    await press(world, here, "This server only")
    assert listed(here) == [2, 1]


async def test_another_members_history_is_for_moderators_only(world):
    await world.start_bot()
    await results(world, 2)
    world.discord.add_member(name="bob")
    refused = await history(world, user="bob", member="alice")
    assert "Only moderators" in private_answer(refused)
    other = world.discord.add_guild("Other server")
    world.discord.add_member(user_id=world.discord.alice, guild=other)
    await finished(await world.kontext(channel_id=other.channel_id))  # not this moderator's server
    looked_up = (await history(world, user="mod", member="alice", where="a")).original
    assert listed(looked_up) == [2, 1]  # this server only, whatever the filter asked
    assert "Show here" not in buttons(looked_up)  # a moderator looks; only the member posts
    # The list's buttons are its owner's: nobody else's press counts.
    click = await world.discord.click_button(looked_up.id, buttons(looked_up)["Next"]["custom_id"], user="bob")
    await click.wait_for_callback()
    assert "belongs to someone else" in private_answer(click)


async def test_the_chain_of_edits_is_followed_both_ways(world):
    await world.start_bot()
    (first,) = await results(world, 1)
    reroll = await finished(await world.discord.click_button(first.id, button(first, "reroll"), user="alice"))
    assert text(reroll).startswith("✅")
    again = await finished(await world.discord.click_button(reroll.id, button(reroll, "reroll"), user="alice"))
    assert text(again).startswith("✅")
    page = (await history(world)).original
    assert listed(page) == [3, 2, 1]
    assert "from job #1" in "\n".join(text_displays(page.components))
    await press(world, page, entry_button(page, "chain", 2))
    assert listed(page) == [1, 2, 3]  # made from 1, and 3 made from it
    await press(world, page, entry_button(page, "chain", 1))  # back to the source
    assert listed(page) == [1, 2]
    await press(world, page, "Back to the list")
    assert listed(page) == [3, 2, 1]


async def test_show_here_posts_the_result_again_with_working_buttons(world):
    await world.start_bot()
    (original,) = await results(world, 1)
    art = world.discord.add_channel("gallery")
    handle = await world.discord.invoke_slash("kontext-history", user="alice", channel_id=art["id"])
    await handle.wait_for_callback()
    page = handle.original
    click = await press(world, page, "Show here")
    shown = await finished(click)
    assert not shown.flags & EPHEMERAL and shown.channel_id == art["id"]
    assert "Shown again by <@" in text(shown)
    (item,) = media_gallery_items(shown)
    (source,) = media_gallery_items(original)
    assert item["data"] == source["data"]  # the same image, uploaded again
    # Its buttons act on the job: a re-roll from here is made from job #1, in this channel.
    again = await finished(await world.discord.click_button(shown.id, button(shown, "reroll"), user="alice"))
    assert details(again).splitlines()[-1].endswith("Job #2 · from job #1")
    assert again.channel_id == art["id"]
    delete = await world.discord.click_button(shown.id, button(shown, "delete"), user="alice")
    await delete.wait_for_callback()
    await world.discord.wait_until(lambda: shown.deleted)
    assert not original.deleted  # the shown copy only


async def test_a_private_first_result_shown_here_is_a_public_card(world):
    await world.start_bot()
    await settings(world, results="private_first")
    private = await finished(await world.kontext(image=None, prompt="a secret garden"))
    art = world.discord.add_channel("gallery")
    handle = await world.discord.invoke_slash("kontext-history", user="alice", channel_id=art["id"])
    await handle.wait_for_callback()
    shown = await finished(await press(world, handle.original, "Show here"))
    assert not shown.ephemeral and shown.channel_id == art["id"]
    assert "Only you can see this" not in details(shown) and not has_button(shown, "share")
    for action in ("reroll", "edit", "delete"):
        button(shown, action)
    # The original stays the member's alone until they share it, and Share still posts it.
    assert "Only you can see this until you share it" in details(private)
    shared = await finished(await world.discord.click_button(private.id, button(private, "share"), user="alice"))
    assert not shared.ephemeral and shared.channel_id == world.discord.channel_id
    assert "Only you can see this" not in details(shared) and not has_button(shared, "share")


async def test_a_deleted_result_is_not_shown_again(world):
    """Deleted with its 🗑️ button (or by a moderator), a result is gone: Show here does not post
    it again from the image addresses kept when it was posted, which Discord's CDN may still
    serve for a while."""
    await world.start_bot()
    (original,) = await results(world, 1)
    delete = await world.discord.click_button(original.id, button(original, "delete"), user="alice")
    await delete.wait_for_callback()
    await world.discord.wait_until(lambda: original.deleted)
    handle = await history(world)
    click = await press(world, handle.original, "Show here")
    await click.wait_until(lambda h: any("no longer has the images" in m.content for m in h.followups))
    assert not [m for m in world.discord.channel_messages(world.discord.channel_id) if not (m.deleted or m.ephemeral)]


async def test_a_late_result_that_came_by_dm_is_shown_here(world):
    """The bot may not upload files in the job's channel, so its late result came by DM: Show
    here finds its images (in the DM, not the channel), instead of taking it for deleted."""
    await outliving_its_reply(world, bot_denied=ATTACH_FILES)
    fake = world.discord
    dm = lambda: [m for m in fake.channel_messages(fake.dm_channels.get(fake.alice["id"], "none")) if m.files]  # noqa: E731
    await fake.wait_until(dm, timeout=15)
    fake.set_permission_overwrite(fake.channel_id, fake.default_guild.bot_role_id)
    page = (await history(world)).original
    shown = await finished(await press(world, page, "Show here"))
    assert not shown.ephemeral and shown.channel_id == fake.channel_id, text(shown)
    assert "Shown again by <@" in text(shown) and len(media_gallery_items(shown)) == 1


async def test_a_result_the_bot_may_not_read_again_is_shown_here(world):
    """The bot's role may not Read Message History in the channel, so Discord refuses it the
    result's message (403, not 404): the result is not gone, and Show here posts it from the
    image addresses kept when it was posted."""
    fake = world.discord
    fake.set_permission_overwrite(fake.channel_id, fake.default_guild.bot_role_id, deny=READ_MESSAGE_HISTORY)
    await world.start_bot()
    await results(world, 1)
    page = (await history(world)).original
    shown = await finished(await press(world, page, "Show here"))
    assert not shown.ephemeral and "Shown again by <@" in text(shown), text(shown)
    assert len(media_gallery_items(shown)) == 1


async def test_show_here_is_refused_where_kontext_would_be(world):
    await world.start_bot()
    (original,) = await results(world, 1)
    closed = world.discord.add_channel("closed")
    await admin(world, "access channel-add", channel=world.discord.channel_id)
    handle = await world.discord.invoke_slash("kontext-history", user="alice", channel_id=closed["id"])
    await handle.wait_for_callback()
    click = await press(world, handle.original, "Show here")
    refusal = private_answer(click)
    job = await world.discord.invoke_slash(
        "kontext", user="alice", channel_id=closed["id"], options={"image": world.input_image(), "prompt": "x"}
    )
    await job.wait_for_callback()
    assert refusal == private_answer(job) and refusal


async def test_show_here_keeps_a_result_made_at_the_nsfw_maximum_out_of_ordinary_channels(world):
    await world.start_bot()
    made = await finished(await world.kontext(channel_id=world.discord.nsfw_channel_id, safety_tolerance=4))
    assert text(made).startswith("✅") and world.fal.submits[-1]["safety_tolerance"] == "4"
    await finished(await world.kontext(safety_tolerance=4))
    assert world.fal.submits[-1]["safety_tolerance"] == "2"  # what /kontext allows in #general
    page = (await history(world)).original  # opened in #general
    refused = await press(world, page, entry_button(page, "show", 1))
    assert "made at a higher safety tolerance than this channel allows (at most 2)" in private_answer(refused)
    assert [m for m in world.discord.channel_messages() if "Shown again by" in text(m)] == []
    # Another age-restricted channel allows what the first one did: there it is shown.
    adult = world.discord.add_channel("more-nsfw-art", nsfw=True)
    handle = await world.discord.invoke_slash("kontext-history", user="alice", channel_id=adult["id"])
    await handle.wait_for_callback()
    shown = await finished(await press(world, handle.original, entry_button(handle.original, "show", 1)))
    assert shown.channel_id == adult["id"] and "Shown again by <@" in text(shown)


async def test_history_skips_servers_the_bot_left(world):
    other = world.discord.add_guild("Other server")
    world.discord.add_member(user_id=world.discord.alice, guild=other)
    await world.start_bot()
    await results(world, 1)
    await finished(await world.kontext(channel_id=other.channel_id))
    assert listed((await history(world)).original) == [2, 1]
    other.bot_member, other.bot_left = False, True  # removed from the server
    await world.discord.dispatch("GUILD_DELETE", {"id": other.id})
    assert listed((await history(world)).original) == [1]


def thumbnails(message) -> list[str]:
    return [c["media"]["url"] for c in walk_components(message.components) if c["type"] == 11]


async def test_thumbnails_outlive_discords_signed_urls(world):
    world.discord.upload_url_lifetime = 2  # seconds, on the clocks of both Discord and the bot
    await world.start_bot()
    (result,) = await results(world, 1)
    (stored,) = thumbnails((await history(world)).original)
    assert stored == result.attachments[0]["url"]  # as Discord returned it, while it lasts
    assert not world.discord.requests_to("GET", r"^/channels/\d+/messages/\d+$")
    expires = int(urllib.parse.parse_qs(urllib.parse.urlsplit(stored).query)["ex"][0], 16)
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.05)
    (fresh,) = thumbnails((await history(world)).original)
    assert fresh != stored and fresh.split("?")[0] == stored.split("?")[0]  # the result's message fetched again
    fetches = len(world.discord.requests_to("GET", r"^/channels/\d+/messages/\d+$"))
    assert fetches == 1
    assert thumbnails((await history(world)).original) == [fresh]  # kept: not fetched again meanwhile
    assert len(world.discord.requests_to("GET", r"^/channels/\d+/messages/\d+$")) == fetches
    # Once that expires too and Discord does not answer the fetch, the list still comes in time.
    expires = int(urllib.parse.parse_qs(urllib.parse.urlsplit(fresh).query)["ex"][0], 16)
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.05)
    world.discord.fail_next("GET", r"^/channels/\d+/messages/\d+$", status="hang")
    started = time.monotonic()
    page = (await history(world)).original
    assert thumbnails(page) == [] and listed(page) == [1] and time.monotonic() - started < 2.5
    world.discord.release_hangs()


async def test_history_in_dms_lists_personal_use_and_shows_results_there(world):
    await world.start_bot(PERSONAL_USE="1", MONTHLY_BUDGET_USD="5")
    commands = world.discord.commands  # offered wherever /kontext is
    for where in ("integration_types", "contexts"):
        assert commands["kontext-history"][where] == commands["kontext"][where]
    alone = world.discord.add_guild("Friends", bot=False)
    world.discord.add_member(world.discord.alice, guild=alone)
    world.discord.authorize_user_install("alice")
    await results(world, 1)  # in the server
    options = {"image": world.input_image(), "prompt": "far from the bot"}
    external = await world.discord.invoke_slash("kontext", options=options, user="alice", guild_id=alone.id)
    assert text(await finished(external)).startswith("✅")
    handle = await world.discord.invoke_slash("kontext-history", user="alice", context="bot_dm")
    await handle.wait_for_callback()
    page = handle.original
    assert listed(page) == [2, 1]
    assert "Everywhere" not in buttons(page)  # no server to filter by in a DM
    # Only the interaction could post in that server: its images come from the URLs Discord gave.
    click = await press(world, page, entry_button(page, "show", 2))
    shown = await finished(click)
    (item,) = media_gallery_items(shown)
    (source,) = media_gallery_items(external.original)
    assert item["data"] == source["data"]
    # The server's job shown here is the DM's to build on, under the rules for personal use.
    click = await press(world, page, entry_button(page, "show", 1))
    shown = await finished(click)
    again = await finished(await world.discord.click_button(shown.id, button(shown, "reroll"), user="alice"))
    assert text(again).startswith("✅"), text(again)
    world.discord.expire_cdn_urls()
    click = await press(world, page, entry_button(page, "show", 2))
    await click.wait_until(lambda h: bool(h.followups))
    assert "no longer has the images of job #2" in click.followups[-1].content
    assert click.original.deleted  # the "thinking…" placeholder does not stay behind


async def test_show_here_says_what_it_could_not_show_again(world):
    world.fal.default = JobScript(image_size=40_000)
    await world.start_bot()
    (original,) = await results(world, 1, num_images=2)
    page = (await history(world)).original
    small = await world.discord.click_button(
        page.id, entry_button(page, "show", 1), user="alice", attachment_size_limit=30_000
    )
    await small.wait_for_callback()
    assert "over the upload limit here" in private_answer(small)
    gone = original.attachments[1]["url"].split("?")[0].removeprefix(world.discord.base_url)
    del world.discord.cdn_files[gone]  # Discord lost one of the two
    shown = await finished(await press(world, page, entry_button(page, "show", 1)))
    assert len(media_gallery_items(shown)) == 1
    assert "1 image could not be shown again here" in text(shown)


async def test_history_lists_the_servers_another_process_serves(cluster: Cluster):
    """With SHARD_IDS each process knows only its own shards' servers: the jobs of a server on
    the other process's shard are still the member's, and the bot is still in it."""
    world = cluster.world
    await cluster.identified(cluster.shard_b)
    await results(world, 1)  # in a's server
    elsewhere = await finished(await world.kontext(channel_id=cluster.guild_b.channel_id, prompt="in b's server"))
    assert text(elsewhere).startswith("✅")
    page = (await history(world)).original  # asked in a's server: a answers
    assert listed(page) == [2, 1]


async def test_a_server_without_the_bot_has_no_moderators_of_its_members_jobs(world):
    """Where only members' own installs bring the app, no server governs it: a member with Manage
    Messages there cannot read another member's jobs (their private results' prompts included)."""
    await world.start_bot(PERSONAL_USE="1", MONTHLY_BUDGET_USD="5")
    alone = world.discord.add_guild("Friends", bot=False)
    world.discord.add_member(world.discord.alice, guild=alone)
    world.discord.authorize_user_install("alice")
    await settings(world, results="private_first")
    options = {"image": world.input_image(), "prompt": "my secret birthday card"}
    private = await finished(await world.discord.invoke_slash("kontext", options=options, guild_id=alone.id))
    assert private.ephemeral and text(private).startswith("✅")
    world.discord.add_member(name="nosy", permissions=MOD_PERMISSIONS, guild=alone)
    world.discord.authorize_user_install("nosy")
    handle = await world.discord.invoke_slash(
        "kontext-history", options={"member": world.discord.alice["id"]}, user="nosy", guild_id=alone.id
    )
    await handle.wait_for_callback()
    assert "for the moderators of a server that added the bot" in private_answer(handle)
    # Once the server adds the bot, its moderators look up the jobs it governs, not those before.
    await world.discord.add_bot_to_guild(alone)
    channel = alone.channel_id
    await finished(await world.kontext(channel_id=channel, prompt="now the server's", user="alice"))
    handle = await world.discord.invoke_slash(
        "kontext-history", options={"member": world.discord.alice["id"]}, user="nosy", guild_id=alone.id
    )
    await handle.wait_for_callback()
    assert listed(handle.original) == [2]


async def test_a_channels_own_moderator_looks_up_only_that_channels_jobs(world):
    """Manage Messages granted in one channel makes a member its moderator, not the server's:
    Discord sends the member's permissions in the channel the command is used in, so a lookup
    from there lists the member's jobs of that channel, not those of channels they do not
    moderate (a result its member kept private there included), and elsewhere none."""
    fake = world.discord
    art = fake.add_channel("art")
    fake.set_permission_overwrite(art["id"], fake.alice, allow=MANAGE_MESSAGES)
    bob = fake.add_member(name="bob")
    await world.start_bot()
    await results(world, 1, user="bob")
    await results(world, 1, user="bob", channel_id=art["id"])
    lookup = await fake.invoke_slash(
        "kontext-history", options={"member": bob["id"]}, user="alice", channel_id=art["id"]
    )
    await lookup.wait_for_callback()
    assert listed(lookup.original) == [2]
    assert "Only moderators" in private_answer(await history(world, user="alice", member=bob["id"]))


async def test_a_moderator_sees_only_the_jobs_of_channels_they_may_see(world):
    """Manage Messages lets a moderator look a member up, not read a staff-only channel they
    cannot open: its jobs (prompt, image, link) stay out of their list."""
    fake = world.discord
    staff = fake.add_role("staff")
    staff_room = fake.add_channel("staff-room")
    fake.set_permission_overwrite(staff_room["id"], fake.guild_id, deny=VIEW_CHANNEL)
    for allowed in (staff, fake.default_guild.bot_role_id):
        fake.set_permission_overwrite(staff_room["id"], allowed, allow=VIEW_CHANNEL)
    fake.add_member(user_id=fake.alice, roles=[staff])
    await world.start_bot()
    await results(world, 1)
    secret = await finished(await world.kontext(channel_id=staff_room["id"], prompt="staff-only mock-up"))
    assert text(secret).startswith("✅")
    looked_up = (await history(world, user="mod", member="alice")).original
    assert listed(looked_up) == [1]
    assert "staff-only mock-up" not in "\n".join(text_displays(looked_up.components))
    fake.add_member(user_id=fake.mod, permissions=MOD_PERMISSIONS, roles=[staff])  # now one of the staff
    assert listed((await history(world, user="mod", member="alice")).original) == [2, 1]


async def test_a_moderator_sees_the_jobs_of_a_private_thread_only_if_they_manage_threads(world):
    """A private thread is seen only by its members and by those who may manage threads
    (resources/channel.mdx, Channel Types): Manage Messages in its channel does not open it, so
    its jobs (prompt, image, link) stay out of a moderator's list."""
    fake = world.discord
    keepers = fake.add_role("thread keepers", MANAGE_THREADS)
    secret = fake.add_thread(fake.channel_id, "alice and bob", owner="alice", type=12)
    await world.start_bot()
    fake.add_thread_member(secret["id"], fake.bot_user)
    await results(world, 1)
    hidden = await finished(await world.kontext(channel_id=secret["id"], prompt="a surprise for bob"))
    assert text(hidden).startswith("✅")
    assert not fake.member_permissions_in(fake.mod["id"], secret["id"]) & VIEW_CHANNEL
    looked_up = (await history(world, user="mod", member="alice")).original
    assert listed(looked_up) == [1]
    assert "a surprise for bob" not in "\n".join(text_displays(looked_up.components))
    fake.add_member(user_id=fake.mod, permissions=MOD_PERMISSIONS, roles=[keepers])
    assert listed((await history(world, user="mod", member="alice")).original) == [2, 1]


async def test_a_moderator_still_sees_the_jobs_of_a_thread_since_archived(world):
    """discord.py drops an archived thread from its cache, and a restart's GUILD_CREATE lists
    only active threads: the job keeps the thread's channel, whose moderators still see it, and
    a private thread stays closed to those who may not manage threads."""
    fake = world.discord
    thread = fake.add_thread(fake.channel_id, "sketches", owner="alice")
    secret = fake.add_thread(fake.channel_id, "alice and bob", owner="alice", type=12)
    await world.start_bot()
    fake.add_thread_member(secret["id"], fake.bot_user)
    await results(world, 1)
    for channel in (thread, secret):
        assert text(await finished(await world.kontext(channel_id=channel["id"]))).startswith("✅")
    assert listed((await history(world, user="mod", member="alice")).original) == [2, 1]
    for channel in (thread, secret):
        await fake.archive_thread(channel["id"])
    assert listed((await history(world, user="mod", member="alice")).original) == [2, 1]
    await restart(world)
    assert listed((await history(world, user="mod", member="alice")).original) == [2, 1]
