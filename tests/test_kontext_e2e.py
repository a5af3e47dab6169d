"""/kontext end to end: a member's command through the real bot process to the fake fal and
back to the fake Discord, checked as the member would see it."""

from __future__ import annotations

import asyncio

import pytest

from fakes.discord_fake import media_gallery_items
from fakes.fal_fake import JobScript
from tests.e2e import button, contents, data_uri, details, fal_job, finished, has_button, private_answer, text


async def test_edit_is_queued_shown_and_posted(world):
    world.fal.default = JobScript(queue_positions=(2, 1, 0), step=0.3, run_time=0.3, image_size=50_000)
    await world.start_bot()
    handle = await world.kontext(prompt="make it blue", seed=42, num_images=2, safety_tolerance=1, aspect_ratio="16:9")
    assert (await handle.wait_for_callback())["type"] == 5  # "thinking…" at once
    message = await finished(handle)
    shown = contents(message)
    assert any("position **3**" in c for c in shown), shown
    assert any("position **1**" in c for c in shown), shown
    assert any("Generating" in c for c in shown), shown
    assert world.fal.submits == [
        {
            "prompt": "make it blue",
            # fal fetches inputs when the job starts: a small one goes inline, never as the expiring link
            "image_url": data_uri(world, handle.payload["data"]["resolved"]["attachments"].popitem()[1]),
            "seed": 42,
            "num_images": 2,
            "safety_tolerance": "1",
            "aspect_ratio": "16:9",
        }
    ]
    expected, _, _ = fal_job(world).image_blob()
    assert sorted(message.files) == [f"kontext-1-{i}.jpg" for i in (1, 2)]
    assert all(data == expected for data in message.files.values())  # byte for byte
    card = details(message)
    assert "\n> make it blue\n" in card
    assert all(f"**{name}** " in card for name in ("Seed", "Options", "Requested by", "Time")), card
    # While queued the reply offers Cancel; the result no longer does.
    assert any("kontext:cancel:1:" in str(s["components"]) for s in message.history)
    assert "kontext:cancel" not in str(message.components)


async def test_only_changes_are_edited(world):
    world.fal.default = JobScript(queue_positions=(0,), step=1.0, run_time=1.0)
    await world.start_bot()
    handle = await world.kontext()
    message = await finished(handle)
    shown = contents(message)
    assert len(shown) == len(set(shown)), shown  # no edit repeats what was already shown
    assert len(world.discord.requests_to("PATCH", "/webhooks/")) == len(shown) - 1


async def test_mentions_in_the_prompt_never_ping(world):
    await world.start_bot()
    handle = await world.kontext(prompt="@everyone look <@&123> @here")
    message = await finished(handle)
    assert "> @everyone look" in details(message)
    writes = [r for r in world.discord.requests if r.method in ("POST", "PATCH") and "/webhooks/" in r.path]
    assert writes
    assert all(r.json.get("allowed_mentions") == {"parse": []} for r in writes), [r.json for r in writes]


@pytest.mark.parametrize(
    "attachment,expected",
    [
        (dict(data=b"just text", filename="notes.txt", content_type="text/plain"), "not an image"),
        (dict(data=b"%PDF-1.7", filename="scan.pdf", content_type="application/pdf"), "not an image"),
    ],
)
async def test_unreadable_attachments_are_refused_privately(world, attachment, expected):
    await world.start_bot()
    image = world.discord.add_cdn_file(**attachment)
    handle = await world.kontext(image=image)
    await handle.wait_for_callback()
    assert expected in private_answer(handle)
    assert world.fal.submits == []


async def test_oversized_attachment_and_blank_prompt_are_refused(world):
    await world.start_bot(MAX_INPUT_BYTES="1000")
    big = await world.kontext(image=world.input_image(size=5000))
    await big.wait_for_callback()
    assert "limit" in private_answer(big)
    blank = await world.kontext(prompt="    ")
    await blank.wait_for_callback()
    assert "describe the edit" in private_answer(blank)
    assert world.fal.submits == []


async def test_fal_validation_error_is_explained(world):
    await world.start_bot()
    world.fal.fail_next(
        "submit",
        status=422,
        json={"detail": [{"loc": ["body", "image_url"], "msg": "Image is too small", "type": "value_error"}]},
    )
    message = await finished(await world.kontext())
    assert text(message) == "❌ FLUX.1 Kontext refused this edit: Image is too small"
    assert world.fal.count("submit") == 1  # a 4xx is not retried


async def test_content_policy_rejection_from_the_result(world):
    world.fal.default = JobScript(
        result_status=422,
        result_body={"detail": [{"loc": ["body", "prompt"], "msg": "flagged", "type": "content_policy_violation"}]},
    )
    await world.start_bot()
    message = await finished(await world.kontext())
    assert "safety system refused" in text(message)


