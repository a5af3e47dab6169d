# mypy: check-untyped-defs=False
# mypy: disable-error-code="attr-defined,union-attr,method-assign,var-annotated"
# (like tests/test_fake_discord.py: throwaway bots with attributes added on the fly)
"""Self-tests of the fake Discord's servers: several guilds, per-guild members, joining and
leaving at runtime, guild REST routes and locales, with a real discord.py bot in-process."""

from __future__ import annotations

from json import dumps

import aiohttp
import discord
import pytest

from fakes.discord_fake import (
    ATTACH_FILES,
    BOT_PERMISSIONS,
    EMBED_LINKS,
    MANAGE_GUILD,
    MANAGE_MESSAGES,
    MANAGE_THREADS,
    MEMBER_PERMISSIONS,
    MOD_PERMISSIONS,
    READ_MESSAGE_HISTORY,
    SEND_MESSAGES,
    USE_APPLICATION_COMMANDS,
    USER_APP_PERMISSIONS,
    VIEW_CHANNEL,
    CommandNotAvailable,
    shard_of,
)
from tests.test_fake_discord import new_bot, running

MISSING_PERMISSIONS = {"message": "Missing Permissions", "code": 50013}


async def _bot_get(fake, path):
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{fake.api_base}{path}", headers={"Authorization": f"Bot {fake.token}"}) as r,
    ):
        return r.status, await r.json(content_type=None)


