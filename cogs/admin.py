"""`/kontext-admin`: moderators set the server's policy (safety, access, limits, spend, log)."""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from services.i18n import N_, Texts
from services.policy import POLICY_FIELDS, GuildPolicy, validate_policy
from services.recipes import MAX_RECIPE_NAME, MAX_RECIPE_TEXT, WORDS, check_recipe
from services.usage_chart import last_days, render_usage_chart, usage_summary_text

from .errors import UserFacingError
from .modlog import post_to_log_channel
from .render import channel_list, plain_text
from .translation import member_texts, server_texts
from .views import may_send, own_permissions

if TYPE_CHECKING:
    from bot import KontextBot

log = logging.getLogger(__name__)

EVERYTHING = "everything"
NOTHING_CHANGED = N_("Nothing changed: those were already the settings.")
POLICY_CHANGED = N_("🛠️ {moderator} changed the Kontext policy:")
RECIPE_ADDED = N_("🛠️ {moderator} added the recipe “{name}”.")
RECIPE_REMOVED = N_("🛠️ {moderator} removed the recipe “{name}”.")
CHART_DAYS = 30
# Discord's limits for embeds (resources/message.mdx, Embed Limits): a field's value, and all the
# embeds of a message together.
FIELD_VALUE_LIMIT = 1024
EMBEDS_TOTAL_LIMIT = 6000


# What a policy command changes, given the policy as it is: {field: new value}.
PolicyEdit = Callable[[GuildPolicy], dict[str, Any]]


def _given(**values: Any) -> PolicyEdit:
    """The options a moderator gave, whatever the policy was (None: an option left out)."""
    given = {name: value for name, value in values.items() if value is not None}
    return lambda old: given


class AllowableChannel(app_commands.Transformer):
    """A channel /kontext can be allowed in: every kind a member can run it in, or whose threads
    follow it. A forum's posts are threads of the forum, so a choice of text channels alone would
    leave no way to allow them; voice and stage channels have a text chat of their own."""

    @property
    def type(self) -> discord.AppCommandOptionType:
        return discord.AppCommandOptionType.channel

    @property
    def channel_types(self) -> list[discord.ChannelType]:
        kinds = discord.ChannelType
        return [kinds.text, kinds.news, kinds.forum, kinds.voice, kinds.stage_voice]

    async def transform(
        self, interaction: discord.Interaction, value: app_commands.AppCommandChannel
    ) -> app_commands.AppCommandChannel:
        return value  # only its id is kept


AllowedChannel = app_commands.Transform[app_commands.AppCommandChannel, AllowableChannel]


def format_value(name: str, value: Any, _: Texts) -> str:
    """A policy value as moderators read it."""
    if name == "allowed_channel_ids":
        return channel_list(value, _) if value else _("every channel")
    if value is None:
        return _("not set") if name in ("required_role_id", "log_channel_id") else _("no limit")
    if name == "required_role_id":
        return f"<@&{value}>"
    if name == "log_channel_id":
        return f"<#{value}>"
    if name == "monthly_usd_budget":
        return _.money(value)
    if name == "cooldown_seconds":
        return _("{seconds} s", seconds=value) if value else _("none")
    return str(value)


