"""The prompt modal: a new edit of an image, from a button or the message context menu."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord

from services.flux_kontext import KontextEdit, KontextOptions
from services.i18n import Texts

from .errors import report
from .inputs import MAX_PROMPT_LENGTH
from .recipes import resolve_prompt

if TYPE_CHECKING:
    from bot import KontextBot

    Interaction = discord.Interaction[KontextBot]


class PromptModal(discord.ui.Modal):
    """Asks for a prompt (and, given several images, which one) and starts a job on it."""

    def __init__(
        self,
        *,
        title: str,
        images: list[tuple[str, str]],
        options: KontextOptions,
        parent_job_id: int | None,
        texts: Texts,
    ) -> None:
        super().__init__(title=title[:45], timeout=600)
        _ = texts  # the language of the member the form is shown to
        self._images = images
        self._options = options
        self._parent_job_id = parent_job_id
        self.prompt: discord.ui.TextInput[PromptModal] = discord.ui.TextInput(
            custom_id="prompt",
            style=discord.TextStyle.paragraph,
            max_length=MAX_PROMPT_LENGTH,
            placeholder=_("e.g. make it night time, keep everything else")[:100],
        )
        self.add_item(discord.ui.Label(text=_("What should change?")[:45], component=self.prompt))
        self.choice: discord.ui.Select[PromptModal] | None = None
        if len(images) > 1:
            self.choice = discord.ui.Select(
                custom_id="image",
                options=[
                    discord.SelectOption(label=label, value=str(i), default=i == 0)
                    for i, (label, _) in enumerate(images)
                ],
            )
            self.add_item(discord.ui.Label(text=_("Which image?")[:45], component=self.choice))

    async def on_submit(self, interaction: Interaction) -> None:  # type: ignore[override]
        index = int(self.choice.values[0]) if self.choice is not None and self.choice.values else 0
        prompt, member_prompt = await resolve_prompt(interaction, self.prompt.value)
        edit = KontextEdit(prompt, (self._images[index][1],), self._options)
        await interaction.client.intake.start(
            interaction, edit, parent_job_id=self._parent_job_id, fill_defaults=True, member_prompt=member_prompt
        )

    async def on_error(self, interaction: Interaction, error: Exception) -> None:  # type: ignore[override]
        await report(interaction, error)
