"""Which language a text is written in: the member's for what they read (their Discord locale),
the server's preferred one for what its moderators' log channel shows, and every language the
catalogs have for the commands' descriptions and choices (through discord.py's Translator).
Command and option names stay English: they are what members type, and what `</kontext:id>`
mentions show whatever the language (discord-api-docs #7309)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands

from services.i18n import Catalogs, Texts, catalogs, texts

if TYPE_CHECKING:
    from bot import KontextBot

# Names are typed and matched; only what describes them is translated.
UNTRANSLATED = frozenset(
    {
        app_commands.TranslationContextLocation.command_name,
        app_commands.TranslationContextLocation.group_name,
        app_commands.TranslationContextLocation.parameter_name,
    }
)


class KontextTranslator(app_commands.Translator):
    """Descriptions and choice names from the catalogs, for every Discord locale with a catalog
    of its own or of its language (es-419 reads es); None elsewhere, so Discord shows English."""

    def __init__(self, source: Catalogs | None = None) -> None:
        self._catalogs = source or catalogs()

    async def translate(
        self, string: app_commands.locale_str, locale: discord.Locale, context: app_commands.TranslationContextTypes
    ) -> str | None:
        if context.location in UNTRANSLATED:
            return None
        return self._catalogs.texts(locale.value).translation(string.message)


def member_texts(interaction: discord.Interaction) -> Texts:
    """Texts in the language of the member who used the interaction."""
    return texts(interaction.locale.value)


def server_texts(bot: KontextBot, guild_id: int, known_locale: str | None = None) -> Texts:
    """Texts in the server's preferred language (for its moderators' log channel): as the cache
    has it, else `known_locale`, the language the server had when a job was asked for (the
    cache holds only this process's shards, and only once the gateway sent the server)."""
    guild = bot.get_guild(guild_id)
    return texts(guild.preferred_locale.value if guild is not None else known_locale)