# A server's own moderation: installed to the server and used in it only, whatever the bot's
# defaults for the other commands (discord.py merges these over them).
@app_commands.allowed_installs(guilds=True, users=False)
@app_commands.allowed_contexts(guilds=True, dms=False, private_channels=False)
@app_commands.default_permissions(manage_guild=True)
class Admin(
    commands.GroupCog, group_name="kontext-admin", group_description=N_("Moderate the Kontext bot in this server")
):
    """Visible by default to members with Manage Server; checked again on every use, since
    server admins can show the commands to anyone."""

    access = app_commands.Group(name="access", description=N_("Where and by whom /kontext may be used"))
    recipes = app_commands.Group(name="recipes", description=N_("Prompts /kontext suggests to this server's members"))

    def __init__(self, bot: KontextBot) -> None:
        self.bot = bot
        super().__init__()

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.guild_id is None or not interaction.is_guild_integration():
            raise app_commands.NoPrivateMessage()
        if not interaction.permissions.manage_guild:
            raise app_commands.MissingPermissions(["manage_guild"])
        return True

    # -- reading ------------------------------------------------------------------------------

    @app_commands.command(name="show", description=N_("This server's Kontext policy and this month's usage"))
    async def show(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        _ = member_texts(interaction)
        now = time.time()
        policy = await self.bot.store.policy(interaction.guild_id)
        usage = await self.bot.store.usage(interaction.guild_id, interaction.user.id, now)
        embed = discord.Embed(title=_("Kontext policy"), colour=discord.Colour.blurple())
        for name, info in POLICY_FIELDS.items():
            embed.add_field(name=_(info.label), value=format_value(name, getattr(policy, name), _))
        cost = usage.guild_images_this_month * self.bot.settings.price_per_image_usd
        images = _.ngettext("{count} image", "{count} images", usage.guild_images_this_month)
        running = _.ngettext("{count} job running now", "{count} jobs running now", usage.guild_active_jobs)
        embed.add_field(
            name=_("This month"),
            value=_("{images}, about {cost} · {running}", images=images, cost=_.money(cost), running=running),
            inline=False,
        )
        await interaction.response.send_message(embed=embed, ephemeral=True)

    @app_commands.command(name="usage", description=N_("A chart of this server's last 30 days and this month's spend"))
    async def usage(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        _ = member_texts(interaction)
        now = time.time()
        price = self.bot.settings.price_per_image_usd
        policy = await self.bot.store.policy(interaction.guild_id)
        today = datetime.fromtimestamp(now, UTC).date()
        counts = await self.bot.store.daily_images(interaction.guild_id, since=now - CHART_DAYS * 86400)
        days = last_days({day: (images, images * price) for day, images in counts.items()}, today, CHART_DAYS)
        usage = await self.bot.store.usage(interaction.guild_id, interaction.user.id, now)
        # The budget that stops jobs first, in dollars: both may be set (a new server's 250
        # images stay when moderators add a budget in dollars).
        caps = [policy.monthly_usd_budget]
        if policy.monthly_image_budget is not None and price > 0:
            caps.append(policy.monthly_image_budget * price)
        budget = min((cap for cap in caps if cap is not None), default=None)
        spent = usage.guild_images_this_month * price
        guild_name = interaction.guild.name if interaction.guild else _("this server")
        chart = render_usage_chart(
            days,
            monthly_budget_usd=budget,
            month_spent_usd=spent,
            title=_("Kontext in {server}", server=guild_name),
            in_language=_,
        )
        summary = usage_summary_text(days, budget, spent, _)
        # The same facts as text, for screen readers: in the message and as the image's alt text.
        await interaction.response.send_message(
            summary,
            file=discord.File(io.BytesIO(chart), filename="kontext-usage.png", description=summary),
            ephemeral=True,
        )

    # -- recipes ------------------------------------------------------------------------------

    @recipes.command(name="add", description=N_("Suggest a prompt to members as they type one in /kontext"))
    @app_commands.describe(
        name=N_("What members see and pick, e.g. 'Mascot style'"),
        prompt=N_("The prompt sent; {prompt} in it stands for the member's own words (they never see it)"),
    )
    async def recipe_add(
        self,
        interaction: discord.Interaction,
        name: app_commands.Range[str, 1, MAX_RECIPE_NAME],
        prompt: app_commands.Range[str, 1, MAX_RECIPE_TEXT],
    ) -> None:
        assert interaction.guild_id is not None
        store = self.bot.store
        name, text = check_recipe(name, prompt, await store.recipes(interaction.guild_id))
        if not await store.add_recipe(interaction.guild_id, name, text, by_user=interaction.user.id, now=time.time()):
            raise UserFacingError(N_("This server already has a recipe called “{name}”."), name=name)
        log.info("guild %d: %s added the recipe %r", interaction.guild_id, interaction.user.id, name)
        _ = member_texts(interaction)
        how = (
            _("Members type their words, then pick it: their words go where {words} is.", words=WORDS)
            if WORDS in text
            else _("Members pick it and its prompt is sent as it is.")
        )
        await interaction.response.send_message(_("Added the recipe “{name}”.", name=name) + " " + how, ephemeral=True)
        await self._log_recipe(interaction, RECIPE_ADDED, name)

    @recipes.command(name="remove", description=N_("Stop suggesting one of this server's recipes"))
    async def recipe_remove(self, interaction: discord.Interaction, name: str) -> None:
        assert interaction.guild_id is not None
        if not await self.bot.store.remove_recipe(interaction.guild_id, name):
            # Discord lets a moderator type 6,000 characters here; no recipe's name is longer than this.
            raise UserFacingError(
                N_("This server has no recipe called “{name}”."), name=plain_text(name, MAX_RECIPE_NAME)
            )
        log.info("guild %d: %s removed the recipe %r", interaction.guild_id, interaction.user.id, name)
        _ = member_texts(interaction)
        await interaction.response.send_message(_("Removed the recipe “{name}”.", name=name), ephemeral=True)
        await self._log_recipe(interaction, RECIPE_REMOVED, name)

    @recipe_remove.autocomplete("name")
    async def recipe_names(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        recipes = await self.bot.store.recipes(interaction.guild_id or 0)
        typed = current.casefold()
        return [app_commands.Choice(name=r.name, value=r.name) for r in recipes if typed in r.name.casefold()][:25]

    @recipes.command(name="list", description=N_("This server's recipes and the prompts they send"))
    async def recipe_list(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        _ = member_texts(interaction)
        recipes = await self.bot.store.recipes(interaction.guild_id)
        embed = discord.Embed(title=_("Recipes of this server"), colour=discord.Colour.blurple())
        embed.description = (
            _("Members see these names as they type a prompt, with the bot's own suggestions and their recent prompts.")
            if recipes
            else _("None yet: add one with /kontext-admin recipes add.")
        )
        whole = [len(plain_text(recipe.text, FIELD_VALUE_LIMIT)) for recipe in recipes]
        room = EMBEDS_TOTAL_LIMIT - len(embed) - sum(len(recipe.name) for recipe in recipes)
        for recipe, share in zip(recipes, _fair_shares(whole, room), strict=True):
            embed.add_field(name=recipe.name, value=plain_text(recipe.text, share), inline=False)
        await interaction.response.send_message(embed=embed, ephemeral=True)

    async def _log_recipe(self, interaction: discord.Interaction, template: str, name: str) -> None:
        assert interaction.guild_id is not None
        server = server_texts(self.bot, interaction.guild_id)
        policy = await self.bot.store.policy(interaction.guild_id)
        line = server(template, moderator=interaction.user.mention, name=plain_text(name, MAX_RECIPE_NAME))
        await post_to_log_channel(self.bot, interaction.guild_id, policy, line)

    # -- changing -----------------------------------------------------------------------------

    @app_commands.command(name="safety", description=N_("How permissive the model's safety_tolerance may be"))
    @app_commands.describe(
        default=N_("Used when a member sets none (1 strictest .. 6 most permissive)"),
        maximum=N_("Highest a member may ask for in ordinary channels"),
        nsfw_maximum=N_("Highest allowed in age-restricted channels"),
    )
    async def safety(
        self,
        interaction: discord.Interaction,
        default: app_commands.Range[int, 1, 6] | None = None,
        maximum: app_commands.Range[int, 1, 6] | None = None,
        nsfw_maximum: app_commands.Range[int, 1, 6] | None = None,
    ) -> None:
        await self._change(
            interaction, _given(safety_default=default, safety_maximum=maximum, safety_nsfw_maximum=nsfw_maximum)
        )

    @access.command(name="channel-add", description=N_("Allow /kontext in this channel (then only listed channels)"))
    async def channel_add(self, interaction: discord.Interaction, channel: AllowedChannel) -> None:
        await self._change(interaction, lambda old: {"allowed_channel_ids": old.allowed_channel_ids | {channel.id}})

    @access.command(name="channel-remove", description=N_("Stop allowing /kontext in this channel"))
    async def channel_remove(self, interaction: discord.Interaction, channel: AllowedChannel) -> None:
        def without_it(old: GuildPolicy) -> dict[str, Any]:
            if channel.id not in old.allowed_channel_ids:
                raise UserFacingError(N_("{channel} is not in the list of allowed channels."), channel=channel.mention)
            if old.allowed_channel_ids == {channel.id}:
                # An empty list allows every channel: the opposite of what removing one means.
                raise UserFacingError(
                    N_(
                        "{channel} is the only channel /kontext is allowed in, and with none listed it is allowed "
                        "in every channel. Add the channel it should be used in instead first, or use "
                        "`/kontext-admin access all-channels` to allow every channel."
                    ),
                    channel=channel.mention,
                )
            return {"allowed_channel_ids": old.allowed_channel_ids - {channel.id}}

        await self._change(interaction, without_it)

    @access.command(name="all-channels", description=N_("Allow /kontext in every channel again"))
    async def all_channels(self, interaction: discord.Interaction) -> None:
        await self._change(interaction, _given(allowed_channel_ids=frozenset()))

    @access.command(name="role", description=N_("Require a role to use /kontext (reset it to allow everyone)"))
    async def role(self, interaction: discord.Interaction, role: discord.Role) -> None:
        await self._change(interaction, _given(required_role_id=role.id))

    @app_commands.command(name="limits", description=N_("How often and how much members may use the bot"))
    @app_commands.describe(
        cooldown_seconds=N_("Seconds a member waits between two jobs"),
        daily_jobs=N_("Jobs per member per day (UTC)"),
        member_concurrent=N_("Jobs one member may have running at once"),
        server_concurrent=N_("Jobs the whole server may have running at once"),
        monthly_images=N_("Images per month for the whole server"),
        monthly_usd=N_("US dollars per month for the whole server (at the configured price per image)"),
    )
    async def limits(
        self,
        interaction: discord.Interaction,
        cooldown_seconds: app_commands.Range[int, 0, 86_400] | None = None,
        daily_jobs: app_commands.Range[int, 0, 10_000] | None = None,
        member_concurrent: app_commands.Range[int, 0, 100] | None = None,
        server_concurrent: app_commands.Range[int, 0, 1_000] | None = None,
        monthly_images: app_commands.Range[int, 1, 10_000_000] | None = None,
        monthly_usd: app_commands.Range[float, 0.01, 1_000_000.0] | None = None,
    ) -> None:
        await self._change(
            interaction,
            _given(
                cooldown_seconds=cooldown_seconds,
                daily_jobs_per_member=daily_jobs,
                concurrent_jobs_per_member=member_concurrent,
                concurrent_jobs_per_guild=server_concurrent,
                monthly_image_budget=monthly_images,
                monthly_usd_budget=monthly_usd,
            ),
        )

    @app_commands.command(name="log-channel", description=N_("Post one line per job (and every policy change) here"))
    async def log_channel(self, interaction: discord.Interaction, channel: discord.TextChannel) -> None:
        """Refused where the bot may not post: the log is best-effort, so a channel it cannot
        reach would take every line without a word to the moderators."""
        permissions = own_permissions(channel)
        if permissions is not None and not may_send(channel, permissions):
            raise UserFacingError(
                N_(
                    "The bot may not post in {channel}, so the log would stay empty. Allow its role View Channel "
                    "and Send Messages there, then set it again."
                ),
                channel=channel.mention,
            )
        await self._change(interaction, _given(log_channel_id=channel.id))

    @app_commands.command(name="reset", description=N_("Put a setting (or everything) back to its default"))
    @app_commands.choices(
        setting=[app_commands.Choice(name=info.label, value=name) for name, info in POLICY_FIELDS.items()]
        + [app_commands.Choice(name=N_("Everything"), value=EVERYTHING)]
    )
    async def reset(self, interaction: discord.Interaction, setting: str) -> None:
        names = list(POLICY_FIELDS) if setting == EVERYTHING else [setting]
        defaults = {name: POLICY_FIELDS[name].default for name in names}
        await self._change(interaction, lambda old: defaults)

    async def _change(self, interaction: discord.Interaction, changes_to: PolicyEdit) -> None:
        """Apply the changes `changes_to` makes of the policy as it is, validate, store, confirm to
        the moderator (in their language) and note it in the log channel (in the server's), and
        in the one it was until now. One change at a time per server: two moderators at once
        would each write back the policy they read, undoing the other's change."""
        guild_id = interaction.guild_id
        assert guild_id is not None
        _ = member_texts(interaction)
        async with self.bot.store.exclusive(f"policy:{guild_id}"):
            old = await self.bot.store.policy(guild_id)
            changes = changes_to(old)
            if not changes:
                raise UserFacingError(N_("Give at least one option to change."))
            new = dataclasses.replace(old, **changes)
            problems = validate_policy(new, _)
            if problems:
                raise UserFacingError(N_("Not saved: {problems}"), problems="; ".join(problems))
            await self.bot.store.save_policy(guild_id, new, by_user=interaction.user.id, now=time.time())
        changed = [name for name in changes if getattr(old, name) != getattr(new, name)]
        log.info(
            "guild %d: %s changed the policy: %s",
            guild_id,
            interaction.user.id,
            {name: getattr(new, name) for name in changes},
        )
        answer = "\n".join([_change_text(changed, old, new, _), *_caveats(changed, new, _)])
        await interaction.response.send_message(answer, ephemeral=True)
        server = server_texts(self.bot, guild_id)
        note = (
            f"{server(POLICY_CHANGED, moderator=interaction.user.mention)}\n{_change_text(changed, old, new, server)}"
        )
        await post_to_log_channel(self.bot, guild_id, new, note)
        if old.log_channel_id not in (None, new.log_channel_id):
            # Moved or turned off: the moderators reading the old log see where it went.
            await post_to_log_channel(self.bot, guild_id, old, note)


def _caveats(changed: list[str], new: GuildPolicy, _: Texts) -> list[str]:
    """What the moderator should know of a change that is allowed but rarely meant."""
    found = []
    if {"safety_maximum", "safety_nsfw_maximum"} & set(changed) and new.safety_nsfw_maximum < new.safety_maximum:
        # A server may want its age-restricted channels the stricter; most want the opposite.
        found.append(
            _(
                "⚠️ Age-restricted channels keep their own maximum, {maximum}, stricter than the one for other "
                "channels: set `nsfw_maximum` too to allow more there.",
                maximum=new.safety_nsfw_maximum,
            )
        )
    return found


def _fair_shares(lengths: list[int], room: int) -> list[int]:
    """How long each text may be so that all fit in `room`: the short ones whole, the long ones
    an equal share of what the short ones leave (20 recipes of 1,000 characters do not fit one
    message)."""
    shares = [0] * len(lengths)
    waiting = sorted(range(len(lengths)), key=lengths.__getitem__)
    for place, index in enumerate(waiting):
        shares[index] = min(lengths[index], room // (len(waiting) - place))
        room -= shares[index]
    return shares


def _change_text(names: list[str], old: GuildPolicy, new: GuildPolicy, _: Texts) -> str:
    """One line per setting changed: its label, the old value and the new."""
    lines = [f"**{_(POLICY_FIELDS[name].label)}**: {_change(name, old, new, _)}" for name in names]
    return "\n".join(lines) or _(NOTHING_CHANGED)


def _change(name: str, old: GuildPolicy, new: GuildPolicy, _: Texts) -> str:
    """The old value and the new; for one list of channels to another, the channels added and
    removed (the lists themselves are cut to their first few)."""
    before, after = getattr(old, name), getattr(new, name)
    if name != "allowed_channel_ids" or not (before and after):
        return f"{format_value(name, before, _)} → {format_value(name, after, _)}"
    added, removed = after - before, before - after
    done = [_("added {channels}", channels=channel_list(added, _))] if added else []
    done += [_("removed {channels}", channels=channel_list(removed, _))] if removed else []
    return _.ngettext(
        "{changes} ({count} channel now)", "{changes} ({count} channels now)", len(after), changes="; ".join(done)
    )


async def setup(bot: KontextBot) -> None:
    await bot.add_cog(Admin(bot))
