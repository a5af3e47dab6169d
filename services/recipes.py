"""Recipes: prompts that work with FLUX.1 Kontext, offered as the member types `prompt`.

Three sources, in this order: the server's own recipes (moderators write them; one may wrap the
member's words in a hidden prompt, `{prompt}, in our mascot's style`), a built-in set of proven
edits, and the member's own recent prompts. Discord's autocomplete takes at most 25 choices,
each name and value 1-100 characters (application-commands.mdx, Autocomplete); what a choice
cannot carry in 100 characters (a server recipe's text, a long past prompt) travels as a token
that the intake expands. Members' clients sometimes send a choice's name instead of its value, so
the intake also recognises a server recipe's name.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .i18n import N_, LocalizedError
from .job import RecipeNote

MAX_CHOICES = 25
MAX_CHOICE_LENGTH = 100
# A recipe's name leaves room in a choice's name for ": " and the member's words.
MAX_RECIPE_NAME = 40
MAX_RECIPE_TEXT = 1000
MAX_SERVER_RECIPES = 20
WORDS = "{prompt}"
# The values of choices that stand for more than they can say (never typed: U+2063 is invisible).
RECIPE_TOKEN = "\u2063recipe:"
PAST_PROMPT_TOKEN = "\u2063job:"

# Proven Kontext edits, written as Black Forest Labs' Kontext prompting guide advises: say exactly
# what changes, name the style and its traits, and say what must stay (identity, composition,
# pose, font). Each is its own choice's name and value, so a member can pick one and edit it.
# Kept in English, the language the model follows best.
BUILT_IN_RECIPES: tuple[str, ...] = (
    "Turn it into a watercolour painting, keeping the composition and everyone's identity",
    "Make it an oil painting with visible brushstrokes, keeping the same composition and pose",
    "Redraw it in hand-drawn anime style, keeping the layout, poses and facial expressions",
    "Make it a detailed pencil sketch with soft shading, keeping the same composition",
    "Replace the background with a sunny beach; keep the subject's position, scale and pose",
    "Put the subject on a clean white studio background, changing nothing about the subject",
    "Relight the scene with warm golden-hour sunlight from the left, keeping everything else",
    "Change it to night with soft moonlight and city lights, keeping the same scene and style",
    "Make it winter with fresh snow on the ground, keeping the same composition and subject",
    "Replace the text 'OLD' with 'NEW', keeping the same font, colour, size and position",
    "Change the colour of the car to deep red, keeping everything else exactly the same",
    "Remove the people in the background and fill the space naturally; change nothing else",
    "Restore this old photo: remove scratches and dust, add natural colour, keep faces unchanged",
    "Turn the subject into a die-cut sticker with a thick white outline on a plain background",
    "Keep the same face, hairstyle and expression, and put the person in a cosy café",
)


class RecipeRefused(LocalizedError):
    """A recipe a moderator wrote that cannot be kept, or one a member cannot use as picked."""


@dataclass(frozen=True)
class Recipe:
    """A server's recipe. `text` is the prompt sent; with `{prompt}` in it, a hidden wrapper
    around the member's own words."""

    id: int
    name: str
    text: str

    @property
    def wraps(self) -> bool:
        return WORDS in self.text

    def prompt(self, words: str) -> str:
        """The prompt for the model: the member's words in the wrapper, or the recipe's text."""
        if not self.wraps:
            return self.text
        if not words.strip(" …"):  # "…": the choice's name, sent before any words were typed
            raise RecipeRefused(
                N_("Type your own words first, then pick “{name}”: it puts them into its prompt."), name=self.name
            )
        return self.text.replace(WORDS, words.strip())

    def note(self, words: str) -> RecipeNote:
        """What members are shown of a job it made, in place of its text: its name, and for a
        wrapper the member's words (on one line, as the autocomplete offers them)."""
        return RecipeNote(name=self.name, words=" ".join(words.split())) if self.wraps else RecipeNote(name=self.name)


def reading_order(recipe: Recipe) -> tuple[str, str]:
    """Where a recipe's name goes in a list, as people read names: case and accents aside
    ("anime", "émail", "Mascot"), the same on both engines (a database sorts by its collation:
    SQLite by code points, capitals first; PostgreSQL by the locale it was created with)."""
    folded = unicodedata.normalize("NFKD", recipe.name.casefold())
    return "".join(c for c in folded if not unicodedata.combining(c)), recipe.name


