"""The embedded store: SQLite (aiosqlite), one file in DATA_DIR, one process.

WAL journal and one transaction per write: a `kill -9` at any moment leaves the last committed
state, which is what resuming relies on. The DATA_DIR lock keeps a second process away, so this
process drives every unfinished job: no leases, nothing to renew or hand back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import aiosqlite

from .job import Job
from .settings_cache import SettingKind
from .store import MIGRATIONS, LeaseReport, Row, Signal, Store, StoreUnavailable, lock_directory, migration_text

log = logging.getLogger(__name__)


class SqliteStore(Store):
    """`SqliteStore(path)`: the database file at `path`, in a folder this process takes."""

    _day_of_created = "CAST(created_at / 86400 AS INTEGER)"
    # Locked past the busy timeout, an I/O error, a full disk.
    transient_errors = (sqlite3.OperationalError,)

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = path
        self._connection: aiosqlite.Connection | None = None
        # Durable writes switch the connection's synchronous mode around themselves, one at a time.
        self._durable_write = asyncio.Lock()
        self._lock: int | None = None

    async def open(self) -> Self:
        """Take the folder, connect and migrate. A failure closes what was opened: the
        connection's thread left running would keep the process from ever exiting."""
        directory = self._path.parent
        self._lock = lock_directory(directory)
        try:
            await self._connect()
            for name in (self._path.name, f"{self._path.name}-wal", f"{self._path.name}-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.chmod(directory / name, 0o600)
            await self._migrate()
        except sqlite3.DatabaseError as exc:  # not a database, damaged, unreadable
            await self.close()
            raise StoreUnavailable(f"cannot use the database {self._path}: {exc}") from None
        except BaseException:
            await self.close()
            raise
        return self

    async def _connect(self) -> None:
        # Autocommit: each statement is its own transaction, one trip to the database thread.
        self._connection = connection = await aiosqlite.connect(self._path, isolation_level=None)
        connection.row_factory = aiosqlite.Row
        await connection.execute("PRAGMA busy_timeout=10000")
        await connection.execute("PRAGMA journal_mode=WAL")
        # Writes commit without waiting for the disk (a crash of the bot loses nothing, a power
        # loss may lose the last commits), except the durable ones (see _update_job).
        await connection.execute("PRAGMA synchronous=NORMAL")
        await connection.execute("PRAGMA foreign_keys=ON")

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        if self._lock is not None:
            os.close(self._lock)  # releases the lock
            self._lock = None

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
        for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
            log.info("upgrading the database to schema version %d", number)
            # One transaction per version: the schema change and its version number together.
            script = migration_text(migration, "sqlite")
            await self._db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version = {number};\nCOMMIT;")

    async def _fetch(self, sql: str, args: Mapping[str, Any]) -> Sequence[Row]:
        return list(await self._db.execute_fetchall(sql, args))

    async def _execute(self, sql: str, args: Mapping[str, Any]) -> int:
        cursor = await self._db.execute(sql, args)
        return cursor.rowcount

    async def _insert_job(self, job: Job, row: dict[str, Any]) -> int:
        columns = ", ".join(row)
        placeholders = ", ".join(f":{name}" for name in row)
        inserted = await self._db.execute_insert(f"INSERT INTO jobs ({columns}) VALUES ({placeholders})", row)
        assert inserted is not None
        return int(inserted[0])

    async def _update_job(self, job: Job, changed: dict[str, Any], *, durable: bool) -> None:
        assignments = ", ".join(f"{name} = :{name}" for name in changed)
        sql, args = f"UPDATE jobs SET {assignments} WHERE id = :id", {**changed, "id": job.id}
        if not durable:
            await self._db.execute(sql, args)
            return
        # A write that must survive a power loss too, such as the one recording a submit under
        # way (lost, the job would be submitted again), commits with synchronous=FULL, which also
        # syncs every earlier commit. The same connection, not a second one: a write by another
        # connection makes SQLite drop this one's page cache and read the pages again.
        async with self._durable_write:
            await self._db.execute("PRAGMA synchronous=FULL")
            try:
                await self._db.execute(sql, args)
            finally:
                await self._db.execute("PRAGMA synchronous=NORMAL")

    async def claim(self) -> list[Job]:
        """Every job a previous run left unfinished: this process is the only one."""
        rows = await self._fetch("SELECT * FROM jobs WHERE delivered_at IS NULL ORDER BY id", {})
        return [job for job, _ in await self._read_claimed(rows)]

    async def renew(self) -> LeaseReport:
        return LeaseReport()

    async def release(self) -> None:
        """Nothing to hand back: the next start of this process resumes every unfinished job."""

    def holds(self, job: Job) -> bool:
        return True

    def held_for(self, job: Job) -> float:
        return math.inf

    def _stop_renewing(self, job: Job) -> None:
        """No leases: a job left unfinished is resumed at the next start."""

    async def request_cancel(self, job_id: int, by_user: int) -> bool:
        return False  # a job this process does not drive is finished, or waits for the next start

    async def answer_cancel(self, job_id: int, by_user: int, answer: str) -> None:
        raise RuntimeError("no other process asks an unshared store's jobs to cancel")

    async def cancel_answer(self, job_id: int, *, wait: float) -> str | None:
        return None

    def on_signal(self, kind: Signal, callback: Callable[[], None]) -> None:
        """No other process sends signals."""

    async def _setting_changed(self, kind: SettingKind, key: int) -> None:
        """No other process caches settings."""

    def exclusive(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self._local_lock(name)

    def _locked_transaction(self, names: Sequence[str]) -> contextlib.AbstractAsyncContextManager[None]:
        """This process's locks are all there are; each statement commits on its own."""
        return contextlib.nullcontext()

    async def _clock(self) -> float:
        return time.time()
