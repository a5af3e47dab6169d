"""The bot's database: jobs and per-server settings behind one interface, on two engines.

`SqliteStore` (services.sqlite_store) is the embedded default: one process, a file in DATA_DIR.
`PostgresStore` (services.postgres_store), used when DATABASE_URL is set, lets several processes
share the jobs: any of them may drive any job, one at a time, through a lease in the job's row.
The queries both engines run are written here once, with `:name` parameters; the engines differ in
how they connect, migrate, lease and signal.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, Self

from .fal_queue import FalRequest
from .flux_kontext import KontextEdit
from .job import NOTE_SHARED_AS, NOTE_SHARED_PARTS, Job, JobPlace, JobRequest, JobResult, JobState
from .member_defaults import MemberDefaults
from .policy import GuildPolicy, Usage, day_start, month_start, policy_from_dict, policy_to_dict
from .recipes import PastPrompt, Recipe, reading_order
from .redact import describe_error
from .retry import Backoff, retrying
from .settings_cache import SettingKind, SettingsCache

log = logging.getLogger(__name__)

WRITE_BACKOFF = Backoff(base=0.2, factor=2.0, cap=5.0)
# The answer to a cancel asked of a job that another process delivered before it could answer:
# it had no job left to cancel.
CANCEL_TOO_LATE = "too_late"


@dataclass(frozen=True)
class Dialects:
    """A migration whose text differs between the engines (column types, JSON functions)."""

    sqlite: str
    postgres: str


# Failures fal does not charge for: an input it rejected before any GPU time, its own 5xx.
_UNBILLED_FAILURES = "('fal_rejected', 'content_policy', 'fal_failed')"
# Failures after fal made the images, and charged for them: the bot could not fetch or use what
# it made. Billed even when the bot never saw the job start (it ran during a restart).
_BILLED_FAILURES = "('result_expired', 'missing_files', 'bad_output')"


def _sqlite_image_counters(*, billed_failures: str | None = None, create_table: bool = True) -> str:
    """SQLite's text of the monthly image counters (below): its triggers cannot call functions
    of our own, so the expressions are written out for the old and the new row. The first
    counters did not count `billed_failures`; the migration that does replaces their triggers."""

    def spent(row: str) -> str:
        made = f" OR ({row}.state = 'failed' AND {row}.error_code IN {billed_failures})" if billed_failures else ""
        return (
            f"(CASE WHEN {row}.state IN ('pending', 'submitting', 'queued', 'running', 'succeeded'){made}"
            f" OR ({row}.started_at IS NOT NULL AND {row}.request_id IS NOT NULL AND NOT ({row}.state = 'failed'"
            f" AND {row}.error_code IN {_UNBILLED_FAILURES})) THEN {row}.images ELSE 0 END)"
        )

    def month(row: str) -> str:
        return f"CAST(strftime('%s', {row}.created_at, 'unixepoch', 'start of month') AS INTEGER)"

    def count(row: str, sign: str) -> str:
        upsert = "ON CONFLICT (month, scope) DO UPDATE SET images = images + excluded.images"
        return f"""
            INSERT INTO monthly_images SELECT {month(row)}, 0, {sign}{spent(row)} WHERE {spent(row)} > 0 {upsert};
            INSERT INTO monthly_images SELECT {month(row)}, {row}.guild_id, {sign}{spent(row)}
                WHERE {spent(row)} > 0 AND {row}.place = 'server' {upsert};"""

    table = """
        CREATE TABLE monthly_images (
            month INTEGER NOT NULL,
            scope INTEGER NOT NULL,
            images INTEGER NOT NULL,
            PRIMARY KEY (month, scope)
        ) WITHOUT ROWID;"""
    replaced = """
        DROP TRIGGER jobs_count_images_insert;
        DROP TRIGGER jobs_count_images_update;
        DELETE FROM monthly_images;"""
    return f"""{table if create_table else replaced}
        CREATE TRIGGER jobs_count_images_insert AFTER INSERT ON jobs BEGIN {count("NEW", "")}
        END;
        CREATE TRIGGER jobs_count_images_update
            AFTER UPDATE OF state, started_at, request_id, error_code, images, created_at, guild_id, place ON jobs
            WHEN {spent("OLD")} != {spent("NEW")} OR OLD.created_at IS NOT NEW.created_at
                OR OLD.guild_id IS NOT NEW.guild_id OR OLD.place IS NOT NEW.place
        BEGIN {count("OLD", "-")} {count("NEW", "")}
        END;
        INSERT INTO monthly_images SELECT {month("jobs")}, 0, SUM({spent("jobs")}) FROM jobs GROUP BY 1;
        INSERT INTO monthly_images SELECT {month("jobs")}, guild_id, SUM({spent("jobs")}) FROM jobs
            WHERE place = 'server' GROUP BY 1, 2;
        """


# PostgreSQL's count of the monthly images from the jobs there (`job_images_spent`).
_POSTGRES_IMAGE_RECOUNT = """
        INSERT INTO monthly_images
            SELECT month_of(created_at), 0, SUM(job_images_spent(jobs)) FROM jobs GROUP BY 1;
        INSERT INTO monthly_images
            SELECT month_of(created_at), guild_id, SUM(job_images_spent(jobs)) FROM jobs
            WHERE place = 'server' GROUP BY 1, 2;
        """


def _staged_copies_by_url(time_type: str) -> str:
    """The durable copies of inputs keyed by their URL (each copy made), their picture indexed."""
    return f"""
        CREATE TABLE staged_copies (
            url TEXT PRIMARY KEY,
            source TEXT NOT NULL,
            expires_at {time_type} NOT NULL
        );
        INSERT INTO staged_copies (url, source, expires_at) SELECT url, source, expires_at FROM staged_inputs;
        DROP TABLE staged_inputs;
        ALTER TABLE staged_copies RENAME TO staged_inputs;
        CREATE INDEX staged_inputs_source ON staged_inputs (source, expires_at);
        """


# Append-only: each entry upgrades the schema by one version, on either engine; never edit a
# released one. SQLite's column types are affinities, so its first texts keep INTEGER and REAL;
# PostgreSQL needs BIGINT for Discord's 64-bit ids and DOUBLE PRECISION for unix times.
MIGRATIONS: tuple[str | Dialects, ...] = (
    Dialects(
        sqlite="""
        CREATE TABLE jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            guild_id INTEGER,
            channel_id INTEGER NOT NULL,
            user_id INTEGER NOT NULL,
            application_id INTEGER NOT NULL,
            interaction_token TEXT NOT NULL,
            interaction_created_at REAL NOT NULL,
            message_id INTEGER,
            channel_nsfw INTEGER NOT NULL,
            upload_limit INTEGER NOT NULL,
            endpoint TEXT NOT NULL,
            params TEXT NOT NULL,
            notes TEXT NOT NULL,
            parent_job_id INTEGER REFERENCES jobs(id),
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            bot_queue_position INTEGER,
            queue_position INTEGER,
            request_id TEXT,
            status_url TEXT,
            response_url TEXT,
            cancel_url TEXT,
            submitted_at REAL,
            started_at REAL,
            completed_at REAL,
            delivered_at REAL,
            error_code TEXT,
            error_detail TEXT,
            cancelled_by INTEGER,
            result TEXT
        );
        CREATE INDEX jobs_unfinished ON jobs (guild_id, user_id) WHERE delivered_at IS NULL;
        CREATE INDEX jobs_member ON jobs (guild_id, user_id, created_at);
        CREATE INDEX jobs_guild ON jobs (guild_id, created_at);
        """,
        postgres="""
        CREATE TABLE jobs (
            id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            guild_id BIGINT,
            channel_id BIGINT NOT NULL,
            user_id BIGINT NOT NULL,
            application_id BIGINT NOT NULL,
            interaction_token TEXT NOT NULL,
            interaction_created_at DOUBLE PRECISION NOT NULL,
            message_id BIGINT,
            channel_nsfw INTEGER NOT NULL,
            upload_limit BIGINT NOT NULL,
            endpoint TEXT NOT NULL,
            params TEXT NOT NULL,
            notes TEXT NOT NULL,
            parent_job_id BIGINT REFERENCES jobs(id),
            state TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            bot_queue_position INTEGER,
            queue_position INTEGER,
            request_id TEXT,
            status_url TEXT,
            response_url TEXT,
            cancel_url TEXT,
            submitted_at DOUBLE PRECISION,
            started_at DOUBLE PRECISION,
            completed_at DOUBLE PRECISION,
            delivered_at DOUBLE PRECISION,
            error_code TEXT,
            error_detail TEXT,
            cancelled_by BIGINT,
            result TEXT
        );
        CREATE INDEX jobs_unfinished ON jobs (guild_id, user_id) WHERE delivered_at IS NULL;
        CREATE INDEX jobs_member ON jobs (guild_id, user_id, created_at);
        CREATE INDEX jobs_guild ON jobs (guild_id, created_at);
        """,
    ),
    Dialects(
        sqlite="""
        CREATE TABLE guild_policies (
            guild_id INTEGER PRIMARY KEY,
            policy TEXT NOT NULL,
            updated_at REAL NOT NULL,
            updated_by INTEGER NOT NULL
        );
        """,
        postgres="""
        CREATE TABLE guild_policies (
            guild_id BIGINT PRIMARY KEY,
            policy TEXT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            updated_by BIGINT NOT NULL
        );
        """,
    ),
    """
    ALTER TABLE jobs ADD COLUMN delivered_parts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN delivered_in_channel INTEGER NOT NULL DEFAULT 0;
    """,
    """
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    Dialects(
        sqlite="""
        CREATE TABLE staged_inputs (
            source TEXT PRIMARY KEY,
            url TEXT NOT NULL,
            expires_at REAL NOT NULL
        );
        """,
        postgres="""
        CREATE TABLE staged_inputs (
            source TEXT PRIMARY KEY,
            url TEXT NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL
        );
        """,
    ),
    Dialects(
        sqlite="""
        ALTER TABLE jobs ADD COLUMN button_key TEXT;
        ALTER TABLE jobs ADD COLUMN posted_message_ids TEXT NOT NULL DEFAULT '[]';
        ALTER TABLE jobs ADD COLUMN images INTEGER NOT NULL DEFAULT 1;
        UPDATE jobs SET images = COALESCE(json_extract(params, '$.num_images'), 1);
        CREATE INDEX jobs_created ON jobs (created_at);
        """,
        postgres="""
        ALTER TABLE jobs ADD COLUMN button_key TEXT;
        ALTER TABLE jobs ADD COLUMN posted_message_ids TEXT NOT NULL DEFAULT '[]';
        ALTER TABLE jobs ADD COLUMN images INTEGER NOT NULL DEFAULT 1;
        UPDATE jobs SET images = COALESCE((params::jsonb ->> 'num_images')::INTEGER, 1);
        CREATE INDEX jobs_created ON jobs (created_at);
        """,
    ),
    # Leases (PostgreSQL): the process driving the job (INSTANCE_ID, and which start of it), until
    # when, and the fencing counter every claim increases; a cancel asked for in another process,
    # and the driving process's answer. One process on SQLite drives every job and leaves them empty.
    """
    ALTER TABLE jobs ADD COLUMN owner TEXT;
    ALTER TABLE jobs ADD COLUMN owner_run TEXT;
    ALTER TABLE jobs ADD COLUMN lease_until DOUBLE PRECISION;
    ALTER TABLE jobs ADD COLUMN lease_epoch BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN cancel_requested_by BIGINT;
    ALTER TABLE jobs ADD COLUMN cancel_answer TEXT;
    """,
    """
    ALTER TABLE jobs ADD COLUMN place TEXT NOT NULL DEFAULT 'server';
    ALTER TABLE jobs ADD COLUMN locale TEXT NOT NULL DEFAULT 'en-US';
    CREATE INDEX jobs_personal ON jobs (user_id, created_at) WHERE place != 'server';
    """,
    # The images the budgets count, per UTC month: for each server that governs its jobs, and in
    # all (scope 0, the operator's budget). Kept by triggers in the same statement as every job
    # write, whichever process makes it, so a budget check reads one row instead of summing a
    # month of jobs (of every server, for the operator's budget). A job counts while it is in
    # flight (reserved), once it succeeded, and when it ended after fal started it unless fal
    # does not bill that failure.
    Dialects(
        sqlite=_sqlite_image_counters(),
        postgres="""
        CREATE TABLE monthly_images (
            month BIGINT NOT NULL,
            scope BIGINT NOT NULL,
            images BIGINT NOT NULL,
            PRIMARY KEY (month, scope)
        );
        CREATE FUNCTION job_images_spent(job jobs) RETURNS BIGINT LANGUAGE sql AS $$
            SELECT CASE WHEN job.state IN ('pending', 'submitting', 'queued', 'running', 'succeeded')
                OR (job.started_at IS NOT NULL AND job.request_id IS NOT NULL
                    AND NOT (job.state = 'failed' AND job.error_code IN ('fal_rejected', 'content_policy', 'fal_failed')))
            THEN job.images ELSE 0 END
        $$;
        CREATE FUNCTION month_of(unix_time DOUBLE PRECISION) RETURNS BIGINT LANGUAGE sql AS $$
            SELECT EXTRACT(EPOCH FROM date_trunc('month', to_timestamp(unix_time) AT TIME ZONE 'UTC'))::BIGINT
        $$;
        CREATE FUNCTION count_job_images(job jobs, sign INTEGER) RETURNS VOID LANGUAGE plpgsql AS $$
        DECLARE
            change BIGINT := sign * job_images_spent(job);
            first_instant BIGINT := month_of(job.created_at);
        BEGIN
            IF change <> 0 THEN
                INSERT INTO monthly_images AS counted VALUES (first_instant, 0, change)
                    ON CONFLICT (month, scope) DO UPDATE SET images = counted.images + EXCLUDED.images;
                IF job.place = 'server' THEN
                    INSERT INTO monthly_images AS counted VALUES (first_instant, job.guild_id, change)
                        ON CONFLICT (month, scope) DO UPDATE SET images = counted.images + EXCLUDED.images;
                END IF;
            END IF;
        END $$;
        CREATE FUNCTION jobs_count_images() RETURNS TRIGGER LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'UPDATE' THEN
                PERFORM count_job_images(OLD, -1);
            END IF;
            PERFORM count_job_images(NEW, 1);
            RETURN NULL;
        END $$;
        CREATE TRIGGER jobs_count_images_insert AFTER INSERT ON jobs
            FOR EACH ROW WHEN (job_images_spent(NEW) > 0) EXECUTE FUNCTION jobs_count_images();
        CREATE TRIGGER jobs_count_images_update
            AFTER UPDATE OF state, started_at, request_id, error_code, images, created_at, guild_id, place ON jobs
            FOR EACH ROW WHEN (
                job_images_spent(OLD) <> job_images_spent(NEW) OR OLD.created_at <> NEW.created_at
                OR OLD.guild_id IS DISTINCT FROM NEW.guild_id OR OLD.place <> NEW.place
            ) EXECUTE FUNCTION jobs_count_images();"""
        + _POSTGRES_IMAGE_RECOUNT,
    ),
    # A member's own defaults (/kontext-settings), one row per member for every place they use
    # the bot: JSON, read tolerantly (services.member_defaults).
    Dialects(
        sqlite="""
        CREATE TABLE member_defaults (
            user_id INTEGER PRIMARY KEY,
            defaults TEXT NOT NULL,
            updated_at REAL NOT NULL
        );
        """,
        postgres="""
        CREATE TABLE member_defaults (
            user_id BIGINT PRIMARY KEY,
            defaults TEXT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        );
        """,
    ),
    # A member's history: their jobs newest first (paged by created_at and id), the jobs made
    # from one, and the images Discord shows; then the results shown again elsewhere ("Show here").
    """
    ALTER TABLE jobs ADD COLUMN posted_image_urls TEXT NOT NULL DEFAULT '[]';
    CREATE INDEX jobs_history ON jobs (user_id, created_at, id);
    CREATE INDEX jobs_parent ON jobs (parent_job_id, created_at) WHERE parent_job_id IS NOT NULL;
    """,
    Dialects(
        sqlite="""
        CREATE TABLE shown_results (
            message_id INTEGER PRIMARY KEY,
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            channel_id INTEGER NOT NULL,
            shown_by INTEGER NOT NULL,
            shown_at REAL NOT NULL
        );
        """,
        postgres="""
        CREATE TABLE shown_results (
            message_id BIGINT PRIMARY KEY,
            job_id BIGINT NOT NULL REFERENCES jobs(id),
            channel_id BIGINT NOT NULL,
            shown_by BIGINT NOT NULL,
            shown_at DOUBLE PRECISION NOT NULL
        );
        """,
    ),
    # Recipes: each server's own prompts for /kontext's autocomplete; and the prompt as the member
    # typed it (before a recipe wrapped it), which the autocomplete offers them again.
    Dialects(
        sqlite="""
        CREATE TABLE recipes (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            guild_id INTEGER NOT NULL,
            name TEXT NOT NULL,
            text TEXT NOT NULL,
            created_by INTEGER NOT NULL,
            created_at REAL NOT NULL,
            UNIQUE (guild_id, name)
        );
        ALTER TABLE jobs ADD COLUMN member_prompt TEXT;
        CREATE INDEX jobs_member_prompts ON jobs (user_id, created_at) WHERE member_prompt IS NOT NULL;
        """,
        postgres="""
        CREATE TABLE recipes (
            id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            guild_id BIGINT NOT NULL,
            name TEXT NOT NULL,
            text TEXT NOT NULL,
            created_by BIGINT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            UNIQUE (guild_id, name)
        );
        ALTER TABLE jobs ADD COLUMN member_prompt TEXT;
        CREATE INDEX jobs_member_prompts ON jobs (user_id, created_at) WHERE member_prompt IS NOT NULL;
        """,
    ),
    # Where a job came from, as the process that took it knew it: the server's language, and a
    # thread's channel and kind.
    """
    ALTER TABLE jobs ADD COLUMN guild_locale TEXT;
    ALTER TABLE jobs ADD COLUMN parent_channel_id BIGINT;
    ALTER TABLE jobs ADD COLUMN private_thread INTEGER NOT NULL DEFAULT 0;
    """,
    # The counters count the images of a job that failed after fal made them (fal billed them),
    # and are counted again with that rule.
    Dialects(
        sqlite=_sqlite_image_counters(billed_failures=_BILLED_FAILURES, create_table=False),
        postgres=f"""
        CREATE OR REPLACE FUNCTION job_images_spent(job jobs) RETURNS BIGINT LANGUAGE sql AS $$
            SELECT CASE WHEN job.state IN ('pending', 'submitting', 'queued', 'running', 'succeeded')
                OR (job.state = 'failed' AND job.error_code IN {_BILLED_FAILURES})
                OR (job.started_at IS NOT NULL AND job.request_id IS NOT NULL
                    AND NOT (job.state = 'failed' AND job.error_code IN {_UNBILLED_FAILURES}))
            THEN job.images ELSE 0 END
        $$;
        DELETE FROM monthly_images;"""
        + _POSTGRES_IMAGE_RECOUNT,
    ),
    # Every copy made is kept, one row each, looked up by its URL to tell whether an earlier
    # job's input still lasts; not only the newest of each picture: two jobs can upload the same
    # picture at once (each misses the other's copy), and the first one's copy, which lasts at
    # fal all the same, was otherwise forgotten and its job's Re-roll refused.
    Dialects(
        sqlite=_staged_copies_by_url("REAL"),
        postgres=_staged_copies_by_url("DOUBLE PRECISION"),
    ),
)


