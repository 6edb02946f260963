"""Opening a SQL database for the store: URLs, drivers, engine settings, and what is there.

Promises:

* Only SQLite (the standard ``sqlite3`` driver) and PostgreSQL through psycopg 3 are
  accepted; any other URL, a URL whose driver is not installed, or an in-memory SQLite
  database is a ``StoreError`` that says what to do, raised before anything is connected.
* ``inspect_database`` reads, never writes: it is what lets ``SqlStore`` refuse an empty
  database, someone else's database, or one at a schema newer than this code, with nothing
  written.  (This is also why WAL mode is switched on by the migrations and by an open that
  passed the checks, never by the connection hook: ``PRAGMA journal_mode=WAL`` writes.)

Engine settings per durability mode (``connection hook`` below, one per new DBAPI connection):

* SQLite: the driver's implicit transactions are turned off (``isolation_level=None``) and
  every write transaction is an explicit ``BEGIN IMMEDIATE``: the write lock is taken up
  front, so a transaction never fails half-way on a lock upgrade (which ``busy_timeout``
  cannot wait out in WAL mode).  ``busy_timeout`` makes writers queue.
  ``synchronous=FULL`` for ``sync`` (the WAL is fsynced at every commit), ``NORMAL`` for
  ``batch`` and ``none`` (not OFF: with OFF a power loss during a checkpoint can corrupt the
  database, not just lose the last commits, and OFF saves little once checkpoints run in the
  background).  In WAL mode NORMAL means: a commit is written to the
  WAL (so it survives a crash of the *process* at once) but fsynced only by the next
  checkpoint, so power loss can take back the commits since the last checkpoint: group
  commit, which is what ``batch`` means here.  Checkpoints do not run inside commits
  (``wal_autocheckpoint=0``: SQLite would otherwise make every ~250th commit wait for two
  fsyncs, which costs a third of the commit rate); ``SqliteCheckpointer`` runs them in a
  background thread every ``CHECKPOINT_SECONDS`` or ``CHECKPOINT_COMMITS`` commits, so
  ``batch`` loses at most about that window on power loss or an OS crash: whole commits,
  the newest ones (WAL recovery keeps the longest valid prefix of frames).  A crash of the
  *process* loses nothing in any mode: ``COMMIT`` has written the WAL frames to the file
  (the OS page cache) before it returns.  The checkpointer also keeps the WAL from growing
  without bound under a steady stream of commits (see ``SqliteCheckpointer``).  (When the
  last connection to a database closes, SQLite checkpoints too.)
* PostgreSQL: ``synchronous_commit=off`` for ``batch`` and ``none`` - a commit returns before
  its WAL record is flushed, and the WAL writer flushes every ``wal_writer_delay`` (200 ms by
  default) for all sessions at once: group commit by the server, and a server crash can lose
  at most that window, never corrupt or reorder it.  ``on`` for ``sync``.
* ``NullPool``: the store keeps one connection per thread itself (``stores.sql``), so a pool
  would only add a layer.

Also here, the pieces of a connection's life the store runs itself: ``SqliteCheckpointer``
(WAL checkpoints off the commit path), ``DueWatcher`` (PostgreSQL LISTEN), and
``PgStatement`` (PostgreSQL: a hot statement as a named prepared statement through libpq,
skipping psycopg's cursor; named prepared statements, like psycopg's own after five
executions, need a session-pooling or direct connection, not a transaction-pooling proxy).
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.pool import NullPool

from .base import DURABILITIES, Durability, StoreError
from .sql_schema import NOTIFY_CHANNEL, REVISIONS, VERSION_TABLE, from_us

BUSY_TIMEOUT_MS = 30_000
"""How long a SQLite writer waits for the write lock before ``database is locked``."""

_EXTRAS = {"psycopg": "pip install 'wakepoint[postgres]'"}


def parse_url(url: str | URL) -> URL:
    """Parse and check a store URL; ``StoreError`` for anything the SQL store cannot use."""
    try:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        shown = show(parsed)
        parsed.port  # noqa: B018 - a port that is not a number raises here, not later
    except (ArgumentError, ValueError) as exc:
        # The text as given may hold a password: only its scheme is repeated.
        scheme = re.match(r"[A-Za-z0-9+.-]*", str(url))[0]  # type: ignore[index]
        raise StoreError(f"not a usable SQLAlchemy URL (scheme {scheme!r}): "
                         f"{type(exc).__name__}: {str(exc).split(chr(10))[0]}") from None
    try:
        driver = parsed.get_driver_name()
    except NoSuchModuleError:
        driver = ""  # a dialect SQLAlchemy does not know (postgres://, say): refused below
    if backend == "sqlite":
        if driver != "pysqlite":
            raise StoreError(f"{shown}: use the standard driver, sqlite:///PATH")
        if not parsed.database or parsed.database == ":memory:" or (
            parsed.query.get("mode") == "memory"
        ):
            raise StoreError(
                f"{shown}: an in-memory SQLite database lives in one connection; use a file "
                "(sqlite:///PATH) or the memory: store"
            )
    elif backend == "postgresql":
        if driver != "psycopg":
            raise StoreError(
                f"{shown}: wakepoint talks to PostgreSQL through psycopg 3: use a "
                "postgresql+psycopg://... URL (and pip install 'wakepoint[postgres]')"
            )
    else:
        raise StoreError(
            f"{shown}: the SQL store supports SQLite (sqlite:///PATH) and PostgreSQL "
            f"(postgresql+psycopg://...), not {backend}"
        )
    return parsed


def show(url: URL) -> str:
    """The URL for messages, password hidden."""
    return url.render_as_string(hide_password=True)


def sqlite_path(url: URL) -> Path | None:
    """The database file of a SQLite URL (None for other dialects)."""
    if url.get_backend_name() != "sqlite" or not url.database:
        return None
    database = url.database
    if database.startswith("file:"):  # a URI filename (?uri=true)
        database = database[5:].partition("?")[0]
    return Path(database)


def make_engine(url: URL, durability: Durability) -> Engine:
    """An engine for ``url`` with the settings of ``durability`` (see the module header)."""
    if durability not in DURABILITIES:
        raise StoreError(f"durability must be one of {DURABILITIES}, not {durability!r}")
    backend = url.get_backend_name()
    options: dict[str, Any] = {}
    if backend == "sqlite":
        # The store closes every thread's connection from the thread that calls close();
        # named parameters so that compiled statements take dicts on both dialects.
        options = {"connect_args": {"check_same_thread": False}, "paramstyle": "named"}
    else:
        # Text in UTF-8 whatever the database's encoding: ``PgStatement`` sends it so, and
        # every other statement must spell a run id, key or worker the same way.
        options = {"connect_args": {"client_encoding": "utf8"}}
    try:
        engine = create_engine(url, poolclass=NullPool, **options)
    except (ImportError, NoSuchModuleError) as exc:
        driver = url.get_driver_name()
        hint = _EXTRAS.get(driver, f"pip install {driver}")
        raise StoreError(
            f"{show(url)}: the {driver} driver is not installed ({exc}); {hint}"
        ) from None
    hook = _sqlite_hook(durability) if backend == "sqlite" else _postgres_hook(durability)
    event.listen(engine, "connect", hook)
    if backend == "sqlite":
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_hook(durability: Durability) -> Callable[[Any, Any], None]:
    synchronous = "FULL" if durability == "sync" else "NORMAL"

    def connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN IMMEDIATE / COMMIT ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute(f"PRAGMA synchronous = {synchronous}")
        cursor.execute("PRAGMA wal_autocheckpoint = 0")  # see SqliteCheckpointer
        cursor.close()

    return connect


CHECKPOINT_SECONDS = 0.5
CHECKPOINT_COMMITS = 500
WAL_RESTART_FRAMES = 4096
"""A WAL longer than this many frames (16 MiB at 4 KiB pages) gets a RESTART checkpoint."""
RESTART_WAIT_MS = 200
"""How long a RESTART checkpoint waits for the write lock and for readers (then retried)."""


class SqliteCheckpointer:
    """Runs SQLite's WAL checkpoints for one store in a daemon thread, off the commit path.

    ``note()`` after every commit; the thread wakes every ``CHECKPOINT_SECONDS`` (or at once
    after ``CHECKPOINT_COMMITS`` commits) and, if there were commits, runs a PASSIVE checkpoint
    on a connection of its own: it copies what it can without waiting for readers or
    writers, and fsyncs the WAL and the database file (synchronous=NORMAL's checkpoint).

    PASSIVE alone lets the WAL grow without bound under a steady stream of commits: SQLite
    starts writing the WAL from its beginning again only when a writer finds every frame
    copied back, and a busy writer always appends a frame while the copy runs (measured: 325
    MB of WAL after 20,000 commits, and commits slowing as the file grows).  So when the WAL
    passes ``WAL_RESTART_FRAMES``, the round is a RESTART checkpoint instead: it holds off
    new writers while it copies the few frames PASSIVE left (a short pause, bounded by
    ``RESTART_WAIT_MS`` of waiting) and makes the next writer start the WAL from the top;
    the file keeps its size and is overwritten in place.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._wake = threading.Event()
        self._stopping = False
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name="wakepoint-sqlite-checkpoint",
                                        daemon=True)
        self._thread.start()

    def note(self) -> None:
        """A commit happened (a racy count is fine: it only decides when to wake)."""
        self._pending += 1
        if self._pending >= CHECKPOINT_COMMITS:
            self._wake.set()

    def _run(self) -> None:
        proxy = self._engine.raw_connection()
        try:
            conn: Any = proxy.driver_connection
            conn.execute(f"PRAGMA busy_timeout = {RESTART_WAIT_MS}")
            mode = "PASSIVE"
            while not self._stopping:
                self._wake.wait(CHECKPOINT_SECONDS)
                self._wake.clear()
                if self._pending:
                    self._pending = 0
                    with suppress(Exception):  # busy or closing: the next round retries
                        # (busy, frames in the WAL, frames copied back)
                        _busy, frames, _copied = conn.execute(
                            f"PRAGMA wal_checkpoint({mode})").fetchone()
                        mode = "RESTART" if frames > WAL_RESTART_FRAMES else "PASSIVE"
                        if mode == "RESTART":
                            self._wake.set()  # at once, not a round later
        finally:
            with suppress(Exception):
                proxy.close()

    def stop(self) -> None:
        """End the thread (it finishes a checkpoint in progress first)."""
        self._stopping = True
        self._wake.set()
        self._thread.join()


