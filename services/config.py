"""Settings read from the environment (and a `.env` file), validated once at start-up.

Every value is checked here: numbers are finite and within bounds (a NaN timeout would fire at
once, a NaN sleep never end), URLs use https (plain http only for loopback addresses, or when
`ALLOW_PLAIN_HTTP` says so), and no credential appears in the logged settings.
"""

from __future__ import annotations

import enum
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from ipaddress import ip_address
from pathlib import Path
from typing import TypeVar

import yarl

from .log_format import LOG_FORMATS
from .policy import SAFETY_MAX, SAFETY_MIN, PersonalUse
from .redact import without_credentials

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
    # Where input images are fetched from, as host[:port]: Discord's CDN and media proxy
    # (attachments), and its external-media proxy, which serves the images of links' embeds.
    discord_cdn_hosts: frozenset[str] = frozenset(
        {"cdn.discordapp.com", "media.discordapp.net", "images-ext-1.discordapp.net", "images-ext-2.discordapp.net"}
    )
    fal_queue_url: str = "https://queue.fal.run"
    # fal's REST host, for uploads to fal's storage (the upload host comes from its token answer).
    fal_rest_url: str = "https://rest.fal.ai"
    data_dir: Path = Path("./data")
    log_level: str = "INFO"
    # "text" or "json" (one JSON object per line, for log collectors).
    log_format: str = "text"
    # The operators' endpoint (/livez, /healthz, /metrics): off unless a port is given.
    http_port: int | None = None
    http_host: str = "127.0.0.1"
    dev_guild_id: int | None = None
    sync_commands: CommandSync = CommandSync.AUTO
    # An operator's cap on jobs at fal at once (None: as many as fal takes; the scheduler shares
    # fal's account limit fairly by itself once it shows).
    max_concurrent_jobs: int | None = None
    # Seconds between two edits of one progress message (Discord tolerates about one per second).
    edit_interval: float = 1.5
    # Seconds between status polls when fal's status stream is unavailable.
    poll_interval: float = 1.0
    # Prefer fal's server-sent status stream; polling is the fallback (and the benchmark's reference).
    use_status_stream: bool = True
    # A status stream with no event for this long is checked with one poll and reopened (fal's
    # keep-alive comments every 15 s only show that the connection lives).
    stream_event_timeout: float = 20.0
    # Silence after which an answer from fal (or Discord's CDN) counts as lost.
    read_timeout: float = 30.0
    # A job fal has not started after this many seconds is cancelled at fal and reported; one fal
    # started is followed for as long again from its start.
    job_timeout: float = 600.0
    # After fal refuses the account (out of credit, locked), seconds before jobs are let through
    # to find out whether it is back; doubled by a refusal after a pause (services/fal_account.py).
    fal_lock_retry_seconds: float = 30.0
    # Base delay of the exponential backoff for retried fal and Discord calls.
    retry_base_delay: float = 0.5
    # Largest input attachment accepted, and largest result image downloaded from fal.
    max_input_bytes: int = 20 * 1024 * 1024
    max_result_bytes: int = 50 * 1024 * 1024
    # Result images held in memory at once on their way to Discord, all jobs together; beyond
    # it they pass through DATA_DIR.
    result_memory_bytes: int = 32 * 1024 * 1024
    # Kontext Max price per image, used for budgets and the job log.
    price_per_image_usd: float = 0.08
    # The operator's spend cap for all servers together, per UTC month (None: no cap).
    monthly_budget_usd: float | None = None
    # Servers the bot serves (None: any that adds it); it leaves the others.
    allowed_guild_ids: frozenset[int] | None = None
    # PostgreSQL shared by several bot processes (None: SQLite in DATA_DIR, one process).
    database_url: str | None = None
    # A connection to it not made within this many seconds has failed (one at the start stops
    # the bot, with exit 2; one later fails the write that needed it, which is retried).
    database_connect_timeout: float = 10.0
    # This process among those sharing the database: stable across its restarts, unique among
    # the live ones (default: the host name and DATA_DIR, which only one process can use).
    instance_id: str = "local"
    # A job's lease: how long it stays this process's without a renewal, how often it is
    # renewed, and how often other processes look for jobs whose lease ran out.
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    claim_interval: float = 5.0
    # The shards this process runs, of how many (None: all, as many as Discord recommends).
    shard_count: int | None = None
    shard_ids: tuple[int, ...] | None = None
    # The gateway address used instead of discord.py's built-in one (a gateway proxy, a fake).
    discord_gateway_url: str | None = None
    # Where no server governs (DMs, servers without the bot, through members' own installs).
    personal: PersonalUse = PersonalUse()
    # Results as one components-v2 card (0: the classic message with an embed and attachments).
    result_cards: bool = True

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            if not f.repr:
                continue
            value = getattr(self, f.name)
            shown.append(f"{f.name}={(without_credentials(value) if isinstance(value, str) else value)!r}")
        return f"Settings({', '.join(shown)})"

    def serves_guild(self, guild_id: int | None) -> bool:
        """Whether the operator lets the bot work in this server (ALLOWED_GUILD_IDS)."""
        return self.allowed_guild_ids is None or guild_id in self.allowed_guild_ids

    @property
    def db_path(self) -> Path:
        return self.data_dir / "kontext.sqlite3"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"