def check_recipe(name: str, text: str, existing: Sequence[Recipe]) -> tuple[str, str]:
    """The name and text cleaned, or RecipeRefused saying why they cannot be kept."""
    name, text = " ".join(name.split()), text.strip()
    if not name or len(name) > MAX_RECIPE_NAME:
        raise RecipeRefused(N_("A recipe's name is 1 to {limit} characters."), limit=MAX_RECIPE_NAME)
    if not text or len(text) > MAX_RECIPE_TEXT:
        raise RecipeRefused(N_("A recipe's prompt is 1 to {limit} characters."), limit=MAX_RECIPE_TEXT)
    if text.count(WORDS) > 1:
        raise RecipeRefused(N_("Use {words} at most once: it is where the member's words go."), words=WORDS)
    if text.strip() == WORDS:
        raise RecipeRefused(N_("A recipe needs words of its own around {words}."), words=WORDS)
    if any(recipe.name.casefold() == name.casefold() for recipe in existing):
        raise RecipeRefused(N_("This server already has a recipe called “{name}”."), name=name)
    if len(existing) >= MAX_SERVER_RECIPES:
        raise RecipeRefused(N_("A server keeps at most {limit} recipes: remove one first."), limit=MAX_SERVER_RECIPES)
    return name, text


@dataclass(frozen=True)
class PastPrompt:
    job_id: int
    prompt: str


@dataclass(frozen=True)
class Suggestion:
    """One autocomplete choice: what the member sees, and what Discord sends back."""

    name: str
    value: str


def _clip(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_CHOICE_LENGTH else flat[: MAX_CHOICE_LENGTH - 1] + "…"


def _matches(typed: str, *texts: str) -> bool:
    return not typed or any(typed in text.casefold() for text in texts)


def suggest(typed: str, server: Sequence[Recipe], recent: Iterable[PastPrompt]) -> list[Suggestion]:
    """The choices for what the member has typed so far: the server's recipes (a wrapper takes
    the typed words, so it is always offered once there are some), the built-in recipes and the
    member's recent prompts that contain it; never a recipe's text."""
    words = " ".join(typed.split())
    query = words.casefold()
    found: list[Suggestion] = []
    for recipe in server:
        if recipe.wraps and words:
            value = f"{RECIPE_TOKEN}{recipe.id}:{words}"
            if len(value) <= MAX_CHOICE_LENGTH:
                found.append(Suggestion(_clip(f"{recipe.name}: {words}"), value))
        elif _matches(query, recipe.name.casefold()):
            found.append(
                Suggestion(_clip(recipe.name + (": …" if recipe.wraps else "")), f"{RECIPE_TOKEN}{recipe.id}:")
            )
    found += [Suggestion(text, text) for text in BUILT_IN_RECIPES if _matches(query, text.casefold())]
    for past in recent:
        if _matches(query, past.prompt.casefold()):
            flat = " ".join(past.prompt.split())
            value = flat if len(flat) <= MAX_CHOICE_LENGTH else f"{PAST_PROMPT_TOKEN}{past.job_id}"
            found.append(Suggestion(_clip(flat), value))
    unique: dict[str, Suggestion] = {}
    for suggestion in found:
        unique.setdefault(suggestion.value, suggestion)
    return list(unique.values())[:MAX_CHOICES]


@dataclass(frozen=True)
class Picked:
    """What a submitted prompt stands for: a server recipe (with the member's words), a past
    prompt of the member's, or itself."""

    recipe_id: int | None = None
    job_id: int | None = None
    words: str = ""


def picked(prompt: str, server: Sequence[Recipe]) -> Picked:
    """Read a submitted `prompt`: a choice's token, or a server recipe's name as some clients send
    it ("Mascot style: a cat", or a plain recipe's name), or the member's own words."""
    if prompt.startswith(RECIPE_TOKEN):
        number, _, words = prompt.removeprefix(RECIPE_TOKEN).partition(":")
        return Picked(recipe_id=int(number), words=words) if number.isdigit() else Picked(words=prompt)
    if prompt.startswith(PAST_PROMPT_TOKEN):
        number = prompt.removeprefix(PAST_PROMPT_TOKEN)
        return Picked(job_id=int(number)) if number.isdigit() else Picked(words=prompt)
    # The longest name first: "Style: anime: a cat" is the recipe "Style: anime", not "Style".
    for recipe in sorted(server, key=lambda recipe: len(recipe.name), reverse=True):
        if recipe.wraps and prompt.startswith(f"{recipe.name}: "):
            return Picked(recipe_id=recipe.id, words=prompt.removeprefix(f"{recipe.name}: "))
        if not recipe.wraps and prompt == recipe.name:
            return Picked(recipe_id=recipe.id)
    return Picked(words=prompt)
