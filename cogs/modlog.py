"""The moderators' log channel: one line per job and per policy change."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord

from services.policy import GuildPolicy
from services.redact import describe_error

from .views import cached_channel

if TYPE_CHECKING:
    from bot import KontextBot

log = logging.getLogger(__name__)


async def post_to_log_channel(bot: KontextBot, guild_id: int, policy: GuildPolicy, content: str) -> None:
    """Best-effort: a missing channel or permission is logged, never shown to the member."""
    if policy.log_channel_id is None:
        return
    try:
        channel = cached_channel(bot, guild_id, policy.log_channel_id) or await bot.fetch_channel(policy.log_channel_id)
        if isinstance(channel, discord.abc.Messageable):
            await channel.send(content[:2000], allowed_mentions=discord.AllowedMentions.none())
    except Exception as exc:  # Discord's refusal or the way there failing: the log is not worth an error
        log.warning("could not post to log channel %d: %s", policy.log_channel_id, describe_error(exc))
