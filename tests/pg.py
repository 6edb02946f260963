"""A throw-away PostgreSQL server for the tests, from the Debian ``postgresql`` package.

``PgServer.start()`` runs ``initdb`` and ``pg_ctl`` from ``/usr/lib/postgresql/<newest>/bin``
(or ``$WAKEPOINT_PG_BIN``) on a data directory in a fresh temporary directory, listening on
a unix socket in that directory only (``listen_addresses=''``), with ``fsync`` on - the
durability the SQL store promises is the server's, so the tests keep it real.  Both tools
refuse to run as root, so when the tests run as root they run as the ``postgres`` user
(``runuser -u postgres --``) and the directory is handed to that user.  ``stop()`` is
``pg_ctl stop -m immediate``, then SIGKILL of the postmaster pid if that did not work.

``missing()`` says why no server can be started (no binaries, no ``postgres`` user); the
fixture in ``test_sql_store.py`` fails with that message when ``CI`` is set and skips
otherwise.  CI installs the package when ``initdb`` is missing.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from wakepoint.stores.spares import process_alive

PG_ROOT = Path("/usr/lib/postgresql")


def bin_dir() -> Path | None:
    """The directory holding ``initdb`` and ``pg_ctl`` (the newest installed version)."""
    override = os.environ.get("WAKEPOINT_PG_BIN")
    if override:
        return Path(override) if (Path(override) / "initdb").is_file() else None
    if not PG_ROOT.is_dir():
        return None
    found = [d / "bin" for d in PG_ROOT.iterdir() if (d / "bin" / "initdb").is_file()]
    if not found:
        return None
    return max(found, key=lambda p: _version(p.parent.name))


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def missing() -> str | None:
    """Why a server cannot be started here, or None."""
    if bin_dir() is None:
        return (
            f"PostgreSQL server binaries not found under {PG_ROOT}/*/bin (initdb, pg_ctl): "
            "apt-get install -y postgresql (or set WAKEPOINT_PG_BIN)"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run initdb as"
        if shutil.which("runuser") is None:
            return "running as root and runuser (util-linux) is missing"
    return None


class PgServer:
    """One PostgreSQL server in a temporary directory; ``url(db)`` names a database on it."""

    def __init__(self) -> None:
        found = bin_dir()
        if found is None:
            raise RuntimeError(missing() or "no PostgreSQL binaries")
        self.bin = found
        self.root = Path(tempfile.mkdtemp(prefix="wakepoint-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log = self.root / "server.log"
        self.pid: int | None = None
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)

    def start(self) -> PgServer:
        """initdb, start, wait until it accepts connections, create database ``wp``."""
        self.socket_dir.mkdir()
        if self._as_postgres:
            pg = pwd.getpwnam("postgres")
            for path in (self.root, self.socket_dir):
                os.chown(path, pg.pw_uid, pg.pw_gid)
        done = self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                         "-E", "UTF8", "--no-sync")
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{done.stdout}\n{done.stderr}")
        options = (f"-k {self.socket_dir} -c listen_addresses='' -c fsync=on "
                   "-c max_connections=200 -c shared_buffers=128MB")
        done = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options,
                         "-w", "-t", "60", "start")
        if done.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed:\n{done.stdout}\n{done.stderr}\n{log}")
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        self.create_database("wp")
        return self

    def url(self, database: str = "wp") -> str:
        """The SQLAlchemy URL of ``database`` on this server (unix socket, no password)."""
        return f"postgresql+psycopg://postgres@/{database}?host={self.socket_dir}"

    def dsn(self, database: str = "wp") -> str:
        """A libpq connection string for psycopg itself."""
        return f"host={self.socket_dir} user=postgres dbname={database}"

    def create_database(self, name: str) -> str:
        """Create an empty database; returns its URL."""
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever is still connected."""
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server at once (no shutdown checkpoint) and delete its directory."""
        try:
            if self.pid is not None:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30",
                          "stop")
                deadline = time.monotonic() + 10
                while process_alive(self.pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if process_alive(self.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, signal.SIGKILL)
                self.pid = None
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

