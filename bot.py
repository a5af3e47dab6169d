"""Entry point: `python bot.py` reads the settings, then runs the bot until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import discord
from discord.ext import commands
from dotenv import find_dotenv, load_dotenv

from cogs.errors import KontextTree
from cogs.presenter import DiscordPresenter
from services.config import Settings, SettingsError, load_settings
from services.fal_queue import FalQueueClient
from services.retry import Backoff
from services.runner import JobRunner
from services.store import Store

log = logging.getLogger("kontext")

EXTENSIONS = ("cogs.kontext", "cogs.admin")


class KontextBot(commands.AutoShardedBot):
    """AutoShardedBot asks `GET {DISCORD_API_BASE}/gateway/bot` for its gateway, so a REST proxy
    or a local fake Discord serves both REST and gateway."""

    store: Store
    fal: FalQueueClient
    presenter: DiscordPresenter
    runner: JobRunner

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents(guilds=True),
            # A prompt may say @everyone: nothing the bot sends pings anyone unless it says so.
            allowed_mentions=discord.AllowedMentions.none(),
            help_command=None,
            tree_cls=KontextTree,
        )
        self.settings = settings

    async def setup_hook(self) -> None:
        settings = self.settings
        backoff = Backoff(base=settings.retry_base_delay)
        self.store = await Store.open(settings.db_path)
        self.fal = FalQueueClient(
            settings.fal_queue_url,
            settings.fal_key,
            backoff=backoff,
            poll_interval=settings.poll_interval,
            use_stream=settings.use_status_stream,
            stream_stall_timeout=settings.stream_stall_timeout,
        )
        await self.fal.open()
        self.presenter = DiscordPresenter(self, settings.edit_interval)
        self.runner = JobRunner(
            self.store,
            self.fal,
            self.presenter,
            results_dir=settings.results_dir,
            max_concurrent_jobs=settings.max_concurrent_jobs,
            job_timeout=settings.job_timeout,
            max_result_bytes=settings.max_result_bytes,
            result_memory_bytes=settings.result_memory_bytes,
            backoff=backoff,
        )
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        await self._sync_commands()
        resumed = await self.runner.resume()
        if resumed:
            log.info("resumed %d unfinished job(s)", resumed)

    async def _sync_commands(self) -> None:
        guild_id = self.settings.dev_guild_id
        if guild_id is None:
            synced = await self.tree.sync()
        else:
            guild = discord.Object(guild_id)
            self.tree.copy_global_to(guild=guild)
            synced = await self.tree.sync(guild=guild)
        log.info("synced %d application command(s) %s", len(synced), f"to guild {guild_id}" if guild_id else "globally")

    async def close(self) -> None:
        """Stop taking jobs, leave running ones resumable, and close every connection."""
        if self.is_closed():
            return
        try:
            if hasattr(self, "runner"):
                await self.runner.stop()
                await self.presenter.close()
        finally:
            await super().close()
            if hasattr(self, "fal"):
                await self.fal.close()
            if hasattr(self, "store"):
                await self.store.close()


async def run(settings: Settings) -> None:
    # Every REST call, the gateway lookup included, goes to DISCORD_API_BASE.
    discord.http.Route.BASE = settings.discord_api_base
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with KontextBot(settings) as bot:
        running = asyncio.create_task(bot.start(settings.discord_token))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stopping.done():
            log.info("stopping: unfinished jobs will resume at the next start")
            await bot.close()
        stopping.cancel()
        await running  # re-raises a failed login


def _quiet_noisy_loggers(level: int) -> None:
    """discord.py and aiosqlite log request URLs and SQL parameters at DEBUG, and those carry
    interaction tokens: keep them at INFO or above whatever LOG_LEVEL says."""
    for name in ("discord", "aiosqlite"):
        logging.getLogger(name).setLevel(max(level, logging.INFO))


def main() -> int:
    load_dotenv(find_dotenv(usecwd=True))  # the .env of the directory the bot is started from
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"kontext-bot: {exc}", file=sys.stderr)
        return 2
    level = getattr(logging, settings.log_level, logging.INFO)
    discord.utils.setup_logging(level=level, root=True)
    _quiet_noisy_loggers(level)
    log.info("starting with %r", settings)
    try:
        asyncio.run(run(settings))
    except discord.LoginFailure:
        log.error("Discord refused DISCORD_TOKEN; check the token in the Developer Portal")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
