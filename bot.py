"""Entry point: `python bot.py` reads the settings, then runs the bot until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.ext import commands
from dotenv import load_dotenv

from cogs.errors import KontextTree
from cogs.intake import JobIntake
from cogs.presenter import DiscordPresenter
from cogs.translation import KontextTranslator
from cogs.views import JobButton, submit_edit_form
from services.allocator import keep_image_buffers_on_the_heap
from services.config import CommandSync, Settings, SettingsError, allocator_tuned_by_operator, load_settings
from services.fal_account import AccountGate
from services.fal_queue import FalQueueClient
from services.fal_storage import FalStorage
from services.i18n import catalogs
from services.input_images import InputStager
from services.leases import LeaseKeeper
from services.log_format import configure_logging
from services.metrics import Metrics, RateLimitCounter
from services.ops_server import HealthCheck, HealthReport, OpsServer, fal_health
from services.postgres_store import PostgresStore
from services.redact import describe_error
from services.results import ResultCustody
from services.retry import Backoff
from services.runner import JobRunner
from services.sqlite_store import SqliteStore
from services.store import Store, StoreUnavailable, lock_directory

log = logging.getLogger("kontext")

EXTENSIONS = ("cogs.kontext", "cogs.admin", "cogs.history", "cogs.quota", "cogs.member_settings")
# Discord accepts one IDENTIFY per 5 seconds per bucket (shard id % max_concurrency) across all
# of a bot's sessions (docs events/gateway.mdx); the margin covers the time from the turn to the
# IDENTIFY reaching Discord.
IDENTIFY_INTERVAL = 5.0 + 0.5

# The health check's write to the database: within the ops server's own limit (HEALTH_TIMEOUT).
DATABASE_CHECK_SECONDS = 2.0

# How `python bot.py` ends (README, Operations): stopped by SIGTERM or Ctrl-C; Discord refused the
# token; a setting (SHARD_COUNT too low among them) or the database cannot be used; anything else
# stopped it (the log's last line names it).
EXIT_STOPPED, EXIT_TOKEN_REFUSED, EXIT_UNUSABLE_SETTING, EXIT_FAILED = 0, 1, 2, 3
# Close codes of the gateway that discord.py does not reconnect after, as Discord's docs name
# them (topics/opcodes-and-status-codes.mdx), besides 4004 Authentication failed.
SHARDING_REFUSED = {4010: "Invalid shard", 4011: "Sharding required"}
INTENTS_REFUSED = {4013: "Invalid intent(s)", 4014: "Disallowed intent(s)"}
# `docker stop` and Kubernetes send SIGTERM; Ctrl-C is SIGINT.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class CannotStart(Exception):
    """A start-up step failed for a reason outside the bot; the message names the settings
    involved and is safe to log."""


class KontextBot(commands.AutoShardedBot):
    """AutoShardedBot asks `GET {DISCORD_API_BASE}/gateway/bot` for its gateway, so a REST proxy
    or a local fake Discord serves both REST and gateway. With SHARD_COUNT (and SHARD_IDS) it
    runs those shards, connecting to DISCORD_GATEWAY_URL (or discord.py's built-in address)."""

    def __init__(self, settings: Settings, *, store: Store, http: aiohttp.ClientSession, metrics: Metrics) -> None:
        # The bot never joins voice: without this, discord.py warns at every start that voice
        # lacks PyNaCl and davey, two WARNING lines about nothing wrong.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents(guilds=True),
            # A prompt may say @everyone: nothing the bot sends pings anyone unless it says so.
            allowed_mentions=discord.AllowedMentions.none(),
            help_command=None,
            tree_cls=KontextTree,
            # Where the commands are offered: servers that added the bot, and with PERSONAL_USE
            # also wherever a member installed it to their account (DMs with the bot, group DMs,
            # servers without it). /kontext-admin narrows this to servers (cogs/admin.py).
            allowed_installs=app_commands.AppInstallationType(guild=True, user=settings.personal.allowed),
            allowed_contexts=app_commands.AppCommandContext(
                guild=True, dm_channel=settings.personal.allowed, private_channel=settings.personal.allowed
            ),
            **_shard_options(settings),
        )
        self.settings = settings
        self.store = store
        # Doubling from the first delay up to twenty times it (10 s with the default).
        backoff = Backoff(base=settings.retry_base_delay, cap=20 * settings.retry_base_delay)
        self.fal = FalQueueClient(
            http,
            settings.fal_queue_url,
            settings.fal_key,
            backoff=backoff,
            poll_interval=settings.poll_interval,
            use_stream=settings.use_status_stream,
            stream_event_timeout=settings.stream_event_timeout,
            metrics=metrics,
        )
        self.fal_storage = FalStorage(http, settings.fal_rest_url, settings.fal_key, backoff=backoff, metrics=metrics)
        self.presenter = DiscordPresenter(self, settings.edit_interval, metrics)
        self.runner = JobRunner(
            store,
            self.fal,
            self.presenter,
            results=ResultCustody(
                self.fal,
                settings.results_dir,
                memory_bytes=settings.result_memory_bytes,
                max_image_bytes=settings.max_result_bytes,
            ),
            inputs=InputStager(
                http,
                self.fal_storage,
                store,
                discord_cdn_hosts=settings.discord_cdn_hosts,
                max_bytes=settings.max_input_bytes,
                backoff=backoff,
            ),
            account=AccountGate(settings.fal_lock_retry_seconds),
            max_concurrent_jobs=settings.max_concurrent_jobs,
            # Waiting members' places, recomputed as often as a reply may show them.
            places_interval=settings.edit_interval,
            job_timeout=settings.job_timeout,
            backoff=backoff,
            metrics=metrics,
            price_per_image=settings.price_per_image_usd,
        )
        self.intake = JobIntake(self)
        # Sharing the database with other processes: leases, takeovers, cancels from elsewhere.
        self.leases = (
            LeaseKeeper(
                store,
                self.runner,
                heartbeat_seconds=settings.heartbeat_seconds,
                claim_interval=settings.claim_interval,
                metrics=metrics,
            )
            if store.shared
            else None
        )
        self._max_concurrency: int | None = None
        # Held while leaving a server outside ALLOWED_GUILD_IDS (see _leave_unless_allowed).
        self._leaving = asyncio.Lock()

    async def setup_hook(self) -> None:
        # Result buttons are posted by the presenter whichever command started the job; the
        # forms their ✏️ Edit opens are answered from their custom_id, across restarts too.
        self.add_dynamic_items(JobButton)
        self.add_listener(submit_edit_form, "on_interaction")
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        await self.tree.set_translator(KontextTranslator())
        await self._sync_commands()
        resumed = await self.runner.resume()
        if resumed:
            log.info("resumed %d unfinished job(s)", resumed)
        if self.leases is not None:
            self.leases.start()

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """Processes sharing the database take turns to IDENTIFY, one per 5 seconds per bucket
        (`shard_id % max_concurrency`), however many there are; one process alone keeps
        discord.py's own pacing of its shards."""
        if not self.store.shared:
            return await super().before_identify_hook(shard_id, initial=initial)
        if self._max_concurrency is None:
            self._max_concurrency = (await self.fetch_session_start_limits()).max_concurrency
        bucket = (shard_id or 0) % self._max_concurrency
        waited = await self.store.take_turn(f"identify:{bucket}", IDENTIFY_INTERVAL)
        log.info("shard %s identifies (waited %.1fs for its turn)", shard_id, waited)

    async def _sync_commands(self) -> None:
        """Sync the application commands when they differ from the last sync recorded for this
        application (discord.py advises against syncing at every start), or as SYNC_COMMANDS says.
        Processes sharing the database sync one at a time, so with `auto` only the first syncs."""
        async with self.store.exclusive("sync_commands"):
            await self._sync_commands_now()

    async def _sync_commands_now(self) -> None:
        mode = self.settings.sync_commands
        if mode is CommandSync.NEVER:
            return
        guild_id = self.settings.dev_guild_id
        guild = discord.Object(guild_id) if guild_id is not None else None
        if guild is not None:
            self.tree.copy_global_to(guild=guild)
        where = f"to guild {guild_id}" if guild_id else "globally"
        translator = self.tree.translator
        assert translator is not None, "setup_hook sets it"
        payload = [
            await command.get_translated_payload(self.tree, translator)
            for command in self.tree.get_commands(guild=guild)
        ]
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        key = f"synced_commands:{self.application_id}:{guild_id or 'global'}"
        if mode is CommandSync.AUTO and await self.store.meta(key) == digest:
            log.info("application commands unchanged since the last sync %s", where)
            return
        try:
            synced = await self.tree.sync(guild=guild)
        except (discord.Forbidden, discord.NotFound) as exc:
            if guild_id is None:
                raise
            # Discord's answer alone (403 Missing Access) names neither the setting nor the server.
            raise CannotStart(
                f"cannot sync the commands to DEV_GUILD_ID {guild_id} ({describe_error(exc)}): add the bot to that "
                "server with the applications.commands scope, or unset DEV_GUILD_ID"
            ) from None
        await self.store.set_meta(key, digest)
        log.info("synced %d application command(s) %s", len(synced), where)

    async def liveness(self) -> HealthReport:
        """For /livez: this process works, whatever the services it needs are doing. Answering at
        all says its event loop runs (a hung one answers nothing, which a probe's timeout counts
        as a failure); its Discord client must not have been closed. Discord's gateway, the
        database and fal are /healthz's: an outage of theirs is not cured by a restart, which
        would only cut off the jobs in flight, and discord.py reconnects to the gateway itself."""
        running = not self.is_closed()
        return HealthReport({"running": running}, [] if running else ["the bot is stopping"])

    async def health(self) -> HealthReport:
        """For /healthz: connected to Discord's gateway, the database takes a write, and nothing
        stands between fal and the jobs: its queue and storage answered recently (or nothing was
        asked of them), it takes FAL_KEY, and it has not locked the account."""
        problems = []
        shards = self.shards.values()
        gateway = not self.is_closed() and bool(shards) and all(not shard.is_closed() for shard in shards)
        if not gateway:
            problems.append("discord: not connected to the gateway")
        try:
            async with asyncio.timeout(DATABASE_CHECK_SECONDS):
                await self.store.ping()
            store = True
        except TimeoutError:
            store = False
            problems.append(f"database: a write did not complete within {DATABASE_CHECK_SECONDS:g}s")
        except Exception as exc:
            store = False
            problems.append(f"database: {describe_error(exc)}")
        fal_problems = fal_health(
            {"queue": self.fal.calls, "storage": self.fal_storage.calls},
            self.runner.account,
            time.monotonic(),
            secrets=(self.settings.fal_key, self.settings.discord_token),
        )
        problems += fal_problems
        return HealthReport({"discord": gateway, "database": store, "fal": not fal_problems}, problems)

    async def on_guild_join(self, guild: discord.Guild) -> None:
        await self._leave_unless_allowed(guild)

    async def on_guild_available(self, guild: discord.Guild) -> None:
        """Every server a READY lists comes as available (at start-up, and when one shard of
        several identifies again alone, for which discord.py dispatches no on_ready), one that
        added the bot while its shard had no session included."""
        await self._leave_unless_allowed(guild)

    async def on_guild_channel_delete(self, channel: discord.abc.GuildChannel) -> None:
        self.presenter.channel_deleted(channel.id)

    async def on_raw_thread_delete(self, payload: discord.RawThreadDeleteEvent) -> None:
        self.presenter.channel_deleted(payload.thread_id)

    async def _leave_unless_allowed(self, guild: discord.Guild) -> None:
        """With ALLOWED_GUILD_IDS set, a server outside it (anyone can add a public bot, and the
        operator pays for its jobs) is left at once. One at a time: each server of a READY
        comes as its own event, and a bot in thousands outside the list would otherwise send a
        request for each of them at once, far past Discord's global limit (50 a second)."""
        if not self.settings.serves_guild(guild.id):
            async with self._leaving:
                log.warning("leaving guild %d: it is not in ALLOWED_GUILD_IDS", guild.id)
                await guild.leave()

    async def close(self) -> None:
        """Stop taking jobs, leave running ones resumable, and close the Discord connection (the
        store and the fal client belong to `run`)."""
        if self.is_closed():
            return
        try:
            if self.leases is not None:
                await self.leases.stop()
            await self.runner.stop()
            await self.store.release()  # sharing the database: the others take the jobs over at once
            await self.presenter.close()
        finally:
            await super().close()


