"""Buttons and the prompt modal that act on jobs. Every button's custom_id carries its action
and job id (`kontext:<action>:<job id>`), so buttons keep working after a restart."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import discord

from services.fal_queue import FalError
from services.job import Job
from services.runner import CancelOutcome

from .errors import UserFacingError, report, tell
from .inputs import is_image_attachment
from .modal import PromptModal
from .render import JobAction

if TYPE_CHECKING:
    from bot import KontextBot

    Interaction = discord.Interaction[KontextBot]


def is_moderator(interaction: Interaction) -> bool:
    permissions = interaction.permissions
    return permissions.manage_messages or permissions.manage_guild


def image_attachments(message: discord.Message | None) -> list[discord.Attachment]:
    return [a for a in (message.attachments if message else []) if is_image_attachment(a)]


# -- what each button does --------------------------------------------------------------------


async def cancel_job(interaction: Interaction, job: Job) -> None:
    await interaction.response.defer()
    try:
        outcome = await interaction.client.runner.cancel(job.id, interaction.user.id)
    except FalError:
        raise UserFacingError("fal.ai did not answer the cancel request. Please try again in a moment.") from None
    if outcome is CancelOutcome.TOO_LATE:
        await tell(interaction, "Too late to cancel: this edit has already finished.")
    elif outcome is CancelOutcome.REQUESTED:
        await tell(interaction, "Cancelling: the edit is being handed to fal right now and will be stopped there.")
    elif outcome is CancelOutcome.FORWARDED:
        await tell(interaction, "Cancelling: this edit will be stopped in a moment.")
    elif outcome is CancelOutcome.STARTED:
        await tell(
            interaction,
            "FLUX.1 Kontext had already started this edit. fal passes the cancel on, but a started edit is "
            "usually finished (and billed) anyway, so the images will be posted when they are ready.",
        )


async def reroll_job(interaction: Interaction, job: Job) -> None:
    """Same inputs, a new seed, as a new reply."""
    await interaction.client.intake.start(interaction, job.edit.with_options(seed=None), parent_job_id=job.id)


async def edit_job(interaction: Interaction, job: Job) -> None:
    """Anyone in the channel may build on a result: ask for a prompt (and which image)."""
    images = image_attachments(interaction.message)
    if not images:
        raise UserFacingError("This message has no image left to edit.")
    await interaction.response.send_modal(
        PromptModal(
            title=f"Edit the result of job #{job.id}",
            images=[(f"Image {i}: {a.filename}"[:100], a.url) for i, a in enumerate(images, start=1)],
            options=job.edit.options.for_follow_up_edit(),
            parent_job_id=job.id,
        )
    )


async def delete_result(interaction: Interaction, job: Job) -> None:
    """Every message of the result goes, not only the one whose button was pressed."""
    await interaction.response.defer()
    pressed = interaction.message.id if interaction.message is not None else None
    channel = interaction.channel
    for message_id in job.posted_message_ids:
        if message_id != pressed and isinstance(channel, (discord.TextChannel, discord.Thread, discord.VoiceChannel)):
            with contextlib.suppress(discord.NotFound):
                await channel.get_partial_message(message_id).delete()
    await interaction.delete_original_response()


@dataclass(frozen=True)
class ButtonSpec:
    label: str
    emoji: str
    style: discord.ButtonStyle
    handler: Callable[[Interaction, Job], Awaitable[None]]
    # Who may press it: the member who asked and moderators, or (None) anyone in the channel.
    restricted_to_requester: str | None


BUTTONS: dict[JobAction, ButtonSpec] = {
    JobAction.CANCEL: ButtonSpec("Cancel", "✖️", discord.ButtonStyle.secondary, cancel_job, "cancel"),
    JobAction.REROLL: ButtonSpec("Re-roll", "🎲", discord.ButtonStyle.primary, reroll_job, "re-roll"),
    JobAction.RETRY: ButtonSpec("Try again", "🔁", discord.ButtonStyle.primary, reroll_job, "re-roll"),
    JobAction.EDIT: ButtonSpec("Edit", "✏️", discord.ButtonStyle.secondary, edit_job, None),
    JobAction.DELETE: ButtonSpec("Delete", "🗑️", discord.ButtonStyle.danger, delete_result, "delete"),
}


def job_view(job: Job, actions: tuple[JobAction, ...]) -> discord.ui.View:
    """A job's buttons, in one row; an empty view removes any shown before."""
    view = discord.ui.View(timeout=None)
    for action in actions:
        view.add_item(JobButton(action, job.id, job.button_key))
    return view


class JobButton(
    discord.ui.DynamicItem[discord.ui.Button],
    # Buttons posted before the job key existed have none.
    template=r"kontext:(?P<action>[a-z]+):(?P<job_id>[0-9]+)(?::(?P<key>[0-9a-f]+))?",
):
    def __init__(self, action: JobAction, job_id: int, key: str | None) -> None:
        spec = BUTTONS[action]
        custom_id = f"kontext:{action.value}:{job_id}" + (f":{key}" if key else "")
        super().__init__(discord.ui.Button(label=spec.label, emoji=spec.emoji, style=spec.style, custom_id=custom_id))
        self.action = action
        self.job_id = job_id
        self.key = key
        self.job: Job | None = None

    @classmethod
    async def from_custom_id(  # type: ignore[override]  # typed with the bot's own interactions
        cls, interaction: Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> JobButton:
        return cls(JobAction(match["action"]), int(match["job_id"]), match["key"])  # ValueError: unknown action

    async def interaction_check(self, interaction: Interaction) -> bool:  # type: ignore[override]
        """Find the job and check who may press this. discord.py ignores an error raised here
        for a dynamic item, so the member is told here."""
        try:
            bot = interaction.client
            job = bot.runner.active_job(self.job_id) or await bot.store.get_job(self.job_id)
            if job is None or not self._belongs_to(job, interaction):
                raise UserFacingError("This button belongs to an edit the bot no longer knows.")
            verb = BUTTONS[self.action].restricted_to_requester
            if verb is not None and interaction.user.id != job.user_id and not is_moderator(interaction):
                raise UserFacingError(f"Only the member who asked for this edit or a moderator can {verb} it.")
        except Exception as exc:
            await report(interaction, exc)
            return False
        self.job = job
        return True

    def _belongs_to(self, job: Job, interaction: Interaction) -> bool:
        """A button acts only on the job it was posted for: same key (a job id alone is reused
        when a database is lost or restored), same server and channel, one of its messages."""
        if job.button_key is not None and self.key != job.button_key:
            return False
        if (job.guild_id, job.channel_id) != (interaction.guild_id, interaction.channel_id):
            return False
        message = interaction.message
        return message is None or message.id in (job.message_id, *job.posted_message_ids)

    async def callback(self, interaction: Interaction) -> None:  # type: ignore[override]
        assert self.job is not None, "interaction_check found the job"
        try:
            await BUTTONS[self.action].handler(interaction, self.job)
        except Exception as exc:
            await report(interaction, exc)