async def test_several_guilds_ready_rest_and_interactions(fake):
    second = fake.add_guild("Second", preferred_locale="de", premium_tier=2)
    art = fake.add_channel("art", nsfw=True, guild=second)
    fake.add_member(user_id=fake.alice, permissions=MOD_PERMISSIONS, guild=second)  # a mod there only
    boss = fake.add_role("boss", MANAGE_GUILD, guild=second)  # roles are per guild too
    bob = fake.add_member(name="bob", roles=[boss], guild=second)
    later = fake.add_guild("Later", bot=False)
    assert fake.guild_id == next(iter(fake.guilds)) and fake.guild["name"] == "Test Guild"
    assert second.owner_id in second.members and second.owner_id != fake.guild["owner_id"]

    bot = new_bot(fake)
    joined, removed = [], []

    @bot.tree.command(name="where", description="Where am I")
    async def where(interaction: discord.Interaction) -> None:
        bot.seen[interaction.user.name + str(interaction.guild_id)] = {
            "guild": interaction.guild_id,
            "channel": interaction.channel_id,
            "manage_guild": interaction.permissions.manage_guild,
            "locale": interaction.locale,
            "guild_locale": interaction.guild_locale,
        }
        await interaction.response.send_message("here")
        await interaction.channel.send("channel post")

    async def on_guild_join(guild: discord.Guild) -> None:
        joined.append(guild.id)

    async def on_guild_remove(guild: discord.Guild) -> None:
        removed.append(guild.id)

    async def before_identify_hook(shard_id, *, initial=False) -> None:
        return None  # discord.py's default sleeps 5 s before every IDENTIFY but the first

    bot.on_guild_join, bot.on_guild_remove = on_guild_join, on_guild_remove
    bot.before_identify_hook = before_identify_hook

    async with running(fake, bot):
        (session,) = fake.gateway_sessions
        # READY lists the guilds the bot is in (unavailable), a GUILD_CREATE followed for each
        assert session.ready["guilds"] == [
            {"id": fake.guild_id, "unavailable": True},
            {"id": second.id, "unavailable": True},
        ]
        assert {g.id for g in bot.guilds} == {int(fake.guild_id), int(second.id)}
        g2 = bot.get_guild(int(second.id))
        assert g2.name == "Second" and g2.preferred_locale == discord.Locale.german and g2.premium_tier == 2
        assert g2.get_channel(int(art["id"])).is_nsfw() and g2.member_count == 4  # bot, owner, alice, bob
        assert bot.get_guild(int(later.id)) is None

        # a member of two guilds has per-guild permissions; the guild is found by the channel
        h1 = await fake.invoke_slash("where", user="alice", channel_id=art["id"], locale="fr")
        h2 = await fake.invoke_slash("where", user="alice")
        await fake.wait_until(lambda: len(fake.guild_messages(second)) == 2 and len(fake.guild_messages()) == 2)
        here2, here1 = bot.seen["alice" + second.id], bot.seen["alice" + fake.guild_id]
        assert here2["guild"] == int(second.id) and here2["channel"] == int(art["id"]) and here2["manage_guild"]
        assert here2["locale"] == discord.Locale.french and here2["guild_locale"] == discord.Locale.german
        assert here1["guild"] == int(fake.guild_id) and not here1["manage_guild"]
        assert here1["guild_locale"] == discord.Locale.american_english
        assert h1.payload["guild_id"] == second.id and h1.payload["authorizing_integration_owners"] == {"0": second.id}
        assert h1.original.guild_id == second.id and h2.original.guild_id == fake.guild_id
        (post,) = [m for m in fake.channel_messages(art["id"]) if m.interaction is None]
        assert post.content == "channel post" and post.guild_id == second.id
        # guild_id= picks the guild's default channel
        h3 = await fake.invoke_slash("where", user="bob", guild_id=second.id)
        await h3.wait_for_callback()
        assert h3.channel_id == second.channel_id and bot.seen["bob" + second.id]["manage_guild"]
        assert g2.get_role(int(boss["id"])).permissions.manage_guild and boss["id"] not in fake.roles
        with pytest.raises(KeyError, match="not a member"):
            await fake.invoke_slash("where", user="bob")  # bob is not in the first guild
        with pytest.raises(ValueError, match="locale"):
            await fake.invoke_slash("where", user="alice", locale="xx")

        # REST routes answer for the right guild
        assert (await bot.fetch_guild(int(second.id))).name == "Second"
        assert {c.name for c in await g2.fetch_channels()} == {"general", "art"}
        assert (await g2.fetch_member(int(bob["id"]))).name == "bob"
        assert (await bot.fetch_channel(int(art["id"]))).guild.id == int(second.id)
        assert await _bot_get(fake, f"/guilds/{later.id}") == (403, {"message": "Missing Access", "code": 50001})
        assert (await _bot_get(fake, "/guilds/123"))[1]["code"] == 10004

        # added at runtime: GUILD_CREATE -> on_guild_join
        await fake.add_bot_to_guild(later)
        await fake.wait_until(lambda: int(later.id) in joined)
        assert bot.get_guild(int(later.id)).name == "Later"
        # leaving: 204, then GUILD_DELETE -> on_guild_remove; the guild's routes are closed
        await g2.leave()
        await fake.wait_until(lambda: int(second.id) in removed)
        assert second.bot_left and not fake.bot_left_guild and bot.get_guild(int(second.id)) is None
        assert (await _bot_get(fake, f"/channels/{art['id']}"))[0] == 403
        with pytest.raises(discord.NotFound):
            await g2.leave()
        # a new session's READY lists the guilds the bot is in now
        await fake.invalidate_session()
        await fake.wait_until(lambda: fake.identify_count == 2)
        assert [g["id"] for g in fake.gateway_sessions[-1].ready["guilds"]] == [fake.guild_id, later.id]
    assert fake.violations == []


async def test_guild_on_a_chosen_shard_and_runtime_guild_without_connection(fake):
    for n in (1, 2, 3, 7):
        for i in range(n):
            g = fake.add_guild(shard=(i, n))
            assert shard_of(g.id, n) == i == fake.shard_for(g, n)
            # a real-time snowflake: its timestamp is now (within the shard count in ms)
            assert abs(discord.utils.snowflake_time(int(g.id)).timestamp() - discord.utils.utcnow().timestamp()) < 5
    with pytest.raises(ValueError):
        fake.add_guild(shard=(2, 2))
    # no bot connected: joining just marks it (READY will list it)
    g = fake.add_guild("offline", bot=False)
    await fake.add_bot_to_guild(g)
    assert g.bot_present and fake.violations == []


async def _bot_request(fake, method, path, *, json=None, file=None):
    async with aiohttp.ClientSession(headers={"Authorization": f"Bot {fake.token}"}) as s:
        if file is None:
            kw = {"json": json}
        else:
            form = aiohttp.FormData(quote_fields=False)
            form.add_field("payload_json", dumps(json))
            form.add_field("files[0]", file, filename="a.png")
            kw = {"data": form}
        async with s.request(method, f"{fake.api_base}{path}", **kw) as r:
            return r.status, await r.json(content_type=None)


