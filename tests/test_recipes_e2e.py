"""Recipes through the fake Discord: the prompt's autocomplete (built-in edits, the server's own
recipes with their hidden wrappers, the member's recent prompts) and /kontext-admin recipes."""

from __future__ import annotations

import pytest

from fakes.discord_fake import media_gallery_items, text_displays
from services.recipes import BUILT_IN_RECIPES, PAST_PROMPT_TOKEN, RECIPE_TOKEN
from tests.e2e import admin, button, details, finished, private_answer, text
from tests.test_history_e2e import history

MASCOT = "{prompt}, drawn in the style of our fox mascot with thick ink lines"
POSTER = "Turn it into a retro event poster with bold lettering"


async def suggestions(world, typed: str, user: str = "alice", **where) -> list[dict]:
    handle = await world.discord.autocomplete("kontext", options={"prompt": typed}, user=user, **where)
    callback = await handle.wait_for_callback()
    assert callback["type"] == 8, callback
    return handle.choices


async def kontext(world, prompt: str, user: str = "alice"):
    return await world.kontext(user=user, prompt=prompt)


async def test_the_prompt_suggests_built_in_edits_and_the_members_recent_prompts(world):
    await world.start_bot()
    first = await suggestions(world, "")
    assert [c["value"] for c in first] == list(BUILT_IN_RECIPES)  # nothing else yet
    assert text(await finished(await kontext(world, "give the dog a tiny party hat"))).startswith("✅")
    long_prompt = "make it look like a " + "very " * 30 + "old photograph"
    assert text(await finished(await kontext(world, long_prompt))).startswith("✅")
    assert [c["value"] for c in await suggestions(world, "party")] == ["give the dog a tiny party hat"]
    (long_choice,) = await suggestions(world, "very very")
    assert long_choice["value"].startswith(PAST_PROMPT_TOKEN) and long_choice["name"].endswith("…")
    # Picking the long one runs it whole.
    await finished(await kontext(world, long_choice["value"]))
    assert world.fal.submits[-1]["prompt"] == long_prompt
    assert await suggestions(world, "party", user="mod") == []  # nobody else's


async def test_a_servers_recipe_wraps_the_members_words_without_showing_them(world):
    await world.start_bot()
    answer = await admin(world, "recipes add", name="Mascot style", prompt=MASCOT)
    assert "Added the recipe “Mascot style”" in answer
    await admin(world, "recipes add", name="Event poster", prompt=POSTER)
    choices = await suggestions(world, "a red fox on a bike")
    assert choices[0]["name"] == "Mascot style: a red fox on a bike"
    assert all("thick ink" not in c["name"] and "retro" not in c["name"] for c in choices)
    await finished(await kontext(world, choices[0]["value"]))
    assert world.fal.submits[-1]["prompt"] == MASCOT.replace("{prompt}", "a red fox on a bike")
    # A client that sends the choice's name instead of its value gets the same.
    await finished(await kontext(world, "Mascot style: a blue whale"))
    assert world.fal.submits[-1]["prompt"] == MASCOT.replace("{prompt}", "a blue whale")
    (poster,) = [c for c in await suggestions(world, "poster") if c["name"] == "Event poster"]
    await finished(await kontext(world, poster["value"]))
    assert world.fal.submits[-1]["prompt"] == POSTER
    # What the member is offered again is their own words, never the wrapper.
    again = [c for c in await suggestions(world, "whale") if not c["value"].startswith(RECIPE_TOKEN)]
    assert [c["value"] for c in again] == ["a blue whale"]
    # Picked before typing anything: the member is asked for their words.
    (empty,) = [c for c in await suggestions(world, "") if c["name"] == "Mascot style: …"]
    refused = await kontext(world, empty["value"])
    await refused.wait_for_callback()
    assert "Type your own words first" in private_answer(refused)


