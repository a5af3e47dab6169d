"""The prompt's recipes in Discord: the autocomplete of `/kontext`'s `prompt`, and reading back
what a member submitted (a choice's token, a recipe's name) into the prompt sent to the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import discord
from discord import app_commands

from services.i18n import N_
from services.job import JobPlace, RecipeNote
from services.recipes import Recipe, picked, suggest

from .errors import UserFacingError, place_of
from .inputs import clean_prompt

if TYPE_CHECKING:
    from bot import KontextBot

    Interaction = discord.Interaction[KontextBot]

# The member's past prompts read for suggestions (each once, newest first).
RECENT_PROMPTS = 25


async def server_recipes(interaction: Interaction) -> list[Recipe]:
    """The recipes of the server the member is in, where that server added the bot."""
    if place_of(interaction) is not JobPlace.SERVER or interaction.guild_id is None:
        return []
    return await interaction.client.store.recipes(interaction.guild_id)


async def prompt_choices(interaction: Interaction, typed: str) -> list[app_commands.Choice[str]]:
    """What the member may pick while typing `prompt`: two indexed reads, then pure matching."""
    store = interaction.client.store
    recent = await store.recent_prompts(interaction.user.id, limit=RECENT_PROMPTS)
    found = suggest(typed, await server_recipes(interaction), recent)
    return [app_commands.Choice(name=s.name, value=s.value) for s in found]


@dataclass(frozen=True)
class ReadPrompt:
    """A submitted prompt, read: what the model is sent, the member's own words (what they are
    offered again; None where they typed none) and the server recipe that made it, if one did
    (what members see of it)."""

    sent: str
    member_prompt: str | None
    recipe: RecipeNote | None = None


async def resolve_prompt(interaction: Interaction, submitted: str) -> ReadPrompt:
    """A server recipe applied to the member's words, a past prompt of theirs, or what they typed."""
    server = await server_recipes(interaction)
    choice = picked(submitted, server)
    if choice.recipe_id is not None:
        recipe = next((r for r in server if r.id == choice.recipe_id), None)
        if recipe is None:
            raise UserFacingError(N_("That recipe is not on this server any more: pick another or type your prompt."))
        sent = clean_prompt(recipe.prompt(choice.words))
        note = recipe.note(choice.words)
        return ReadPrompt(sent, note.get("words") or None, note)
    if choice.job_id is not None:
        job = await interaction.client.store.get_job(choice.job_id)
        if job is None or job.user_id != interaction.user.id or job.member_prompt is None:
            raise UserFacingError(N_("That past prompt is not available any more: please type it again."))
        return ReadPrompt(job.member_prompt, job.member_prompt)
    prompt = clean_prompt(submitted)
    return ReadPrompt(prompt, prompt)
