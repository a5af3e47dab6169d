"""Buttons whose custom_id carries the job id, so they keep working after a restart."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import discord

from services.job import Job
from services.runner import CancelOutcome

from .errors import UserFacingError, report, tell

if TYPE_CHECKING:
    from bot import KontextBot


def is_moderator(interaction: discord.Interaction) -> bool:
    permissions = interaction.permissions
    return permissions.manage_messages or permissions.manage_guild


async def job_for(interaction: discord.Interaction, job_id: int) -> Job:
    bot: KontextBot = interaction.client  # type: ignore[assignment]
    job = bot.runner.active_job(job_id) or await bot.store.get_job(job_id)
    if job is None:
        raise UserFacingError("This job no longer exists.")
    return job


def ensure_requester_or_moderator(interaction: discord.Interaction, job: Job, action: str) -> None:
    if interaction.user.id != job.user_id and not is_moderator(interaction):
        raise UserFacingError(f"Only the member who asked for this edit or a moderator can {action} it.")


class CancelButton(discord.ui.DynamicItem[discord.ui.Button], template=r"kontext:cancel:(?P<job_id>\d+)"):
    def __init__(self, job_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Cancel", style=discord.ButtonStyle.secondary, emoji="✖️", custom_id=f"kontext:cancel:{job_id}"
            )
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str]
    ) -> CancelButton:
        return cls(int(match["job_id"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: KontextBot = interaction.client  # type: ignore[assignment]
        try:
            job = await job_for(interaction, self.job_id)
            ensure_requester_or_moderator(interaction, job, "cancel")
            await interaction.response.defer()
            outcome = await bot.runner.cancel(job.id, interaction.user.id)
        except Exception as exc:
            await report(interaction, exc)
            return
        if outcome is CancelOutcome.TOO_LATE:
            await tell(interaction, "Too late to cancel: this edit has already finished.")
        elif outcome is CancelOutcome.REQUESTED:
            await tell(interaction, "Cancelling: the edit is being handed to fal right now and will be stopped there.")