async def test_the_bots_channel_permissions_are_discords(fake):
    """The bot's permissions come from its managed role and the channel's overwrites, computed as
    topics/permissions.mdx (Permission Overwrites) says, and the bot-token message routes refuse
    what they need and it lacks: Create Message needs SEND_MESSAGES, and READ_MESSAGE_HISTORY for
    a reply; Get Channel Message needs VIEW_CHANNEL and READ_MESSAGE_HISTORY; Get Channel
    Messages without READ_MESSAGE_HISTORY returns none (resources/message.mdx); uploading needs
    ATTACH_FILES (permissions.mdx). No VIEW_CHANNEL is 50001 Missing Access, the rest 50013."""
    cid = fake.channel_id
    posts = f"/channels/{cid}/messages"
    status, first = await _bot_request(fake, "POST", posts, json={"content": "hi"})
    assert status == 200 and fake.bot_permissions(cid) == BOT_PERMISSIONS
    reply = {"content": "re", "message_reference": {"message_id": first["id"]}}
    bot_role = fake.default_guild.bot_role_id

    fake.set_permission_overwrite(cid, bot_role, deny=READ_MESSAGE_HISTORY)
    assert await _bot_request(fake, "POST", posts, json=reply) == (403, MISSING_PERMISSIONS)
    assert (await _bot_request(fake, "GET", f"{posts}/{first['id']}")) == (403, MISSING_PERMISSIONS)
    assert await _bot_request(fake, "GET", posts) == (200, [])
    assert (await _bot_request(fake, "POST", posts, json={"content": "plain"}))[0] == 200

    fake.set_permission_overwrite(cid, bot_role, deny=ATTACH_FILES)
    assert await _bot_request(fake, "POST", posts, json={"content": "f"}, file=b"png") == (403, MISSING_PERMISSIONS)
    assert (await _bot_request(fake, "POST", posts, json=reply))[0] == 200

    # @everyone denies sending; an overwrite for the bot itself allows it again (applied last)
    fake.set_permission_overwrite(cid, bot_role, deny=0)
    fake.set_permission_overwrite(cid, fake.guild_id, deny=SEND_MESSAGES)
    assert await _bot_request(fake, "POST", posts, json={"content": "x"}) == (403, MISSING_PERMISSIONS)
    fake.set_permission_overwrite(cid, fake.bot_user, allow=SEND_MESSAGES)
    assert (await _bot_request(fake, "POST", posts, json={"content": "x"}))[0] == 200

    fake.set_permission_overwrite(cid, bot_role, deny=VIEW_CHANNEL)
    missing_access = {"message": "Missing Access", "code": 50001}
    assert await _bot_request(fake, "POST", posts, json={"content": "x"}) == (403, missing_access)
    assert await _bot_request(fake, "GET", f"{posts}/{first['id']}") == (403, missing_access)
    assert fake.violations == []


async def test_the_bot_deletes_its_own_messages_and_others_only_with_manage_messages(fake):
    """Delete Message (resources/message.mdx): the bot may delete its own messages; another's in
    a guild channel needs MANAGE_MESSAGES there (50013 without it); in a DM it may delete only
    its own (50003 "Cannot execute action on a DM channel")."""
    cid = fake.channel_id
    posts = f"/channels/{cid}/messages"
    status, own = await _bot_request(fake, "POST", posts, json={"content": "mine"})
    assert status == 200
    alices = fake.post_user_message("hers")
    assert await _bot_request(fake, "DELETE", f"{posts}/{alices.id}") == (403, MISSING_PERMISSIONS)
    assert not alices.deleted
    assert (await _bot_request(fake, "DELETE", f"{posts}/{own['id']}"))[0] == 204
    fake.set_permission_overwrite(cid, fake.default_guild.bot_role_id, allow=MANAGE_MESSAGES)
    assert (await _bot_request(fake, "DELETE", f"{posts}/{alices.id}"))[0] == 204 and alices.deleted

    dm = fake._dm_channel(fake.alice["id"])["id"]
    dm_posts = f"/channels/{dm}/messages"
    status, own_dm = await _bot_request(fake, "POST", dm_posts, json={"content": "mine"})
    assert status == 200
    in_dm = fake.post_user_message("hers", channel_id=dm)
    refused = {"message": "Cannot execute action on a DM channel", "code": 50003}
    assert await _bot_request(fake, "DELETE", f"{dm_posts}/{in_dm.id}") == (403, refused)
    assert (await _bot_request(fake, "DELETE", f"{dm_posts}/{own_dm['id']}"))[0] == 204
    fake.violations.clear()  # refused on purpose