async def run(settings: Settings) -> None:
    # Every REST call, the gateway lookup included, goes to DISCORD_API_BASE.
    discord.http.Route.BASE = settings.discord_api_base
    if settings.discord_gateway_url is not None:
        # Where discord.py connects with a fixed SHARD_COUNT, and after an invalidated session.
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)
    stop = asyncio.Event()
    starting = asyncio.current_task()
    assert starting is not None, "asyncio.run runs it as a task"

    def stop_starting() -> None:
        stop.set()
        starting.cancel()

    # Until the Discord client runs, a stop signal cancels the start-up at once: opening the
    # database may wait long (a host that says nothing, another process's migration), and no
    # job has begun that a stop must let finish. From then on it stops the bot cleanly.
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop_starting)
    metrics = Metrics()
    logging.getLogger("discord").addHandler(RateLimitCounter(metrics))
    try:
        async with (
            _open_store(settings) as store,
            _http_session(settings) as http,
            KontextBot(settings, store=store, http=http, metrics=metrics) as bot,
            _ops_endpoint(settings, metrics, bot.health, bot.liveness),
        ):
            for signum in STOP_SIGNALS:
                loop.add_signal_handler(signum, stop.set)
            await _serve(bot, stop)
    except asyncio.CancelledError:
        if not stop.is_set():
            raise
        starting.uncancel()
        log.info("stopping during the start-up")


