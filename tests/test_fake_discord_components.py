# mypy: check-untyped-defs=False
# mypy: disable-error-code="attr-defined,union-attr,method-assign,var-annotated"
# (like tests/test_fake_discord.py: throwaway bots with attributes added on the fly)
"""Self-tests of the fake Discord's components v2 rules (IS_COMPONENTS_V2 messages), with a
real discord.py LayoutView in-process and raw requests for what Discord refuses."""

from __future__ import annotations

import io
import json

import aiohttp
import discord
import pytest

from fakes.discord_fake import IS_COMPONENTS_V2, FakeDiscord, custom_ids, media_gallery_items
from tests.test_fake_discord import PNG, new_bot, running


class ResultCard(discord.ui.LayoutView):
    def __init__(self, bot, n: int) -> None:
        super().__init__(timeout=None)
        again = discord.ui.Button(label="Again", custom_id="kx:again")

        async def on_again(interaction: discord.Interaction) -> None:
            bot.seen["again"] = interaction.message.id
            await interaction.response.send_message("again!", ephemeral=True)

        again.callback = on_again
        self.add_item(
            discord.ui.Container(
                discord.ui.TextDisplay("# Results"),
                discord.ui.MediaGallery(
                    *[discord.MediaGalleryItem(f"attachment://out{i}.png", description=f"image {i}") for i in range(n)]
                ),
                discord.ui.Separator(),
                discord.ui.ActionRow(again),
                accent_colour=0x5865F2,
            )
        )


async def test_layout_view_card_with_a_media_gallery(tmp_path):
    fake = FakeDiscord(token="test-token")
    await fake.start()
    bot = new_bot(fake)

    @bot.tree.command(name="card", description="Results as one card")
    async def card(interaction: discord.Interaction, n: int = 3) -> None:
        await interaction.response.defer()
        files = [discord.File(io.BytesIO(PNG + bytes([i])), filename=f"out{i}.png") for i in range(n)]
        try:
            await interaction.edit_original_response(view=ResultCard(bot, n), attachments=files)
        except discord.HTTPException as e:
            bot.seen["error"] = (e.status, e.code)

    try:
        async with running(fake, bot):
            h = await fake.invoke_slash("card", {"n": 3})
            await h.wait_until(lambda h: h.original is not None and not h.original.loading)
            msg = h.original
            assert msg.flags & IS_COMPONENTS_V2 and msg.content == "" and msg.embeds == []
            (container,) = msg.components
            assert container["type"] == 17 and [c["type"] for c in container["components"]] == [10, 12, 14, 1]
            items = media_gallery_items(msg)
            assert [i["filename"] for i in items] == ["out0.png", "out1.png", "out2.png"]
            assert [i["data"] for i in items] == [PNG + bytes([i]) for i in range(3)]
            assert [i["description"] for i in items] == ["image 0", "image 1", "image 2"]
            # attachment:// became the uploaded attachment's CDN URL, served by the fake CDN
            media = items[1]["media"]
            assert media["attachment_id"] == msg.attachments[1]["id"] and media["url"] == msg.attachments[1]["url"]
            async with aiohttp.ClientSession() as s, s.get(media["url"]) as r:
                assert r.status == 200 and await r.read() == PNG + bytes([1])
            # a button nested in the container still routes to the view
            assert custom_ids(msg.components) == ["kx:again"]
            b = await fake.click_button(msg.id, "kx:again")
            await b.wait_for_callback()
            assert bot.seen["again"] == int(msg.id) and b.original.content == "again!"
            assert fake.violations == []
            # 11 images: the spec's 1-10 Media Gallery items -> 400 50035
            h = await fake.invoke_slash("card", {"n": 11})
            await fake.wait_until(lambda: "error" in bot.seen)
            assert bot.seen["error"] == (400, 50035) and len(fake.violations) == 1
    finally:
        await fake.stop()


def gallery(*urls: str, description: str | None = None) -> dict:
    items = []
    for u in urls:
        item: dict = {"media": {"url": u}}
        if description is not None:
            item["description"] = description
        items.append(item)
    return {"type": 12, "items": items}