async def test_members_see_their_words_and_the_recipes_name_never_its_text(world):
    """The model gets the wrapper; everyone else sees what the member typed and which recipe
    made it: on the result card, in its alt text, on a Re-roll's card and in /kontext-history.
    An Edit of the result takes the new words as they are. The moderators' log keeps the prompt
    sent, theirs to moderate."""
    log_channel = world.discord.add_channel("kontext-log")["id"]
    await world.start_bot()
    await admin(world, "log-channel", channel=log_channel)
    await admin(world, "recipes add", name="Mascot style", prompt=MASCOT)
    (choice,) = [c for c in await suggestions(world, "a red fox") if c["name"] == "Mascot style: a red fox"]
    message = await finished(await kontext(world, choice["value"]))
    wrapped = MASCOT.replace("{prompt}", "a red fox")
    again = await finished(await world.discord.click_button(message.id, button(message, "reroll"), user="alice"))
    assert [submit["prompt"] for submit in world.fal.submits] == [wrapped, wrapped]
    for card in (message, again):
        assert "\n> a red fox\n**Requested by**" in details(card) and "**Recipe** Mascot style" in details(card)
        assert "thick ink" not in details(card)
        assert [item["description"] for item in media_gallery_items(card)] == ["a red fox"]
    click = await world.discord.click_button(message.id, button(message, "edit"), user="alice")
    await click.wait_for_callback()
    edited = await finished(await world.discord.submit_modal(click, {"prompt": "now at night"}, user="alice"))
    assert world.fal.submits[-1]["prompt"] == "now at night" and "**Recipe**" not in details(edited)
    listing = "\n".join(text_displays((await history(world)).original.components))
    assert listing.count("> a red fox") == 2 and listing.count("recipe “Mascot style”") == 2
    assert "thick ink" not in listing

    def job_lines() -> dict[str, str]:
        lines = [text(m) for m in world.discord.channel_messages(log_channel)]
        return {line.split(" ", 3)[2]: line for line in lines if " Job #" in line}

    await world.discord.wait_until(lambda: len(job_lines()) == 3)
    assert f"“{wrapped}”" in job_lines()["#1"] and f"“{wrapped}”" in job_lines()["#2"]


async def test_a_complete_recipe_is_shown_by_its_name_on_a_classic_message(world):
    """A recipe without {prompt} is the moderators' whole prompt: members picked its name, and
    its name is what they see, while it waits and on the result."""
    await world.start_bot(RESULT_CARDS="0")
    await admin(world, "recipes add", name="Event poster", prompt=POSTER)
    message = await finished(await kontext(world, "Event poster"))
    assert world.fal.submits[-1]["prompt"] == POSTER
    shown = [embed for snapshot in message.history for embed in snapshot["embeds"]]
    assert len(shown) > 1 and all(embed["description"] == "> Event poster" for embed in shown)
    assert all({"name": "Recipe", "value": "Event poster", "inline": True} in embed["fields"] for embed in shown)


async def test_moderators_add_list_and_remove_recipes(world):
    await world.start_bot()
    world.discord.add_member(name="bob")
    denied = await world.discord.invoke_slash(
        "kontext-admin recipes add", options={"name": "x", "prompt": "y"}, user="bob"
    )
    await denied.wait_for_callback()
    assert "Manage Server permission" in private_answer(denied)
    await admin(world, "recipes add", name="Mascot style", prompt=MASCOT)
    assert "already has a recipe" in await admin(world, "recipes add", name="mascot STYLE", prompt="x")
    assert "at most once" in await admin(world, "recipes add", name="Twice", prompt="{prompt} {prompt}")
    listing = await admin(world, "recipes list")
    assert "**Mascot style**" in listing and "thick ink lines" in listing  # moderators see the text
    names = await world.discord.autocomplete(
        "kontext-admin recipes remove", options={"name": "masc"}, focused="name", user="mod"
    )
    await names.wait_for_callback()
    assert names.choices == [{"name": "Mascot style", "value": "Mascot style"}]
    assert "Removed" in await admin(world, "recipes remove", name="Mascot style")
    assert not any(c["name"].startswith("Mascot") for c in await suggestions(world, "a cat"))
    stale = await kontext(world, f"{RECIPE_TOKEN}1:a cat")
    await stale.wait_for_callback()
    assert "not on this server any more" in private_answer(stale)