async def _serve(bot: KontextBot, stop: asyncio.Event) -> None:
    """Run the bot until Discord stops it (a failed login, a gateway closed for good) or `stop`
    is set."""
    running = asyncio.create_task(bot.start(bot.settings.discord_token))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if stopping.done():
        log.info(
            "stopping: unfinished jobs %s",
            "are handed to the other processes" if bot.store.shared else "will resume at the next start",
        )
        await bot.close()
        # Closed: a shard still opening its connection (waiting for its turn to IDENTIFY)
        # would retry for ever, so the start is not waited for.
        running.cancel()
    stopping.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running  # re-raises a failed login


def _shard_options(settings: Settings) -> dict[str, Any]:
    """SHARD_COUNT and SHARD_IDS as discord.py takes them; neither set: AutoShardedBot asks
    Discord how many shards to run, and runs them all."""
    options: dict[str, Any] = {}
    if settings.shard_count is not None:
        options["shard_count"] = settings.shard_count
    if settings.shard_ids is not None:
        options["shard_ids"] = list(settings.shard_ids)
    return options


@contextlib.asynccontextmanager
async def _open_store(settings: Settings) -> AsyncIterator[Store]:
    """SQLite in DATA_DIR, or the PostgreSQL database in DATABASE_URL (DATA_DIR then holds only
    this process's result files, and is still this process's alone)."""
    if settings.database_url is None:
        async with SqliteStore(settings.db_path) as sqlite:
            yield sqlite
        return
    lock = lock_directory(settings.data_dir)
    try:
        shared = PostgresStore(
            settings.database_url,
            instance_id=settings.instance_id,
            lease_seconds=settings.lease_seconds,
            connect_timeout=settings.database_connect_timeout,
        )
        async with shared:
            yield shared
    finally:
        os.close(lock)


