"""A fake Discord, a fake fal and the real bot process, wired together: used by the end-to-end
tests, the sandbox and the benchmark."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from .bot_process import BotProcess
from .discord_fake import FakeDiscord
from .fal_fake import FakeFal, JobScript, make_image

FAL_KEY = "test-fal-key"
DISCORD_TOKEN = "test-discord-token"


class World:
    # What runs the bot; the sandbox swaps in a variant that can profile it.
    bot_class: type[BotProcess] = BotProcess

    def bot_options(self) -> dict[str, object]:
        return {}

    def __init__(
        self, discord: FakeDiscord, fal: FakeFal, data_dir: Path, settings: Mapping[str, str] | None = None
    ) -> None:
        self.discord = discord
        self.fal = fal
        self.data_dir = data_dir
        self.settings = dict(settings or {})
        self.bot: BotProcess | None = None
        self.bots: list[BotProcess] = []  # every process started, stopped when the world ends

    def new_bot(self, data_dir: Path | None = None, /, **settings: str) -> BotProcess:
        """A bot process on the world's DATA_DIR, or on `data_dir` (one per process, as several
        processes sharing a database each have their own)."""
        bot = self.bot_class(
            **self.bot_options(),
            discord_api_base=self.discord.api_base,
            discord_token=DISCORD_TOKEN,
            fal_url=self.fal.base_url,
            fal_key=FAL_KEY,
            data_dir=data_dir or self.data_dir,
            settings={
                # The fake Discord's CDN is where attachments live, and the fake fal serves storage.
                "DISCORD_CDN_HOSTS": f"127.0.0.1:{self.discord.port}",
                "FAL_REST_URL": self.fal.rest_url,
                **self.settings,
                **settings,
            },
        )
        self.bots.append(bot)
        return bot

    async def start_bot(self, **settings: str) -> BotProcess:
        """Start `python bot.py` and wait until it is connected. discord.py runs the bot's
        setup_hook (command sync, resuming jobs) before it opens the gateway, so by then the
        bot is ready."""
        identified = self.discord.identify_count
        self.bot = self.new_bot(**settings)
        await self.bot.start()
        try:
            await self.discord.wait_until(lambda: self.discord.identify_count > identified, timeout=20)
        except Exception:
            raise AssertionError("the bot did not come up:\n" + self.bot.log_text()[-5000:]) from None
        return self.bot

    def input_image(self, size: int = 4096, fmt: str = "png") -> dict:
        data, width, height = make_image(fmt, size, 64, 64)
        return self.discord.add_cdn_file(data, f"input.{fmt}", f"image/{fmt}", width=width, height=height)

    async def kontext(self, user: str = "alice", channel_id: str | None = None, **options):
        """Run `/kontext` as a member would: an image attached (`image=None`: none, to make one
        from the prompt) and a prompt."""
        options.setdefault("image", self.input_image())
        if options["image"] is None:
            del options["image"]
        options.setdefault("prompt", "make the sky purple")
        return await self.discord.invoke_slash("kontext", options=options, user=user, channel_id=channel_id)


@contextlib.asynccontextmanager
async def running_world(
    data_dir: Path,
    *,
    spec_validation: bool = True,
    fal_script: JobScript | None = None,
    settings: Mapping[str, str] | None = None,
) -> AsyncIterator[World]:
    discord = FakeDiscord(token=DISCORD_TOKEN, spec_validation=spec_validation)
    fal = FakeFal(key=FAL_KEY, default=fal_script or JobScript())
    await discord.start()
    await fal.start()
    world = World(discord, fal, data_dir, settings)
    try:
        yield world
    finally:
        for bot in world.bots:
            await bot.stop()
        await fal.stop()
        await discord.stop()
