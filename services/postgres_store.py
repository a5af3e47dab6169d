"""PostgreSQL (asyncpg): the store several bot processes share, used when DATABASE_URL is set.

Any process may drive any job, one at a time, through a lease in the job's row: the owner's slot
(INSTANCE_ID) and run (this start of it), until when (on the database's clock), and a fencing
counter, `lease_epoch`, that every claim increases. Every write of a job checks the counter
(`... WHERE id = $1 AND lease_epoch = $2`), so a process that lost the lease (it paused past it
and another took the job over) writes nothing and is told so with LeaseLost; before anything it
does outside the database (a post, a submit), it checks its own clock (`holds`). One UPDATE per
heartbeat renews all of a process's leases; expired ones are claimed with FOR UPDATE SKIP LOCKED,
so two processes claiming at once never take the same job. Processes signal each other with
NOTIFY on one dedicated connection, as wake-ups only: what to do is always read from the rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import secrets
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Self

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from .job import Job
from .redact import describe_error
from .settings_cache import SettingKind
from .store import (
    CANCEL_TOO_LATE,
    MIGRATIONS,
    LeaseLost,
    LeaseReport,
    Row,
    Signal,
    Store,
    StoreUnavailable,
    migration_text,
)

log = logging.getLogger(__name__)

# The first key of every advisory lock the bot takes ("kont"), so its locks cannot collide with
# another application's in the same database; the second key is a hash of the lock's name.
LOCK_SPACE = 0x6B6F6E74
# A holder stops acting outside the database once half its lease passed without a renewal: the
# other half covers a side effect already under way (an upload, with discord.py's retries).
SELF_FENCE_FRACTION = 0.5
POOL_SIZE = 10
# A statement unanswered this long fails (and its job resumes elsewhere) rather than hang; a
# migration of a large table may take longer.
STATEMENT_TIMEOUT = 60.0
MIGRATION_TIMEOUT = 3600.0
# How often a wait for a cancel answer reads the row, in case a NOTIFY is lost.
ANSWER_POLL_SECONDS = 0.5
# How often the notification connection is asked a query of its own. It only listens, so one
# dropped without a word (a NAT table or a load balancer's idle timeout forgets it) would never
# find out, and the settings other processes change would stay stale here until a restart.
LISTENER_CHECK_SECONDS = 30.0

RELEASED_CHANNEL = "kontext_released"
ANSWER_CHANNEL = "kontext_cancel_answer"
# A changed setting, its server or member as the payload ("kontext_policy" as earlier versions
# send it, so processes of both versions keep each other's policies current during an upgrade).
SETTING_CHANNELS: dict[SettingKind, str] = {
    "policy": "kontext_policy",
    "recipes": "kontext_recipes",
    "defaults": "kontext_member_defaults",
}
_SETTING_OF_CHANNEL = {channel: kind for kind, channel in SETTING_CHANNELS.items()}

# The database's clock, which decides when leases expire (the machines' clocks may differ).
_NOW = "extract(epoch FROM clock_timestamp())::DOUBLE PRECISION"
_PARAMETER = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")

_CLAIM = f"""
    UPDATE jobs SET owner = :slot, owner_run = :run, lease_epoch = lease_epoch + 1, lease_until = {_NOW} + :lease
    WHERE id IN (
        SELECT id FROM jobs
        WHERE delivered_at IS NULL
            AND (lease_until IS NULL OR lease_until < {_NOW} OR (owner = :slot AND owner_run <> :run))
            AND NOT id = ANY(:held)
        ORDER BY id
        FOR UPDATE SKIP LOCKED)
    RETURNING *
"""
_RENEW = f"""
    UPDATE jobs SET lease_until = {_NOW} + :lease WHERE id = ANY(:ids) AND owner_run = :run
    RETURNING id, cancel_requested_by, cancel_answer
"""
_RELEASE = """
    UPDATE jobs SET owner = NULL, owner_run = NULL, lease_until = NULL
    WHERE owner_run = :run AND delivered_at IS NULL
