# mypy: disable-error-code="attr-defined,union-attr,method-assign"
# (throwaway bots with attributes added on the fly, driven through channels the test made)
"""Self-tests of the fake Discord, driven by a real discord.py AutoShardedBot running in-process."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
import urllib.parse

import aiohttp
import discord
import pytest
import pytest_asyncio
from discord import app_commands
from discord.ext import commands

from fakes.discord_fake import FakeDiscord

PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x02\x00\x00\x00\x03\x08\x02\x00\x00\x00" + b"\x00" * 40


class ReRoll(discord.ui.DynamicItem[discord.ui.Button], template=r"kx:reroll:(?P<job>[0-9]+)"):
    def __init__(self, job: int) -> None:
        super().__init__(discord.ui.Button(label="Re-roll", custom_id=f"kx:reroll:{job}"))
        self.job = job

    @classmethod
    async def from_custom_id(cls, interaction, item, match):
        return cls(int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        interaction.client.clicked.append(self.job)
        await interaction.response.send_message(f"rerolling {self.job}", ephemeral=True)


def make_bot(fake: FakeDiscord) -> commands.AutoShardedBot:
    discord.http.Route.BASE = fake.api_base
    bot = commands.AutoShardedBot(
        command_prefix="!",
        intents=discord.Intents.default(),
        guild_ready_timeout=0.05,
        allowed_mentions=discord.AllowedMentions.none(),
    )
    bot.clicked = []
    bot.seen = {}

    @bot.tree.command(name="kontext", description="Edit an image")
    @app_commands.describe(image="Image", prompt="Prompt")
    async def kontext(interaction: discord.Interaction, image: discord.Attachment, prompt: str, seed: int = 0) -> None:
        bot.seen.update(
            prompt=prompt,
            seed=seed,
            nsfw=interaction.channel.is_nsfw(),
            limit=interaction.filesize_limit,
            perms=interaction.permissions.manage_guild,
        )
        await interaction.response.defer()
        data = await image.read()
        view = discord.ui.View(timeout=None)
        view.add_item(ReRoll(7))
        await interaction.edit_original_response(
            content=f"done: {prompt} @everyone",
            view=view,
            attachments=[discord.File(io.BytesIO(data[::-1]), filename="out.png")],
        )
        await interaction.followup.send("extra", file=discord.File(io.BytesIO(b"abc"), filename="x.txt"))

    @bot.tree.command(name="slow", description="Answers too late")
    async def slow(interaction: discord.Interaction) -> None:
        await asyncio.sleep(0.3)
        try:
            await interaction.response.send_message("late")
        except discord.NotFound as e:
            bot.seen["late_error"] = e.code

    @bot.tree.command(name="later", description="Edits after expiry")
    async def later(interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True)
        await bot.wait_for("expired_go")
        try:
            await interaction.edit_original_response(content="too late")
        except discord.HTTPException as e:
            bot.seen["expired_error"] = (e.status, e.code)

    async def setup_hook() -> None:
        bot.add_dynamic_items(ReRoll)
        await bot.tree.sync()

    bot.setup_hook = setup_hook
    return bot


def new_bot(fake: FakeDiscord, **options) -> commands.AutoShardedBot:
    """A bare throwaway AutoShardedBot pointed at the fake (for the other self-test files)."""
    discord.http.Route.BASE = fake.api_base
    bot = commands.AutoShardedBot(
        command_prefix="!",
        intents=discord.Intents.default(),
        guild_ready_timeout=0.05,
        allowed_mentions=discord.AllowedMentions.none(),
        **options,
    )
    bot.seen = {}
    return bot


@contextlib.asynccontextmanager
async def running(fake: FakeDiscord, bot: commands.AutoShardedBot, *, sync: bool = True, identifies: int = 1):
    """Run `bot` in-process (its setup_hook syncs the tree when `sync`) until the block ends."""
    if sync:

        async def setup_hook() -> None:
            await bot.tree.sync()

        bot.setup_hook = setup_hook
    fake._commands_synced.clear()
    before = fake.identify_count
    task = asyncio.create_task(bot.start(fake.token))
    try:
        await fake.wait_until(lambda: fake.identify_count >= before + identifies or task.done(), timeout=15)
        if task.done():
            task.result()
        if sync:
            await fake.wait_for_commands(timeout=10)
        # on_ready: guild_ready_timeout has passed after the last GUILD_CREATE of every shard
        await asyncio.wait_for(bot.wait_until_ready(), 15)
        yield bot
    finally:
        await bot.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)


@pytest_asyncio.fixture
async def env():
    fake = FakeDiscord(token="test-token")
    await fake.start()
    bot = make_bot(fake)
    task = asyncio.create_task(bot.start(fake.token))
    try:
        await fake.wait_for_identify(timeout=10)
        await fake.wait_for_commands(timeout=10)
        yield fake, bot
    finally:
        await bot.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)
        await fake.stop()


@pytest.mark.asyncio
async def test_slash_defer_edit_followup_and_button(env):
    fake, bot = env
    assert "kontext" in fake.commands and fake.commands["kontext"]["application_id"] == fake.application_id
    att = fake.add_cdn_file(PNG, "in.png", "image/png")
    assert att["width"] == 2 and att["height"] == 3
    h = await fake.invoke_slash(
        "kontext", options={"prompt": "a cat", "image": att, "seed": 42}, user="alice", channel_id=fake.nsfw_channel_id
    )
    await h.wait_until(lambda h: h.original is not None and not h.original.loading and len(h.followups) == 1)
    assert h.callback == {"type": 5}
    assert bot.seen == {"prompt": "a cat", "seed": 42, "nsfw": True, "limit": 10485760, "perms": False}
    msg = h.original
    assert msg.type == 20 and msg.channel_id == fake.nsfw_channel_id
    assert [s["event"] for s in msg.history] == ["create", "edit"]
    assert msg.history[0]["flags"] & 128 and msg.history[0]["content"] == ""
    assert msg.content == "done: a cat @everyone"
    assert msg.files == {"out.png": PNG[::-1]}
    assert msg.allowed_mentions == {"parse": []}
    assert msg.attachments[0]["content_type"] == "image/png"
    assert msg.components[0]["components"][0]["custom_id"] == "kx:reroll:7"
    fu = h.followups[0]
    assert fu.files == {"x.txt": b"abc"} and fu.content == "extra" and fu.allowed_mentions == {"parse": []}
    # the uploaded output is served by the fake CDN
    async with aiohttp.ClientSession() as s, s.get(msg.attachments[0]["url"]) as r:
        assert r.status == 200 and await r.read() == PNG[::-1]
    # spec-validated requests are recorded
    patch = fake.requests_to("PATCH", r"/messages/@original$")[0]
    assert patch.status == 200 and patch.json["attachments"] == [{"id": 0, "filename": "out.png"}]
    assert "files[0]" in patch.files

    # button on a DynamicItem
    b = await fake.click_button(msg.id, "kx:reroll:7", user="mod")
    await b.wait_for_callback()
    assert bot.clicked == [7]
    assert b.callback["type"] == 4 and b.original.ephemeral and b.original.content == "rerolling 7"
    # a second acknowledgement is refused like Discord does
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{fake.api_base}/interactions/{b.id}/{b.token}/callback?with_response=1", json={"type": 6}) as r,
    ):
        assert r.status == 400 and (await r.json())["code"] == 40060
    # gateway drop -> discord.py resumes on resume_gateway_url; dispatch goes to the new socket
    await fake.disconnect_gateway(4000)
    await fake.wait_until(lambda: any(e[1] == "gateway_resume" for e in fake.events), timeout=10)
    b2 = await fake.click_button(msg.id, "kx:reroll:7", user="alice")
    await b2.wait_for_callback()
    assert bot.clicked == [7, 7]
    assert fake.violations == []


@pytest.mark.asyncio
async def test_late_callback_and_expired_token(env):
    fake, bot = env
    h = await fake.invoke_slash("slow", user="alice")
    fake.age_interactions(3.0)  # dispatch counts as > 3 s ago
    await fake.wait_until(lambda: "late_error" in bot.seen, timeout=5)
    assert bot.seen["late_error"] == 10062 and h.callback is None
    assert any(r[1]["code"] == 10062 for r in fake.rejections)

    h2 = await fake.invoke_slash("later", user="mod")
    await h2.wait_for_callback()
    assert h2.original.ephemeral
    fake.expire_token(h2.token)
    bot.dispatch("expired_go")
    await fake.wait_until(lambda: "expired_error" in bot.seen, timeout=5)
    assert bot.seen["expired_error"] == (401, 50027)
    assert fake.violations == []


@pytest.mark.asyncio
async def test_spec_violation_and_rules_raw():
    fake = FakeDiscord(token="t0k")
    await fake.start()
    try:
        auth = {"Authorization": "Bot t0k"}
        async with aiohttp.ClientSession() as s:
            # content too long (spec maxLength 2000)
            async with s.post(
                f"{fake.api_base}/channels/{fake.channel_id}/messages", json={"content": "x" * 2001}, headers=auth
            ) as r:
                body = await r.json(content_type=None)
                assert r.status == 400 and body["code"] == 50035 and "content" in body["errors"]
                assert r.headers["Content-Type"] == "application/json"
            assert len(fake.violations) == 1 and "content" in fake.violations[0]
            # no auth on a bot route
            async with s.get(f"{fake.api_base}/users/@me") as r:
                assert r.status == 401
            # unknown route
            async with s.get(f"{fake.api_base}/nope/nothing", headers=auth) as r:
                assert r.status == 404 and (await r.json())["message"] == "404: Not Found"
            assert len(fake.violations) == 2
            fake.violations.clear()
            # reply (type 19) with multipart, then a too-large file, then too many files
            first = None
            async with s.post(
                f"{fake.api_base}/channels/{fake.channel_id}/messages", json={"content": "hi"}, headers=auth
            ) as r:
                first = await r.json()
                assert first["type"] == 0
            form = aiohttp.FormData(quote_fields=False)
            form.add_field(
                "payload_json",
                json.dumps(
                    {
                        "content": "re",
                        "message_reference": {"message_id": int(first["id"])},
                        "attachments": [{"id": 0, "filename": "a.bin"}],
                    }
                ),
            )
            form.add_field("files[0]", b"123", filename="a.bin")
            async with s.post(f"{fake.api_base}/channels/{fake.channel_id}/messages", data=form, headers=auth) as r:
                reply = await r.json()
                assert r.status == 200 and reply["type"] == 19 and reply["attachments"][0]["size"] == 3
            assert fake.messages[reply["id"]].files == {"a.bin": b"123"}
            form = aiohttp.FormData(quote_fields=False)
            form.add_field("payload_json", json.dumps({"content": "big"}))
            form.add_field("files[0]", b"0" * (10 * 1024 * 1024 + 1), filename="big.bin")
            async with s.post(f"{fake.api_base}/channels/{fake.channel_id}/messages", data=form, headers=auth) as r:
                assert r.status == 413 and (await r.json())["code"] == 40005
            form = aiohttp.FormData(quote_fields=False)
            form.add_field("payload_json", json.dumps({"content": "many"}))
            for i in range(11):
                form.add_field(f"files[{i}]", b"1", filename=f"{i}.bin")
            async with s.post(f"{fake.api_base}/channels/{fake.channel_id}/messages", data=form, headers=auth) as r:
                assert r.status == 400 and (await r.json())["code"] == 50035
            assert len(fake.violations) == 1
            # fault injection: 429 with Via
            fake.fail_next("GET", r"^/users/@me$", status=429)
            async with s.get(f"{fake.api_base}/users/@me", headers=auth) as r:
                assert r.status == 429 and r.headers["Via"] and (await r.json())["retry_after"] == 0.2
                assert r.headers["X-RateLimit-Scope"] == "user" and "X-RateLimit-Global" not in r.headers
            fake.fail_next(
                "GET", r"^/users/@me$", status=429, json={"message": "x", "retry_after": 1.5, "global": True}
            )
            async with s.get(f"{fake.api_base}/users/@me", headers=auth) as r:
                assert r.status == 429 and r.headers["Retry-After"] == "2"
                assert r.headers["X-RateLimit-Scope"] == "global" and r.headers["X-RateLimit-Global"] == "true"
            async with s.get(f"{fake.api_base}/users/@me", headers=auth) as r:
                assert r.status == 200
    finally:
        await fake.stop()


@pytest.mark.asyncio
async def test_a_post_discord_did_but_answered_with_a_5xx_and_enforce_nonce():
    """applied=True: the message exists though the answer was a 502. Posted again with the same
    nonce and enforce_nonce, Discord returns that message instead of creating another one; a
    nonce without enforce_nonce, or another nonce, creates one."""
    fake = FakeDiscord(token="t0k")
    await fake.start()
    try:
        auth = {"Authorization": "Bot t0k"}
        url = f"{fake.api_base}/channels/{fake.channel_id}/messages"
        once = {"content": "result", "nonce": "42-1", "enforce_nonce": True}
        fake.fail_next("POST", r"/messages$", status=502, applied=True)
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json=once, headers=auth) as r:
                assert r.status == 502
            (created,) = fake.channel_messages()
            async with s.post(url, json=once, headers=auth) as r:
                assert r.status == 200 and (await r.json())["id"] == created.id
            assert len(fake.channel_messages()) == 1
            for other in ({**once, "enforce_nonce": False}, {**once, "nonce": "42-2"}):
                async with s.post(url, json=other, headers=auth) as r:
                    assert r.status == 200 and (await r.json())["id"] != created.id
        assert len(fake.channel_messages()) == 3
        assert fake.violations == []
    finally:
        await fake.stop()


@pytest.mark.asyncio
async def test_a_webhook_edit_is_validated_against_the_spec():
    """What the bot sends in an edit passes; a field of the wrong type is refused with Discord's
    form error, at the field's path. (How fast validation is belongs to the benchmark.)"""
    fake = FakeDiscord()
    spec = fake.spec
    body = {
        "content": "hello",
        "embeds": [{"title": "t", "description": "d", "color": 1}],
        "components": [{"type": 1, "components": [{"type": 2, "style": 1, "label": "x", "custom_id": "a"}]}],
        "allowed_mentions": {"parse": []},
        "attachments": [{"id": 0, "filename": "o.png"}],
    }
    tmpl, ok = spec.match("PATCH", "/webhooks/1/tok/messages/@original")
    assert ok and tmpl.endswith("@original")
    assert spec.validate(tmpl, "PATCH", body) is None
    errors = spec.validate(tmpl, "PATCH", {**body, "embeds": [{"title": "t", "color": "red"}]})
    assert errors is not None
    assert errors["embeds"]["0"]["color"]["_errors"][0]["code"] == "BASE_TYPE_TYPE"


