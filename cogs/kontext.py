"""`/kontext`: turns a member's request into a job for the runner."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from services.images import ACCEPTED_CONTENT_TYPES, declared_image_type
from services.job import ENDPOINT_SINGLE, JobRequest
from services.runner import RunnerStopped

from .errors import UserFacingError
from .views import CancelButton

if TYPE_CHECKING:
    from bot import KontextBot

log = logging.getLogger(__name__)

ASPECT_RATIOS = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")
MAX_PROMPT_LENGTH = 2000
MAX_SEED = 2**32 - 1


def _image_url(attachment: discord.Attachment, max_bytes: int) -> str:
    """The attachment's URL for fal to fetch, once it is known to be an image fal can read."""
    if declared_image_type(attachment.content_type, attachment.filename) is None:
        kinds = ", ".join(sorted(t.split("/")[1].upper() for t in ACCEPTED_CONTENT_TYPES))
        raise UserFacingError(f"`{attachment.filename}` is not an image Kontext can read. Please attach {kinds}.")
    if attachment.size <= 0:
        raise UserFacingError(f"`{attachment.filename}` is empty.")
    if attachment.size > max_bytes:
        raise UserFacingError(
            f"`{attachment.filename}` is {attachment.size / 1_048_576:.1f} MB; the limit is {max_bytes / 1_048_576:.0f} MB."
        )
    return attachment.url


def _clean_prompt(prompt: str) -> str:
    cleaned = prompt.strip()
    if not cleaned:
        raise UserFacingError("Please describe the edit you want in `prompt`.")
    if len(cleaned) > MAX_PROMPT_LENGTH:
        raise UserFacingError(f"The prompt is {len(cleaned)} characters; the limit is {MAX_PROMPT_LENGTH}.")
    return cleaned


def is_nsfw_channel(channel: Any) -> bool:
    is_nsfw = getattr(channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else False


class Kontext(commands.Cog):
    def __init__(self, bot: KontextBot) -> None:
        self.bot = bot

    @app_commands.command(name="kontext", description="Edit an image with FLUX.1 Kontext [max]")
    @app_commands.describe(
        image="The image to edit (PNG, JPEG, WebP or GIF)",
        prompt="What to change, e.g. 'make it a watercolour painting'",
        aspect_ratio="Shape of the result (default: like the input)",
        num_images="How many variations to make (1-4, default 1)",
        seed="Same seed + same prompt = same result (default: random)",
        guidance_scale="How closely to follow the prompt (1-20, default 3.5)",
        output_format="File type of the result (default JPEG)",
        safety_tolerance="1 is the strictest, 6 the most permissive (default 2; servers may cap it)",
    )
    @app_commands.choices(
        aspect_ratio=[app_commands.Choice(name=ratio, value=ratio) for ratio in ASPECT_RATIOS],
        output_format=[app_commands.Choice(name="JPEG", value="jpeg"), app_commands.Choice(name="PNG", value="png")],
    )
    async def kontext(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        prompt: app_commands.Range[str, 1, MAX_PROMPT_LENGTH],
        aspect_ratio: str | None = None,
        num_images: app_commands.Range[int, 1, 4] | None = None,
        seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
        guidance_scale: app_commands.Range[float, 1.0, 20.0] | None = None,
        output_format: str | None = None,
        safety_tolerance: app_commands.Range[int, 1, 6] | None = None,
    ) -> None:
        # Everything is checked before the interaction is acknowledged, so bad input gets a
        # private answer and nothing is spent.
        params: dict[str, Any] = {
            "prompt": _clean_prompt(prompt),
            "image_url": _image_url(image, self.bot.settings.max_input_bytes),
            "aspect_ratio": aspect_ratio,
            "num_images": num_images,
            "seed": seed,
            "guidance_scale": guidance_scale,
            "output_format": output_format,
            "safety_tolerance": str(safety_tolerance) if safety_tolerance is not None else None,
        }
        params = {name: value for name, value in params.items() if value is not None}
        await self.start_job(interaction, ENDPOINT_SINGLE, params)

    async def start_job(self, interaction: discord.Interaction, endpoint: str, params: dict[str, Any]) -> None:
        """Acknowledge within Discord's 3 seconds, record the job, and hand it to the runner."""
        callback = await interaction.response.defer(thinking=True)
        message_id = callback.message_id if callback is not None else None
        if message_id is None:
            message_id = (await interaction.original_response()).id
        request = JobRequest(
            guild_id=interaction.guild_id,
            channel_id=interaction.channel_id or 0,
            user_id=interaction.user.id,
            application_id=interaction.application_id,
            interaction_token=interaction.token,
            interaction_created_at=interaction.created_at.timestamp(),
            message_id=message_id,
            channel_nsfw=is_nsfw_channel(interaction.channel),
            upload_limit=interaction.filesize_limit,
            endpoint=endpoint,
            params=params,
        )
        try:
            await self.bot.runner.submit(request)
        except RunnerStopped:
            raise UserFacingError("The bot is restarting. Please try again in a minute.") from None


async def setup(bot: KontextBot) -> None:
    bot.add_dynamic_items(CancelButton)
    await bot.add_cog(Kontext(bot))