async def test_recipes_list_with_long_recipes_is_answered(world):
    await world.start_bot()
    for i in range(7):
        await admin(world, "recipes add", name=f"Recipe {i}", prompt=f"{i} " + "x" * 990)
    handle = await world.discord.invoke_slash("kontext-admin recipes list", user="mod")
    await handle.wait_for_callback(timeout=5)
    assert handle.callback["data"].get("embeds"), (handle.callback, world.discord.violations)


async def test_a_full_servers_recipes_list_fits_one_message(world):
    """20 recipes, names of 40 characters and prompts of 1,000 full of markdown that escaping
    makes longer: each is shortened to its share of the embed's 6,000 characters, the short one
    shown whole."""
    await world.start_bot()
    await admin(world, "recipes add", name="Short", prompt="make it *blue*")
    names = [f"Recipe {n:02} " + "n" * 30 for n in range(19)]
    for n, name in enumerate(names):
        await admin(world, "recipes add", name=name, prompt=f"{n:02} " + "a_b*" * 249 + "!")
    listing = await admin(world, "recipes list")
    assert "**Short**: make it \\*blue\\*" in listing
    assert all(f"**{name}**: {n:02} a\\_b\\*" in listing for n, name in enumerate(names))
    assert listing.count("…") == 19


async def test_removing_a_recipe_by_a_name_it_cannot_have_is_answered(world):
    await world.start_bot()
    answer = await admin(world, "recipes remove", name="no_such " * 300)
    assert answer.startswith("This server has no recipe called “no\\_such") and len(answer) < 200


async def test_a_full_servers_suggestions_stay_within_discords_limits(world):
    """20 recipes, the built-ins and past prompts: more than Discord shows. The answer keeps to
    25 choices of at most 100 characters (the fake Discord also checks the callback against
    Discord's spec), the server's own first. How fast it answers is the benchmark's to say."""
    await world.start_bot()
    for n in range(20):
        await admin(world, "recipes add", name=f"Recipe {n}", prompt=f"{{prompt}} in style number {n}")
    for n in range(3):
        await finished(await kontext(world, f"prompt number {n}"))
    everything = await suggestions(world, "")
    assert len(everything) == 25
    assert [c["name"] for c in everything[:20]] == [f"Recipe {n}: …" for n in sorted(range(20), key=str)]
    assert all(len(c["name"]) <= 100 and len(c["value"]) <= 100 for c in everything)
    typed = await suggestions(world, "a cat " + "very " * 16)  # "Recipe 1: a cat very …": 96 characters
    assert len(typed) == 20  # every wrapper takes the words
    assert all(len(c["name"]) <= 100 and len(c["value"]) <= 100 for c in typed)


async def test_a_recipe_works_in_the_edit_form_by_its_name(world):
    await world.start_bot()
    await admin(world, "recipes add", name="Mascot style", prompt=MASCOT)
    message = await finished(await kontext(world, "make the sky purple"))
    click = await world.discord.click_button(message.id, button(message, "edit"), user="alice")
    await click.wait_for_callback()
    edited = await finished(await world.discord.submit_modal(click, {"prompt": "Mascot style: at night"}, user="alice"))
    assert world.fal.submits[-1]["prompt"] == MASCOT.replace("{prompt}", "at night")
    assert "\n> at night\n" in details(edited) and "**Recipe** Mascot style" in details(edited)


async def test_no_suggestions_where_the_bot_does_not_work(world):
    await world.start_bot(ALLOWED_GUILD_IDS="1234")  # not this server: nothing runs here, nothing is suggested
    handle = await world.discord.autocomplete("kontext", options={"prompt": "a"}, user="alice")
    with pytest.raises(TimeoutError):  # no answer (an autocomplete cannot be answered with a message)
        await handle.wait_for_callback(timeout=0.5)
    assert "NotServedHere" not in world.bot.log_text()
