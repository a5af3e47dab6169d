"""Recipes as pure logic: what the autocomplete offers within Discord's limits, and how a
submitted prompt is read back."""

from __future__ import annotations

import pytest

from services.recipes import (
    BUILT_IN_RECIPES,
    MAX_CHOICE_LENGTH,
    MAX_CHOICES,
    MAX_SERVER_RECIPES,
    PAST_PROMPT_TOKEN,
    RECIPE_TOKEN,
    PastPrompt,
    Picked,
    Recipe,
    RecipeRefused,
    check_recipe,
    picked,
    suggest,
)

MASCOT = Recipe(1, "Mascot style", "{prompt}, drawn in the style of our fox mascot, thick ink lines")
POSTER = Recipe(2, "Event poster", "Turn it into a retro event poster with bold lettering, keeping the subject")


def within_discords_limits(found) -> None:
    assert len(found) <= MAX_CHOICES
    for s in found:
        assert 1 <= len(s.name) <= MAX_CHOICE_LENGTH and 1 <= len(s.value) <= MAX_CHOICE_LENGTH


def test_the_built_in_recipes_are_whole_choices():
    assert 10 <= len(BUILT_IN_RECIPES) <= 15 and len(set(BUILT_IN_RECIPES)) == len(BUILT_IN_RECIPES)
    assert all(len(text) <= MAX_CHOICE_LENGTH for text in BUILT_IN_RECIPES)


def test_nothing_typed_offers_every_recipe_and_recent_prompt_within_the_limits():
    recent = [PastPrompt(n, f"my prompt {n}") for n in range(30)]
    found = suggest("", [MASCOT, POSTER], recent)
    within_discords_limits(found)
    assert len(found) == MAX_CHOICES
    assert [s.name for s in found[:2]] == ["Mascot style: …", "Event poster"]
    assert found[2].value == BUILT_IN_RECIPES[0]


def test_a_wrapper_takes_the_typed_words_and_is_never_shown():
    found = suggest("a red fox", [MASCOT, POSTER], [])
    assert found[0].name == "Mascot style: a red fox" and found[0].value == f"{RECIPE_TOKEN}1:a red fox"
    assert all("thick ink" not in s.name and "retro" not in s.name for s in found)
    assert all(s.name != "Event poster" for s in found)  # a plain recipe must match what is typed


def test_typed_text_narrows_the_built_ins_and_recent_prompts():
    recent = [PastPrompt(7, "Make it WINTER in Paris"), PastPrompt(8, "x" * 150)]
    found = suggest("winter", [], recent)
    assert [s.value for s in found] == [
        next(t for t in BUILT_IN_RECIPES if "winter" in t),
        "Make it WINTER in Paris",
    ]
    (long,) = suggest("xxx", [], recent)
    assert long.value == f"{PAST_PROMPT_TOKEN}8" and long.name.endswith("…") and len(long.name) == 100


def test_words_too_long_for_a_choice_leave_the_wrapper_out():
    found = suggest("w" * 95, [MASCOT], [])
    assert not any(s.value.startswith(RECIPE_TOKEN) for s in found)
    within_discords_limits(found)


def test_a_submitted_prompt_is_read_back():
    server = [MASCOT, POSTER]
    assert picked(f"{RECIPE_TOKEN}1:a cat", server) == Picked(recipe_id=1, words="a cat")
    assert picked(f"{PAST_PROMPT_TOKEN}8", server) == Picked(job_id=8)
    # Clients that send a choice's name instead of its value.
    assert picked("Mascot style: a cat", server) == Picked(recipe_id=1, words="a cat")
    assert picked("Event poster", server) == Picked(recipe_id=2)
    assert picked("Event poster with balloons", server) == Picked(words="Event poster with balloons")
    assert MASCOT.prompt(" a cat ") == "a cat, drawn in the style of our fox mascot, thick ink lines"
    assert POSTER.prompt("ignored") == POSTER.text
    for nothing in ("", "…"):
        with pytest.raises(RecipeRefused):
            MASCOT.prompt(nothing)


def test_a_recipe_name_sent_back_is_the_longest_that_fits():
    """Recipes listed in name order, "Style" before "Style: anime": a client that sends the
    choice's name back must get the recipe the member picked, not the shorter one it begins with."""
    style, anime = Recipe(3, "Style", "{prompt}, styled"), Recipe(4, "Style: anime", "{prompt}, as anime")
    assert picked("Style: anime: a cat", [style, anime]) == Picked(recipe_id=4, words="a cat")
    assert picked("Style: a cat", [style, anime]) == Picked(recipe_id=3, words="a cat")


@pytest.mark.parametrize(
    ("name", "text", "why"),
    [
        ("", "x", "name"),
        ("n" * 41, "x", "name"),
        ("ok", "", "prompt"),
        ("ok", "{prompt} and {prompt}", "at most once"),
        ("ok", " {prompt} ", "words of its own"),
        ("MASCOT STYLE", "x", "already"),
    ],
)
def test_a_recipe_that_cannot_be_kept_says_why(name, text, why):
    with pytest.raises(RecipeRefused) as refused:
        check_recipe(name, text, [MASCOT])
    assert why in str(refused.value)


def test_a_server_keeps_a_bounded_number_of_recipes():
    full = [Recipe(n, f"r{n}", "x") for n in range(MAX_SERVER_RECIPES)]
    with pytest.raises(RecipeRefused):
        check_recipe("one more", "x", full)
    assert check_recipe("  Tidy   name ", " text ", []) == ("Tidy name", "text")
