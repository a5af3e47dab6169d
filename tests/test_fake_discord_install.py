# mypy: check-untyped-defs=False
# mypy: disable-error-code="attr-defined,union-attr,method-assign,var-annotated"
# (like tests/test_fake_discord.py: throwaway bots with attributes added on the fly)
"""Self-tests of the fake Discord's user-installed apps (contexts, integration types, the
5-followup limit, Missing Access where the bot is not), and of autocomplete, with a real
discord.py bot in-process."""

from __future__ import annotations

import aiohttp
import discord
import pytest
from discord import app_commands

from fakes.discord_fake import (
    ATTACH_FILES,
    BOT_PERMISSIONS,
    DM_APP_PERMISSIONS,
    EMBED_LINKS,
    EPHEMERAL,
    MEMBER_PERMISSIONS,
    PRIVATE_APP_PERMISSIONS,
    USE_EXTERNAL_EMOJIS,
    CommandNotAvailable,
)
from tests.test_fake_discord import new_bot, running


def install_bot(fake):
    bot = new_bot(fake)
    bot.seen = {}

    @bot.tree.command(name="anywhere", description="Works wherever the app is installed")
    @app_commands.allowed_installs(guilds=True, users=True)
    @app_commands.allowed_contexts(guilds=True, dms=True, private_channels=True)
    async def anywhere(interaction: discord.Interaction, followups: int = 0) -> None:
        seen = bot.seen.setdefault(interaction.id, {})
        seen.update(
            context=interaction.context,
            user_integration=interaction.is_user_integration(),
            guild_integration=interaction.is_guild_integration(),
            app_permissions=interaction.app_permissions.value,
            permissions=interaction.permissions.value,
            guild_id=interaction.guild_id,
            channel_type=interaction.channel.type if interaction.channel else None,
        )
        await interaction.response.send_message("hi")
        seen["followups"] = []
        for i in range(followups):
            try:
                await interaction.followup.send(f"followup {i}")
                seen["followups"].append("ok")
            except discord.HTTPException as e:
                seen["followups"].append(e.code)
        try:
            await interaction.channel.send("with the bot token")
            seen["channel_send"] = "ok"
        except discord.HTTPException as e:
            seen["channel_send"] = (e.status, e.code)

    @bot.tree.command(name="serveronly", description="Guild install only")
    @app_commands.allowed_installs(guilds=True, users=False)
    async def serveronly(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("ok")

    @bot.tree.command(name="guildonly", description="guild_only: contexts [0], integration_types unset")
    @app_commands.guild_only()
    async def guildonly(interaction: discord.Interaction) -> None:
        bot.seen[interaction.id] = interaction.is_user_integration()
        await interaction.response.send_message("ok")

    return bot


async def test_guild_install_user_install_dm_and_group_dm(fake):
    alone = fake.add_guild("Bot-less", bot=False)  # only alice installed the app to her account
    fake.add_member(fake.alice, permissions=MEMBER_PERMISSIONS, guild=alone)
    bot = install_bot(fake)
    async with running(fake, bot):
        synced = fake.commands
        assert synced["anywhere"]["integration_types"] == [0, 1] and synced["anywhere"]["contexts"] == [0, 1, 2]
        # a command synced without integration_types gets the app's (docs: the app's configured contexts)
        assert synced["guildonly"]["integration_types"] == [0, 1] and synced["guildonly"]["contexts"] == [0]

        # 1. a guild where the bot is installed; then also installed by the user
        h = await fake.invoke_slash("anywhere", user="alice")
        await fake.wait_until(lambda: "channel_send" in bot.seen.get(int(h.id), {}))
        seen = bot.seen[int(h.id)]
        assert h.payload["context"] == 0 and h.owners == {"0": fake.guild_id} and not h.user_install_only
        assert seen["guild_integration"] and not seen["user_integration"]
        assert seen["app_permissions"] == BOT_PERMISSIONS and seen["channel_send"] == "ok"
        fake.authorize_user_install("alice")
        h = await fake.invoke_slash("anywhere", user="alice", options={"followups": 6})
        await fake.wait_until(lambda: "channel_send" in bot.seen.get(int(h.id), {}))
        assert h.owners == {"0": fake.guild_id, "1": fake.alice["id"]}
        assert bot.seen[int(h.id)]["followups"] == ["ok"] * 6  # installed in the server: no limit

        # 2. a guild without the bot: user install only
        with pytest.raises(ValueError, match="without the bot"):
            await fake.invoke_slash("anywhere", user="alice", context="user_guild")
        h = await fake.invoke_slash(
            "anywhere", user="alice", guild_id=alone.id, context="user_guild", options={"followups": 6}
        )
        await fake.wait_until(lambda: "channel_send" in bot.seen.get(int(h.id), {}))
        seen = bot.seen[int(h.id)]
        p = h.payload
        assert p["context"] == 0 and p["authorizing_integration_owners"] == {"1": fake.alice["id"]}
        assert p["guild_id"] == alone.id and p["guild"] == {"id": alone.id, "locale": "en-US", "features": []}
        assert p["member"]["permissions"] == str(MEMBER_PERMISSIONS) and p["channel"]["id"] == alone.channel_id
        assert all(alone.id not in s.guild_ids for s in fake.gateway_sessions) and bot.get_guild(int(alone.id)) is None
        assert seen["user_integration"] and not seen["guild_integration"] and seen["guild_id"] == int(alone.id)
        assert seen["app_permissions"] == MEMBER_PERMISSIONS & (ATTACH_FILES | EMBED_LINKS | USE_EXTERNAL_EMOJIS)
        assert seen["permissions"] == MEMBER_PERMISSIONS
        assert seen["followups"] == ["ok"] * 5 + [40094]  # at most 5 followups (docs)
        assert seen["channel_send"] == (403, 50001)  # the bot is not in that server
        assert any(r[1]["code"] == 40094 for r in fake.rejections)
        assert h.original.channel_id == alone.channel_id and h.original.guild_id == alone.id
        # guild_only commands without integration_types follow the app's install types: usable there too
        g = await fake.invoke_slash("guildonly", user="alice", guild_id=alone.id)
        await g.wait_for_callback()
        assert bot.seen[int(g.id)] is True
        # "Use External Apps" off: a not-installed app answers ephemerally (docs change-log 2024-06-27)
        alone.use_external_apps = False
        g = await fake.invoke_slash("guildonly", user="alice", guild_id=alone.id)
        await g.wait_for_callback()
        assert g.original.flags & EPHEMERAL

        # 3. the DM with the bot (context 1)
        h = await fake.invoke_slash("anywhere", user="alice", context="bot_dm")
        await fake.wait_until(lambda: "channel_send" in bot.seen.get(int(h.id), {}))
        seen = bot.seen[int(h.id)]
        assert h.payload["context"] == 1 and h.owners == {"0": "0", "1": fake.alice["id"]}
        assert "guild_id" not in h.payload and h.payload["user"]["id"] == fake.alice["id"]
        assert seen["channel_type"] == discord.ChannelType.private and seen["app_permissions"] == DM_APP_PERMISSIONS
        assert seen["channel_send"] == "ok" and fake.channel_messages(h.channel_id)[-1].guild_id is None

        # 4. a group DM without the bot (context 2)
        h = await fake.invoke_slash("anywhere", user="mod", context="private_channel")
        await fake.wait_until(lambda: "channel_send" in bot.seen.get(int(h.id), {}))
        seen = bot.seen[int(h.id)]
        assert h.payload["context"] == 2 and h.owners == {"1": fake.mod["id"]} and h.user_install_only
        assert seen["channel_type"] == discord.ChannelType.group and seen["app_permissions"] == PRIVATE_APP_PERMISSIONS
        assert seen["channel_send"] == (403, 50001)

        # refused where Discord would not offer the command: a violation, nothing dispatched
        sent = len(fake.interactions)
        with pytest.raises(CommandNotAvailable):
            await fake.invoke_slash("serveronly", user="alice", guild_id=alone.id)
        with pytest.raises(CommandNotAvailable):
            await fake.invoke_slash("guildonly", user="alice", context="bot_dm")
        with pytest.raises(CommandNotAvailable):
            await fake.invoke_slash("serveronly", user="alice", context="private_channel")
        assert len(fake.interactions) == sent and len(fake.violations) == 3
        assert all(v.startswith("command not available") for v in fake.violations)


async def test_integration_types_beyond_the_apps_are_refused_at_sync(fake):
    fake.app_integration_types = [0]
    url = f"{fake.api_base}/applications/{fake.application_id}/commands"
    body = [{"name": "x", "description": "x", "type": 1, "integration_types": [0, 1], "contexts": [0]}]
    async with aiohttp.ClientSession(headers={"Authorization": "Bot test-token"}) as s:
        async with s.put(url, json=body) as r:
            assert r.status == 400 and (await r.json())["code"] == 50035
        body[0]["integration_types"] = [0]
        async with s.put(url, json=body) as r:
            assert r.status == 200
        # options: autocomplete cannot go with choices
        body[0]["options"] = [
            {"type": 3, "name": "o", "description": "o", "autocomplete": True, "choices": [{"name": "a", "value": "a"}]}
        ]
        async with s.put(url, json=body) as r:
            assert r.status == 400 and "autocomplete" in json_text(await r.json())
    assert len(fake.violations) == 2


def json_text(x) -> str:
    import json

    return json.dumps(x)


def autocomplete_bot(fake):
    bot = new_bot(fake)
    bot.choices = 3
    bot.value_len = 0
    bot.typed = []

    @bot.tree.command(name="kontext", description="Edit")
    async def kontext(interaction: discord.Interaction, prompt: str, style: str = "none", strength: int = 1) -> None:
        await interaction.response.send_message(prompt)

    @kontext.autocomplete("prompt")
    async def prompt_choices(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        bot.typed.append((current, interaction.namespace.style, interaction.locale))
        value = "v" * bot.value_len
        return [app_commands.Choice(name=f"{current} {i}", value=value or f"{current}-{i}") for i in range(bot.choices)]

    @kontext.autocomplete("strength")
    async def strength_choices(interaction: discord.Interaction, current: str) -> list[app_commands.Choice]:
        if bot.value_len:  # a wrong type for an INTEGER option
            return [app_commands.Choice(name="one", value="1")]
        return [app_commands.Choice(name=str(i), value=i) for i in range(1, 4)]

    return bot


async def test_autocomplete_payload_choices_and_limits(fake):
    bot = autocomplete_bot(fake)
    async with running(fake, bot):
        opts = {o["name"]: o for o in fake.commands["kontext"]["options"]}
        assert opts["prompt"]["autocomplete"] is True and not opts["style"].get("autocomplete")
        h = await fake.autocomplete("kontext", {"style": "ink", "prompt": "a ca"}, focused="prompt", locale="de")
        await h.wait_for_callback()
        assert h.payload["type"] == 4 and h.payload["data"]["options"] == [
            {"name": "style", "type": 3, "value": "ink"},
            {"name": "prompt", "type": 3, "value": "a ca", "focused": True},
        ]
        assert bot.typed == [("a ca", "ink", discord.Locale.german)]
        assert h.callback["type"] == 8 and h.choices == [{"name": f"a ca {i}", "value": f"a ca-{i}"} for i in range(3)]
        # an integer option: the partial input arrives as text, the choices must be integers
        h = await fake.autocomplete("kontext", {"strength": "2"}, focused="strength")
        await h.wait_for_callback()
        assert [c["value"] for c in h.choices] == [1, 2, 3]
        assert fake.violations == []

        # refused like Discord: more than 25 choices, a string value over 100 chars, a wrong type
        bot.choices = 26
        h = await fake.autocomplete("kontext", {"prompt": "x"})
        await fake.wait_until(lambda: len(fake.violations) == 1)
        bot.choices, bot.value_len = 1, 101
        h2 = await fake.autocomplete("kontext", {"prompt": "x"})
        await fake.wait_until(lambda: len(fake.violations) == 2)
        h3 = await fake.autocomplete("kontext", {}, focused="strength")
        await fake.wait_until(lambda: len(fake.violations) == 3)
        assert h.callback is None and h2.callback is None and h3.callback is None
        assert [r[1]["code"] for r in fake.rejections[-3:]] == [50035] * 3
        # (more than 25 is already outside the spec's maxItems; the other two are the fake's rules)
        assert "choices" in fake.violations[0] and "100" in fake.violations[1] and "type 4" in fake.violations[2]
        # an option without autocomplete never gets an autocomplete interaction
        with pytest.raises(CommandNotAvailable):
            await fake.autocomplete("kontext", {"style": "x"}, focused="style")