def migration_text(migration: str | Dialects, dialect: Literal["sqlite", "postgres"]) -> str:
    return migration if isinstance(migration, str) else getattr(migration, dialect)


# SQL fragments over job rows; the state names are our own enum values, never user input.
_ACTIVE = "state IN ({})".format(", ".join(f"'{state.value}'" for state in JobState if not state.is_final))
# Budgets count the images of jobs in flight (reserved) and of those fal billed: succeeded,
# failed once made, or ended after fal started them (a cancel then rarely stops it). A job that
# never ran is free.
_SPENT = (
    f"({_ACTIVE} OR state = 'succeeded' OR (state = 'failed' AND error_code IN {_BILLED_FAILURES})"
    f" OR (started_at IS NOT NULL AND request_id IS NOT NULL"
    f" AND NOT (state = 'failed' AND error_code IN {_UNBILLED_FAILURES})))"
)
# The jobs the cooldown paces: every job a member started, but not one the bot closed before
# Discord took its acknowledgement (`JobRunner.abandon`): the member was told something went wrong
# on the bot's side and to try again, and never saw a job.
_PACED = "(error_code IS NULL OR error_code != 'abandoned')"
# Jobs a server's policy governs; the others (DMs, servers without the bot) count against the
# operator's policy for personal use, per member.
_SERVER = "place = 'server'"
_PERSONAL = "place != 'server'"
# The images a job makes, a column of its own: budgets sum it over a month of jobs at every
# request, which must not mean parsing each job's payload (inputs inline make it kilobytes).
_IMAGES = "images"