@pytest.mark.parametrize(
    ("body", "files", "why"),
    [
        ({"flags": IS_COMPONENTS_V2, "content": "hi", "components": [{"type": 10, "content": "x"}]}, {}, "content"),
        (
            {"flags": IS_COMPONENTS_V2, "embeds": [{"title": "t"}], "components": [{"type": 10, "content": "x"}]},
            {},
            "embeds",
        ),
        (
            {
                "flags": IS_COMPONENTS_V2,
                "components": [{"type": 17, "components": [{"type": 10, "content": "x"}] * 40}],
            },
            {},
            "41 components",
        ),
        (
            {
                "flags": IS_COMPONENTS_V2,
                "components": [{"type": 10, "content": "x" * 2001}, {"type": 10, "content": "y" * 2000}],
            },
            {},
            "text displays total 4001",
        ),
        (
            {"flags": IS_COMPONENTS_V2, "components": [gallery("attachment://missing.png")]},
            {"a.png": PNG},
            "missing.png",
        ),
        ({"flags": IS_COMPONENTS_V2, "components": [gallery(*["https://x/y.png"] * 11)]}, {}, "items"),
        (
            {"flags": IS_COMPONENTS_V2, "components": [gallery("https://x/y.png", description="d" * 1025)]},
            {},
            "description",
        ),
        ({"flags": IS_COMPONENTS_V2, "components": [{"type": 12, "items": [{"media": {}}]}]}, {}, "url"),
        ({"flags": IS_COMPONENTS_V2, "components": [{"type": 13, "file": {"url": "https://x/y.pdf"}}]}, {}, "File"),
        ({"components": [{"type": 10, "content": "x"}]}, {}, "without IS_COMPONENTS_V2"),
        (
            {
                "content": "x",
                "components": [{"type": 1, "components": [{"type": 2, "style": 1, "label": "a", "custom_id": "k"}]}]
                * 6,
            },
            {},
            "6 action rows",
        ),
        (
            {
                "flags": IS_COMPONENTS_V2,
                "components": [
                    {"type": 1, "components": [{"type": 2, "style": 1, "label": "a", "custom_id": "k"}]},
                    {
                        "type": 9,
                        "components": [{"type": 10, "content": "s"}],
                        "accessory": {"type": 2, "style": 1, "custom_id": "k"},
                    },
                ],
            },
            {},
            "custom_id 'k' used twice",
        ),
        (
            {
                "flags": IS_COMPONENTS_V2,
                "components": [
                    {
                        "type": 9,
                        "components": [{"type": 10, "content": "s"}] * 4,
                        "accessory": {"type": 11, "media": {"url": "https://x/y.png"}},
                    }
                ],
            },
            {},
            "components",
        ),
        ({"flags": IS_COMPONENTS_V2, "components": [{"type": 14, "spacing": 3}]}, {}, "spacing"),
        (
            {"content": "x", "components": [{"type": 1, "components": [{"type": 2, "style": 5, "custom_id": "k"}]}]},
            {},
            "style 5 needs exactly ['url']",
        ),
        (
            {"content": "x", "components": [{"type": 1, "components": [{"type": 2, "style": 1, "label": "no id"}]}]},
            {},
            "style 1 needs exactly ['custom_id']",
        ),
    ],
)
async def test_what_discord_refuses(body, files, why):
    fake = FakeDiscord(token="t0k")
    await fake.start()
    try:
        status, answer = await post(fake, body, files)
        assert status == 400 and answer["code"] == 50035, answer
        assert len(fake.violations) == 1 and why in fake.violations[0], fake.violations
    finally:
        await fake.stop()


async def post(fake, body, files=None, method="POST", mid=None):
    url = f"{fake.api_base}/channels/{fake.channel_id}/messages" + (f"/{mid}" if mid else "")
    async with aiohttp.ClientSession(headers={"Authorization": "Bot t0k"}) as s:
        if files:
            form = aiohttp.FormData(quote_fields=False)
            body = {**body, "attachments": [{"id": i, "filename": n} for i, n in enumerate(files)]}
            form.add_field("payload_json", json.dumps(body))
            for i, (n, data) in enumerate(files.items()):
                form.add_field(f"files[{i}]", data, filename=n)
            kw = {"data": form}
        else:
            kw = {"json": body}
        async with s.request(method, url, **kw) as r:
            return r.status, await r.json(content_type=None)


async def test_accepted_cards_and_edits():
    fake = FakeDiscord(token="t0k")
    await fake.start()
    try:
        card = {
            "flags": IS_COMPONENTS_V2,
            "components": [
                {
                    "type": 9,
                    "components": [{"type": 10, "content": "## Done"}],
                    "accessory": {"type": 11, "media": {"url": "attachment://a.png"}, "spoiler": True},
                },
                gallery("attachment://a.png", "https://example.com/b.png", description="alt"),
                {"type": 13, "file": {"url": "attachment://a.png"}},
            ],
        }
        status, sent = await post(fake, card, {"a.png": PNG})
        assert status == 200 and sent["flags"] == IS_COMPONENTS_V2, sent
        msg = fake.messages[sent["id"]]
        items = media_gallery_items(msg)
        assert [i["filename"] for i in items] == ["a.png", None] and items[0]["data"] == PNG
        assert items[1]["media"] == {"url": "https://example.com/b.png"}
        assert sent["components"][0]["accessory"]["media"]["attachment_id"] == msg.attachments[0]["id"]
        # edits: the flag stays (omitted flags keep it), content stays refused, dropping it is refused
        status, _ = await post(fake, {"components": [{"type": 10, "content": "edited"}]}, method="PATCH", mid=msg.id)
        assert status == 200 and msg.flags & IS_COMPONENTS_V2 and msg.components[0]["content"] == "edited"
        assert (await post(fake, {"content": "text"}, method="PATCH", mid=msg.id))[0] == 400
        assert (await post(fake, {"flags": 0}, method="PATCH", mid=msg.id))[0] == 400
        assert (await post(fake, {"content": None, "embeds": []}, method="PATCH", mid=msg.id))[0] == 200
        assert len(fake.violations) == 2 and "drops IS_COMPONENTS_V2" in fake.violations[1]
        # a legacy message may turn into v2 only with its content reset
        status, legacy = await post(fake, {"content": "legacy"})
        v2 = {"flags": IS_COMPONENTS_V2, "components": [{"type": 10, "content": "now a card"}]}
        assert (await post(fake, v2, method="PATCH", mid=legacy["id"]))[0] == 400
        assert "keeps its content" in fake.violations[-1]
        status, edited = await post(fake, {**v2, "content": None}, method="PATCH", mid=legacy["id"])
        assert status == 200 and edited["flags"] == IS_COMPONENTS_V2 and edited["content"] == ""
    finally:
        await fake.stop()
