"""A real PostgreSQL server for the tests: a throwaway cluster in a temporary folder, reached
through a Unix socket in that folder (no TCP port, so runs side by side never collide).

Debian's `postgresql` package provides the binaries (`.ci/run` installs it when missing). The
server refuses to run as root, so under root it runs as the package's `postgres` user. Durability
is switched off: a test cluster never outlives its run.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import asyncpg


class PostgresMissing(Exception):
    """No PostgreSQL server binaries on this machine."""


def server_binaries() -> Path:
    """The folder with initdb and pg_ctl: on PATH, else Debian's versioned folder (newest)."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    if folders and (Path(folders[-1]) / "initdb").exists():
        return Path(folders[-1])
    raise PostgresMissing("PostgreSQL is not installed (apt-get install postgresql)")


class PostgresServer:
    def __init__(self) -> None:
        self.bin = server_binaries()
        self.root = Path(tempfile.mkdtemp(prefix="kontext-pg-"))
        self.data = self.root / "data"
        self._user: str | None = None
        self._names = itertools.count(1)
        self.started_in: float | None = None

    def _run(self, *command: str) -> None:
        subprocess.run(
            [str(self.bin / command[0]), *command[1:]],
            check=True,
            capture_output=True,
            user=self._user,
            group=self._user,
            cwd=self.root,
        )

    def start(self) -> None:
        begun = time.monotonic()
        if os.geteuid() == 0:
            self._user = "postgres"  # initdb: "cannot be run as root"
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        options = (
            f"-c listen_addresses='' -k {self.root} -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "server.log"), "-w", "start")
        self.started_in = time.monotonic() - begun

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """A DATABASE_URL for one of the server's databases (Unix socket in `root`)."""
        return f"postgresql://postgres@/{database}?host={self.root}"

    async def new_database(self) -> str:
        """A fresh, empty database; returns its DATABASE_URL."""
        name = f"kontext_{os.getpid()}_{next(self._names)}"
        connection = await asyncpg.connect(self.url())
        try:
            await connection.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        finally:
            await connection.close()
        return self.url(name)