def _parse(env: Mapping[str, str], name: str, convert: Callable[[str], T], default: T, *, secret: bool = False) -> T:
    """The setting `name` converted, or `default` when unset. A `secret` one (a URL, which may
    carry a password) is never quoted in the error, which bot.py prints."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return convert(raw)
    except ValueError as exc:
        why = f" ({exc})" if str(exc) and str(exc) != raw else ""
        shown = "" if secret else f": {raw!r}"
        raise SettingsError(f"{name} has an invalid value{shown}{why}") from None


def _number(convert: Callable[[str], T], *, minimum: float, maximum: float = math.inf) -> Callable[[str], T]:
    """A finite number within [minimum, maximum]."""

    def parse(raw: str) -> T:
        value = convert(raw)
        try:
            number = float(value)  # type: ignore[arg-type]
        except OverflowError:  # an integer beyond any float: beyond any bound the bot has
            raise ValueError("it is far too large") from None
        if not math.isfinite(number):
            raise ValueError("it must be a finite number")
        if not minimum <= number <= maximum:
            bound = f"at least {minimum:g}" if maximum == math.inf else f"between {minimum:g} and {maximum:g}"
            raise ValueError(f"it must be {bound}")
        return value

    return parse


def _flag(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("use 1 or 0")


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return host is not None and ip_address(host).is_loopback
    except ValueError:
        return False


def _url(*, allow_plain_http: bool) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        url = yarl.URL(raw.rstrip("/"))
        if url.scheme not in ("https", "http") or not url.host:
            raise ValueError("it must be an https:// URL")
        if url.scheme == "http" and not (allow_plain_http or _is_loopback(url.host)):
            raise ValueError("plain http sends the token unencrypted: use https, or set ALLOW_PLAIN_HTTP=1")
        if url.user is not None or url.password is not None:
            # aiohttp refuses them next to the Authorization header every call to these hosts sends.
            raise ValueError("it must not contain user:password@ (every call sends the bot's own Authorization)")
        return str(url)

    return parse


# A host name or IPv4 address, with an optional port: what `hosted_on` compares a URL's with.
HOST_AND_PORT = re.compile(r"[a-z0-9-]+(\.[a-z0-9-]+)*(:[0-9]{1,5})?")


def _hosts(raw: str) -> frozenset[str]:
    """Hosts separated by commas. Anything else ("a b", "a;b", "https://a") is refused: taken as
    one host, it would match no attachment, and every input image would be refused."""
    hosts = frozenset(part.strip().lower() for part in raw.split(",") if part.strip())
    if not hosts or not all(HOST_AND_PORT.fullmatch(host) for host in hosts):
        raise ValueError("give host names (host or host:port), separated by commas")
    return hosts


# Variables glibc itself reads to tune malloc: not settings of the bot's, but where an operator
# set one, the bot leaves the allocator as they tuned it (services/allocator.py).
GLIBC_MALLOC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def allocator_tuned_by_operator(env: Mapping[str, str] | None = None) -> bool:
    """Whether `env` (default: the process environment) tunes glibc's malloc already."""
    env = os.environ if env is None else env
    return any(name in env for name in GLIBC_MALLOC_VARIABLES)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from `env` (default: the process environment)."""
    env = os.environ if env is None else env
    secrets = {}
    for name in ("DISCORD_TOKEN", "FAL_KEY"):
        value = env.get(name, "").strip()
        if not value:
            raise SettingsError(f"{name} is not set: put it in the environment or in a .env file (see .env.example)")
        secrets[name] = value
    plain_http = _parse(env, "ALLOW_PLAIN_HTTP", _flag, False)
    url = _url(allow_plain_http=plain_http)
    seconds = _number(float, minimum=0.001)
    data_dir = _parse(env, "DATA_DIR", Path, Settings.data_dir)
    database_url = _parse(env, "DATABASE_URL", _database_url, None, secret=True)
    shard_count = _parse(env, "SHARD_COUNT", _number(int, minimum=1), None)
    shard_ids = _parse(env, "SHARD_IDS", _shard_ids, None)
    if shard_ids is not None:
        if shard_count is None:
            raise SettingsError("SHARD_IDS needs SHARD_COUNT: the shards this process runs, out of how many")
        if max(shard_ids) >= shard_count:
            raise SettingsError(f"SHARD_IDS has a shard beyond SHARD_COUNT={shard_count} (ids start at 0)")
        if database_url is None:
            raise SettingsError(
                "SHARD_IDS needs DATABASE_URL: the processes that share the bot's shards must share its database"
            )
    lease_seconds = _parse(env, "LEASE_SECONDS", _number(float, minimum=1), Settings.lease_seconds)
    heartbeat_seconds = _parse(env, "HEARTBEAT_SECONDS", seconds, Settings.heartbeat_seconds)
    if heartbeat_seconds * 3 > lease_seconds:
        raise SettingsError(
            f"HEARTBEAT_SECONDS must be at most a third of LEASE_SECONDS ({lease_seconds:g}): a lease must "
            "outlive a missed renewal"
        )
    monthly_budget = _parse(env, "MONTHLY_BUDGET_USD", _number(float, minimum=0.01), None)
    return Settings(
        discord_token=secrets["DISCORD_TOKEN"],
        fal_key=secrets["FAL_KEY"],
        discord_api_base=_parse(env, "DISCORD_API_BASE", url, Settings.discord_api_base, secret=True),
        discord_cdn_hosts=_parse(env, "DISCORD_CDN_HOSTS", _hosts, Settings.discord_cdn_hosts),
        fal_queue_url=_parse(env, "FAL_QUEUE_URL", url, Settings.fal_queue_url, secret=True),
        fal_rest_url=_parse(env, "FAL_REST_URL", url, Settings.fal_rest_url, secret=True),
        data_dir=data_dir,
        log_level=_parse(env, "LOG_LEVEL", _log_level, Settings.log_level),
        log_format=_parse(env, "LOG_FORMAT", _log_format, Settings.log_format),
        http_port=_parse(env, "HTTP_PORT", _number(int, minimum=1, maximum=65535), None),
        http_host=_parse(env, "HTTP_HOST", str, Settings.http_host),
        dev_guild_id=_parse(env, "DEV_GUILD_ID", _number(int, minimum=1), None),
        sync_commands=_parse(env, "SYNC_COMMANDS", lambda raw: CommandSync(raw.lower()), Settings.sync_commands),
        max_concurrent_jobs=_parse(env, "MAX_CONCURRENT_JOBS", _number(int, minimum=1), None),
        edit_interval=_parse(env, "EDIT_INTERVAL", seconds, Settings.edit_interval),
        poll_interval=_parse(env, "POLL_INTERVAL", seconds, Settings.poll_interval),
        use_status_stream=_parse(env, "FAL_STATUS_STREAM", _flag, Settings.use_status_stream),
        stream_event_timeout=_parse(env, "FAL_STREAM_EVENT_TIMEOUT", seconds, Settings.stream_event_timeout),
        read_timeout=_parse(env, "FAL_READ_TIMEOUT", seconds, Settings.read_timeout),
        job_timeout=_parse(env, "JOB_TIMEOUT", seconds, Settings.job_timeout),
        fal_lock_retry_seconds=_parse(env, "FAL_LOCK_RETRY_SECONDS", seconds, Settings.fal_lock_retry_seconds),
        retry_base_delay=_parse(
            env, "RETRY_BASE_DELAY", _number(float, minimum=0.001, maximum=60), Settings.retry_base_delay
        ),
        max_input_bytes=_parse(env, "MAX_INPUT_BYTES", _number(int, minimum=1), Settings.max_input_bytes),
        max_result_bytes=_parse(env, "MAX_RESULT_BYTES", _number(int, minimum=1), Settings.max_result_bytes),
        result_memory_bytes=_parse(env, "RESULT_MEMORY_BYTES", _number(int, minimum=0), Settings.result_memory_bytes),
        price_per_image_usd=_parse(env, "PRICE_PER_IMAGE_USD", _number(float, minimum=0), Settings.price_per_image_usd),
        monthly_budget_usd=monthly_budget,
        allowed_guild_ids=_parse(env, "ALLOWED_GUILD_IDS", _ids, None),
        database_url=database_url,
        database_connect_timeout=_parse(env, "DATABASE_CONNECT_TIMEOUT", seconds, Settings.database_connect_timeout),
        instance_id=_parse(env, "INSTANCE_ID", _instance_id, _default_instance_id(data_dir)),
        lease_seconds=lease_seconds,
        heartbeat_seconds=heartbeat_seconds,
        claim_interval=_parse(env, "CLAIM_INTERVAL", seconds, Settings.claim_interval),
        shard_count=shard_count,
        shard_ids=shard_ids,
        discord_gateway_url=_parse(
            env, "DISCORD_GATEWAY_URL", _gateway_url(allow_plain_http=plain_http), None, secret=True
        ),
        personal=_personal_use(env, monthly_budget),
        result_cards=_parse(env, "RESULT_CARDS", _flag, Settings.result_cards),
    )


def _database_url(raw: str) -> str:
    """Only the scheme is checked, as text: asyncpg takes URLs yarl cannot parse, such as several
    hosts (postgresql://user:password@db1:5432,db2:5432/db), and reports the rest itself."""
    scheme, separator, _ = raw.partition("://")
    if not separator or scheme.lower() not in ("postgresql", "postgres"):
        raise ValueError("it must be a postgresql:// URL")
    return raw


def _instance_id(raw: str) -> str:
    if len(raw) > 200 or not raw.isprintable():
        raise ValueError("use at most 200 printable characters")
    return raw


def _default_instance_id(data_dir: Path) -> str:
    """The host and DATA_DIR: stable across restarts of the process, and no two live processes
    have both (each locks its DATA_DIR)."""
    return f"{socket.gethostname()}:{data_dir.resolve()}"


def _shard_ids(raw: str) -> tuple[int, ...]:
    """A list of shard ids and ranges: "0,1", "0-3", "4-7,9". Spaces around the numbers are
    allowed; "0 1" is refused, not read as shard 1."""
    ids: set[int] = set()
    for part in raw.split(","):
        first, _, last = (half.strip() for half in part.partition("-"))
        if not first.isdigit() or (last and not last.isdigit()) or int(last or first) < int(first):
            raise ValueError("give shard ids or ranges, separated by commas (e.g. 0-3,8)")
        ids.update(range(int(first), int(last or first) + 1))
    return tuple(sorted(ids))


def _gateway_url(*, allow_plain_http: bool) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        url = yarl.URL(raw)
        if url.scheme not in ("wss", "ws") or not url.host:
            raise ValueError("it must be a wss:// URL")
        if url.scheme == "ws" and not (allow_plain_http or _is_loopback(url.host)):
            raise ValueError("plain ws sends the token unencrypted: use wss, or set ALLOW_PLAIN_HTTP=1")
        return str(url)

    return parse


def _personal_use(env: Mapping[str, str], monthly_budget_usd: float | None) -> PersonalUse:
    defaults = PersonalUse()
    safety = _number(int, minimum=SAFETY_MIN, maximum=SAFETY_MAX)
    personal = PersonalUse(
        allowed=_parse(env, "PERSONAL_USE", _flag, defaults.allowed),
        safety_default=_parse(env, "PERSONAL_SAFETY_DEFAULT", safety, defaults.safety_default),
        safety_maximum=_parse(env, "PERSONAL_SAFETY_MAXIMUM", safety, defaults.safety_maximum),
        daily_jobs_per_member=_parse(
            env, "PERSONAL_DAILY_JOBS", _number(int, minimum=1), defaults.daily_jobs_per_member
        ),
        concurrent_jobs_per_member=_parse(
            env, "PERSONAL_CONCURRENT_JOBS", _number(int, minimum=1), defaults.concurrent_jobs_per_member
        ),
    )
    if personal.safety_default > personal.safety_maximum:
        raise SettingsError(
            f"PERSONAL_SAFETY_DEFAULT ({personal.safety_default}) is above PERSONAL_SAFETY_MAXIMUM "
            f"({personal.safety_maximum})"
        )
    if personal.allowed and monthly_budget_usd is None:
        # Anyone may install the app to their account; every such job is billed to the operator.
        raise SettingsError("PERSONAL_USE=1 needs MONTHLY_BUDGET_USD: personal use is paid from the operator's budget")
    return personal


def _ids(raw: str) -> frozenset[int]:
    """Server ids separated by commas. Ids separated by spaces are refused, not run together
    into one id that matches no server."""
    parts = [part.strip() for part in raw.split(",") if part.strip()]
    if not parts or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ValueError("give server ids, separated by commas")
    return frozenset(int(part) for part in parts)


def _log_format(raw: str) -> str:
    fmt = raw.lower()
    if fmt not in LOG_FORMATS:
        raise ValueError("use text or json")
    return fmt


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level