async def test_discord_py_sees_the_bots_permissions_as_the_fake_enforces_them(fake):
    """The bot's role is in GUILD_CREATE and an overwrite set while it runs comes as
    CHANNEL_UPDATE, so discord.py's permissions_for(guild.me) and the interaction's
    app_permissions agree with what the fake enforces."""
    bot = new_bot(fake)
    seen = {}

    @bot.tree.command(name="where", description="Permissions here")
    async def where(interaction: discord.Interaction) -> None:
        seen["app"] = interaction.app_permissions.value
        await interaction.response.send_message("ok", ephemeral=True)

    async with running(fake, bot):
        guild = bot.get_guild(int(fake.guild_id))
        channel = guild.get_channel(int(fake.channel_id))
        assert guild.me.roles[-1].is_bot_managed()
        assert channel.permissions_for(guild.me).value == fake.bot_permissions(fake.channel_id) == BOT_PERMISSIONS
        fake.set_permission_overwrite(fake.channel_id, fake.default_guild.bot_role_id, deny=SEND_MESSAGES)
        await fake.wait_until(lambda: not channel.permissions_for(guild.me).send_messages, timeout=5)
        # discord.py also drops what no SEND_MESSAGES implicitly denies (permissions.mdx,
        # Implicit Permissions), which Discord's calculation leaves in the value
        implicit = ATTACH_FILES | EMBED_LINKS
        assert channel.permissions_for(guild.me).value == fake.bot_permissions(fake.channel_id) & ~implicit
        h = await fake.invoke_slash("where")
        await h.wait_for_callback()
        assert seen["app"] == BOT_PERMISSIONS & ~SEND_MESSAGES
    assert fake.violations == []


async def test_an_interactions_member_permissions_are_those_in_its_channel(fake):
    """An interaction's `member.permissions` are the member's "total permissions in the channel,
    including overwrites" (resources/guild.mdx, Guild Member Object), as its `channel.permissions`
    (resources/channel.mdx); a thread's are its parent's. Where the app is only the member's
    install, `app_permissions` are theirs in the channel, limited to what responses can use."""
    bot = new_bot(fake)
    seen = []

    @bot.tree.command(name="where", description="Permissions here")
    async def where(interaction: discord.Interaction) -> None:
        seen.append((interaction.permissions.value, interaction.app_permissions.value))
        await interaction.response.send_message("ok", ephemeral=True)

    staff = fake.add_channel("staff")
    thread = fake.add_thread(staff["id"], "a thread")
    fake.set_permission_overwrite(staff["id"], fake.alice, allow=MANAGE_MESSAGES, deny=ATTACH_FILES)
    fake.set_permission_overwrite(
        staff["id"], fake.default_guild.members[fake.mod["id"]]["roles"][0], deny=MANAGE_MESSAGES
    )
    async with running(fake, bot):
        for where_id in (staff["id"], thread["id"]):
            h = await fake.invoke_slash("where", channel_id=where_id)
            await h.wait_for_callback()
            assert h.payload["channel"]["permissions"] == h.payload["member"]["permissions"]
            h = await fake.invoke_slash("where", user="mod", channel_id=where_id)
            await h.wait_for_callback()
        h = await fake.invoke_slash("where")
        await h.wait_for_callback()
    in_staff = (MEMBER_PERMISSIONS | MANAGE_MESSAGES) & ~ATTACH_FILES
    assert seen == [
        (in_staff, BOT_PERMISSIONS),
        (MOD_PERMISSIONS & ~MANAGE_MESSAGES, BOT_PERMISSIONS),
        (in_staff, BOT_PERMISSIONS),
        (MOD_PERMISSIONS & ~MANAGE_MESSAGES, BOT_PERMISSIONS),
        (MEMBER_PERMISSIONS, BOT_PERMISSIONS),
    ]
    alone = fake.add_guild("No bot", bot=False)
    fake.add_member(fake.alice, guild=alone)
    room = fake.add_channel("room", guild=alone)
    fake.set_permission_overwrite(room["id"], alone.id, deny=ATTACH_FILES)
    place = fake._place(fake.alice, None, 0, alone, room["id"], None)
    assert place.app_permissions == USER_APP_PERMISSIONS & MEMBER_PERMISSIONS & ~ATTACH_FILES
    assert fake.violations == []