@contextlib.asynccontextmanager
async def _ops_endpoint(
    settings: Settings, metrics: Metrics, health: HealthCheck, liveness: HealthCheck
) -> AsyncIterator[None]:
    """The operators' /livez, /healthz and /metrics, when HTTP_PORT is set."""
    if settings.http_port is None:
        yield
        return
    server = OpsServer(settings.http_host, settings.http_port, metrics, health, liveness)
    try:
        await server.start()
    except OSError as exc:  # the port taken, the host not an address of this machine, or unknown
        where = f"{settings.http_host}:{settings.http_port} (HTTP_HOST, HTTP_PORT)"
        raise CannotStart(f"cannot serve /livez, /healthz and /metrics on {where}: {exc}") from None
    try:
        yield
    finally:
        await server.stop()


def _http_session(settings: Settings) -> aiohttp.ClientSession:
    """The one HTTP session for fal and Discord's CDN (discord.py keeps its own for the API).
    No connection cap: every followed job holds one status stream open."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=settings.read_timeout),
        headers={"User-Agent": "kontext-discord-bot"},
    )


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    """uvloop where it is installed (it runs the same asyncio code with less CPU per job, as the
    benchmark shows), else asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def main() -> int:
    load_dotenv(".env")  # the .env of the directory the bot is started from, never a parent's
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"kontext-bot: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE_SETTING
    # Passwords (DATABASE_URL's) are masked by where they stand, in every record (services/redact.py).
    secrets = [settings.discord_token, settings.fal_key]
    configure_logging(getattr(logging, settings.log_level), settings.log_format, secrets=secrets)
    log.info("starting with %r", settings)
    log.info("texts in English and %s", ", ".join(catalogs().languages) or "no other language")
    # Everything the bot writes (database, result files) is readable by its own user only.
    os.umask(0o077)
    keep_image_buffers_on_the_heap(tuned_by_operator=allocator_tuned_by_operator())
    try:
        _event_loop_runner()(run(settings))
    except Exception as exc:
        # One line through the configured (redacted) log, never a raw traceback on stderr.
        known = _known_cause(exc, settings)
        if known is not None:
            exit_code, why = known
            log.error("%s", why)
            return exit_code
        # Discord unreachable at the login or the command sync, or a fault of the bot's own.
        log.error("stopped by %s", describe_error(exc))
        log.debug("what stopped the bot", exc_info=exc)
        return EXIT_FAILED
    return EXIT_STOPPED