# The counters the migration's triggers keep (scope: a server's id, or 0 for all jobs).
_IMAGES_THIS_MONTH = "COALESCE((SELECT images FROM monthly_images WHERE month = :month AND scope = {scope}), 0)"

_JSON_COLUMNS = ("notes", "posted_message_ids", "posted_image_urls")
_BOOL_COLUMNS = ("channel_nsfw", "delivered_in_channel", "private_thread")
_REQUEST_FIELDS = ("request_id", "status_url", "response_url", "cancel_url")
_SCALAR_COLUMNS = tuple(
    f.name
    for f in dataclasses.fields(Job)
    if f.name not in (*_JSON_COLUMNS, "id", "state", "edit", "request", "result", "starts_at")
)


class Row(Protocol):
    """A result row as both drivers return it (sqlite3.Row, asyncpg.Record): read by column name."""

    def __getitem__(self, key: str | int, /) -> Any: ...


def _to_row(job: Job) -> dict[str, Any]:
    row = {name: getattr(job, name) for name in _SCALAR_COLUMNS}
    row.update({name: int(getattr(job, name)) for name in _BOOL_COLUMNS})
    row.update({name: json.dumps(getattr(job, name)) for name in _JSON_COLUMNS})
    row["state"] = job.state.value
    row["endpoint"] = job.edit.endpoint
    row["params"] = json.dumps(job.edit.payload())
    row["images"] = job.edit.options.image_count
    request = job.request
    row.update({name: getattr(request, name) if request else None for name in _REQUEST_FIELDS})
    row["result"] = json.dumps(job.result.to_dict()) if job.result else None
    return row