@pytest.mark.asyncio
async def test_modal_context_menu_reply_and_429(env):
    fake, bot = env

    class Ask(discord.ui.Modal, title="Edit again"):
        text = discord.ui.TextInput(label="Prompt", custom_id="prompt")

        async def on_submit(self, interaction: discord.Interaction) -> None:
            bot.seen["modal"] = self.text.value
            await interaction.response.send_message(f"got {self.text.value}")
            m = await interaction.channel.send(
                "channel reply", reference=interaction.message or await interaction.original_response()
            )
            bot.seen["reply_type"] = m.type

    async def edit_ctx(interaction: discord.Interaction, message: discord.Message) -> None:
        bot.seen["target"] = message.content
        await interaction.response.send_modal(Ask())

    bot.tree.add_command(app_commands.ContextMenu(name="Edit with Kontext", callback=edit_ctx))
    fake._commands_synced.clear()
    await bot.tree.sync()
    await fake.wait_for_commands()
    target = fake.post_user_message("look at this", user="alice")
    h = await fake.invoke_message_command("Edit with Kontext", target.id, user="alice")
    cb = await h.wait_for_callback()
    assert cb["type"] == 9 and bot.seen["target"] == "look at this"
    m = await fake.submit_modal(h, {"prompt": "brighter"}, user="alice")
    await fake.wait_until(lambda: "reply_type" in bot.seen)
    assert bot.seen["modal"] == "brighter" and m.original.content == "got brighter"
    assert bot.seen["reply_type"] == discord.MessageType.reply
    reply = [x for x in fake.channel_messages() if x.content == "channel reply"][0]
    assert reply.type == 19 and reply.allowed_mentions == {"parse": []}

    # 429 on an interaction-token PATCH: discord.py waits retry_after and retries
    t0 = time.monotonic()
    hh = await fake.invoke_slash("later", user="alice")
    await hh.wait_for_callback()
    fake.fail_next("PATCH", r"@original", status=429)
    bot.dispatch("expired_go")
    await fake.wait_until(lambda: hh.original.content == "too late", timeout=5)
    assert time.monotonic() - t0 >= 0.2
    assert [r.status for r in fake.requests_to("PATCH", "@original")][-2:] == [429, 200]
    assert fake.violations == []


