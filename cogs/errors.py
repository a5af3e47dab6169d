"""The one place where errors become what a member reads (always privately)."""

from __future__ import annotations

import logging

import discord
from discord import app_commands

log = logging.getLogger(__name__)


class UserFacingError(Exception):
    """Raised by commands and buttons with a message meant for the member who used them."""


async def tell(interaction: discord.Interaction, message: str) -> None:
    """Send a private message to the member, whether or not the interaction was answered yet."""
    if interaction.response.is_done():
        await interaction.followup.send(message, ephemeral=True)
    else:
        await interaction.response.send_message(message, ephemeral=True)


def describe(error: Exception) -> str | None:
    """The member-facing text for an error, or None for a bug (logged, then a generic text)."""
    if isinstance(error, app_commands.CommandInvokeError):
        error = error.original  # type: ignore[assignment]
    if isinstance(error, UserFacingError):
        return str(error)
    if isinstance(error, app_commands.MissingPermissions):
        return "You need the " + ", ".join(p.replace("_", " ").title() for p in error.missing_permissions) + " permission for this."
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


class KontextTree(app_commands.CommandTree):
    """The command tree whose error handler is `report`: one place for every command's errors."""

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        await report(interaction, error)