async def test_plain_string_detail_is_shown(world):
    world.fal.default = JobScript(result_status=400, result_body={"detail": "Unsupported image dimensions"})
    await world.start_bot()
    message = await finished(await world.kontext())
    assert "Unsupported image dimensions" in text(message)


@pytest.mark.parametrize("result_memory", ["33554432", "0"], ids=["in-memory", "through-files"])
async def test_fal_5xx_and_dropped_connections_are_retried(world, result_memory):
    await world.start_bot(RESULT_MEMORY_BYTES=result_memory)
    world.fal.fail_next("submit", status="ingress_503", times=2)  # fal's front proxy: nothing recorded
    world.fal.fail_next("status", status="drop", times=2)
    world.fal.fail_next("result", status="ingress_502", times=2)
    world.fal.fail_next("file", status="drop", times=2)
    message = await finished(await world.kontext())
    assert text(message).startswith("✅"), text(message)
    assert len(message.files) == 1
    assert len(world.fal.jobs) == 1  # fal created exactly one job
    # Nothing is left behind in DATA_DIR once the result is posted (no partial downloads).
    results = world.data_dir / "results"
    await world.discord.wait_until(lambda: not results.exists() or not any(results.iterdir()), timeout=5)


@pytest.mark.parametrize("drop,jobs_at_fal", [("drop_after", 1), ("drop", 0)])
async def test_submit_whose_answer_was_lost_is_not_resent(world, drop, jobs_at_fal):
    """Once the request was sent, a broken connection leaves the bot unable to tell whether fal
    took the job, so it says so instead of risking a second billed job."""
    await world.start_bot()
    world.fal.fail_next("submit", status=drop)
    message = await finished(await world.kontext())
    assert "cannot tell whether fal received it" in text(message)
    assert len(world.fal.jobs) == jobs_at_fal and world.fal.count("submit") == 1


async def test_fal_down_ends_in_a_clear_message(world):
    await world.start_bot(JOB_TIMEOUT="1.5")
    world.fal.fail_next("submit", status="ingress_503", times=1000)
    message = await finished(await world.kontext())
    assert "fal.ai is not answering" in text(message)
    assert world.fal.jobs == {}


@pytest.mark.parametrize("mode", ["unavailable", "drop", "stall"])
async def test_broken_status_stream_falls_back_to_polling(world, mode):
    # A dropped stream's one event must not already say COMPLETED (then no poll is needed), which
    # it would if a loaded machine opened the stream after the job ended: the job lasts 1.2 s.
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.5, run_time=0.2, stream_mode=mode)
    await world.start_bot()
    message = await finished(await world.kontext())
    assert text(message).startswith("✅")
    assert world.fal.count("status") >= 1


async def test_a_status_stream_that_never_opens_is_given_up_as_soon_as_a_quiet_one(world):
    """fal takes the stream's request but never answers it: the bot polls around it after the
    stream's event timeout, not after the much longer read timeout of ordinary calls."""
    world.fal.default = JobScript(queue_positions=(0,), step=0.2, run_time=0.3)
    world.fal.fail_next("stream", "hang")
    await world.start_bot(FAL_STREAM_EVENT_TIMEOUT="1", FAL_READ_TIMEOUT="30")
    message = await finished(await world.kontext(), timeout=10)
    assert text(message).startswith("✅")


async def test_polling_mode_when_the_stream_is_disabled(world):
    world.fal.default = JobScript(queue_positions=(1, 0), step=0.2, run_time=0.2)
    await world.start_bot(FAL_STATUS_STREAM="0")
    message = await finished(await world.kontext())
    assert text(message).startswith("✅")
    assert world.fal.count("stream") == 0 and world.fal.count("status") >= 3


async def test_slow_queue_hits_the_deadline_and_is_cancelled_at_fal(world):
    world.fal.default = JobScript(queue_positions=(5, 4, 3, 2, 1), step=2.0)
    await world.start_bot(JOB_TIMEOUT="1.0")
    message = await finished(await world.kontext())
    assert "took too long" in text(message)
    assert world.fal.count("cancel") == 1 and fal_job(world).cancelled


async def test_flagged_image_is_withheld_in_ordinary_channels(world):
    world.fal.default = JobScript(nsfw=(False, True))
    await world.start_bot()
    message = await finished(await world.kontext(num_images=2))
    assert list(message.files) == ["kontext-1-1.jpg"]
    assert "1 of 2" in text(message)


async def test_flagged_image_is_spoilered_in_age_restricted_channels(world):
    world.fal.default = JobScript(nsfw=(True,))
    await world.start_bot()
    message = await finished(await world.kontext(channel_id=world.discord.nsfw_channel_id))
    assert list(message.files) == ["kontext-1-1.jpg"]
    assert [item["spoiler"] for item in media_gallery_items(message)] == [True]  # the card's own spoiler