BOT_SCRIPT = r"""
import asyncio, sys, discord
from discord.ext import commands
discord.http.Route.BASE = sys.argv[1]
bot = commands.AutoShardedBot(command_prefix="!", intents=discord.Intents.default(), guild_ready_timeout=0.05)
@bot.tree.command(name="ping", description="ping")
async def ping(interaction: discord.Interaction):
    await interaction.response.send_message("pong")
async def setup_hook():
    await bot.tree.sync()
bot.setup_hook = setup_hook
bot.run("test-token", log_handler=None)
"""


@pytest.mark.asyncio
async def test_bot_process_killed_and_restarted():
    import sys

    fake = FakeDiscord(token="test-token")
    await fake.start()
    procs = []
    try:
        for _ in range(2):
            p = await asyncio.create_subprocess_exec(sys.executable, "-c", BOT_SCRIPT, fake.api_base)
            procs.append(p)
            await fake.wait_for_identify(timeout=15)
            await fake.wait_for_commands(timeout=10)
            h = await fake.invoke_slash("ping", user="alice")
            await h.wait_until(lambda h: h.original is not None)
            assert h.original.content == "pong"
            p.kill()
            await p.wait()
            await fake.wait_until(lambda: fake._ws is None, timeout=5)
        assert fake.identify_count == 2
        assert fake.violations == []
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await fake.stop()