async def test_a_private_thread_is_seen_by_its_members_and_thread_managers(fake):
    """A private thread is "only viewable by those invited and those with the MANAGE_THREADS
    permission" (resources/channel.mdx, Channel Types): others get no interaction from it, the bot
    neither finds it in GUILD_CREATE nor may post in it until it is added (THREAD_CREATE), and a
    member who may not see a channel, or use app commands in it, cannot run a command there."""
    bot = new_bot(fake)

    @bot.tree.command(name="where", description="Permissions here")
    async def where(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("ok", ephemeral=True)

    private = fake.add_thread(fake.channel_id, "secret", owner="alice", type=12)
    assert fake.member_permissions_in(fake.alice["id"], private["id"]) & VIEW_CHANNEL
    assert not fake.member_permissions_in(fake.mod["id"], private["id"]) & VIEW_CHANNEL
    assert fake.member_permissions_in(fake.owner["id"], private["id"]) & VIEW_CHANNEL  # administrator
    fake.set_permission_overwrite(fake.channel_id, fake.mod, allow=MANAGE_THREADS)
    assert fake.member_permissions_in(fake.mod["id"], private["id"]) & VIEW_CHANNEL
    fake.set_permission_overwrite(fake.channel_id, fake.mod, allow=0)
    async with running(fake, bot):
        guild = bot.get_guild(int(fake.guild_id))
        assert guild.get_thread(int(private["id"])) is None
        with pytest.raises(KeyError, match="cannot see"):
            await fake.invoke_slash("where", user="mod", channel_id=private["id"])
        h = await fake.invoke_slash("where", channel_id=private["id"])
        await h.wait_for_callback()
        posts = f"/channels/{private['id']}/messages"
        missing_access = {"message": "Missing Access", "code": 50001}
        assert await _bot_request(fake, "POST", posts, json={"content": "x"}) == (403, missing_access)
        fake.add_thread_member(private["id"], fake.bot_user)
        await fake.wait_until(lambda: guild.get_thread(int(private["id"])) is not None, timeout=5)
        assert (await _bot_request(fake, "POST", posts, json={"content": "x"}))[0] == 200

        fake.set_permission_overwrite(fake.channel_id, fake.alice, deny=USE_APPLICATION_COMMANDS)
        with pytest.raises(CommandNotAvailable):
            await fake.invoke_slash("where")
        fake.violations.clear()  # provoked on purpose
        fake.set_permission_overwrite(fake.channel_id, fake.alice, deny=VIEW_CHANNEL)
        with pytest.raises(KeyError, match="cannot see"):
            await fake.invoke_slash("where")


async def test_an_archived_thread_leaves_discord_py_s_cache_and_the_next_guild_create(fake):
    """Archiving sends THREAD_UPDATE (discord.py then drops the thread from its cache), and
    GUILD_CREATE lists only active threads, so a bot connecting again does not see it either."""
    thread = fake.add_thread(fake.channel_id, "sketches")
    bot = new_bot(fake)
    async with running(fake, bot, sync=False):
        guild = bot.get_guild(int(fake.guild_id))
        assert guild.get_thread(int(thread["id"])) is not None
        await fake.archive_thread(thread["id"])
        await fake.wait_until(lambda: guild.get_thread(int(thread["id"])) is None, timeout=5)
    assert fake.guild_payload()["threads"] == []
    status, fetched = await _bot_get(fake, f"/channels/{thread['id']}")
    assert status == 200 and fetched["thread_metadata"]["archived"] is True
    assert fake.violations == []
