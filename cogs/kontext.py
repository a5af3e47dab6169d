"""`/kontext` and "Edit with Kontext": turn what a member typed or picked into a job for the
intake: an edit of the images attached, or with none an image made from the prompt."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from services.flux_kontext import (
    GUIDANCE_MAX,
    GUIDANCE_MIN,
    NUM_IMAGES_MAX,
    NUM_IMAGES_MIN,
    SAFETY_MAX,
    SAFETY_MIN,
    SEED_MAX,
    KontextEdit,
    KontextOptions,
)
from services.i18n import N_

from .errors import UserFacingError, report
from .inputs import (
    ASPECT_RATIO_CHOICES,
    MAX_PROMPT_LENGTH,
    OUTPUT_FORMAT_CHOICES,
    first_image_url,
    image_url,
)
from .modal import PromptModal, answer_of, form_id, start_edit
from .recipes import prompt_choices, resolve_prompt
from .translation import member_texts

if TYPE_CHECKING:
    from bot import KontextBot

    Interaction = discord.Interaction[KontextBot]

log = logging.getLogger(__name__)

# The context menu's form: the message whose first image it edits.
MENU_FORM = re.compile(r"kontext:menu:(?P<channel_id>[0-9]+):(?P<message_id>[0-9]+)")
# Messages whose image is remembered for their forms (the oldest forgotten first).
MAX_OPEN_FORMS = 1000
# How long a submitted form waits for its message read again, of the 3 seconds it has to be
# acknowledged in (see Acknowledgement).
MESSAGE_READ_WITHIN = 1.5


class Kontext(commands.Cog):
    def __init__(self, bot: KontextBot) -> None:
        self.bot = bot
        # Context menus cannot be methods decorated in a class: build it around a bound method.
        # Where it is offered (servers, and with PERSONAL_USE also DMs and group DMs) is the
        # bot's default (bot.py).
        self.edit_menu = app_commands.ContextMenu(name="Edit with Kontext", callback=self.edit_message_image)
        # The image of each message a form was opened on, by the form's custom_id (one for every
        # member's form on that message): where the bot cannot read the message again (a server
        # without the bot), this is the only copy, so one member's submit does not take it from
        # another's form still open.
        self._open_forms: dict[str, str] = {}

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.edit_menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.edit_menu.name, type=self.edit_menu.type)

    # Names stay English; descriptions (each at most 100 characters in every language, Discord's
    # limit) are translated by cogs.translation.KontextTranslator.
    @app_commands.command(
        name="kontext", description=N_("Edit an image, or make one from text, with FLUX.1 Kontext [max]")
    )
    @app_commands.describe(
        prompt=N_("What to change, or with no image what to make, e.g. 'a watercolour fox'"),
        image=N_("The image to edit (PNG, JPEG, WebP or GIF); none: made from the prompt"),
        aspect_ratio=N_("Shape of the result (default: like the input, or 1:1 from text)"),
        num_images=N_("How many variations to make (1-4, default 1)"),
        seed=N_("Same seed + same prompt = same result (default: random)"),
        guidance_scale=N_("How closely to follow the prompt (1-20, default 3.5)"),
        output_format=N_("File type of the result (default JPEG)"),
        safety_tolerance=N_("1 is the strictest, 6 the most permissive (default 2; servers may cap it)"),
        enhance_prompt=N_("Let fal improve the prompt before editing (default off)"),
        image2=N_("A second image to combine with the first (e.g. 'put the hat from image 2 on...')"),
        image3=N_("A third image to combine"),
        image4=N_("A fourth image to combine"),
    )
    @app_commands.choices(
        aspect_ratio=ASPECT_RATIO_CHOICES,
        output_format=OUTPUT_FORMAT_CHOICES,
    )
    async def kontext(
        self,
        interaction: Interaction,
        # Discord lists required options first: the prompt, then the image it may edit.
        prompt: app_commands.Range[str, 1, MAX_PROMPT_LENGTH],
        image: discord.Attachment | None = None,
        aspect_ratio: str | None = None,
        num_images: app_commands.Range[int, NUM_IMAGES_MIN, NUM_IMAGES_MAX] | None = None,
        seed: app_commands.Range[int, 0, SEED_MAX] | None = None,
        guidance_scale: app_commands.Range[float, GUIDANCE_MIN, GUIDANCE_MAX] | None = None,
        output_format: str | None = None,
        safety_tolerance: app_commands.Range[int, SAFETY_MIN, SAFETY_MAX] | None = None,
        enhance_prompt: bool | None = None,
        image2: discord.Attachment | None = None,
        image3: discord.Attachment | None = None,
        image4: discord.Attachment | None = None,
    ) -> None:
        # Everything is checked before the interaction is acknowledged, so bad input gets a
        # private answer and nothing is spent.
        if image is None and (image2 or image3 or image4):
            raise UserFacingError(N_("Attach the first image as `image`: `image2` to `image4` are combined with it."))
        read = await resolve_prompt(interaction, prompt)
        limit = self.bot.settings.max_input_bytes
        urls = tuple(image_url(a, limit) for a in (image, image2, image3, image4) if a is not None)
        options = KontextOptions(
            aspect_ratio=aspect_ratio,
            num_images=num_images,
            seed=seed,
            guidance_scale=guidance_scale,
            output_format=output_format,
            enhance_prompt=enhance_prompt,
            safety_tolerance=safety_tolerance,
        )
        await self.bot.intake.start(
            interaction,
            KontextEdit(read.sent, urls, options),
            fill_defaults=True,
            member_prompt=read.member_prompt,
            recipe=read.recipe,
        )

    @kontext.autocomplete("prompt")
    async def prompt_autocomplete(self, interaction: Interaction, current: str) -> list[app_commands.Choice[str]]:
        return await prompt_choices(interaction, current)

    async def edit_message_image(self, interaction: Interaction, message: discord.Message) -> None:
        """Message context menu: edit the message's first image with a prompt from a form. The
        form is not held by discord.py: its submit comes to `submit_menu_form`, however late."""
        settings = self.bot.settings
        await self.bot.intake.check_access(interaction)
        url = first_image_url(message, settings.max_input_bytes, settings.discord_cdn_hosts)
        _ = member_texts(interaction)
        custom_id = f"kontext:menu:{message.channel.id}:{message.id}"
        self._open_forms.pop(custom_id, None)
        self._open_forms[custom_id] = url
        if len(self._open_forms) > MAX_OPEN_FORMS:
            del self._open_forms[next(iter(self._open_forms))]
        await interaction.response.send_modal(
            PromptModal(title=_("Edit with Kontext"), image_labels=(), texts=_, custom_id=custom_id)
        )

    @commands.Cog.listener("on_interaction")
    async def submit_menu_form(self, interaction: Interaction) -> None:
        """A submitted "Edit with Kontext" form: the message's first image read again where the
        bot can read it, else as remembered when the form was opened."""
        match = MENU_FORM.fullmatch(form_id(interaction) or "")
        if match is None:
            return
        prompt = answer_of(interaction).prompt
        try:
            # Read again where the bot can: the link remembered is signed and expires (about a
            # day; a form may stay open longer), and Discord signs the message's links afresh.
            channel_id, message_id = int(match["channel_id"]), int(match["message_id"])
            url = None
            # The custom_id is the member's to send: Discord checks a clicked component's against
            # its message, and documents no check of a form's. Only a message of the channel the
            # form is submitted in (where the member opened it) is read, so no member gets the bot
            # to read a channel, a server or a DM they cannot see.
            if channel_id == interaction.channel_id:
                url = await self._first_image(channel_id, message_id) or self._open_forms.get(match[0])
            if url is None:
                raise UserFacingError(
                    N_("This form was opened before the bot restarted: open it again from the message's Apps menu.")
                )
            await start_edit(interaction, prompt, url, KontextOptions())
        except Exception as exc:
            await report(interaction, exc, typed=prompt)

    async def _first_image(self, channel_id: int, message_id: int) -> str | None:
        """The message's first image as Discord serves it now; None where the bot may not read
        the message (a server without the bot), or Discord does not return it soon enough (its
        retries of a 5xx take seconds, and the form's 3 seconds run): the image remembered
        stands in for it there."""
        try:
            async with asyncio.timeout(MESSAGE_READ_WITHIN):
                message = await self.bot.get_partial_messageable(channel_id).fetch_message(message_id)
        except TimeoutError:
            log.info("the message of an Edit with Kontext form was not read within %.1f s", MESSAGE_READ_WITHIN)
            return None
        except discord.NotFound:
            # Deleted (a moderator removed it, or its channel) while the form was open: its image
            # is not edited and posted again, though the link remembered may still be served.
            raise UserFacingError(N_("That message was deleted, so there is no image left to edit.")) from None
        except discord.Forbidden:
            return None
        settings = self.bot.settings
        return first_image_url(message, settings.max_input_bytes, settings.discord_cdn_hosts)


async def setup(bot: KontextBot) -> None:
    await bot.add_cog(Kontext(bot))