# ---------------------------------------------------------------- signed, expiring CDN URLs
@pytest_asyncio.fixture
async def cdn_fake():
    fake = FakeDiscord(token="t0k", spec_validation=False)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


async def _cdn_get(url):
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.read()


@pytest.mark.asyncio
async def test_cdn_url_expires_after_its_lifetime(cdn_fake):
    from fakes.discord_fake import CDN_GONE_TEXT, CDN_URL_LIFETIME

    fake = cdn_fake
    att = fake.add_cdn_file(PNG, "in.png", "image/png")
    short = fake.add_cdn_file(PNG, "short.png", "image/png", lifetime=60)
    q = {k: v[0] for k, v in urllib.parse.parse_qs(urllib.parse.urlsplit(att["url"]).query).items()}
    assert int(q["ex"], 16) - int(q["is"], 16) == CDN_URL_LIFETIME == 86400 and len(q["hm"]) == 64
    assert await _cdn_get(att["url"]) == (200, PNG)
    assert await _cdn_get(short["url"]) == (200, PNG)
    fake.advance_cdn_clock(61)
    assert await _cdn_get(short["url"]) == (404, CDN_GONE_TEXT.encode())
    assert (await _cdn_get(att["url"]))[0] == 200
    fake.advance_cdn_clock(86400)
    assert await _cdn_get(att["url"]) == (404, CDN_GONE_TEXT.encode())


