# mypy: check-untyped-defs=False
# mypy: disable-error-code="attr-defined,union-attr,method-assign,var-annotated"
# (like tests/test_fake_discord.py: throwaway bots with attributes added on the fly)
"""Self-tests of the fake Discord's sharded gateway: shard routing by Discord's formula,
READY/GUILD_CREATE per shard, per-connection RESUME, and the IDENTIFY concurrency limit, with real
discord.py AutoShardedBots in-process and raw websockets."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import discord
from discord import app_commands

from fakes.discord_fake import FakeDiscord, shard_of
from tests.test_fake_discord import new_bot, running


def sharded_bot(fake: FakeDiscord, wait: float, **options):
    """A bot whose IDENTIFYs after the first wait `wait` s (discord.py's default waits 5 s)."""
    bot = new_bot(fake, **options)
    bot.seen = {"ping": []}

    async def before_identify_hook(shard_id, *, initial=False) -> None:
        if not initial:
            await asyncio.sleep(wait)

    bot.before_identify_hook = before_identify_hook

    @bot.tree.command(name="ping", description="ping")
    @app_commands.allowed_contexts(guilds=True, dms=True)
    async def ping(interaction: discord.Interaction) -> None:
        shard = interaction.guild.shard_id if interaction.guild else None
        bot.seen["ping"].append((interaction.guild_id, shard))
        await interaction.response.send_message("pong")

    return bot


async def test_auto_sharded_bot_gets_each_guild_on_its_shard(fake):
    fake.shard_count, fake.identify_interval = 2, 0.3
    zero = fake.add_guild("zero", shard=(0, 2))
    one = fake.add_guild("one", shard=(1, 2))
    for g in (zero, one):
        fake.add_member(fake.alice, guild=g)
    bot = sharded_bot(fake, wait=0.35)
    async with running(fake, bot, identifies=2):
        # GET /gateway/bot told discord.py to open 2 shards
        (gw,) = fake.requests_to("GET", r"^/gateway/bot$")
        assert gw.response["shards"] == 2 and gw.response["session_start_limit"]["max_concurrency"] == 1
        assert [r["shard"] for r in fake.identifies] == [[0, 2], [1, 2]] and all(r["accepted"] for r in fake.identifies)
        t0, t1 = fake.identifies_by_shard[0][0], fake.identifies_by_shard[1][0]
        assert t1 - t0 >= fake.identify_interval and fake.gateway_rejections == []
        # READY and GUILD_CREATE of each session: only the guilds of its shard
        sessions = {s.shard: s for s in fake.gateway_sessions}
        assert set(sessions) == {(0, 2), (1, 2)}
        for (i, n), s in sessions.items():
            assert s.ready["shard"] == [i, n] and s.guild_ids == [g["id"] for g in s.ready["guilds"]]
            assert all(shard_of(gid, n) == i for gid in s.guild_ids)
        assert zero.id in sessions[(0, 2)].guild_ids and one.id in sessions[(1, 2)].guild_ids
        assert sorted(sessions[(0, 2)].guild_ids + sessions[(1, 2)].guild_ids) == sorted(fake.guilds)
        assert {g.id for g in bot.guilds} == {int(g) for g in fake.guilds}
        assert bot.get_guild(int(one.id)).shard_id == 1 and bot.get_guild(int(zero.id)).shard_id == 0

        # interactions go to the connection of the guild's shard; DMs to shard 0
        h1 = await fake.invoke_slash("ping", guild_id=one.id)
        h0 = await fake.invoke_slash("ping", guild_id=zero.id)
        hd = await fake.invoke_slash("ping", guild=False)
        for h in (h1, h0, hd):
            await h.wait_for_callback()
        assert (h1.shard, h0.shard, hd.shard) == ((1, 2), (0, 2), (0, 2))
        assert bot.seen["ping"] == [(int(one.id), 1), (int(zero.id), 0), (None, None)]
        # other guild events too
        chan = fake.add_channel("new", guild=one)
        assert (await fake.dispatch("CHANNEL_CREATE", chan)).shard == (1, 2)
        await fake.wait_until(lambda: bot.get_channel(int(chan["id"])) is not None, timeout=5)
        assert (await fake.dispatch("GUILD_DELETE", {"id": zero.id, "unavailable": True})).shard == (0, 2)

        # RESUME per connection: drop shard 1; it resumes its own session, shard 0 is untouched
        before = sessions[(1, 2)].session_id
        await fake.disconnect_gateway(4000, shard=1)
        await fake.wait_until(lambda: any(e[1] == "gateway_resume" for e in fake.events), timeout=10)
        (resume,) = [e[2] for e in fake.events if e[1] == "gateway_resume"]
        assert resume["shard"] == [1, 2] and resume["session_id"] == before
        h1b = await fake.invoke_slash("ping", guild_id=one.id)
        await h1b.wait_for_callback()
        assert h1b.session_id == before and fake.identify_count == 2
    assert fake.violations == []


async def test_two_processes_each_run_a_shard_and_a_too_fast_identify_is_invalidated(fake):
    """Two bot instances (as two processes would) with shard_ids=[0] and [1] of 2. The second one
    identifies at once: same bucket (max_concurrency 1) within the interval -> Invalid Session;
    discord.py waits and identifies again, which is accepted."""
    fake.shard_count, fake.identify_interval = 2, 0.4
    zero = fake.add_guild("zero", shard=(0, 2))
    one = fake.add_guild("one", shard=(1, 2))
    for g in (zero, one):
        fake.add_member(fake.alice, guild=g)
    a = sharded_bot(fake, wait=0.45, shard_ids=[0], shard_count=2)
    b = sharded_bot(fake, wait=0.45, shard_ids=[1], shard_count=2)
    async with running(fake, a), running(fake, b, sync=False):
        assert [r["accepted"] for r in fake.identifies] == [True, False, True]
        (rej,) = fake.gateway_rejections
        assert rej["op"] == 9 and rej["shard"] == [1, 2] and "bucket 0" in rej["reason"]
        assert fake.identifies_by_shard[1][0] - fake.identifies_by_shard[0][0] >= 0.4
        assert {g.id for g in a.guilds} == {int(g) for g in fake.guilds if shard_of(g, 2) == 0}
        assert {g.id for g in b.guilds} == {int(g) for g in fake.guilds if shard_of(g, 2) == 1}
        for g in (zero, one, zero):
            await (await fake.invoke_slash("ping", guild_id=g.id)).wait_for_callback()
        assert a.seen["ping"] == [(int(zero.id), 0)] * 2 and b.seen["ping"] == [(int(one.id), 1)]
    assert fake.violations == []


@contextlib.asynccontextmanager
async def raw_gateway(fake):
    async with aiohttp.ClientSession() as s, s.ws_connect(fake.gateway_url) as ws:
        hello = await ws.receive_json()
        assert hello["op"] == 10
        yield ws


async def identify(ws: aiohttp.ClientWebSocketResponse, token: str = "test-token", shard: list | None = None) -> tuple:
    d: dict = {"token": token, "intents": 1, "properties": {}}
    if shard is not None:
        d["shard"] = shard
    await ws.send_str(json.dumps({"op": 2, "d": d}))
    msg = await ws.receive()
    if msg.type != aiohttp.WSMsgType.TEXT:
        return ("closed", ws.close_code)
    data = json.loads(msg.data)
    return (data["op"], data.get("t") or data.get("d"))


async def test_identify_buckets_invalid_shards_and_double_identify_raw(fake):
    fake.shard_count, fake.max_concurrency, fake.identify_interval = 4, 2, 0.5
    async with raw_gateway(fake) as w0, raw_gateway(fake) as w1, raw_gateway(fake) as w2:
        assert await identify(w0, shard=[0, 4]) == (0, "READY")
        assert await identify(w1, shard=[1, 4]) == (0, "READY")  # bucket 1: its own 5-s slot
        assert await identify(w2, shard=[2, 4]) == (9, False)  # bucket 0 again too soon
        await asyncio.sleep(0.5)
        assert await identify(w2, shard=[2, 4]) == (0, "READY")
    assert fake.gateway_rejections[0]["op"] == 9 and fake.gateway_rejections[0]["shard"] == [2, 4]
    buckets = {}
    for r in fake.identifies:
        if r["accepted"]:
            buckets.setdefault(r["shard"][0] % 2, []).append(r["time"])
    assert all(b - a >= 0.5 for times in buckets.values() for a, b in zip(times, times[1:], strict=False))
    async with raw_gateway(fake) as ws:
        assert await identify(ws, shard=[4, 4]) == ("closed", 4010)  # Invalid shard
    async with raw_gateway(fake) as ws:
        assert await identify(ws, token="nope") == ("closed", 4004)
    await asyncio.sleep(0.5)
    async with raw_gateway(fake) as ws:
        assert await identify(ws, shard=[3, 4]) == (0, "READY")
        await ws.send_str(json.dumps({"op": 2, "d": {"token": "test-token", "shard": [3, 4], "properties": {}}}))
        while (await ws.receive()).type == aiohttp.WSMsgType.TEXT:
            pass  # GUILD_CREATEs of its guilds, if any
        assert ws.close_code == 4005  # Already authenticated
    # an unsharded lone connection is not limited by default (only recorded): see FakeDiscord
    solo = FakeDiscord(token="test-token")
    await solo.start()
    try:
        for _ in range(2):
            async with raw_gateway(solo) as ws:
                assert await identify(ws) == (0, "READY")
        assert solo.identify_count == 2 and solo.identify_limit_breaches[0]["enforced"] is False
        solo.enforce_identify_limit = True
        async with raw_gateway(solo) as ws:
            assert await identify(ws) == (9, False)
    finally:
        await solo.stop()
    async with aiohttp.ClientSession() as s:
        url = f"{fake.api_base}/gateway/bot"
        async with s.get(url, headers={"Authorization": "Bot test-token"}) as r:
            body = await r.json()
    assert body["shards"] == 4 and body["session_start_limit"]["max_concurrency"] == 2
    assert fake.violations == []
