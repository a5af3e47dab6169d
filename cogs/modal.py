"""The prompt form: a new edit of an image, from the ✏️ Edit button or the message context menu."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import discord

from services.flux_kontext import KontextEdit, KontextOptions
from services.i18n import Texts

from .inputs import MAX_PROMPT_LENGTH
from .recipes import resolve_prompt

if TYPE_CHECKING:
    from bot import KontextBot

    Interaction = discord.Interaction[KontextBot]

# The form's fields, as their answers come back in a submit.
PROMPT_FIELD = "prompt"
IMAGE_FIELD = "image"


class PromptModal(discord.ui.Modal):
    """Asks for a prompt and, given several images, which one. The form is only sent, never
    held (stopped at once, discord.py keeps no copy): its submit, however late, even after a
    restart, goes to the listener that handles its `custom_id`, once (`answer_of`)."""

    def __init__(self, *, title: str, image_labels: Sequence[str], texts: Texts, custom_id: str) -> None:
        super().__init__(title=title[:45], custom_id=custom_id)
        _ = texts  # the language of the member the form is shown to
        prompt: discord.ui.TextInput[PromptModal] = discord.ui.TextInput(
            custom_id=PROMPT_FIELD,
            style=discord.TextStyle.paragraph,
            max_length=MAX_PROMPT_LENGTH,
            placeholder=_("e.g. make it night time, keep everything else")[:100],
        )
        self.add_item(discord.ui.Label(text=_("What should change?")[:45], component=prompt))
        if len(image_labels) > 1:
            choice: discord.ui.Select[PromptModal] = discord.ui.Select(
                custom_id=IMAGE_FIELD,
                options=[
                    discord.SelectOption(label=label[:100], value=str(i), default=i == 0)
                    for i, label in enumerate(image_labels)
                ],
            )
            self.add_item(discord.ui.Label(text=_("Which image?")[:45], component=choice))
        self.stop()


@dataclass(frozen=True)
class Answer:
    prompt: str
    image: int  # which of the form's images, from 0


def answer_of(interaction: Interaction) -> Answer:
    """The form's answers, read from the submit itself, so a form nobody holds in memory (sent
    before a restart, or open for long) is read the same as one that is."""
    found: dict[str, Any] = {}
    pending: list[Any] = list(_data(interaction).get("components", []))
    while pending:
        component = pending.pop()
        pending.extend(component.get("components", []))  # an action row
        if "component" in component:  # a label
            pending.append(component["component"])
        if "custom_id" in component:
            found[component["custom_id"]] = component.get("values", component.get("value"))
    choice = found.get(IMAGE_FIELD) or ["0"]
    return Answer(str(found.get(PROMPT_FIELD) or ""), int(choice[0]))


def form_id(interaction: Interaction) -> str | None:
    """The custom_id of a submitted form; None for any other interaction."""
    if interaction.type is not discord.InteractionType.modal_submit:
        return None
    return str(_data(interaction).get("custom_id", ""))


def _data(interaction: Interaction) -> dict[str, Any]:
    return cast("dict[str, Any]", interaction.data or {})


async def start_edit(
    interaction: Interaction, submitted: str, url: str, options: KontextOptions, *, parent_job_id: int | None = None
) -> None:
    """What a submitted form does, whichever form: the prompt read (a recipe, a past prompt, the
    member's words) and a job started on the image."""
    read = await resolve_prompt(interaction, submitted)
    await interaction.client.intake.start(
        interaction,
        KontextEdit(read.sent, (url,), options),
        parent_job_id=parent_job_id,
        fill_defaults=True,
        member_prompt=read.member_prompt,
        recipe=read.recipe,
    )