def _from_row(row: Row) -> Job:
    values = {name: row[name] for name in _SCALAR_COLUMNS}
    values.update({name: bool(row[name]) for name in _BOOL_COLUMNS})
    values.update({name: json.loads(row[name]) for name in _JSON_COLUMNS})
    values["place"] = JobPlace(values["place"])
    request = FalRequest(*(row[name] for name in _REQUEST_FIELDS)) if row["request_id"] else None
    result = JobResult.from_dict(json.loads(row["result"])) if row["result"] else None
    edit = KontextEdit.from_payload(row["endpoint"], json.loads(row["params"]))
    return Job(**values, edit=edit, id=row["id"], state=JobState(row["state"]), request=request, result=result)


class StoreUnavailable(Exception):
    """The database must not be used as it is; the message says why and can be printed."""


@dataclass
class _JobWrites:
    """One job's saves: they take turns, and the last one lets a finished job go."""

    turn: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    pending: int = 0


@dataclass
class _NamedLock:
    """A lock of `Store._local_lock`, and how many hold it or wait for it."""

    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    users: int = 0


class StoreFailed(Exception):
    """A job's write kept failing for a reason of the database's own (connection lost, server
    restarting, disk): what the row holds is unknown but intact, and the job resumes from it
    (at the next start; sharing the database, once its lease runs out, here or elsewhere)."""

    def __init__(self, job_id: int, cause: BaseException) -> None:
        super().__init__(f"job {job_id} could not be written: {describe_error(cause)}")
        self.job_id = job_id


class LeaseLost(BaseException):
    """This process no longer holds the job's lease (another process took it over, or this one
    could not renew it in time): stop driving it, and write and show nothing more of it.

    A BaseException, like asyncio.CancelledError and for the same reason: no `except Exception`
    on a job's path may catch it and carry on writing or posting."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"job {job_id} is not held by this process any more")
        self.job_id = job_id


@dataclass(frozen=True)
class LeaseReport:
    """What one renewal of this process's leases found."""

    # Jobs this process drove whose lease another process took: they must be dropped here.
    lost: tuple[int, ...] = ()
    # Cancels members asked for in another process, not answered yet: job id -> who asked.
    cancel_requests: Mapping[int, int] = dataclasses.field(default_factory=dict)


Signal = Literal["cancel", "released"]
# Where a page of a member's history ends: its last job's (created_at, id).
HistoryCursor = tuple[float, int]


