"""`/kontext-settings`: a member keeps their own defaults for `/kontext` (shape, count, format,
safety tolerance, prompt enhancement) and chooses whether results are posted in the channel or
shown to them first with a "Share to channel" button. Kept per member, for every place they use
the bot (services.member_defaults)."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from services.flux_kontext import (
    NUM_IMAGES_MAX,
    NUM_IMAGES_MIN,
    SAFETY_MAX,
    SAFETY_MIN,
)
from services.i18n import N_, Texts
from services.member_defaults import DEFAULTABLE, MemberDefaults
from services.policy import effective_maximum

from .errors import place_of
from .inputs import ASPECT_RATIO_CHOICES, OUTPUT_FORMAT_CHOICES
from .intake import is_nsfw_channel
from .render import EMBED_COLOUR, OPTION_LABELS
from .translation import member_texts

if TYPE_CHECKING:
    from bot import KontextBot

    Interaction = discord.Interaction[KontextBot]

EVERYTHING = "everything"
RESULTS_PUBLIC, RESULTS_PRIVATE_FIRST = "public", "private_first"
RESULTS_LABEL = N_("Results")
# What a member can keep, and so forget: the defaultable options (not every option the card
# labels: there is no default guidance) and where results go.
LABELS: dict[str, str] = {
    **{name: label for name, label in OPTION_LABELS if name in DEFAULTABLE},
    "private_first": RESULTS_LABEL,
}


def defaults_text(defaults: MemberDefaults, _: Texts) -> list[tuple[str, str]]:
    """Each default as the member reads it: its label and value ("not set" leaves the command's)."""
    lines = []
    for name in DEFAULTABLE:
        value = getattr(defaults, name)
        if value is None:
            shown = _("not set")
        elif isinstance(value, bool):
            shown = _("on") if value else _("off")
        else:
            shown = str(value).upper() if name == "output_format" else str(value)
        lines.append((_(LABELS[name]), shown))
    results = _("shown to you first, with Share to channel") if defaults.private_first else _("posted in the channel")
    lines.append((_(RESULTS_LABEL), results))
    return lines


class MemberSettings(commands.Cog):
    def __init__(self, bot: KontextBot) -> None:
        self.bot = bot

    @app_commands.command(name="kontext-settings", description=N_("Your own defaults for /kontext, everywhere"))
    @app_commands.describe(
        aspect_ratio=N_("Shape of your results when you set none"),
        num_images=N_("How many images to make when you set none (1-4)"),
        output_format=N_("File type of your results when you set none"),
        safety_tolerance=N_("Your safety tolerance when you set none (each place's policy caps it)"),
        enhance_prompt=N_("Let fal improve your prompts when you set none"),
        results=N_("Post results in the channel, or show them to you first with a Share button"),
        reset=N_("Forget one of your defaults, or all of them"),
    )
    @app_commands.choices(
        aspect_ratio=ASPECT_RATIO_CHOICES,
        output_format=OUTPUT_FORMAT_CHOICES,
        results=[
            app_commands.Choice(name=N_("Post in the channel"), value=RESULTS_PUBLIC),
            app_commands.Choice(name=N_("Show to me first, with Share to channel"), value=RESULTS_PRIVATE_FIRST),
        ],
        reset=[app_commands.Choice(name=label, value=name) for name, label in LABELS.items()]
        + [app_commands.Choice(name=N_("Everything"), value=EVERYTHING)],
    )
    async def kontext_settings(
        self,
        interaction: Interaction,
        aspect_ratio: str | None = None,
        num_images: app_commands.Range[int, NUM_IMAGES_MIN, NUM_IMAGES_MAX] | None = None,
        output_format: str | None = None,
        safety_tolerance: app_commands.Range[int, SAFETY_MIN, SAFETY_MAX] | None = None,
        enhance_prompt: bool | None = None,
        results: str | None = None,
        reset: str | None = None,
    ) -> None:
        """Without options: the member's defaults. `reset` forgets first, then the options given
        are set, so one command can start over with new defaults."""
        _ = member_texts(interaction)
        store = self.bot.store
        defaults = await store.member_defaults(interaction.user.id)
        changes: dict[str, Any] = {}
        if reset == EVERYTHING:
            changes = {field.name: field.default for field in dataclasses.fields(MemberDefaults)}
        elif reset in LABELS:
            changes[reset] = getattr(MemberDefaults(), reset)
        given = {
            "aspect_ratio": aspect_ratio,
            "num_images": num_images,
            "output_format": output_format,
            "safety_tolerance": safety_tolerance,
            "enhance_prompt": enhance_prompt,
        }
        changes.update({name: value for name, value in given.items() if value is not None})
        if results is not None:
            changes["private_first"] = results == RESULTS_PRIVATE_FIRST
        if changes:
            defaults = dataclasses.replace(defaults, **changes)
            defaults.options.check()
            await store.save_member_defaults(interaction.user.id, defaults, now=time.time())
            heading = _("Saved. Your defaults for /kontext, wherever you use the bot:")
        else:
            heading = _("Your defaults for /kontext, wherever you use the bot:")
        embed = discord.Embed(description=heading, colour=EMBED_COLOUR)
        for name, value in defaults_text(defaults, _):
            embed.add_field(name=name, value=value)
        note = await self._safety_note(interaction, defaults, _)
        footer = _("Options you give /kontext always win over these.")
        embed.set_footer(text=f"{note}\n{footer}" if note else footer)
        await interaction.response.send_message(embed=embed, ephemeral=True)

    async def _safety_note(self, interaction: Interaction, defaults: MemberDefaults, _: Texts) -> str | None:
        """Where the member is now, a default safety tolerance above what the place allows is
        lowered at use: say so now rather than surprise them later."""
        if defaults.safety_tolerance is None:
            return None
        if place_of(interaction).personal:
            maximum = self.bot.settings.personal.safety_maximum
        else:
            assert interaction.guild_id is not None
            policy = await self.bot.store.policy(interaction.guild_id)
            maximum = effective_maximum(policy, is_nsfw_channel(interaction.channel))
        if defaults.safety_tolerance <= maximum:
            return None
        return _("Here the safety tolerance is at most {maximum}: your jobs here use {maximum}.", maximum=maximum)


async def setup(bot: KontextBot) -> None:
    await bot.add_cog(MemberSettings(bot))
