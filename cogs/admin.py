"""`/kontext-admin`: moderators set the server's policy (safety, access, limits, spend, log)."""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from services.policy import POLICY_FIELDS, validate_policy
from services.usage_chart import last_days, render_usage_chart, usage_summary_text

from .errors import UserFacingError
from .modlog import post_to_log_channel

if TYPE_CHECKING:
    from bot import KontextBot

log = logging.getLogger(__name__)

EVERYTHING = "everything"
CHART_DAYS = 30


def format_value(name: str, value: Any) -> str:
    """A policy value as moderators read it."""
    if name == "allowed_channel_ids":
        return ", ".join(f"<#{channel}>" for channel in sorted(value)) if value else "every channel"
    if value is None:
        return "not set" if name in ("required_role_id", "log_channel_id") else "no limit"
    if name == "required_role_id":
        return f"<@&{value}>"
    if name == "log_channel_id":
        return f"<#{value}>"
    if name == "monthly_usd_budget":
        return f"${value:,.2f}"
    if name == "cooldown_seconds":
        return f"{value}s" if value else "none"
    return str(value)


@app_commands.guild_only()
@app_commands.default_permissions(manage_guild=True)
class Admin(commands.GroupCog, group_name="kontext-admin", group_description="Moderate the Kontext bot in this server"):
    """Visible by default to members with Manage Server; checked again on every use, since
    server admins can show the commands to anyone."""

    access = app_commands.Group(name="access", description="Where and by whom /kontext may be used")

    def __init__(self, bot: KontextBot) -> None:
        self.bot = bot
        super().__init__()

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if not interaction.permissions.manage_guild:
            raise app_commands.MissingPermissions(["manage_guild"])
        return True

    # -- reading ------------------------------------------------------------------------------

    @app_commands.command(name="show", description="This server's Kontext policy and this month's usage")
    async def show(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        now = time.time()
        policy = await self.bot.store.policy(interaction.guild_id)
        usage = await self.bot.store.usage(interaction.guild_id, interaction.user.id, now)
        embed = discord.Embed(title="Kontext policy", colour=discord.Colour.blurple())
        for name, info in POLICY_FIELDS.items():
            embed.add_field(name=info.label, value=format_value(name, getattr(policy, name)))
        cost = usage.guild_images_this_month * self.bot.settings.price_per_image_usd
        embed.add_field(
            name="This month",
            value=f"{usage.guild_images_this_month} image(s), about ${cost:,.2f} "
            f"· {usage.guild_active_jobs} job(s) running now",
            inline=False,
        )
        await interaction.response.send_message(embed=embed, ephemeral=True)

    @app_commands.command(name="usage", description="A chart of this server's last 30 days and this month's spend")
    async def usage(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        now = time.time()
        price = self.bot.settings.price_per_image_usd
        policy = await self.bot.store.policy(interaction.guild_id)
        today = datetime.fromtimestamp(now, UTC).date()
        counts = await self.bot.store.daily_images(interaction.guild_id, since=now - CHART_DAYS * 86400)
        days = last_days({day: (images, images * price) for day, images in counts.items()}, today, CHART_DAYS)
        usage = await self.bot.store.usage(interaction.guild_id, interaction.user.id, now)
        budget = policy.monthly_usd_budget
        if budget is None and policy.monthly_image_budget is not None and price > 0:
            budget = policy.monthly_image_budget * price
        spent = usage.guild_images_this_month * price
        guild_name = interaction.guild.name if interaction.guild else "this server"
        chart = render_usage_chart(
            days, monthly_budget_usd=budget, month_spent_usd=spent, title=f"Kontext in {guild_name}"
        )
        summary = usage_summary_text(days, budget, spent)
        # The same facts as text, for screen readers: in the message and as the image's alt text.
        await interaction.response.send_message(
            summary,
            file=discord.File(io.BytesIO(chart), filename="kontext-usage.png", description=summary),
            ephemeral=True,
        )

    # -- changing -----------------------------------------------------------------------------

    @app_commands.command(name="safety", description="How permissive the model's safety_tolerance may be")
    @app_commands.describe(
        default="Used when a member sets none (1 strictest .. 6 most permissive)",
        maximum="Highest a member may ask for in ordinary channels",
        nsfw_maximum="Highest allowed in age-restricted channels",
    )
    async def safety(
        self,
        interaction: discord.Interaction,
        default: app_commands.Range[int, 1, 6] | None = None,
        maximum: app_commands.Range[int, 1, 6] | None = None,
        nsfw_maximum: app_commands.Range[int, 1, 6] | None = None,
    ) -> None:
        await self._change(
            interaction, safety_default=default, safety_maximum=maximum, safety_nsfw_maximum=nsfw_maximum
        )

    @access.command(name="channel-add", description="Allow /kontext in this channel (then only listed channels)")
    async def channel_add(self, interaction: discord.Interaction, channel: discord.TextChannel) -> None:
        policy = await self.bot.store.policy(interaction.guild_id or 0)
        await self._change(interaction, allowed_channel_ids=policy.allowed_channel_ids | {channel.id})

    @access.command(name="channel-remove", description="Stop allowing /kontext in this channel")
    async def channel_remove(self, interaction: discord.Interaction, channel: discord.TextChannel) -> None:
        policy = await self.bot.store.policy(interaction.guild_id or 0)
        if channel.id not in policy.allowed_channel_ids:
            raise UserFacingError(f"{channel.mention} is not in the list of allowed channels.")
        await self._change(interaction, allowed_channel_ids=policy.allowed_channel_ids - {channel.id})

    @access.command(name="all-channels", description="Allow /kontext in every channel again")
    async def all_channels(self, interaction: discord.Interaction) -> None:
        await self._change(interaction, allowed_channel_ids=frozenset())

    @access.command(name="role", description="Require a role to use /kontext (reset it to allow everyone)")
    async def role(self, interaction: discord.Interaction, role: discord.Role) -> None:
        await self._change(interaction, required_role_id=role.id)

    @app_commands.command(name="limits", description="How often and how much members may use the bot")
    @app_commands.describe(
        cooldown_seconds="Seconds a member waits between two jobs",
        daily_jobs="Jobs per member per day (UTC)",
        member_concurrent="Jobs one member may have running at once",
        server_concurrent="Jobs the whole server may have running at once",
        monthly_images="Images per month for the whole server",
        monthly_usd="US dollars per month for the whole server (at the configured price per image)",
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
            cooldown_seconds=cooldown_seconds,
            daily_jobs_per_member=daily_jobs,
            concurrent_jobs_per_member=member_concurrent,
            concurrent_jobs_per_guild=server_concurrent,
            monthly_image_budget=monthly_images,
            monthly_usd_budget=monthly_usd,
        )

    @app_commands.command(name="log-channel", description="Post one line per job (and every policy change) here")
    async def log_channel(self, interaction: discord.Interaction, channel: discord.TextChannel) -> None:
        await self._change(interaction, log_channel_id=channel.id)

    @app_commands.command(name="reset", description="Put a setting (or everything) back to its default")
    @app_commands.choices(
        setting=[app_commands.Choice(name=info.label, value=name) for name, info in POLICY_FIELDS.items()]
        + [app_commands.Choice(name="Everything", value=EVERYTHING)]
    )
    async def reset(self, interaction: discord.Interaction, setting: str) -> None:
        names = list(POLICY_FIELDS) if setting == EVERYTHING else [setting]
        await self._change(interaction, _explicit=True, **{name: POLICY_FIELDS[name].default for name in names})

    async def _change(self, interaction: discord.Interaction, _explicit: bool = False, **values: Any) -> None:
        """Apply the given values (None = option not given, unless `_explicit`), validate, store,
        confirm to the moderator and note it in the log channel."""
        assert interaction.guild_id is not None
        changes = values if _explicit else {name: value for name, value in values.items() if value is not None}
        if not changes:
            raise UserFacingError("Give at least one option to change.")
        old = await self.bot.store.policy(interaction.guild_id)
        new = dataclasses.replace(old, **changes)
        problems = validate_policy(new)
        if problems:
            raise UserFacingError("Not saved: " + "; ".join(problems))
        await self.bot.store.save_policy(interaction.guild_id, new, by_user=interaction.user.id, now=time.time())
        lines = [
            f"**{POLICY_FIELDS[name].label}**: {format_value(name, getattr(old, name))} → {format_value(name, getattr(new, name))}"
            for name in changes
            if getattr(old, name) != getattr(new, name)
        ] or ["Nothing changed: those were already the settings."]
        log.info(
            "guild %d: %s changed the policy: %s",
            interaction.guild_id,
            interaction.user.id,
            {name: getattr(new, name) for name in changes},
        )
        await interaction.response.send_message("\n".join(lines), ephemeral=True)
        await post_to_log_channel(
            self.bot, new, f"🛠️ {interaction.user.mention} changed the Kontext policy:\n" + "\n".join(lines)
        )


async def setup(bot: KontextBot) -> None:
    await bot.add_cog(Admin(bot))