class DueWatcher:
    """PostgreSQL: LISTENs for new wait deadlines on a connection of its own, in a daemon
    thread, and calls ``callback(deadline)`` for each (migration 0002's trigger NOTIFYs
    ``NOTIFY_CHANNEL`` with the deadline in microseconds when a commit sets one).

    The notification arrives when the committing transaction commits, from any process on
    the same database.  If the connection fails, the thread reconnects after
    ``RETRY_SECONDS`` (a worker's slow poll covers the gap); ``callback`` errors are the
    caller's and are not caught.  ``started(timeout)`` waits until LISTEN is in effect.
    """

    POLL_SECONDS = 0.25
    """How often the thread looks at its stop flag while no notification comes."""
    RETRY_SECONDS = 1.0

    def __init__(self, engine: Engine, callback: Callable[[datetime], None]) -> None:
        self._engine = engine
        self._callback = callback
        self._stopping = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wakepoint-pg-listen",
                                        daemon=True)
        self._thread.start()

    def started(self, timeout: float) -> bool:
        """Wait until the LISTEN is in effect; whether it is."""
        return self._listening.wait(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            proxy: Any = None
            try:
                proxy = self._engine.raw_connection()
                conn: Any = proxy.driver_connection
                conn.autocommit = True
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                self._listening.set()
                while not self._stopping.is_set():
                    for note in conn.notifies(timeout=self.POLL_SECONDS):
                        self._callback(from_us(int(note.payload)))
            except self._engine.dialect.loaded_dbapi.Error:
                self._listening.clear()
                self._stopping.wait(self.RETRY_SECONDS)
            finally:
                if proxy is not None:
                    with suppress(Exception):  # broken or closing: nothing to save
                        proxy.close()

    def stop(self) -> None:
        """End the thread (within ``POLL_SECONDS``) and close its connection."""
        self._stopping.set()
        self._thread.join()


_PARAM = re.compile(r"%\((\w+)\)s")


class PgStatement:
    """A statement in psycopg's ``%(name)s`` style, run as a named server-side prepared
    statement straight through libpq (``PGconn.exec_prepared``).

    Why: psycopg's ``cursor.execute`` costs the client about 75 us of CPU per statement
    (adapting each parameter, a Python-level wait loop), ``exec_prepared`` about 38 us
    (measured here with a four-parameter upsert), and a worker runs one statement per
    transition.  libpq releases the GIL while it waits, as psycopg does.  Parameters go
    as text (``str``, ``int``) or binary (``bytes``), with their types inferred by the
    server from the statement (every one is a column value or has a cast); results come
    in binary (``bytea`` as raw bytes; integers are read with ``int_value``).  Errors are
    psycopg's own exception classes (``psycopg.errors.error_from_result``), so callers
    handle them as they handle ``cursor.execute``'s.
    """

    __slots__ = ("name", "names", "sql")

    def __init__(self, name: str, sql: str) -> None:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        self.name = name.encode()
        self.sql = _PARAM.sub(number, sql).replace("%%", "%").encode()
        self.names = tuple(names)

    def run(self, conn: Any, prepared: set[bytes], params: Mapping[str, Any]) -> Any:
        """Execute on the psycopg connection ``conn`` (preparing it first when its name is
        not in ``prepared``, the set of names prepared on that connection); the
        ``PGresult``."""
        values: list[bytes | None] = []
        formats: list[int] = []
        for key in self.names:
            value = params[key]
            if value is None or isinstance(value, _BINARY):
                values.append(None if value is None else bytes(value))
                formats.append(1)
            else:  # str or int: their text form (UTF-8: the engine sets client_encoding)
                text = str(value)
                if "\x00" in text:
                    # libpq reads text parameters as C strings: the value would be cut short
                    # at the NUL and stored as another one.  psycopg's cursor refuses it too.
                    errors: Any = importlib.import_module("psycopg.errors")
                    raise errors.DataError(
                        f"{key}: PostgreSQL text cannot contain NUL (0x00) characters: "
                        f"{text!r}"
                    )
                values.append(text.encode())
                formats.append(0)
        # psycopg's own lock, as its cursors hold it: a close() from another thread waits
        # for the statement instead of finishing the connection under it.
        with conn.lock:
            pgconn = conn.pgconn
            if self.name not in prepared:
                self._prepare(pgconn)
                prepared.add(self.name)
            result = pgconn.exec_prepared(self.name, values, formats, 1)
            if result.status not in _SUCCESS and (
                result.error_field(_SQLSTATE) == _NO_STATEMENT
            ):
                # Someone ran DEALLOCATE (or DISCARD ALL) on this connection: prepare again.
                self._prepare(pgconn)
                result = pgconn.exec_prepared(self.name, values, formats, 1)
            return _ok(result, pgconn)

    def _prepare(self, pgconn: Any) -> None:
        result = pgconn.prepare(self.name, self.sql)
        if result.status not in _SUCCESS and result.error_field(_SQLSTATE) == _DUPLICATE:
            return  # the session has it already (a pooler's reused session): same text
        _ok(result, pgconn)


def int_value(raw: bytes) -> int:
    """An integer column of a binary ``PGresult`` (``int2``/``int4``/``int8``)."""
    return int.from_bytes(raw, "big", signed=True)


_SUCCESS = (1, 2)
"""libpq's ``PGRES_COMMAND_OK`` and ``PGRES_TUPLES_OK`` (``psycopg.pq.ExecStatus``)."""


_BINARY = (bytes, bytearray, memoryview)
"""Parameter types sent in binary (as they are); every other value goes as its text."""
_SQLSTATE = ord("C")
"""libpq's ``PG_DIAG_SQLSTATE`` (``psycopg.pq.DiagnosticField.SQLSTATE``)."""
_NO_STATEMENT = b"26000"
"""SQLSTATE ``invalid_sql_statement_name``: no prepared statement of that name."""
_DUPLICATE = b"42P05"
"""SQLSTATE ``duplicate_prepared_statement`` (names are digests of the SQL text: the same)."""

_CONNECTION_BAD = 1
"""libpq's ``CONNECTION_BAD`` (``psycopg.pq.ConnStatus.BAD``)."""


def _ok(result: Any, pgconn: Any) -> Any:
    if result.status not in _SUCCESS:
        # psycopg is an optional dependency (and has no stubs where mypy runs): by name.
        errors: Any = importlib.import_module("psycopg.errors")
        if pgconn.status == _CONNECTION_BAD:
            # A lost connection's result carries no SQLSTATE; psycopg's cursor raises
            # OperationalError then, and callers drop the connection on that class.
            raise errors.OperationalError(result.get_error_message())
        raise errors.error_from_result(result)
    return result


def _sqlite_begin(connection: Any) -> None:
    # SQLAlchemy Connections on SQLite (the migrations) get real, lock-first transactions
    # too, so that DDL is transactional (SQLAlchemy's documented pysqlite recipe).
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _postgres_hook(durability: Durability) -> Callable[[Any, Any], None]:
    setting = "on" if durability == "sync" else "off"

    def connect(dbapi_connection: Any, _record: Any) -> None:
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True
        dbapi_connection.execute(f"SET synchronous_commit TO {setting}")
        dbapi_connection.autocommit = autocommit

    return connect


# --- what is in the database ----------------------------------------------------------------


@dataclass(frozen=True)
class DatabaseState:
    """What ``inspect_database`` found: the tables of the current schema and our revision."""

    tables: frozenset[str]
    revision: str | None

    @property
    def empty(self) -> bool:
        """No table at all: a database the migrations may create the schema in."""
        return not self.tables

    @property
    def current(self) -> bool:
        """At the head revision of this code."""
        return self.revision == REVISIONS[-1]


def inspect_database(dbapi_connection: Any, backend: str) -> DatabaseState:
    """Read which tables exist and our schema revision, through a DBAPI connection in
    autocommit mode (no transaction is left open, nothing is written)."""
    cursor = dbapi_connection.cursor()
    try:
        if backend == "sqlite":
            cursor.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%'"
            )
        else:
            cursor.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema()"
            )
        tables = frozenset(str(row[0]) for row in cursor.fetchall())
        revision = None
        if VERSION_TABLE in tables:
            cursor.execute(f"SELECT version_num FROM {VERSION_TABLE}")
            rows = [str(row[0]) for row in cursor.fetchall()]
            revision = rows[0] if len(rows) == 1 else ",".join(sorted(rows)) or None
        return DatabaseState(tables=tables, revision=revision)
    finally:
        cursor.close()


