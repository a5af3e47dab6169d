"""`/kontext-me`: a member's own usage against every limit that governs them where they are, and
when each frees up. The figures are the policy's own (`services.policy.standings` on the usage the
intake decides on), so what it shows can never disagree with a refusal."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from services.i18n import N_, Texts
from services.policy import JobAsk, RefusalReason, Refused, Standing, resolve, standings

from .errors import is_paused, refusal_text, timestamp_when_free
from .intake import requester_of
from .render import EMBED_COLOUR
from .translation import member_texts

if TYPE_CHECKING:
    from bot import KontextBot

    Interaction = discord.Interaction[KontextBot]

# Refusals about where and who, not how much: no figure explains them.
ACCESS_REASONS = (RefusalReason.CHANNEL_NOT_ALLOWED, RefusalReason.MISSING_ROLE)


def standing_line(standing: Standing, _: Texts, *, personal: bool) -> tuple[str, str]:
    """One limit as the member reads it: its name and where they stand (⛔ when the next job
    would be refused by it), counts and money written as the member's language writes them."""
    reason = standing.reason
    used, limit = standing.used, standing.limit
    counted = {"used": _.number(used), "limit": _.number(limit)}
    if reason is RefusalReason.OPERATOR_BUDGET:
        name = _("The bot's monthly budget (all servers)")
        value = _("{used} of {limit}", used=_.money(used), limit=_.money(limit))
    elif reason is RefusalReason.MEMBER_CONCURRENCY:
        name = _("Your jobs running")
        value = _("{used} of {limit}", **counted)
    elif reason is RefusalReason.GUILD_CONCURRENCY:
        name = _("Jobs running in this server")
        value = _("{used} of {limit}", **counted)
    elif reason is RefusalReason.COOLDOWN:
        name = _("Cooldown")
        value = _("one job every {seconds} s", seconds=_.number(limit))
    elif reason is RefusalReason.DAILY_LIMIT:
        name = _("Your jobs today outside servers") if personal else _("Your jobs today")
        value = _("{used} of {limit}", **counted)
    elif reason is RefusalReason.MONTHLY_IMAGE_BUDGET:
        name = _("This server's monthly budget")
        value = _("{used} of {limit} images", **counted)
    else:
        name = _("This server's monthly budget")
        value = _("{used} of {limit}", used=_.money(used), limit=_.money(limit))
    value += " · " + _when_free(standing, _)
    return (f"⛔ {name}" if standing.reached else name), value


def _when_free(standing: Standing, _: Texts) -> str:
    reason = standing.reason
    if is_paused(standing):  # no job ending or new day lets one start
        return _("paused by the moderators")
    if reason in (RefusalReason.MEMBER_CONCURRENCY, RefusalReason.GUILD_CONCURRENCY):
        return _("frees up when a job finishes") if standing.reached else _("a job can start now")
    if reason is RefusalReason.COOLDOWN:
        if standing.resets_at is None:
            return _("ready now")
        return _("ready {when}", when=timestamp_when_free(standing.resets_at))
    assert standing.resets_at is not None, "counted limits reset at a known moment"
    return _("resets {when}", when=timestamp_when_free(standing.resets_at))


class Quota(commands.Cog):
    def __init__(self, bot: KontextBot) -> None:
        self.bot = bot

    @app_commands.command(
        name="kontext-me", description=N_("Your Kontext usage against this place's limits, and when each resets")
    )
    async def kontext_me(self, interaction: Interaction) -> None:
        _ = member_texts(interaction)
        now = time.time()
        governing = await self.bot.intake.governing(interaction, now)
        # The next job as a plain /kontext would ask for it: the member's own defaults fill it
        # (two images by default count twice against a budget), as they fill that command.
        defaults = (await self.bot.store.member_defaults(interaction.user.id)).options
        next_job = JobAsk(defaults.safety_tolerance, defaults.image_count)
        price = self.bot.settings.price_per_image_usd
        found = standings(
            governing.policy, governing.usage, next_job, now=now, price_per_image=price, operator=governing.operator
        )
        # Where the channel or a role keeps the member out, or a limit set to 0, that comes first,
        # as /kontext says it.
        decision = resolve(
            governing.policy,
            requester_of(interaction),
            governing.usage,
            next_job,
            now=now,
            price_per_image=price,
            operator=governing.operator,
        )
        kept_out = isinstance(decision, Refused) and (decision.reason in ACCESS_REASONS or is_paused(decision))
        if governing.personal:
            title = _("Your Kontext quota outside servers that added the bot")
        else:
            title = _("Your Kontext quota in this server")
        embed = discord.Embed(title=title, colour=EMBED_COLOUR)
        for standing in found:
            name, value = standing_line(standing, _, personal=governing.personal)
            embed.add_field(name=name, value=value, inline=False)
        if kept_out:
            assert isinstance(decision, Refused)
            embed.description = refusal_text(decision, governing.policy, _, personal=governing.personal)
        elif not found:
            embed.description = _("No usage limits apply to you here.")
        elif any(standing.reached for standing in found):
            embed.description = _("⛔ marks a limit that stops your next job.")
        else:
            embed.description = _("You can start a job now.")
        await interaction.response.send_message(embed=embed, ephemeral=True)


async def setup(bot: KontextBot) -> None:
    await bot.add_cog(Quota(bot))
