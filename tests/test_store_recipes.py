"""Recipes and the member's recent prompts in the store, on both engines."""

from __future__ import annotations

from tests import test_store
from tests.test_store import NOW, Opener, request

new_store = test_store.new_store  # the fixture that opens each engine's store


async def test_a_servers_recipes_are_kept_by_name(new_store: Opener):
    async with new_store() as store:
        assert await store.add_recipe(1, "Mascot style", "{prompt}, as our mascot", by_user=9, now=NOW)
        assert await store.add_recipe(1, "Event poster", "a poster", by_user=9, now=NOW)
        assert not await store.add_recipe(1, "Event poster", "another", by_user=9, now=NOW)
        assert await store.add_recipe(2, "Event poster", "elsewhere", by_user=9, now=NOW)
    async with new_store() as store:
        recipes = await store.recipes(1)
        assert [(r.name, r.text) for r in recipes] == [
            ("Event poster", "a poster"),
            ("Mascot style", "{prompt}, as our mascot"),
        ]
        assert await store.remove_recipe(1, "Event poster")
        assert not await store.remove_recipe(1, "Event poster")
        assert [r.name for r in await store.recipes(1)] == ["Mascot style"]
        assert [r.text for r in await store.recipes(2)] == ["elsewhere"]


async def test_recent_prompts_are_the_members_own_words_newest_first_each_once(new_store: Opener):
    async with new_store() as store:
        for words in ("a cat", "a dog", "a cat", None, "a bird"):
            job = await store.create_job(request(member_prompt=words))
            job.created_at = NOW + job.id
            await store.save(job)
        await store.create_job(request(user_id=8, member_prompt="someone else's"))
        recent = await store.recent_prompts(3, limit=10)
        assert [p.prompt for p in recent] == ["a bird", "a cat", "a dog"]
        assert recent[1].job_id == 3  # the newest job with those words
        assert [p.prompt for p in await store.recent_prompts(3, limit=2)] == ["a bird", "a cat"]


async def test_recipes_are_in_the_order_members_read_names_whatever_the_engine(new_store: Opener):
    async with new_store() as store:
        for name in ("Zebra print", "anime style", "Mascot style", "émail look"):
            assert await store.add_recipe(1, name, "a prompt", by_user=9, now=NOW)
        assert [r.name for r in await store.recipes(1)] == ["anime style", "émail look", "Mascot style", "Zebra print"]
