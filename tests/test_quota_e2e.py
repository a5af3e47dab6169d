"""/kontext-me end to end: a member's usage against the limits that govern them, from the same
figures the policy refuses on."""

from __future__ import annotations

import re
import sqlite3

from fakes.discord_fake import EPHEMERAL
from fakes.fal_fake import JobScript
from tests.e2e import admin, finished, private_answer
from tests.test_member_settings_e2e import settings


async def my_quota(world, **where) -> dict:
    """The private answer to /kontext-me: its embed."""
    handle = await world.discord.invoke_slash("kontext-me", **where)
    callback = await handle.wait_for_callback()
    assert callback["type"] == 4 and callback["data"]["flags"] & EPHEMERAL
    (embed,) = callback["data"]["embeds"]
    return embed


def field(embed: dict, name: str) -> dict:
    (found,) = [f for f in embed["fields"] if f["name"].removeprefix("⛔ ") == name]
    return found


def timestamps(text: str) -> list[str]:
    return re.findall(r"<t:\d+:R>", text)


async def test_a_new_member_sees_the_servers_limits_and_when_they_reset(world):
    await world.start_bot()
    await admin(world, "limits", daily_jobs=5, cooldown_seconds=60)
    embed = await my_quota(world)
    assert embed["title"] == "Your Kontext quota in this server"
    assert embed["description"] == "You can start a job now."
    assert field(embed, "Your jobs today")["value"].startswith("0 of 5 · resets <t:")
    assert field(embed, "Your jobs running")["value"] == "0 of 2 · a job can start now"
    assert field(embed, "Cooldown")["value"] == "one job every 60 s · ready now"
    assert field(embed, "This server's monthly budget")["value"].startswith("0 of 250 images · resets <t:")


async def test_the_figures_match_the_refusal_they_explain(world):
    await world.start_bot()
    await admin(world, "limits", daily_jobs=1, monthly_images=3)
    await finished(await world.kontext(num_images=2))
    refused = await world.kontext()
    await refused.wait_for_callback()
    refusal = private_answer(refused)
    assert "for today" in refusal
    embed = await my_quota(world)
    daily = field(embed, "Your jobs today")
    assert daily["name"].startswith("⛔") and daily["value"].startswith("1 of 1 · resets ")
    assert timestamps(daily["value"]) == timestamps(refusal)  # the same moment, to the second
    budget = field(embed, "This server's monthly budget")
    assert not budget["name"].startswith("⛔") and budget["value"].startswith("2 of 3 images")
    assert embed["description"] == "⛔ marks a limit that stops your next job."


async def test_a_cooldown_is_told_to_end_no_earlier_than_it_does(world):
    """Discord's timestamps are whole seconds and a job starts at any instant: the moment told
    (in the refusal, and by /kontext-me) is rounded up, never down to a second at which the
    member would be refused again."""
    await world.start_bot()
    await admin(world, "limits", cooldown_seconds=600)
    await finished(await world.kontext())
    handle = await world.kontext()
    await handle.wait_for_callback()
    refusal = private_answer(handle)
    (told,) = timestamps(refusal)
    with sqlite3.connect(world.data_dir / "kontext.sqlite3") as db:
        ((created_at,),) = db.execute("SELECT created_at FROM jobs").fetchall()
    assert created_at + 600 <= int(told[3:-3]) < created_at + 601
    assert timestamps(field(await my_quota(world), "Cooldown")["value"]) == [told]


async def test_running_jobs_count_while_they_run(world):
    world.fal.default = JobScript(queue_positions=(0,), step=2.0)
    await world.start_bot()
    await admin(world, "limits", member_concurrent=1)
    running = await world.kontext()
    await running.wait_for_callback()
    busy = field(await my_quota(world), "Your jobs running")
    assert busy == {"name": "⛔ Your jobs running", "value": "1 of 1 · frees up when a job finishes", "inline": False}
    await finished(running)
    assert field(await my_quota(world), "Your jobs running")["value"] == "0 of 1 · a job can start now"


async def test_the_operator_budget_and_personal_limits_outside_servers(world):
    await world.start_bot(PERSONAL_USE="1", PERSONAL_DAILY_JOBS="4", MONTHLY_BUDGET_USD="8")
    await finished(await world.kontext(num_images=2))  # $0.16 of the operator's budget, in a server
    embed = await my_quota(world, guild=False)  # the member's DM with the bot
    assert embed["title"] == "Your Kontext quota outside servers that added the bot"
    assert field(embed, "Your jobs today outside servers")["value"].startswith("0 of 4 · resets <t:")
    assert field(embed, "The bot's monthly budget (all servers)")["value"].startswith("$0.16 of $8.00 · resets <t:")
    names = [f["name"] for f in embed["fields"]]
    assert "This server's monthly budget" not in names


async def test_a_channel_closed_to_kontext_is_said_first(world):
    await world.start_bot()
    await admin(world, "access channel-add", channel=world.discord.nsfw_channel_id)
    embed = await my_quota(world)
    assert embed["description"].startswith("Kontext isn't enabled in this channel. It works in <#")
    assert field(embed, "Your jobs running")["value"] == "0 of 2 · a job can start now"  # the figures still shown


async def test_the_next_job_is_judged_with_the_members_own_number_of_images(world):
    await world.start_bot()
    await admin(world, "limits", monthly_images=3)
    await settings(world, num_images=2)  # every /kontext of hers without num_images makes 2
    await finished(await world.kontext())
    refused = await world.kontext()
    await refused.wait_for_callback()
    assert "monthly" in private_answer(refused)  # 2 + 2 images would pass the budget of 3
    embed = await my_quota(world)
    budget = field(embed, "This server's monthly budget")
    assert budget["name"].startswith("⛔") and budget["value"].startswith("2 of 3 images")
    assert embed["description"] == "⛔ marks a limit that stops your next job."


async def test_the_figures_are_written_as_the_member_s_language_writes_numbers(world):
    """Counts as the refusals write them (and as money is written beside them): 5,000 in
    English, 5.000 in German, not 5000."""
    await world.start_bot()
    await admin(world, "limits", monthly_images=5000, cooldown_seconds=3600)
    english = await my_quota(world)
    assert field(english, "This server's monthly budget")["value"].startswith("0 of 5,000 images · ")
    assert field(english, "Cooldown")["value"] == "one job every 3,600 s · ready now"
    german = await my_quota(world, locale="de")
    values = [f["value"] for f in german["fields"]]
    assert any(v.startswith("0 von 5.000 Bildern · ") for v in values), values
    assert "ein Auftrag alle 3.600 s · jetzt bereit" in values, values
