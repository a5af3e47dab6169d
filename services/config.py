"""Settings read from the environment (and a `.env` file), validated once at start-up."""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class SettingsError(Exception):
    """A setting is missing or malformed; the message names the variable and is safe to print."""


class CommandSync(enum.Enum):
    """When the application commands are synced with Discord at start-up."""

    AUTO = "auto"  # when they changed since the last sync recorded in the database
    ALWAYS = "always"
    NEVER = "never"  # another process (or a person) syncs them


@dataclass(frozen=True)
class Settings:
    # Secrets are excluded from repr so a logged Settings never leaks them.
    discord_token: str = field(repr=False)
    fal_key: str = field(repr=False)
    discord_api_base: str = "https://discord.com/api/v10"
    fal_queue_url: str = "https://queue.fal.run"
    data_dir: Path = Path("./data")
    log_level: str = "INFO"
    dev_guild_id: int | None = None
    sync_commands: CommandSync = CommandSync.AUTO
    # How many jobs the bot keeps at fal at once (fal accounts run 2 to 40 in parallel).
    max_concurrent_jobs: int = 10
    # Seconds between two edits of one progress message (Discord tolerates about one per second).
    edit_interval: float = 1.5
    # Seconds between status polls when fal's status stream is unavailable.
    poll_interval: float = 1.0
    # Prefer fal's server-sent status stream; polling is the fallback (and the benchmark's reference).
    use_status_stream: bool = True
    # Silence on the status stream longer than this means it died (fal pings every 15 s).
    stream_stall_timeout: float = 30.0
    # A job that has not finished after this many seconds is cancelled at fal and reported.
    job_timeout: float = 600.0
    # Base delay of the exponential backoff for retried fal and Discord calls.
    retry_base_delay: float = 0.5
    # Largest input attachment accepted, and largest result image downloaded from fal.
    max_input_bytes: int = 20 * 1024 * 1024
    max_result_bytes: int = 50 * 1024 * 1024
    # Result images held in memory at once on their way to Discord, all jobs together; beyond
    # it (and for a result whose size fal does not announce) they pass through DATA_DIR.
    result_memory_bytes: int = 32 * 1024 * 1024
    # Kontext Max price per image, used for budgets and the job log.
    price_per_image_usd: float = 0.08

    @property
    def db_path(self) -> Path:
        return self.data_dir / "kontext.sqlite3"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"


def _parse(env: Mapping[str, str], name: str, convert: Callable[[str], T], default: T) -> T:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return convert(raw)
    except ValueError:
        raise SettingsError(f"{name} has an invalid value: {raw!r}") from None


def _positive(convert: Callable[[str], T], *, or_zero: bool = False) -> Callable[[str], T]:
    def parse(raw: str) -> T:
        value = convert(raw)
        if value < 0 or (value == 0 and not or_zero):  # type: ignore[operator]
            raise ValueError(raw)
        return value

    return parse


def _flag(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(raw)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from `env` (default: the process environment)."""
    env = os.environ if env is None else env
    secrets = {}
    for name in ("DISCORD_TOKEN", "FAL_KEY"):
        value = env.get(name, "").strip()
        if not value:
            raise SettingsError(f"{name} is not set: put it in the environment or in a .env file (see .env.example)")
        secrets[name] = value
    return Settings(
        discord_token=secrets["DISCORD_TOKEN"],
        fal_key=secrets["FAL_KEY"],
        discord_api_base=_parse(env, "DISCORD_API_BASE", str, Settings.discord_api_base).rstrip("/"),
        fal_queue_url=_parse(env, "FAL_QUEUE_URL", str, Settings.fal_queue_url).rstrip("/"),
        data_dir=_parse(env, "DATA_DIR", Path, Settings.data_dir),
        log_level=_parse(env, "LOG_LEVEL", str.upper, Settings.log_level),
        dev_guild_id=_parse(env, "DEV_GUILD_ID", int, None),
        sync_commands=_parse(env, "SYNC_COMMANDS", lambda raw: CommandSync(raw.lower()), Settings.sync_commands),
        max_concurrent_jobs=_parse(env, "MAX_CONCURRENT_JOBS", _positive(int), Settings.max_concurrent_jobs),
        edit_interval=_parse(env, "EDIT_INTERVAL", _positive(float), Settings.edit_interval),
        poll_interval=_parse(env, "POLL_INTERVAL", _positive(float), Settings.poll_interval),
        use_status_stream=_parse(env, "FAL_STATUS_STREAM", _flag, Settings.use_status_stream),
        stream_stall_timeout=_parse(env, "FAL_STREAM_STALL_TIMEOUT", _positive(float), Settings.stream_stall_timeout),
        job_timeout=_parse(env, "JOB_TIMEOUT", _positive(float), Settings.job_timeout),
        retry_base_delay=_parse(env, "RETRY_BASE_DELAY", _positive(float), Settings.retry_base_delay),
        max_input_bytes=_parse(env, "MAX_INPUT_BYTES", _positive(int), Settings.max_input_bytes),
        max_result_bytes=_parse(env, "MAX_RESULT_BYTES", _positive(int), Settings.max_result_bytes),
        result_memory_bytes=_parse(
            env, "RESULT_MEMORY_BYTES", _positive(int, or_zero=True), Settings.result_memory_bytes
        ),
        price_per_image_usd=_parse(env, "PRICE_PER_IMAGE_USD", float, Settings.price_per_image_usd),
    )