@pytest.mark.asyncio
async def test_cdn_expire_all_and_forged_expiry(cdn_fake):
    from fakes.discord_fake import CDN_GONE_TEXT

    fake = cdn_fake
    a = fake.add_cdn_file(PNG, "a.png", "image/png")
    b = fake.add_cdn_file(PNG, "b.png", "image/png", lifetime=7 * 86400)
    fake.expire_cdn_urls()
    for att in (a, b):
        assert await _cdn_get(att["url"]) == (404, CDN_GONE_TEXT.encode())
    c = fake.add_cdn_file(PNG, "c.png", "image/png")  # signed on the advanced clock: valid
    assert (await _cdn_get(c["url"]))[0] == 200
    # a client cannot extend a URL by editing `ex`: the signature no longer matches
    parts = urllib.parse.urlsplit(c["url"])
    q = urllib.parse.parse_qs(parts.query)
    forged = c["url"].replace(f"ex={q['ex'][0]}", f"ex={int(q['ex'][0], 16) + 10**6:x}")
    assert forged != c["url"] and (await _cdn_get(forged))[0] == 404


@pytest.mark.asyncio
async def test_fresh_message_fetch_refreshes_expired_cdn_urls(cdn_fake):
    fake = cdn_fake
    att = fake.add_cdn_file(PNG, "in.png", "image/png", lifetime=60)
    msg = fake.post_user_message("look", attachments=[att])
    fake.advance_cdn_clock(120)
    assert (await _cdn_get(att["url"]))[0] == 404
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"{fake.api_base}/channels/{msg.channel_id}/messages/{msg.id}", headers={"Authorization": "Bot t0k"}
        ) as r,
    ):
        assert r.status == 200
        fetched = (await r.json())["attachments"][0]
    assert fetched["url"] != att["url"] and fetched["id"] == att["id"]
    assert await _cdn_get(fetched["url"]) == (200, PNG)
    assert await _cdn_get(fetched["proxy_url"]) == (200, PNG)
    # an unexpired URL is handed out unchanged
    assert fake.refresh_cdn_url(fetched["url"]) == fetched["url"]


async def test_a_client_gone_mid_upload_is_not_a_fault_of_the_fake():
    """A bot killed while it uploads a file leaves its request half sent: Discord never gets it
    whole, so nothing is posted, and the fake reports no error of its own."""
    fake = FakeDiscord(token="t0k")
    await fake.start()
    try:
        host, port = fake.api_base.split("//")[1].split("/")[0].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        path = f"/api/v10/channels/{fake.channel_id}/messages"
        boundary = "b0undary"
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bot t0k\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 1000000\r\n\r\n"
            f'--{boundary}\r\nContent-Disposition: form-data; name="files[0]"; filename="a.png"\r\n\r\n'
        )
        writer.write(head.encode() + b"\x89PNG" * 1000)
        await writer.drain()
        await fake.wait_until(lambda: any(r.path.endswith("/messages") for r in fake.requests), timeout=5)
        writer.close()
        await fake.wait_until(lambda: all(r.status != 0 for r in fake.requests), timeout=5)
        assert fake.violations == []
        assert fake.channel_messages() == []
    finally:
        await fake.stop()