async def test_classic_results_spoiler_the_attachment(world):
    world.fal.default = JobScript(nsfw=(True,))
    await world.start_bot(RESULT_CARDS="0")
    message = await finished(await world.kontext(channel_id=world.discord.nsfw_channel_id))
    assert list(message.files) == ["SPOILER_kontext-1-1.jpg"] and message.embeds


async def test_a_card_holds_every_image_within_the_upload_limit_per_file(world):
    """Discord's upload limit is per file (reference.mdx, Uploading Files): four images that
    together exceed it fit one card; one over it on its own is linked."""
    world.fal.default = JobScript(image_size=40_000)
    await world.start_bot()
    handle = await world.discord.invoke_slash(
        "kontext",
        options={"image": world.input_image(), "prompt": "four", "num_images": 4},
        attachment_size_limit=100_000,
    )
    message = await finished(handle)
    assert len(media_gallery_items(message)) == 4 and len(message.files) == 4 and handle.followups == []
    small = await world.discord.invoke_slash(
        "kontext", options={"image": world.input_image(), "prompt": "one"}, attachment_size_limit=30_000
    )
    message = await finished(small)
    assert media_gallery_items(message) == [] and "Too large for this server's upload limit: [image 1](" in text(
        message
    )


async def test_a_card_with_a_linked_image_and_a_long_markdown_prompt_fits_discords_text_limit(world):
    """The link to an image over the limit is added to the status line after rendering; the
    prompt (2,000 characters, twice as long escaped) is cut to the room left, so the card's
    4,000 characters hold and Discord takes it at once."""
    world.fal.default = JobScript(image_size=40_000)
    await world.start_bot()
    handle = await world.discord.invoke_slash(
        "kontext", options={"image": world.input_image(), "prompt": "__" * 1000}, attachment_size_limit=30_000
    )
    message = await finished(handle)
    assert text(message).startswith("✅") and "Too large for this server's upload limit" in text(message)
    assert len(text(message)) + len(details(message)) <= 4000 and "…\n**Requested by**" in details(message)
    assert world.discord.rejections == []


async def test_classic_results_over_the_upload_limit_are_split_across_followups(world):
    world.fal.default = JobScript(image_size=40_000)
    await world.start_bot(RESULT_CARDS="0")
    handle = await world.discord.invoke_slash(
        "kontext",
        options={"image": world.input_image(), "prompt": "four", "num_images": 4},
        attachment_size_limit=100_000,
    )
    await finished(handle)
    await handle.wait_until(lambda h: len(h.followups) == 1)
    assert len(handle.original.files) == 2 and len(handle.followups[0].files) == 2


async def test_requester_can_cancel_while_queued(world):
    world.fal.default = JobScript(queue_positions=(3, 2, 1, 0), step=1.0)
    await world.start_bot()
    handle = await world.kontext()
    await handle.wait_until(lambda h: has_button(h.original, "cancel"))
    world.discord.add_member(name="bob")
    stranger = await world.discord.click_button(handle.original.id, button(handle.original, "cancel"), user="bob")
    await stranger.wait_for_callback()
    assert "Only the member who asked" in private_answer(stranger)
    click = await world.discord.click_button(handle.original.id, button(handle.original, "cancel"), user="alice")
    message = await finished(handle)
    assert text(message).startswith("🚫 Cancelled by")
    assert (await click.wait_for_callback())["type"] == 6
    assert fal_job(world).cancelled


async def test_commands_sync_to_the_dev_guild_when_set(world):
    await world.start_bot(DEV_GUILD_ID=world.discord.guild_id)
    (sync,) = world.discord.requests_to("PUT", r"/commands$")
    assert sync.path.endswith(f"/guilds/{world.discord.guild_id}/commands")
    assert {c["name"] for c in sync.json} == {
        "kontext",
        "kontext-admin",
        "kontext-history",
        "kontext-me",
        "kontext-settings",
        "Edit with Kontext",
    }


async def test_a_dev_guild_the_bot_is_not_in_stops_it_with_a_line_naming_the_setting(world):
    """DEV_GUILD_ID set to a server the bot was not added to (or not with the
    applications.commands scope): Discord refuses the sync with 403 Missing Access. The last line
    used to be that bare 403, which says nothing about which setting or server is wrong."""
    elsewhere = world.discord.add_guild("another server", bot=False)
    bot = world.new_bot(DEV_GUILD_ID=elsewhere.id)
    await bot.start()
    assert bot.process is not None
    assert await asyncio.wait_for(bot.process.wait(), 20) == 3
    (last,) = [line for line in bot.log_text().splitlines() if "[ERROR" in line]
    assert f"cannot sync the commands to DEV_GUILD_ID {elsewhere.id}" in last and "Missing Access" in last, last
    assert "applications.commands" in last