def refuse_foreign(state: DatabaseState, shown: str) -> None:
    """``StoreError`` unless the database is empty or holds a wakepoint schema this code
    knows (at head or older)."""
    if state.revision is None and not state.empty:
        names = ", ".join(sorted(state.tables)[:8])
        more = "" if len(state.tables) <= 8 else f" and {len(state.tables) - 8} more"
        raise StoreError(
            f"{shown}: not a wakepoint database: it has tables ({names}{more}) but no "
            f"{VERSION_TABLE}; point the store at an empty database (or, on PostgreSQL, a "
            "schema of its own: ?options=-csearch_path%3Dwakepoint)"
        )
    if state.revision is not None and state.revision not in REVISIONS:
        raise StoreError(
            f"{shown}: the database schema is at revision {state.revision!r}, which this "
            f"version of wakepoint does not know (its newest is {REVISIONS[-1]!r}): the code "
            "is older than the database; upgrade wakepoint to open it"
        )


def require_current(state: DatabaseState, shown: str) -> None:
    """``StoreError`` (saying what to run) unless the database is at this code's head."""
    refuse_foreign(state, shown)
    if state.current:
        return
    how = f"run `wakepoint db upgrade {shown}` (or open the store with upgrade=True)"
    if state.revision is None:
        raise StoreError(f"{shown}: the database has no wakepoint tables yet; {how}")
    raise StoreError(
        f"{shown}: the database schema is at revision {state.revision!r}, this code needs "
        f"{REVISIONS[-1]!r}; {how}"
    )
