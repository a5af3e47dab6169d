"""The one place where errors become what a member reads (always privately)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands

from services.fal_queue import FalAccountLocked
from services.flux_kontext import InvalidEdit
from services.policy import GuildPolicy, RefusalReason, Refused
from services.runner import RunnerStopped

if TYPE_CHECKING:
    from bot import KontextBot

log = logging.getLogger(__name__)


class UserFacingError(Exception):
    """Raised by commands and buttons with a message meant for the member who used them."""


class NotServedHere(app_commands.CheckFailure):
    """The operator does not let the bot work in this server (ALLOWED_GUILD_IDS)."""


class PolicyRefusal(Exception):
    """The server's policy does not let this member start a job now."""

    def __init__(self, refused: Refused, policy: GuildPolicy) -> None:
        super().__init__(refused.reason.value)
        self.refused = refused
        self.policy = policy


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
    if reason is RefusalReason.OPERATOR_BUDGET:
        return f"The bot's monthly budget for all servers is used up. It resets{when}."
    return f"This server's monthly budget of ${limit:,.2f} would be exceeded. It resets{when}."


async def tell(interaction: discord.Interaction, message: str) -> None:
    """Send a private message to the member, whether or not the interaction was answered yet."""
    if interaction.response.is_done():
        await interaction.followup.send(message, ephemeral=True)
    else:
        await interaction.response.send_message(message, ephemeral=True)


def describe(error: Exception) -> str | None:
    """The member-facing text for an error, or None for a bug (logged, then a generic text)."""
    if isinstance(error, app_commands.CommandInvokeError):
        error = error.original
    if isinstance(error, UserFacingError):
        return str(error)
    if isinstance(error, NotServedHere):
        return "The Kontext bot is not enabled for this server."
    if isinstance(error, PolicyRefusal):
        return refusal_text(error.refused, error.policy)
    if isinstance(error, InvalidEdit):
        return f"That can't be sent to FLUX.1 Kontext: {error}."
    if isinstance(error, RunnerStopped):
        return "The bot is restarting. Please try again in a minute."
    if isinstance(error, FalAccountLocked):
        return (
            "The bot's fal.ai account can't take edits right now (it is out of credit or locked). "
            "The bot's operator has been told; please try again later. Nothing was charged."
        )
    if isinstance(error, app_commands.MissingPermissions):
        return (
            "You need the "
            + ", ".join(p.replace("_", " ").title() for p in error.missing_permissions)
            + " permission for this."
        )
    if isinstance(error, app_commands.NoPrivateMessage):
        return "This only works in a server."
    if isinstance(error, app_commands.CommandOnCooldown):
        return f"Slow down: try again in {error.retry_after:.0f}s."
    if isinstance(error, app_commands.CheckFailure):
        return "You can't use this here."
    if isinstance(error, app_commands.TransformerError):
        return f"That value doesn't fit: {error.value!r}."
    return None


async def report(interaction: discord.Interaction, error: Exception) -> None:
    message = describe(error)
    if message is None:
        command = interaction.command.qualified_name if interaction.command else "a component"
        log.error("unexpected error in %s", command, exc_info=error)
        message = "Something went wrong on the bot's side. It has been logged; please try again."
    try:
        await tell(interaction, message)
    except discord.HTTPException:
        log.warning("could not tell the member about an error", exc_info=True)


class KontextTree(app_commands.CommandTree["KontextBot"]):
    """The command tree whose error handler is `report`: one place for every command's errors."""

    async def interaction_check(self, interaction: discord.Interaction[KontextBot]) -> bool:
        if interaction.guild_id is not None and not interaction.client.settings.serves_guild(interaction.guild_id):
            raise NotServedHere()
        return True

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        await report(interaction, error)