async def stopped_by_discord(bot) -> tuple[int, str]:
    """The exit code of a bot Discord's gateway closed for good, and the log's last line."""
    assert bot.process is not None
    code = await asyncio.wait_for(bot.process.wait(), 30)
    return code, bot.log_text().strip().splitlines()[-1]


async def refused_for_too_few_shards(world, **settings: str) -> str:
    """Run the bot where Discord closes the gateway with 4011 Sharding required (too many servers
    for the shards run); the log's last line, which names what to set."""
    world.discord.max_guilds_per_shard = 0
    bot = world.new_bot(LOG_LEVEL="INFO", **settings)
    await bot.start()
    code, last = await stopped_by_discord(bot)
    assert code == 2 and "Discord requires more shards" in last and "4011 Sharding required" in last, (code, last)
    return last


async def test_a_gateway_that_requires_more_shards_stops_the_bot_with_a_line_naming_shard_count(world):
    """The last line was discord.py's bare "Shard ID 0 WebSocket closed with 4011", exit 3."""
    last = await refused_for_too_few_shards(world)  # as many shards as Discord recommends
    assert last.endswith("set SHARD_COUNT above that count"), last
    last = await refused_for_too_few_shards(world, SHARD_COUNT="1", DISCORD_GATEWAY_URL=world.discord.gateway_url)
    assert last.endswith("raise SHARD_COUNT, or unset it for automatic sharding"), last


async def test_processes_sharing_the_shards_are_told_to_raise_shard_count_in_each(world, database_url):
    last = await refused_for_too_few_shards(
        world,
        SHARD_COUNT="1",
        SHARD_IDS="0",
        DATABASE_URL=database_url,
        DISCORD_GATEWAY_URL=world.discord.gateway_url,
    )
    assert last.endswith("raise SHARD_COUNT in every process, with their SHARD_IDS covering the new shards"), last


async def test_a_token_reset_while_the_bot_runs_stops_it_as_a_refused_token(world):
    """The token reset in the Developer Portal while the bot runs: Discord refuses its next
    resume with 4004 Authentication failed, which the README's exit 1 is for (it was exit 3)."""
    bot = await world.start_bot(LOG_LEVEL="INFO", DISCORD_GATEWAY_URL=world.discord.gateway_url)
    world.discord.token = "the-new-token"
    await world.discord.disconnect_gateway(code=4000)
    code, last = await stopped_by_discord(bot)
    assert code == 1 and last.endswith("Discord refused DISCORD_TOKEN; check the token in the Developer Portal")


@pytest.mark.parametrize("close_code", [4013, 4014])
async def test_refused_intents_stop_the_bot_with_a_line_saying_what_it_asks_for(world, close_code):
    """4013 Invalid intent(s) and 4014 Disallowed intent(s): discord.py's text for 4014 advises
    switching privileged intents on, none of which the bot asks for."""
    bot = await world.start_bot(LOG_LEVEL="INFO")
    await world.discord.disconnect_gateway(code=close_code)
    code, last = await stopped_by_discord(bot)
    assert code == 3 and f"Discord refused the bot's gateway intents ({close_code} " in last, (code, last)
    assert "the bot asks only for the guilds intent, which is not privileged" in last


async def test_commands_are_synced_only_when_they_changed(world):
    """discord.py advises against syncing at every start; the last sync is recorded per app."""
    await world.start_bot()
    await world.bot.stop()
    await world.start_bot()
    assert len(world.discord.requests_to("PUT", r"/commands$")) == 1
    message = await finished(await world.kontext())  # the commands synced before still work
    assert text(message).startswith("✅")
    await world.bot.stop()
    await world.start_bot(DEV_GUILD_ID=world.discord.guild_id)  # another scope: synced there
    await world.bot.stop()
    await world.start_bot(SYNC_COMMANDS="always")
    await world.bot.stop()
    await world.start_bot(SYNC_COMMANDS="never", DEV_GUILD_ID="1")
    syncs = [r.path for r in world.discord.requests_to("PUT", r"/commands$")]
    assert len(syncs) == 3 and syncs[1].endswith(f"/guilds/{world.discord.guild_id}/commands")


async def test_a_refused_fal_key_is_reported_as_a_configuration_problem(world):
    await world.start_bot(FAL_KEY="not-the-right-key")
    message = await finished(await world.kontext())
    assert "fal.ai key was refused" in text(message)


async def test_secrets_and_interaction_tokens_never_reach_the_log(world):
    from fakes.world import DISCORD_TOKEN, FAL_KEY

    await world.start_bot(LOG_LEVEL="DEBUG")
    handle = await world.kontext()
    await finished(handle)
    await world.bot.stop()
    log = world.bot.log_text()
    assert "job 1 delivered" in log
    for secret in (DISCORD_TOKEN, FAL_KEY, handle.token):
        assert secret not in log
