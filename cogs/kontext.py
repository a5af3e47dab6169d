"""`/kontext`: turns a member's request into a job for the runner."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from services.job import ENDPOINT_MULTI, ENDPOINT_SINGLE, Job, JobRequest
from services.policy import Allowed, GuildPolicy, JobAsk, Refused, RefusalReason, Requester, resolve
from services.runner import RunnerStopped

from .errors import UserFacingError
from .inputs import MAX_PROMPT_LENGTH, clean_prompt, first_image_url, image_url
from .views import JobButton, PromptModal

if TYPE_CHECKING:
    from bot import KontextBot

log = logging.getLogger(__name__)

ASPECT_RATIOS = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")
MAX_SEED = 2**32 - 1


def is_nsfw_channel(channel: Any) -> bool:
    is_nsfw = getattr(channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else False


def requester_of(interaction: discord.Interaction) -> Requester:
    channel = interaction.channel
    member = interaction.user
    return Requester(
        user_id=member.id,
        role_ids=frozenset(role.id for role in getattr(member, "roles", ())),
        channel_id=interaction.channel_id or 0,
        parent_channel_id=channel.parent_id if isinstance(channel, discord.Thread) else None,
        channel_nsfw=is_nsfw_channel(channel),
    )


def refusal_text(refused: Refused, policy: GuildPolicy) -> str:
    """Why a member may not start a job now, and when they can try again."""
    when = f" <t:{int(refused.retry_at)}:R>" if refused.retry_at else ""
    limit = refused.limit
    reason = refused.reason
    if reason is RefusalReason.CHANNEL_NOT_ALLOWED:
        channels = ", ".join(f"<#{channel}>" for channel in sorted(policy.allowed_channel_ids)[:10])
        return f"Kontext isn't enabled in this channel. It works in {channels}."
    if reason is RefusalReason.MISSING_ROLE:
        return f"You need the <@&{policy.required_role_id}> role to use `/kontext` in this server."
    if reason is RefusalReason.MEMBER_CONCURRENCY:
        return f"You already have {limit} edit(s) running. Wait for one to finish, then try again."
    if reason is RefusalReason.GUILD_CONCURRENCY:
        return f"This server already has {limit} edit(s) running. Please try again in a moment."
    if reason is RefusalReason.COOLDOWN:
        return f"Slow down: this server allows one edit every {limit}s. You can start the next one{when}."
    if reason is RefusalReason.DAILY_LIMIT:
        return f"You've used your {limit} edit(s) for today. You can start more{when}."
    if reason is RefusalReason.MONTHLY_IMAGE_BUDGET:
        return f"This server's monthly budget of {limit} image(s) would be exceeded. It resets{when}."
    return f"This server's monthly budget of ${limit:,.2f} would be exceeded. It resets{when}."


class Kontext(commands.Cog):
    def __init__(self, bot: KontextBot) -> None:
        self.bot = bot
        # Checking a server's limits and recording the new job happen under its lock, so two
        # requests at the same instant cannot both take the last free place.
        self._guild_locks: defaultdict[int, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Context menus cannot be methods decorated in a class: build it around a bound method.
        self.edit_menu = app_commands.guild_only(
            app_commands.ContextMenu(name="Edit with Kontext", callback=self.edit_message_image)
        )

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.edit_menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.edit_menu.name, type=self.edit_menu.type)

    @app_commands.command(name="kontext", description="Edit an image with FLUX.1 Kontext [max]")
    @app_commands.guild_only()
    @app_commands.describe(
        image="The image to edit (PNG, JPEG, WebP or GIF)",
        prompt="What to change, e.g. 'make it a watercolour painting'",
        aspect_ratio="Shape of the result (default: like the input)",
        num_images="How many variations to make (1-4, default 1)",
        seed="Same seed + same prompt = same result (default: random)",
        guidance_scale="How closely to follow the prompt (1-20, default 3.5)",
        output_format="File type of the result (default JPEG)",
        safety_tolerance="1 is the strictest, 6 the most permissive (default 2; servers may cap it)",
        enhance_prompt="Let fal improve the prompt before editing (default off)",
        image2="A second image to combine with the first (e.g. 'put the hat from image 2 on...')",
        image3="A third image to combine",
        image4="A fourth image to combine",
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
        enhance_prompt: bool | None = None,
        image2: discord.Attachment | None = None,
        image3: discord.Attachment | None = None,
        image4: discord.Attachment | None = None,
    ) -> None:
        # Everything is checked before the interaction is acknowledged, so bad input gets a
        # private answer and nothing is spent.
        prompt = clean_prompt(prompt)
        limit = self.bot.settings.max_input_bytes
        urls = [image_url(a, limit) for a in (image, image2, image3, image4) if a is not None]
        # Several images go to the /multi endpoint, which takes a list instead of one URL.
        endpoint, images = (ENDPOINT_MULTI, {"image_urls": urls}) if len(urls) > 1 else (ENDPOINT_SINGLE, {"image_url": urls[0]})
        params: dict[str, Any] = {
            "prompt": prompt,
            **images,
            "aspect_ratio": aspect_ratio,
            "num_images": num_images,
            "seed": seed,
            "guidance_scale": guidance_scale,
            "output_format": output_format,
            "enhance_prompt": enhance_prompt,
        }
        params = {name: value for name, value in params.items() if value is not None}
        await self.start_job(interaction, endpoint, params, safety_tolerance)

    async def edit_message_image(self, interaction: discord.Interaction, message: discord.Message) -> None:
        """Message context menu: edit the message's first image with a prompt from a modal."""
        url = first_image_url(message)
        if url is None:
            raise UserFacingError("That message has no image to edit.")
        await interaction.response.send_modal(
            PromptModal(title="Edit with Kontext", images=[("Image", url)], params={}, safety_tolerance=None, parent_job_id=None)
        )

    async def start_job(
        self,
        interaction: discord.Interaction,
        endpoint: str,
        params: dict[str, Any],
        safety_tolerance: int | None,
        *,
        parent_job_id: int | None = None,
    ) -> None:
        """Apply the server's policy, acknowledge within Discord's 3 seconds, record the job and
        hand it to the runner. A refusal is private and nothing is spent."""
        assert interaction.guild_id is not None
        async with self._guild_locks[interaction.guild_id]:
            policy = await self.bot.store.policy(interaction.guild_id)
            requester = requester_of(interaction)
            decision = await self._decide(interaction, policy, requester, safety_tolerance, params.get("num_images", 1))
            if isinstance(decision, Refused):
                raise UserFacingError(refusal_text(decision, policy))
            params = {**params, "safety_tolerance": str(decision.safety_tolerance)}
            notes = {"safety_limited_to": decision.limited_to} if decision.limited_to is not None else {}
            job = await self._accept(interaction, endpoint, params, notes, requester.channel_nsfw, parent_job_id)
        # Acknowledge outside the lock: a burst in one server must not queue up behind Discord's
        # round trips (each interaction has its own 3 seconds).
        try:
            callback = await interaction.response.defer(thinking=True)
            message_id = callback.message_id if callback is not None else None
            if message_id is None:
                message_id = (await interaction.original_response()).id
        except discord.HTTPException as exc:
            await self.bot.runner.abandon(job, f"could not acknowledge the interaction: {exc}")
            raise
        self.bot.runner.start(job, message_id=message_id)

    async def _decide(
        self,
        interaction: discord.Interaction,
        policy: GuildPolicy,
        requester: Requester,
        safety_tolerance: int | None,
        num_images: int,
    ) -> Allowed | Refused:
        assert interaction.guild_id is not None
        now = time.time()
        usage = await self.bot.store.usage(interaction.guild_id, interaction.user.id, now)
        return resolve(
            policy,
            requester,
            usage,
            JobAsk(safety_tolerance, num_images),
            now=now,
            price_per_image=self.bot.settings.price_per_image_usd,
        )

    async def _accept(
        self,
        interaction: discord.Interaction,
        endpoint: str,
        params: dict[str, Any],
        notes: dict[str, Any],
        channel_nsfw: bool,
        parent_job_id: int | None,
    ) -> Job:
        request = JobRequest(
            guild_id=interaction.guild_id,
            channel_id=interaction.channel_id or 0,
            user_id=interaction.user.id,
            application_id=interaction.application_id,
            interaction_token=interaction.token,
            interaction_created_at=interaction.created_at.timestamp(),
            message_id=None,
            channel_nsfw=channel_nsfw,
            upload_limit=interaction.filesize_limit,
            endpoint=endpoint,
            params=params,
            notes=notes,
            parent_job_id=parent_job_id,
        )
        try:
            return await self.bot.runner.accept(request)
        except RunnerStopped:
            raise UserFacingError("The bot is restarting. Please try again in a minute.") from None


async def setup(bot: KontextBot) -> None:
    bot.add_dynamic_items(JobButton)
    await bot.add_cog(Kontext(bot))
