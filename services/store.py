"""SQLite persistence (aiosqlite): jobs and per-server settings, with versioned migrations.

WAL journal and one transaction per write: a `kill -9` at any moment leaves the last committed
state, which is what resuming relies on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
from collections.abc import Iterable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from .fal_queue import FalRequest
from .flux_kontext import KontextEdit
from .job import Job, JobPlace, JobRequest, JobResult, JobState
from .policy import GuildPolicy, Usage, day_start, month_start, policy_from_dict, policy_to_dict

log = logging.getLogger(__name__)

# Append-only: each entry upgrades the schema by one version; never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    """
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
    """
    CREATE TABLE guild_policies (
        guild_id INTEGER PRIMARY KEY,
        policy TEXT NOT NULL,
        updated_at REAL NOT NULL,
        updated_by INTEGER NOT NULL
    );
    """,
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
    """
    CREATE TABLE staged_inputs (
        source TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        expires_at REAL NOT NULL
    );
    """,
    """
    ALTER TABLE jobs ADD COLUMN button_key TEXT;
    ALTER TABLE jobs ADD COLUMN posted_message_ids TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE jobs ADD COLUMN images INTEGER NOT NULL DEFAULT 1;
    UPDATE jobs SET images = COALESCE(json_extract(params, '$.num_images'), 1);
    CREATE INDEX jobs_created ON jobs (created_at);
    """,
    """
    ALTER TABLE jobs ADD COLUMN place TEXT NOT NULL DEFAULT 'server';
    ALTER TABLE jobs ADD COLUMN locale TEXT NOT NULL DEFAULT 'en-US';
    CREATE INDEX jobs_personal ON jobs (user_id, created_at) WHERE place != 'server';
    """,
)

# SQL fragments over job rows; the state names are our own enum values, never user input.
_ACTIVE = "state IN ({})".format(", ".join(f"'{state.value}'" for state in JobState if not state.is_final))
# Failures fal does not charge for: an input it rejected before any GPU time, its own 5xx.
_UNBILLED_FAILURES = "('fal_rejected', 'content_policy', 'fal_failed')"
# Budgets count the images of jobs in flight (reserved) and of those fal billed: succeeded, or
# ended after fal started them (a cancel then rarely stops it). A job that never ran is free.
_SPENT = (
    f"({_ACTIVE} OR state = 'succeeded' OR (started_at IS NOT NULL AND request_id IS NOT NULL"
    f" AND NOT (state = 'failed' AND error_code IN {_UNBILLED_FAILURES})))"
)
# Jobs a server's policy governs; the others (DMs, servers without the bot) count against the
# operator's policy for personal use, per member.
_SERVER = "place = 'server'"
_PERSONAL = "place != 'server'"
# The images a job makes, a column of its own: budgets sum it over a month of jobs at every
# request, which must not mean parsing each job's payload (inputs inline make it kilobytes).
_IMAGES = "images"

_ALL_IMAGES_THIS_MONTH = f"(SELECT COALESCE(SUM({_IMAGES}), 0) FROM jobs WHERE created_at >= :month AND {_SPENT})"

_JSON_COLUMNS = ("notes", "posted_message_ids")
_BOOL_COLUMNS = ("channel_nsfw", "delivered_in_channel")
_REQUEST_FIELDS = ("request_id", "status_url", "response_url", "cancel_url")
_SCALAR_COLUMNS = tuple(
    f.name
    for f in dataclasses.fields(Job)
    if f.name not in (*_JSON_COLUMNS, "id", "state", "edit", "request", "result", "starts_at")
)


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


def _from_row(row: aiosqlite.Row) -> Job:
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


def _lock_directory(directory: Path) -> int:
    """Take DATA_DIR for this process: a second bot on the same folder would resume, and so
    submit, every job a second time."""
    descriptor = os.open(directory / "kontext.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise StoreUnavailable(
            f"another Kontext bot is using {directory}: stop it first (a deploy must stop the old "
            "process before it starts the new one)"
        ) from None
    return descriptor