def _known_cause(exc: Exception, settings: Settings) -> tuple[int, str] | None:
    """The exit code for what stopped the bot and the line saying what to change (README,
    Operations), where the bot knows the cause."""
    closed = _gateway_close_code(exc)
    if isinstance(exc, discord.LoginFailure) or closed == 4004:  # 4004: a token reset while the bot runs
        return EXIT_TOKEN_REFUSED, "Discord refused DISCORD_TOKEN; check the token in the Developer Portal"
    if isinstance(exc, StoreUnavailable):
        return EXIT_UNUSABLE_SETTING, f"cannot start: {exc}"
    if isinstance(exc, CannotStart):
        return EXIT_FAILED, f"cannot start: {exc}"
    if closed in SHARDING_REFUSED:
        return EXIT_UNUSABLE_SETTING, _more_shards_required(settings, f"{closed} {SHARDING_REFUSED[closed]}")
    if closed in INTENTS_REFUSED:
        # discord.py's own text for 4014 advises switching privileged intents on.
        return EXIT_FAILED, (
            f"Discord refused the bot's gateway intents ({closed} {INTENTS_REFUSED[closed]}): the bot asks "
            "only for the guilds intent, which is not privileged, so no Privileged Gateway Intents switch in "
            "the Developer Portal is needed; report it to Discord, or check the gateway proxy if "
            "DISCORD_GATEWAY_URL names one"
        )
    return None


def _gateway_close_code(exc: Exception) -> int | None:
    """The close code of a gateway Discord closed for good (discord.py raises 4014 as
    PrivilegedIntentsRequired); None for anything else."""
    if isinstance(exc, discord.PrivilegedIntentsRequired):
        return 4014
    return exc.code if isinstance(exc, discord.ConnectionClosed) else None


def _more_shards_required(settings: Settings, how: str) -> str:
    """The line for a gateway that wants more shards than the bot runs: what to set."""
    if settings.shard_count is None:
        return f"Discord requires more shards than it recommended ({how}): set SHARD_COUNT above that count"
    if settings.shard_ids is None:
        fix = "raise SHARD_COUNT, or unset it for automatic sharding"
    else:
        fix = "raise SHARD_COUNT in every process, with their SHARD_IDS covering the new shards"
    return f"Discord requires more shards than SHARD_COUNT={settings.shard_count} ({how}): {fix}"


if __name__ == "__main__":
    sys.exit(main())