"""


@functools.lru_cache(maxsize=1024)
def _positional(sql: str) -> tuple[str, tuple[str, ...]]:
    """`:name` parameters as asyncpg's `$n`, and the names in their order. (No SQL text the
    store runs has a `:word` inside a string literal.)"""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _PARAMETER.sub(number, sql), tuple(names)


def _lease_clock() -> float:
    """Seconds on a clock that keeps counting while the machine is suspended (a suspended VM's
    leases expire meanwhile), where there is one."""
    boot_time = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boot_time) if boot_time is not None else time.monotonic()


@dataclass
class _Lease:
    job: Job  # the object this process drives: a job claimed again is another object
    epoch: int
    granted_at: float  # _lease_clock() when the statement that granted or renewed it was sent


@dataclass
class _Transaction:
    """An admission under way in this task (see `_locked_transaction`)."""

    store: PostgresStore
    connection: PoolConnectionProxy[asyncpg.Record]
    # The jobs it inserted, held once it commits: until then no other connection sees their
    # rows, so a heartbeat meanwhile would find their leases gone.
    inserted: list[_Lease]


# The task's admission: its statements run on that connection, inside its transaction (a task
# started inside would inherit it, and outlive it: none is).
_TRANSACTION: ContextVar[_Transaction | None] = ContextVar("kontext_transaction", default=None)


# What connecting can raise besides StoreUnavailable: refused, timed out, refused by the server
# (wrong password, no such database), or a malformed DATABASE_URL.
_CONNECT_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError)


class PostgresStore(Store):
    """`PostgresStore(dsn, instance_id=..., lease_seconds=..., connect_timeout=...)`."""

    shared = True
    # The connection lost or refused, the server shutting down or starting, a statement past
    # its timeout, a transaction the server rolled back (serialization, deadlock).
    transient_errors = (
        OSError,
        TimeoutError,
        asyncpg.PostgresConnectionError,
        asyncpg.InterfaceError,
        asyncpg.exceptions.OperatorInterventionError,
        asyncpg.exceptions.TransactionRollbackError,
    )
    _day_of_created = "FLOOR(created_at / 86400)::BIGINT"

    def __init__(
        self,
        dsn: str,
        *,
        instance_id: str,
        lease_seconds: float,
        connect_timeout: float,
        listener_check_seconds: float = LISTENER_CHECK_SECONDS,
    ) -> None:
        super().__init__()
        self._dsn = dsn
        # asyncpg's own is 60 s: longer than a stop may take, and than an operator should wait
        # to learn that DATABASE_URL does not answer.
        self._connect_timeout = connect_timeout
        self.slot = instance_id
        self.run = secrets.token_hex(8)
        self._lease_seconds = lease_seconds
        # Past its lease a job may be another process's: it is let go, to be claimed again.
        self.write_retry_seconds = lease_seconds
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._relistening: asyncio.Task[None] | None = None
        self._listener_check_seconds = listener_check_seconds
        self._checking_listener: asyncio.Task[None] | None = None
        self._closing = False
        self._held: dict[int, _Lease] = {}
        self._signals: defaultdict[str, list[Callable[[], None]]] = defaultdict(list)
        self._answer_waiters: defaultdict[int, set[asyncio.Event]] = defaultdict(set)

    @property
    def _run_channel(self) -> str:
        """Where other processes wake this one for a cancel of a job it drives."""
        return f"kontext_run_{self.run}"

    # -- connecting ---------------------------------------------------------------------------

    async def open(self) -> Self:
        try:
            try:
                self._pool = await asyncpg.create_pool(
                    self._dsn,
                    min_size=1,
                    max_size=POOL_SIZE,
                    command_timeout=STATEMENT_TIMEOUT,
                    timeout=self._connect_timeout,
                )
            except TimeoutError:
                raise StoreUnavailable(
                    f"the database in DATABASE_URL did not answer within {self._connect_timeout:g}s "
                    "(DATABASE_CONNECT_TIMEOUT)"
                ) from None
            await self._migrate()
            self._listener = await self._listen()
            self._checking_listener = asyncio.create_task(self._check_listener())
        except _CONNECT_ERRORS as exc:
            await self.close()
            raise StoreUnavailable(f"cannot use the database in DATABASE_URL: {describe_error(exc)}") from None
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        self._closing = True
        for task in (self._checking_listener, self._relistening):
            if task is not None:
                task.cancel()
        if self._listener is not None:
            with contextlib.suppress(*_CONNECT_ERRORS):
                await self._listener.close(timeout=5)
            self._listener = None
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 10)
            except TimeoutError:
                self._pool.terminate()
            self._pool = None

    @property
    def _db(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("the store is not open")
        return self._pool

    async def _migrate(self) -> None:
        """Bring the schema up to date once, however many processes start together: each waits
        for the migration lock, and finds the work done if another had it first."""
        async with self._db.acquire() as connection:
            await connection.execute("SELECT pg_advisory_lock($1, hashtext('migrations'))", LOCK_SPACE)
            try:
                await connection.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);"
                    "INSERT INTO schema_version SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM schema_version)"
                )
                version = await connection.fetchval("SELECT version FROM schema_version")
                if version > len(MIGRATIONS):
                    raise StoreUnavailable(
                        f"the database in DATABASE_URL was written by a newer version of the bot (schema {version}; "
                        f"this one knows {len(MIGRATIONS)}): run that version, or restore a backup made before "
                        "the upgrade"
                    )
                for number, migration in enumerate(MIGRATIONS[version:], start=version + 1):
                    log.info("upgrading the database to schema version %d", number)
                    async with connection.transaction():  # the change and its version number together
                        await connection.execute(migration_text(migration, "postgres"), timeout=MIGRATION_TIMEOUT)
                        await connection.execute("UPDATE schema_version SET version = $1", number)
            finally:
                await connection.execute("SELECT pg_advisory_unlock($1, hashtext('migrations'))", LOCK_SPACE)

    async def _listen(self) -> asyncpg.Connection:
        """A connection of its own for LISTEN (a pooled one would be reset, and stop listening)."""
        connection = await asyncpg.connect(self._dsn, timeout=self._connect_timeout)
        for channel in (self._run_channel, RELEASED_CHANNEL, ANSWER_CHANNEL, *SETTING_CHANNELS.values()):
            await connection.add_listener(channel, self._notified)
        connection.add_termination_listener(self._listener_lost)
        return connection

    def _listener_lost(self, connection: object) -> None:
        if not self._closing:
            log.warning("the database's notification connection closed; reconnecting")
            self._relistening = asyncio.create_task(self._listen_again())

    async def _listen_again(self) -> None:
        delay = 0.5
        while True:
            try:
                self._listener = await self._listen()
                break
            except _CONNECT_ERRORS as exc:
                log.warning("cannot listen for notifications yet (%s); retrying in %.0fs", describe_error(exc), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        # Signals sent meanwhile are lost: forget what they would have changed, and look again.
        self._settings.forget_all()
        for callbacks in self._signals.values():
            for callback in callbacks:
                callback()

    async def _check_listener(self) -> None:
        """Replace a notification connection that no longer answers (see LISTENER_CHECK_SECONDS)."""
        while True:
            await asyncio.sleep(self._listener_check_seconds)
            listener = self._listener
            if listener is None or listener.is_closed():
                continue  # being replaced
            try:
                await listener.fetchval("SELECT 1", timeout=self._listener_check_seconds)
            except _CONNECT_ERRORS as exc:
                log.warning("the database's notification connection does not answer (%s)", describe_error(exc))
                listener.terminate()  # then replaced, as any closed one is

    def _notified(self, connection: object, pid: int, channel: str, payload: object) -> None:
        if channel in _SETTING_OF_CHANNEL:
            self._settings.forget(_SETTING_OF_CHANNEL[channel], int(str(payload)))
        elif channel == ANSWER_CHANNEL:
            for event in self._answer_waiters.get(int(str(payload)), ()):
                event.set()
        else:
            for callback in self._signals["cancel" if channel == self._run_channel else "released"]:
                callback()

    def on_signal(self, kind: Signal, callback: Callable[[], None]) -> None:
        self._signals[kind].append(callback)

    async def _notify(self, channel: str, payload: str) -> None:
        await self._db.execute("SELECT pg_notify($1, $2)", channel, payload)

    # -- the engine's primitives ----------------------------------------------------------------

    def _transaction(self) -> _Transaction | None:
        transaction = _TRANSACTION.get()
        return transaction if transaction is not None and transaction.store is self else None

    @property
    def _connection(self) -> asyncpg.Pool | PoolConnectionProxy[asyncpg.Record]:
        """Where this task's statements run: its admission's transaction, or any pooled connection."""
        transaction = self._transaction()
        return transaction.connection if transaction is not None else self._db

    async def _fetch(self, sql: str, args: Mapping[str, Any]) -> Sequence[Row]:
        text, names = _positional(sql)
        return await self._connection.fetch(text, *(args[name] for name in names))

    async def _execute(self, sql: str, args: Mapping[str, Any]) -> int:
        text, names = _positional(sql)
        status = await self._connection.execute(text, *(args[name] for name in names))
        count = status.rsplit(" ", 1)[-1]
        return int(count) if count.isdigit() else 0

    async def _clock(self) -> float:
        return float(await self._db.fetchval(f"SELECT {_NOW}"))

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        """A session advisory lock on a connection held for the block (the server drops it if
        the connection dies; the pool unlocks everything when the connection is returned)."""
        async with self._db.acquire() as connection:
            await connection.execute("SELECT pg_advisory_lock($1, hashtext($2))", LOCK_SPACE, name)
            try:
                yield
            finally:
                await connection.execute("SELECT pg_advisory_unlock($1, hashtext($2))", LOCK_SPACE, name)

    @contextlib.asynccontextmanager
    async def _locked_transaction(self, names: Sequence[str]) -> AsyncIterator[None]:
        """One connection and one transaction for the block, under transaction advisory locks:
        the usage it reads and the job it inserts are seen together by the next holder, and the
        commit or rollback releases the locks however the block ends (behind a transaction
        pooler too). Only this connection is used meanwhile, so waiters cannot exhaust the pool."""
        async with self._db.acquire() as connection:
            transaction = _Transaction(self, connection, [])
            try:
                async with connection.transaction():
                    for name in names:
                        await connection.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", LOCK_SPACE, name)
                    token = _TRANSACTION.set(transaction)
                    try:
                        yield
                    finally:
                        _TRANSACTION.reset(token)
            except BaseException:
                for lease in transaction.inserted:  # rolled back: they do not exist
                    self._written.pop(lease.job.id, None)
                raise
            for lease in transaction.inserted:
                self._held[lease.job.id] = lease

    async def _setting_changed(self, kind: SettingKind, key: int) -> None:
        await self._notify(SETTING_CHANNELS[kind], str(key))

    # -- leases ---------------------------------------------------------------------------------

    async def _insert_job(self, job: Job, row: dict[str, Any]) -> int:
        columns = ", ".join(row)
        placeholders = ", ".join(f":{name}" for name in row)
        sql = (
            f"INSERT INTO jobs ({columns}, owner, owner_run, lease_epoch, lease_until) "
            f"VALUES ({placeholders}, :slot, :run, 1, {_NOW} + :lease) RETURNING id"
        )
        sent = _lease_clock()
        (inserted,) = await self._fetch(sql, {**row, "slot": self.slot, "run": self.run, "lease": self._lease_seconds})
        job_id = int(inserted["id"])
        transaction = self._transaction()
        if transaction is not None:
            transaction.inserted.append(_Lease(job, 1, sent))
        else:
            self._held[job_id] = _Lease(job, 1, sent)
        return job_id

    def _lease(self, job: Job) -> _Lease:
        lease = self._held.get(job.id)
        if lease is None or lease.job is not job:
            raise LeaseLost(job.id)
        return lease

    async def _update_job(self, job: Job, changed: dict[str, Any], *, durable: bool) -> None:
        # `durable` needs nothing more: every commit waits for the server's disk.
        lease = self._lease(job)
        assignments = ", ".join(f"{name} = :{name}" for name in changed)
        sql = f"UPDATE jobs SET {assignments} WHERE id = :id AND lease_epoch = :lease_epoch"
        if not await self._execute(sql, {**changed, "id": job.id, "lease_epoch": lease.epoch}):
            self.let_go(job)
            raise LeaseLost(job.id)

    async def claim(self) -> list[Job]:
        """Jobs nobody holds: handed back, their lease expired (their process died or hung), or
        left by an earlier start of this slot (taken back at once, as a restart resumes them)."""
        sent = _lease_clock()
        args = {"slot": self.slot, "run": self.run, "lease": self._lease_seconds, "held": list(self._held)}
        claimed = await self._read_claimed(await self._fetch(_CLAIM, args))
        for job, row in claimed:
            self._held[job.id] = _Lease(job, row["lease_epoch"], sent)
        return [job for job, _ in claimed]

    async def renew(self) -> LeaseReport:
        if not self._held:
            return LeaseReport()
        sent = _lease_clock()
        ids = list(self._held)
        rows = await self._fetch(_RENEW, {"ids": ids, "run": self.run, "lease": self._lease_seconds})
        renewed = {row["id"]: row for row in rows}
        lost = []
        for job_id in ids:
            lease = self._held.get(job_id)
            if lease is None:
                continue  # finished meanwhile
            if job_id in renewed:
                lease.granted_at = sent
            else:
                del self._held[job_id]
                lost.append(job_id)
        requests = {
            job_id: row["cancel_requested_by"]
            for job_id, row in renewed.items()
            if row["cancel_requested_by"] is not None and row["cancel_answer"] is None and job_id in self._held
        }
        return LeaseReport(tuple(lost), requests)

    async def release(self) -> None:
        self._held.clear()
        if await self._execute(_RELEASE, {"run": self.run}):
            await self._notify(RELEASED_CHANNEL, self.slot)

    def holds(self, job: Job) -> bool:
        return self.held_for(job) > self._lease_seconds * (1 - SELF_FENCE_FRACTION)

    def held_for(self, job: Job) -> float:
        lease = self._held.get(job.id)
        if lease is None or lease.job is not job:
            return 0.0
        return max(0.0, lease.granted_at + self._lease_seconds - _lease_clock())

    def _stop_renewing(self, job: Job) -> None:
        lease = self._held.get(job.id)
        if lease is not None and lease.job is job:
            del self._held[job.id]

    # -- cancels asked for in another process ---------------------------------------------------

    async def request_cancel(self, job_id: int, by_user: int) -> bool:
        sql = (
            "UPDATE jobs SET cancel_requested_by = :by, cancel_answer = NULL "
            "WHERE id = :id AND delivered_at IS NULL RETURNING owner_run"
        )
        rows = await self._fetch(sql, {"id": job_id, "by": by_user})
        if not rows:
            return False
        owner_run = rows[0]["owner_run"]
        if owner_run is not None:  # else nobody drives it now: its next claimant reads the request
            await self._notify(f"kontext_run_{owner_run}", str(job_id))
        return True

    async def answer_cancel(self, job_id: int, by_user: int, answer: str) -> None:
        sql = (
            "UPDATE jobs SET cancel_answer = :answer "
            "WHERE id = :id AND cancel_requested_by = :by AND cancel_answer IS NULL"
        )
        if await self._execute(sql, {"id": job_id, "by": by_user, "answer": answer}):
            await self._notify(ANSWER_CHANNEL, str(job_id))

    async def cancel_answer(self, job_id: int, *, wait: float) -> str | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        answered = asyncio.Event()
        self._answer_waiters[job_id].add(answered)
        try:
            while True:
                answered.clear()
                rows = await self._fetch("SELECT cancel_answer, delivered_at FROM jobs WHERE id = :id", {"id": job_id})
                answer = rows[0]["cancel_answer"] if rows else None
                if answer is None and rows and rows[0]["delivered_at"] is not None:
                    return CANCEL_TOO_LATE
                remaining = deadline - loop.time()
                if answer is not None or remaining <= 0:
                    return str(answer) if answer is not None else None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, ANSWER_POLL_SECONDS)):
                        await answered.wait()
        finally:
            waiters = self._answer_waiters[job_id]
            waiters.discard(answered)
            if not waiters:
                del self._answer_waiters[job_id]