class Store:
    """The bot's only database handle. One connection; aiosqlite runs it off the event loop.
    Opened with `async with Store(path) as store` (or `await Store(path).open()`)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._connection: aiosqlite.Connection | None = None
        self._durable_connection: aiosqlite.Connection | None = None
        self._lock: int | None = None
        # Policies are read on every job and change only by /kontext-admin, which goes through
        # save_policy: a read-through cache is always current.
        self._policies: dict[int, GuildPolicy] = {}
        # The row as last written, per unfinished job this process wrote, for save()'s diff.
        self._written: dict[int, dict[str, Any]] = {}

    async def open(self) -> Store:
        """Open (creating or upgrading) the database. Raises StoreUnavailable, with a message
        that can be printed as it is, when it must not be used."""
        directory = self._path.parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = _lock_directory(directory)
        # Readable by the bot's user only: prompts, ids and interaction tokens live here.
        os.chmod(directory, 0o700)
        # Two connections, each with its own thread. Writes commit without waiting for the disk
        # (synchronous=NORMAL: a crash of the bot loses nothing, a power loss may lose the last
        # commits), except those that must survive a power loss too, such as the one recording a
        # submit under way: lost, the job would be submitted again. Those go through the second
        # connection (synchronous=FULL), whose commit also makes every earlier one durable.
        self._connection = await self._connect("NORMAL")
        self._durable_connection = await self._connect("FULL")
        for name in (self._path.name, f"{self._path.name}-wal", f"{self._path.name}-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(directory / name, 0o600)
        await self._migrate()
        return self

    async def _connect(self, synchronous: str) -> aiosqlite.Connection:
        # Autocommit: each statement is its own transaction, one trip to the database thread.
        connection = await aiosqlite.connect(self._path, isolation_level=None)
        connection.row_factory = aiosqlite.Row
        await connection.execute("PRAGMA busy_timeout=10000")  # the two connections take turns
        await connection.execute("PRAGMA journal_mode=WAL")
        await connection.execute(f"PRAGMA synchronous={synchronous}")
        await connection.execute("PRAGMA foreign_keys=ON")
        return connection

    async def close(self) -> None:
        for connection in (self._connection, self._durable_connection):
            if connection is not None:
                await connection.close()
        self._connection = self._durable_connection = None
        if self._lock is not None:
            os.close(self._lock)  # releases the lock
            self._lock = None

    async def __aenter__(self) -> Store:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def _db(self) -> aiosqlite.Connection:
        if self._connection is None:
            raise RuntimeError("the store is not open")
        return self._connection

    async def _migrate(self) -> None:
        (row,) = await self._db.execute_fetchall("PRAGMA user_version")
        version = row[0]
        if version > len(MIGRATIONS):
            await self.close()
            raise StoreUnavailable(
                f"the database {self._path} was written by a newer version of the bot (schema {version}; this "
                f"one knows {len(MIGRATIONS)}): run that version, or restore a backup made before the upgrade"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            log.info("upgrading the database to schema version %d", number)
            # One transaction per version: the schema change and its version number together.
            await self._db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")

    async def create_job(self, request: JobRequest) -> Job:
        job = Job(**{f.name: getattr(request, f.name) for f in dataclasses.fields(JobRequest)})
        row = _to_row(job)
        columns = ", ".join(row)
        placeholders = ", ".join(f":{name}" for name in row)
        inserted = await self._db.execute_insert(f"INSERT INTO jobs ({columns}) VALUES ({placeholders})", row)
        assert inserted is not None
        job.id = inserted[0]
        self._written[job.id] = row
        return job

    async def save(self, job: Job, *, durable: bool = False) -> None:
        """Write what changed since this job's last write (a transition touches a few columns;
        writing all thirty costs the bot twice the CPU). `durable`: the write must survive a
        power loss before the caller acts on it."""
        row = _to_row(job)
        last = self._written.get(job.id)
        changed = row if last is None else {name: value for name, value in row.items() if last[name] != value}
        # Recorded before the write is awaited, so a second save of the job diffs against it;
        # the one connection runs the two in order.
        if job.delivered_at is None:
            self._written[job.id] = row
        else:
            self._written.pop(job.id, None)  # finished: no more writes expected
        if changed:
            assignments = ", ".join(f"{name} = :{name}" for name in changed)
            connection = self._durable_connection if durable and self._durable_connection else self._db
            try:
                await connection.execute(f"UPDATE jobs SET {assignments} WHERE id = :id", {**changed, "id": job.id})
            except BaseException:
                # What the database holds is unknown now: the next save writes the whole row.
                self._written.pop(job.id, None)
                raise

    async def get_job(self, job_id: int) -> Job | None:
        rows = list(await self._db.execute_fetchall("SELECT * FROM jobs WHERE id = ?", (job_id,)))
        return _from_row(rows[0]) if rows else None

    async def unfinished_jobs(self, now: float) -> list[Job]:
        """Every job a run left unfinished. A row that cannot be read (damaged, or written by
        code that no longer exists) is closed and logged, so it cannot keep the bot from starting."""
        jobs = []
        for row in await self._db.execute_fetchall("SELECT * FROM jobs WHERE delivered_at IS NULL ORDER BY id"):
            try:
                jobs.append(_from_row(row))
            except (KeyError, TypeError, ValueError) as exc:
                log.error("job %s cannot be read (%s: %s); it is closed as failed", row["id"], type(exc).__name__, exc)
                await self._db.execute(
                    "UPDATE jobs SET state = 'failed', error_code = 'unreadable', delivered_at = ?, "
                    "interaction_token = '' WHERE id = ?",
                    (now, row["id"]),
                )
        return jobs

    async def policy(self, guild_id: int) -> GuildPolicy:
        """The server's policy; a server that never changed it gets the defaults."""
        cached = self._policies.get(guild_id)
        if cached is None:
            sql = "SELECT policy FROM guild_policies WHERE guild_id = ?"
            rows = list(await self._db.execute_fetchall(sql, (guild_id,)))
            cached = self._policies[guild_id] = (
                policy_from_dict(json.loads(rows[0]["policy"])) if rows else GuildPolicy()
            )
        return cached

    async def save_policy(self, guild_id: int, policy: GuildPolicy, *, by_user: int, now: float) -> None:
        await self._db.execute(
            "INSERT INTO guild_policies (guild_id, policy, updated_at, updated_by) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (guild_id) DO UPDATE SET policy = excluded.policy, "
            "updated_at = excluded.updated_at, updated_by = excluded.updated_by",
            (guild_id, json.dumps(policy_to_dict(policy)), now, by_user),
        )
        self._policies[guild_id] = policy

    async def usage(self, guild_id: int, user_id: int, now: float, *, all_servers: bool = False) -> Usage:
        """What the policy's limits count. Each part reads an index range (a member's jobs since
        today, the unfinished jobs, the server's jobs this month), never the whole history; the
        images of every server this month only when an operator's budget needs them."""
        sql = f"""
            SELECT
                (SELECT MAX(created_at) FROM jobs WHERE guild_id = :guild AND user_id = :user AND {_SERVER}),
                (SELECT COUNT(*) FROM jobs WHERE guild_id = :guild AND user_id = :user AND created_at >= :day
                    AND {_SERVER}),
                (SELECT COUNT(*) FROM jobs WHERE delivered_at IS NULL AND guild_id = :guild AND user_id = :user
                    AND {_ACTIVE} AND {_SERVER}),
                (SELECT COUNT(*) FROM jobs WHERE delivered_at IS NULL AND guild_id = :guild AND {_ACTIVE}
                    AND {_SERVER}),
                (SELECT COALESCE(SUM({_IMAGES}), 0) FROM jobs
                    WHERE guild_id = :guild AND created_at >= :month AND {_SPENT} AND {_SERVER}),
                {_ALL_IMAGES_THIS_MONTH if all_servers else "0"}
        """
        args = {"user": user_id, "guild": guild_id, "day": day_start(now), "month": month_start(now)}
        (row,) = await self._db.execute_fetchall(sql, args)  # one trip to the database thread
        return Usage(row[0], row[1], row[2], row[3], int(row[4]), int(row[5]))

    async def personal_usage(self, user_id: int, now: float, *, all_servers: bool = False) -> Usage:
        """The same for a member's personal use (DMs, servers without the bot), which the
        operator's policy limits per member: the server figures are zero."""
        sql = f"""
            SELECT
                (SELECT MAX(created_at) FROM jobs WHERE user_id = :user AND {_PERSONAL}),
                (SELECT COUNT(*) FROM jobs WHERE user_id = :user AND created_at >= :day AND {_PERSONAL}),
                (SELECT COUNT(*) FROM jobs WHERE delivered_at IS NULL AND user_id = :user AND {_ACTIVE}
                    AND {_PERSONAL}),
                {_ALL_IMAGES_THIS_MONTH if all_servers else "0"}
        """
        args = {"user": user_id, "day": day_start(now), "month": month_start(now)}
        (row,) = await self._db.execute_fetchall(sql, args)
        return Usage(row[0], row[1], row[2], 0, 0, int(row[3]))

    async def daily_images(self, guild_id: int, since: float) -> dict[date, int]:
        """The images the budgets count, per UTC day, for a server's jobs since `since`."""
        sql = f"""
            SELECT CAST(created_at / 86400 AS INTEGER) AS day, SUM({_IMAGES}) FROM jobs
            WHERE guild_id = ? AND created_at >= ? AND {_SPENT} AND {_SERVER} GROUP BY day
        """
        rows = await self._db.execute_fetchall(sql, (guild_id, since))
        return {datetime.fromtimestamp(row[0] * 86400, UTC).date(): int(row[1]) for row in rows}

    async def ping(self) -> None:
        """One trivial query: the database answers."""
        await self._db.execute_fetchall("SELECT 1")

    async def meta(self, key: str) -> str | None:
        """A value the bot keeps about itself (e.g. the commands last synced)."""
        rows = list(await self._db.execute_fetchall("SELECT value FROM meta WHERE key = ?", (key,)))
        return str(rows[0]["value"]) if rows else None

    async def set_meta(self, key: str, value: str) -> None:
        await self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    async def staged_input(self, source: str, *, now: float) -> str | None:
        """The durable copy of an input image made before, if it lasts past `now`."""
        sql = "SELECT url FROM staged_inputs WHERE source = ? AND expires_at > ?"
        rows = list(await self._db.execute_fetchall(sql, (source, now)))
        return str(rows[0]["url"]) if rows else None

    async def record_staged_input(self, source: str, url: str, *, expires_at: float) -> None:
        await self._db.execute(
            "INSERT INTO staged_inputs (source, url, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT (source) DO UPDATE SET url = excluded.url, expires_at = excluded.expires_at",
            (source, url, expires_at),
        )

    async def _jobs(self, sql: str, args: Iterable[Any]) -> list[Job]:
        return [_from_row(row) for row in await self._db.execute_fetchall(sql, tuple(args))]
