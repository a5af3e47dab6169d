"""Buttons and modals that act on jobs. Every button's custom_id carries its action and job id
(`kontext:<action>:<job id>`), so buttons keep working after a restart."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import discord

from services.fal_queue import FalError
from services.job import ENDPOINT_SINGLE, Job
from services.runner import CancelOutcome

from .errors import UserFacingError, report, tell
from .inputs import MAX_PROMPT_LENGTH, clean_prompt, is_image_attachment

if TYPE_CHECKING:
    from bot import KontextBot

    from .kontext import Kontext

# Options of a result that carry over to an edit of it (which makes one image from one image).
EDIT_CARRIES = ("aspect_ratio", "guidance_scale", "output_format", "enhance_prompt")


def is_moderator(interaction: discord.Interaction) -> bool:
    permissions = interaction.permissions
    return permissions.manage_messages or permissions.manage_guild


def ensure_requester_or_moderator(interaction: discord.Interaction, job: Job, action: str) -> None:
    if interaction.user.id != job.user_id and not is_moderator(interaction):
        raise UserFacingError(f"Only the member who asked for this edit or a moderator can {action} it.")


def kontext_cog(interaction: discord.Interaction) -> Kontext:
    cog = interaction.client.get_cog("Kontext")  # type: ignore[attr-defined]
    assert cog is not None
    return cog  # type: ignore[return-value]


def requested_safety(job: Job) -> int | None:
    value = job.params.get("safety_tolerance")
    return int(value) if value is not None else None


def image_attachments(message: discord.Message | None) -> list[discord.Attachment]:
    return [a for a in (message.attachments if message else []) if is_image_attachment(a)]


# -- what each button does --------------------------------------------------------------------


async def cancel_job(interaction: discord.Interaction, job: Job) -> None:
    bot: KontextBot = interaction.client  # type: ignore[assignment]
    ensure_requester_or_moderator(interaction, job, "cancel")
    await interaction.response.defer()
    try:
        outcome = await bot.runner.cancel(job.id, interaction.user.id)
    except FalError:
        raise UserFacingError("fal.ai did not answer the cancel request. Please try again in a moment.") from None
    if outcome is CancelOutcome.TOO_LATE:
        await tell(interaction, "Too late to cancel: this edit has already finished.")
    elif outcome is CancelOutcome.REQUESTED:
        await tell(interaction, "Cancelling: the edit is being handed to fal right now and will be stopped there.")


async def reroll_job(interaction: discord.Interaction, job: Job) -> None:
    """Same inputs, a new seed, as a new reply."""
    ensure_requester_or_moderator(interaction, job, "re-roll")
    params = {name: value for name, value in job.params.items() if name not in ("seed", "safety_tolerance")}
    await kontext_cog(interaction).start_job(
        interaction, job.endpoint, params, requested_safety(job), parent_job_id=job.id
    )


async def edit_job(interaction: discord.Interaction, job: Job) -> None:
    """Anyone in the channel may build on a result: ask for a prompt (and which image)."""
    images = image_attachments(interaction.message)
    if not images:
        raise UserFacingError("This message has no image left to edit.")
    base = {name: job.params[name] for name in EDIT_CARRIES if name in job.params}
    await interaction.response.send_modal(
        PromptModal(
            title=f"Edit the result of job #{job.id}",
            images=[(f"Image {i}: {a.filename}"[:100], a.url) for i, a in enumerate(images, start=1)],
            params=base,
            safety_tolerance=requested_safety(job),
            parent_job_id=job.id,
        )
    )


async def delete_result(interaction: discord.Interaction, job: Job) -> None:
    ensure_requester_or_moderator(interaction, job, "delete")
    await interaction.response.defer()
    if interaction.message is not None:
        await interaction.message.delete()


ButtonAction = Callable[[discord.Interaction, Job], Awaitable[None]]

# action -> (label, emoji, style, handler). "retry" is a re-roll offered on a failed job.
ACTIONS: dict[str, tuple[str, str, discord.ButtonStyle, ButtonAction]] = {
    "cancel": ("Cancel", "✖️", discord.ButtonStyle.secondary, cancel_job),
    "reroll": ("Re-roll", "🎲", discord.ButtonStyle.primary, reroll_job),
    "retry": ("Try again", "🔁", discord.ButtonStyle.primary, reroll_job),
    "edit": ("Edit", "✏️", discord.ButtonStyle.secondary, edit_job),
    "delete": ("Delete", "🗑️", discord.ButtonStyle.danger, delete_result),
}


class JobButton(discord.ui.DynamicItem[discord.ui.Button], template=r"kontext:(?P<action>[a-z]+):(?P<job_id>[0-9]+)"):
    def __init__(self, action: str, job_id: int) -> None:
        label, emoji, style, _ = ACTIONS[action]
        super().__init__(
            discord.ui.Button(label=label, emoji=emoji, style=style, custom_id=f"kontext:{action}:{job_id}")
        )
        self.action = action
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str]
    ) -> JobButton:
        if match["action"] not in ACTIONS:
            raise ValueError(f"unknown button action {match['action']!r}")
        return cls(match["action"], int(match["job_id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: KontextBot = interaction.client  # type: ignore[assignment]
        try:
            job = bot.runner.active_job(self.job_id) or await bot.store.get_job(self.job_id)
            if job is None:
                raise UserFacingError("This job no longer exists.")
            await ACTIONS[self.action][3](interaction, job)
        except Exception as exc:
            await report(interaction, exc)


class PromptModal(discord.ui.Modal):
    """Asks for a prompt (and, given several images, which one) and starts a job on it."""

    def __init__(
        self,
        *,
        title: str,
        images: list[tuple[str, str]],
        params: dict[str, Any],
        safety_tolerance: int | None,
        parent_job_id: int | None,
    ) -> None:
        super().__init__(title=title[:45], timeout=600)
        self._images = images
        self._params = params
        self._safety_tolerance = safety_tolerance
        self._parent_job_id = parent_job_id
        self.prompt = discord.ui.TextInput(
            custom_id="prompt", style=discord.TextStyle.paragraph, max_length=MAX_PROMPT_LENGTH,
            placeholder="e.g. make it night time, keep everything else",
        )
        self.add_item(discord.ui.Label(text="What should change?", component=self.prompt))
        self.choice: discord.ui.Select | None = None
        if len(images) > 1:
            self.choice = discord.ui.Select(
                custom_id="image",
                options=[discord.SelectOption(label=label, value=str(i), default=i == 0) for i, (label, _) in enumerate(images)],
            )
            self.add_item(discord.ui.Label(text="Which image?", component=self.choice))

    async def on_submit(self, interaction: discord.Interaction) -> None:
        index = int(self.choice.values[0]) if self.choice is not None and self.choice.values else 0
        params = {"prompt": clean_prompt(self.prompt.value), "image_url": self._images[index][1], **self._params}
        await kontext_cog(interaction).start_job(
            interaction, ENDPOINT_SINGLE, params, self._safety_tolerance, parent_job_id=self._parent_job_id
        )

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:
        await report(interaction, error)