def lock_directory(directory: Path) -> int:
    """Take DATA_DIR for this process (created, readable by the bot's user only): a second bot
    on the same folder would resume, and so submit, every job a second time, or delete the result
    files of another's jobs. Returns the descriptor that holds the lock; closing it releases it."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Readable by the bot's user only: prompts, ids and interaction tokens live here.
        os.chmod(directory, 0o700)
        descriptor = os.open(directory / "kontext.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:  # not a folder, or one the bot's user may not write (a volume's owner)
        raise StoreUnavailable(f"cannot use DATA_DIR {directory}: {exc}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise StoreUnavailable(
            f"another Kontext bot is using {directory}: stop it first (a deploy must stop the old "
            "process before it starts the new one)"
        ) from None
    return descriptor


class Store(abc.ABC):
    """The bot's only database handle. Opened with `async with store` (or `await store.open()`).

    Jobs: `create_job` records a new one, held by this process; `save` writes a job's changes and,
    on a shared store, raises LeaseLost when another process took the job over; `claim` takes the
    unfinished jobs this process may drive (at start: those of its previous run); `admitting`
    holds a place's limits, in every process, from reading its usage to recording the job."""

    # Whether several processes use the database at once (then leases decide who drives a job).
    shared: bool = False
    # What the engine raises when the database, not the statement, failed: worth trying again,
    # for this long (seconds) before the job is left to resume from its row.
    transient_errors: tuple[type[BaseException], ...]
    write_retry_seconds = 30.0
    # The UTC day number of a job's created_at, as this engine writes integer division.
    _day_of_created: str

    def __init__(self) -> None:
        # Policies, recipes and members' defaults are read on every command and change only
        # through this store (on a shared one, every process is told): a read-through cache.
        self._settings = SettingsCache()
        # The row as last written, per unfinished job this process wrote, for save()'s diff.
        self._written: dict[int, dict[str, Any]] = {}
        # The saves of each job under way (see save).
        self._writes: dict[int, _JobWrites] = {}
        # The locks of `_local_lock`, each only while it is held or waited for: a bot in thousands
        # of servers takes one per member and server over time.
        self._local_locks: dict[str, _NamedLock] = {}

    # -- what each engine provides ------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> Self:
        """Connect, creating or upgrading the schema. Raises StoreUnavailable, with a message
        that can be printed as it is, when the database must not be used."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def _fetch(self, sql: str, args: Mapping[str, Any]) -> Sequence[Row]: ...

    @abc.abstractmethod
    async def _execute(self, sql: str, args: Mapping[str, Any]) -> int:
        """Run one statement; returns how many rows it changed."""

    @abc.abstractmethod
    async def _insert_job(self, job: Job, row: dict[str, Any]) -> int:
        """Insert a new job's row, held by this process; returns its id."""

    @abc.abstractmethod
    async def _update_job(self, job: Job, changed: dict[str, Any], *, durable: bool) -> None:
        """Write `changed` columns of the job's row (fenced on a shared store)."""

    @abc.abstractmethod
    async def claim(self) -> list[Job]:
        """Take the unfinished jobs this process may drive now, and hold them."""

    @abc.abstractmethod
    async def renew(self) -> LeaseReport:
        """Renew the leases of the jobs this process holds."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Hand every job this process holds back, for another process to claim at once."""

    @abc.abstractmethod
    def holds(self, job: Job) -> bool:
        """Whether this process may still act on the job (post, submit, cancel at fal) by its own
        clock, without asking the database."""

    @abc.abstractmethod
    def held_for(self, job: Job) -> float:
        """Seconds until another process may take the job over, by this process's clock (its
        lease running out unrenewed); infinite where no other process can."""

    def let_go(self, job: Job) -> None:
        """This process stopped driving the job (unfinished, or finished and written): stop
        renewing its lease, so an unfinished one is claimed again once the lease runs out, and
        keep nothing of it. Claimed again here, its row is read afresh."""
        writes = self._writes.get(job.id)
        if writes is None or not writes.pending:  # a save under way still needs its diff
            self._writes.pop(job.id, None)
            self._written.pop(job.id, None)
        self._stop_renewing(job)

    @abc.abstractmethod
    def _stop_renewing(self, job: Job) -> None:
        """Stop renewing the job's lease (see `let_go`)."""

    @abc.abstractmethod
    async def request_cancel(self, job_id: int, by_user: int) -> bool:
        """Ask the process driving the job to cancel it; False if no other process can be
        driving it (it is finished, or nobody else shares the database)."""

    @abc.abstractmethod
    async def answer_cancel(self, job_id: int, by_user: int, answer: str) -> None:
        """Record the driving process's answer to a cancel asked for elsewhere."""

    @abc.abstractmethod
    async def cancel_answer(self, job_id: int, *, wait: float) -> str | None:
        """The answer to a cancel requested for the job, waiting up to `wait` seconds for it;
        `CANCEL_TOO_LATE` as soon as the job is delivered unanswered."""

    @abc.abstractmethod
    def on_signal(self, kind: Signal, callback: Callable[[], None]) -> None:
        """Call `callback` when another process signals work for this one: a cancel requested
        for a job it drives, or jobs handed back. Only a wake-up: the work is read from the rows."""

    @abc.abstractmethod
    def exclusive(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the lock called `name` among all processes sharing the database."""

    @abc.abstractmethod
    def _locked_transaction(self, names: Sequence[str]) -> contextlib.AbstractAsyncContextManager[None]:
        """Run the block's statements as one transaction that holds the locks `names` among all
        processes sharing the database (they were taken in this process already)."""

    @abc.abstractmethod
    async def _setting_changed(self, kind: SettingKind, key: int) -> None:
        """Tell the other processes sharing the database that a server's policy or recipes
        (`key`: the server) or a member's defaults (`key`: the member) changed."""

    @abc.abstractmethod
    async def _clock(self) -> float:
        """Unix time as the processes sharing the database agree on it."""

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def ensure_held(self, job: Job) -> None:
        """Raise LeaseLost unless this process may still act on the job (see `holds`)."""
        if not self.holds(job):
            raise LeaseLost(job.id)

    # -- jobs ---------------------------------------------------------------------------------

    async def create_job(self, request: JobRequest) -> Job:
        job = Job(**{f.name: getattr(request, f.name) for f in dataclasses.fields(JobRequest)})
        row = _to_row(job)
        job.id = await self._insert_job(job, row)
        self._written[job.id] = row
        return job

    async def save(self, job: Job, *, durable: bool = False) -> None:
        """Write what changed since this job's last write (a transition touches a few columns;
        writing all thirty costs the bot twice the CPU). `durable`: the write must survive a
        power loss before the caller acts on it. A job's saves run one at a time, in the order
        they were made (a pool of connections keeps none), and through a short outage of the
        database (a failover, a restart of the server) each is tried again, as the job is then."""
        writes = self._writes.setdefault(job.id, _JobWrites())
        writes.pending += 1
        try:
            async with writes.turn:
                await retrying(
                    lambda: self._write(job, durable=durable),
                    retryable=lambda exc: isinstance(exc, self.transient_errors),
                    backoff=WRITE_BACKOFF,
                    deadline=asyncio.get_running_loop().time() + self.write_retry_seconds,
                    what=f"job {job.id}'s write",
                )
        except self.transient_errors as exc:
            raise StoreFailed(job.id, exc) from exc
        finally:
            writes.pending -= 1
        if job.delivered_at is not None and not writes.pending:  # its last write is done
            self.let_go(job)

    async def _write(self, job: Job, *, durable: bool) -> None:
        row = _to_row(job)
        last = self._written.pop(job.id, None)  # unknown until this write is done: written whole next
        changed = row if last is None else {name: value for name, value in row.items() if last[name] != value}
        if changed:
            await self._update_job(job, changed, durable=durable)
        self._written[job.id] = row

    async def get_job(self, job_id: int) -> Job | None:
        rows = await self._fetch("SELECT * FROM jobs WHERE id = :id", {"id": job_id})
        return _from_row(rows[0]) if rows else None

    async def _read_claimed(self, rows: Sequence[Row]) -> list[tuple[Job, Row]]:
        """The jobs of claimed rows. A row that cannot be read (damaged, or written by code that no
        longer exists) is closed and logged, so it cannot keep the bot from starting."""
        jobs = []
        for row in rows:
            try:
                job = _from_row(row)
            except (KeyError, TypeError, ValueError) as exc:
                log.error("job %s cannot be read (%s: %s); it is closed as failed", row["id"], type(exc).__name__, exc)
                await self._execute(
                    "UPDATE jobs SET state = 'failed', error_code = 'unreadable', delivered_at = :now, "
                    "interaction_token = '' WHERE id = :id",
                    {"now": await self._clock(), "id": row["id"]},
                )
                continue
            self._written[job.id] = _to_row(job)
            jobs.append((job, row))
        return jobs

    # -- a member's history --------------------------------------------------------------------

    async def member_jobs(
        self, user_id: int, *, guild_id: int | None, after: HistoryCursor | None, newer: bool, limit: int
    ) -> list[Job]:
        """Up to `limit` of a member's jobs (in one server, or everywhere) from the cursor `after`
        (a job's created_at, id; None: the newest) on: older ones newest first, or with `newer`
        newer ones oldest first (walking back to the page before). Keyset paging on an index: as
        cheap on the last page as on the first, and no job is skipped or shown twice when new
        ones arrive meanwhile."""
        where = ["user_id = :user"]
        args: dict[str, Any] = {"user": user_id, "limit": limit}
        if guild_id is not None:
            where.append("guild_id = :guild")
            args["guild"] = guild_id
        if after is not None:
            sign = ">" if newer else "<"
            where.append(f"(created_at {sign} :at OR (created_at = :at AND id {sign} :id))")
            args.update(at=after[0], id=after[1])
        order = "ASC" if newer else "DESC"
        sql = f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY created_at {order}, id {order} LIMIT :limit"
        return [_from_row(row) for row in await self._fetch(sql, args)]

    async def jobs_made_from(self, job_id: int, user_id: int, *, limit: int) -> list[Job]:
        """A member's jobs made from `job_id` (Re-roll, Edit), newest first."""
        sql = (
            "SELECT * FROM jobs WHERE parent_job_id = :job AND user_id = :user "
            "ORDER BY created_at DESC, id DESC LIMIT :limit"
        )
        return [_from_row(row) for row in await self._fetch(sql, {"job": job_id, "user": user_id, "limit": limit})]

    async def made_from_counts(self, job_ids: Sequence[int], user_id: int) -> dict[int, int]:
        """How many of a member's jobs were made from each of `job_ids` (those with none are left out)."""
        if not job_ids:
            return {}
        names = {f"job{i}": job_id for i, job_id in enumerate(job_ids)}
        sql = (
            f"SELECT parent_job_id, COUNT(*) AS made FROM jobs WHERE parent_job_id IN "
            f"({', '.join(':' + name for name in names)}) AND user_id = :user GROUP BY parent_job_id"
        )
        rows = await self._fetch(sql, {**names, "user": user_id})
        return {int(row["parent_job_id"]): int(row["made"]) for row in rows}

    async def set_posted_image_urls(self, job_id: int, urls: Sequence[str]) -> None:
        """A finished job's images at the addresses Discord gave them afresh (no process writes
        its row any more)."""
        sql = "UPDATE jobs SET posted_image_urls = :urls WHERE id = :id AND delivered_at IS NOT NULL"
        await self._execute(sql, {"urls": json.dumps(list(urls)), "id": job_id})

    async def set_closed_reply(self, job_id: int, message_id: int) -> None:
        """The reply of a job closed before it learnt it (`JobRunner.abandon`), recorded once that
        reply says so: the job is finished, so no process writes its row any more (nor holds it,
        which `save` needs where several share the database)."""
        sql = "UPDATE jobs SET message_id = :message WHERE id = :id AND delivered_at IS NOT NULL AND message_id IS NULL"
        await self._execute(sql, {"message": message_id, "id": job_id})

    async def record_shown(self, message_id: int, job_id: int, *, channel_id: int, by_user: int, now: float) -> None:
        """A job's result was shown again as `message_id` ("Show here"): its buttons act on it."""
        await self._execute(
            "INSERT INTO shown_results (message_id, job_id, channel_id, shown_by, shown_at) "
            "VALUES (:message, :job, :channel, :by, :now)",
            {"message": message_id, "job": job_id, "channel": channel_id, "by": by_user, "now": now},
        )

    async def shown_job(self, message_id: int) -> tuple[int, int] | None:
        """The job a message shows again, and the channel it is in."""
        sql = "SELECT job_id, channel_id FROM shown_results WHERE message_id = :message"
        rows = await self._fetch(sql, {"message": message_id})
        return (int(rows[0]["job_id"]), int(rows[0]["channel_id"])) if rows else None

    # -- recipes ------------------------------------------------------------------------------

    async def recipes(self, guild_id: int) -> list[Recipe]:
        """A server's recipes by name (a handful, read at each keystroke and each command)."""

        async def read() -> tuple[Recipe, ...]:
            sql = "SELECT id, name, text FROM recipes WHERE guild_id = :guild"
            rows = await self._fetch(sql, {"guild": guild_id})
            return tuple(sorted((Recipe(int(row["id"]), row["name"], row["text"]) for row in rows), key=reading_order))

        return list(await self._settings.get("recipes", guild_id, read))

    async def add_recipe(self, guild_id: int, name: str, text: str, *, by_user: int, now: float) -> bool:
        """Keep a server's new recipe; False if it has one of that name already."""
        added = await self._execute(
            "INSERT INTO recipes (guild_id, name, text, created_by, created_at) "
            "VALUES (:guild, :name, :text, :by, :now) ON CONFLICT (guild_id, name) DO NOTHING",
            {"guild": guild_id, "name": name, "text": text, "by": by_user, "now": now},
        )
        if added:
            await self._forget_everywhere("recipes", guild_id)
        return added > 0

    async def remove_recipe(self, guild_id: int, name: str) -> bool:
        sql = "DELETE FROM recipes WHERE guild_id = :guild AND name = :name"
        removed = await self._execute(sql, {"guild": guild_id, "name": name}) > 0
        if removed:
            await self._forget_everywhere("recipes", guild_id)
        return removed

    async def recent_prompts(self, user_id: int, *, limit: int) -> list[PastPrompt]:
        """The prompts a member typed lately, newest first, each once."""
        sql = (
            "SELECT id, member_prompt FROM jobs WHERE user_id = :user AND member_prompt IS NOT NULL "
            "ORDER BY created_at DESC LIMIT :limit"
        )
        seen: dict[str, PastPrompt] = {}
        for row in await self._fetch(sql, {"user": user_id, "limit": limit}):
            seen.setdefault(row["member_prompt"], PastPrompt(int(row["id"]), row["member_prompt"]))
        return list(seen.values())

    # -- per-server settings and usage ----------------------------------------------------------

    async def policy(self, guild_id: int) -> GuildPolicy:
        """The server's policy; a server that never changed it gets the defaults."""

        async def read() -> GuildPolicy:
            sql = "SELECT policy FROM guild_policies WHERE guild_id = :guild"
            rows = await self._fetch(sql, {"guild": guild_id})
            return policy_from_dict(json.loads(rows[0]["policy"])) if rows else GuildPolicy()

        return await self._settings.get("policy", guild_id, read)

    async def save_policy(self, guild_id: int, policy: GuildPolicy, *, by_user: int, now: float) -> None:
        await self._execute(
            "INSERT INTO guild_policies (guild_id, policy, updated_at, updated_by) "
            "VALUES (:guild, :policy, :now, :by) "
            "ON CONFLICT (guild_id) DO UPDATE SET policy = excluded.policy, "
            "updated_at = excluded.updated_at, updated_by = excluded.updated_by",
            {"guild": guild_id, "policy": json.dumps(policy_to_dict(policy)), "now": now, "by": by_user},
        )
        await self._forget_everywhere("policy", guild_id)

    async def _forget_everywhere(self, kind: SettingKind, key: int) -> None:
        """A setting this process just wrote: read again here, and in the other processes."""
        self._settings.forget(kind, key)
        await self._setting_changed(kind, key)

    # -- a member's own settings ------------------------------------------------------------------

    async def member_defaults(self, user_id: int) -> MemberDefaults:
        """The member's defaults; a member who never set any has none."""

        async def read() -> MemberDefaults:
            sql = "SELECT defaults FROM member_defaults WHERE user_id = :user"
            rows = await self._fetch(sql, {"user": user_id})
            return MemberDefaults.from_dict(json.loads(rows[0]["defaults"])) if rows else MemberDefaults()

        return await self._settings.get("defaults", user_id, read)

    async def save_member_defaults(self, user_id: int, defaults: MemberDefaults, *, now: float) -> None:
        """Keep the member's defaults; having none leaves no row behind."""
        if defaults.is_empty:
            await self._execute("DELETE FROM member_defaults WHERE user_id = :user", {"user": user_id})
        else:
            await self._execute(
                "INSERT INTO member_defaults (user_id, defaults, updated_at) VALUES (:user, :defaults, :now) "
                "ON CONFLICT (user_id) DO UPDATE SET defaults = excluded.defaults, updated_at = excluded.updated_at",
                {"user": user_id, "defaults": json.dumps(defaults.to_dict()), "now": now},
            )
        await self._forget_everywhere("defaults", user_id)

    async def record_share(self, job: Job, message_id: int, *, part: int) -> None:
        """A finished result the member shared to the channel, `part` of it (one of its messages):
        the new message carries the job's buttons too (see cogs.views). Only these two columns,
        without a lease: the job is done, and whichever process drives or drove it writes
        nothing more."""
        job.posted_message_ids = [*job.posted_message_ids, message_id]
        if NOTE_SHARED_AS not in job.notes:
            job.note(NOTE_SHARED_AS, message_id)
        job.note(NOTE_SHARED_PARTS, {**job.notes.get(NOTE_SHARED_PARTS, {}), str(part): message_id})
        await self._execute(
            "UPDATE jobs SET posted_message_ids = :ids, notes = :notes WHERE id = :id",
            {"ids": json.dumps(job.posted_message_ids), "notes": json.dumps(job.notes), "id": job.id},
        )

    async def usage(self, guild_id: int, user_id: int, now: float, *, all_servers: bool = False) -> Usage:
        """What the policy's limits count. Each part reads an index range (a member's jobs since
        today, the unfinished jobs, the server's jobs this month), never the whole history; the
        images of every server this month only when an operator's budget needs them. A member's
        day counts the jobs the budgets count (`_SPENT`): one cancelled before it started, or
        failed on fal's side, cost nothing and does not use the day up; the cooldown counts all but
        those the bot closed before they were acknowledged (`_PACED`)."""
        sql = f"""
            SELECT
                (SELECT MAX(created_at) FROM jobs WHERE guild_id = :guild AND user_id = :user AND {_PACED}
                    AND {_SERVER}),
                (SELECT COUNT(*) FROM jobs WHERE guild_id = :guild AND user_id = :user AND created_at >= :day
                    AND {_SPENT} AND {_SERVER}),
                (SELECT COUNT(*) FROM jobs WHERE delivered_at IS NULL AND guild_id = :guild AND user_id = :user
                    AND {_ACTIVE} AND {_SERVER}),
                (SELECT COUNT(*) FROM jobs WHERE delivered_at IS NULL AND guild_id = :guild AND {_ACTIVE}
                    AND {_SERVER}),
                {_IMAGES_THIS_MONTH.format(scope=":guild")},
                {_IMAGES_THIS_MONTH.format(scope="0") if all_servers else "0"}
        """
        args = {"user": user_id, "guild": guild_id, "day": day_start(now), "month": int(month_start(now))}
        (row,) = await self._fetch(sql, args)  # one trip to the database
        return Usage(row[0], row[1], row[2], row[3], int(row[4]), int(row[5]))

    async def personal_usage(self, user_id: int, now: float, *, all_servers: bool = False) -> Usage:
        """The same for a member's personal use (DMs, servers without the bot), which the
        operator's policy limits per member: the server figures are zero."""
        sql = f"""
            SELECT
                (SELECT MAX(created_at) FROM jobs WHERE user_id = :user AND {_PACED} AND {_PERSONAL}),
                (SELECT COUNT(*) FROM jobs WHERE user_id = :user AND created_at >= :day AND {_SPENT}
                    AND {_PERSONAL}),
                (SELECT COUNT(*) FROM jobs WHERE delivered_at IS NULL AND user_id = :user AND {_ACTIVE}
                    AND {_PERSONAL}),
                {_IMAGES_THIS_MONTH.format(scope="0") if all_servers else "0"}
        """
        args = {"user": user_id, "day": day_start(now), "month": int(month_start(now))}
        (row,) = await self._fetch(sql, args)
        return Usage(row[0], row[1], row[2], 0, 0, int(row[3]))

    async def daily_images(self, guild_id: int, since: float) -> dict[date, int]:
        """The images the budgets count, per UTC day, for a server's jobs since `since`."""
        sql = f"""
            SELECT {self._day_of_created} AS day, SUM({_IMAGES}) FROM jobs
            WHERE guild_id = :guild AND created_at >= :since AND {_SPENT} AND {_SERVER} GROUP BY day
        """
        rows = await self._fetch(sql, {"guild": guild_id, "since": since})
        return {datetime.fromtimestamp(row[0] * 86400, UTC).date(): int(row[1]) for row in rows}

    # -- what the bot keeps about itself --------------------------------------------------------

    async def ping(self) -> None:
        """One small write: the database answers and takes writes. A read alone still answers
        from a full disk, a file system remounted read-only or behind another writer's lock,
        where every job fails at its first write."""
        await self.set_meta("health_checked_at", repr(time.time()))

    async def meta(self, key: str) -> str | None:
        """A value the bot keeps about itself (e.g. the commands last synced)."""
        rows = await self._fetch("SELECT value FROM meta WHERE key = :key", {"key": key})
        return str(rows[0]["value"]) if rows else None

    async def set_meta(self, key: str, value: str) -> None:
        await self._execute(
            "INSERT INTO meta (key, value) VALUES (:key, :value) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            {"key": key, "value": value},
        )

    async def take_turn(self, name: str, interval: float) -> float:
        """Wait until `interval` seconds have passed since the last turn called `name` that any
        process sharing the database took, then take this one (e.g. Discord's one IDENTIFY per
        5 seconds). Returns the seconds waited."""
        async with self.exclusive(f"turn:{name}"):
            key = f"turn:{name}"
            last = await self.meta(key)
            wait = float(last) + interval - await self._clock() if last is not None else 0.0
            if wait > 0:
                await asyncio.sleep(wait)
            await self.set_meta(key, repr(await self._clock()))
            return max(wait, 0.0)

    async def staged_input(self, source: str, *, now: float) -> str | None:
        """The durable copy of an input image made before that lasts longest, if it lasts past
        `now`."""
        sql = (
            "SELECT url FROM staged_inputs WHERE source = :source AND expires_at > :now"
            " ORDER BY expires_at DESC LIMIT 1"
        )
        rows = await self._fetch(sql, {"source": source, "now": now})
        return str(rows[0]["url"]) if rows else None

    async def staged_url_lasts(self, url: str, *, now: float) -> bool:
        """Whether `url`, a durable copy made for an earlier job, lasts past `now`. A copy the
        store does not list was not made by the bot (or before it kept them): it is not known to
        last."""
        sql = "SELECT 1 FROM staged_inputs WHERE url = :url AND expires_at > :now"
        return bool(await self._fetch(sql, {"url": url, "now": now}))

    async def staged_source(self, url: str) -> str | None:
        """What a durable copy made for an earlier job was made of (see `staged_input`), lasting
        or not; None for a copy the store does not list."""
        rows = await self._fetch("SELECT source FROM staged_inputs WHERE url = :url", {"url": url})
        return str(rows[0]["source"]) if rows else None

    async def record_staged_input(self, source: str, url: str, *, expires_at: float) -> None:
        """Record a copy made of `source`; the copies made before of the same picture stay
        listed, as their jobs are built on them until they expire."""
        await self._execute(
            "INSERT INTO staged_inputs (source, url, expires_at) VALUES (:source, :url, :expires) "
            "ON CONFLICT (url) DO UPDATE SET source = excluded.source, expires_at = excluded.expires_at",
            {"source": source, "url": url, "expires": expires_at},
        )

    @contextlib.asynccontextmanager
    async def admitting(self, scopes: Sequence[str]) -> AsyncIterator[None]:
        """Hold the limits of `scopes` (a server, a member's personal use; the operator's budget,
        which every job shares, last) while the block reads the usage against them and records
        the job they admit: two requests, in any process sharing the database, cannot both take
        the last free place. Queued in this process first, so a burst waits here, not on pooled
        connections."""
        names = [f"admit:{scope}" for scope in scopes]
        async with contextlib.AsyncExitStack() as held:
            for name in names:
                await held.enter_async_context(self._local_lock(name))
            async with self._locked_transaction(names):
                yield

    @contextlib.asynccontextmanager
    async def _local_lock(self, name: str) -> AsyncIterator[None]:
        """`exclusive` for a store no other process uses."""
        named = self._local_locks.get(name)
        if named is None:
            named = self._local_locks[name] = _NamedLock()
        named.users += 1
        try:
            async with named.lock:
                yield
        finally:
            named.users -= 1
            if not named.users:
                del self._local_locks[name]
