"""The SQL store: SQLite and PostgreSQL from one code path (SQLAlchemy 2 Core, no ORM).

Promises (the contract of ``stores.base``, checked by ``stores.conformance``):

* ``commit`` is one transaction: ``UPDATE wp_runs ... WHERE run_id = :id AND seq =
  :expected`` (the optimistic check: zero rows means another writer moved the run, or there
  is no run), then the records.  All or nothing; the loser of a race gets ``ConflictError``
  with the seq it lost to.  ``create`` is ``INSERT ... ON CONFLICT DO NOTHING``.
* PostgreSQL writes are ONE statement each, run in autocommit (the statement is the
  transaction): ``WITH run_row AS (<the run's UPDATE or INSERT> RETURNING run_id), bump AS
  (<the counter>), added AS (<the records, from VALUES>) SELECT ...``.  One round trip
  instead of five (BEGIN, run, counter, records, COMMIT), and - what matters for several
  workers - the counter row below is locked only while the server executes the statement,
  not across the client's round trips: with two worker processes the counter lock was the
  point where they queued.  ``claim``, ``release`` and ``renew`` are single statements too.
  SQLite keeps explicit ``BEGIN IMMEDIATE`` transactions (a statement that reads, then
  writes, could not otherwise wait for the write lock).
* Every record gets a store-wide *global position*, dense from 1 and in commit order.
  SQLite: the position is the rowid, which SQLite sets to ``max + 1``; writers hold the
  database's one write lock from ``BEGIN IMMEDIATE`` to ``COMMIT``, so positions follow
  commit order and a rollback gives its numbers back.  PostgreSQL: a sequence would leave
  gaps on rollback and hand out numbers out of commit order, so the transaction bumps the
  counter row of ``wp_meta`` (``UPDATE ... RETURNING``, one round trip) just before it
  inserts its records; the row lock is held to the commit, so positions follow commit
  order, a rollback returns its numbers, and a reader never sees position n+1 without n.
  The cost - committers serialize on that row between the bump and the commit - is the
  point: checkpoints sign a prefix of one global sequence.  The bump comes after the run's
  row is locked, so locks are always taken run first, counter second: no deadlocks.
* Durability: see ``stores.sql_engine`` (SQLite ``synchronous`` per mode; PostgreSQL
  ``synchronous_commit``).  ``flush`` makes every returned commit durable in any mode.
* ``claim`` is one statement on both dialects: ``WITH picked AS (SELECT run_id ... LIMIT n
  FOR UPDATE SKIP LOCKED) UPDATE wp_runs SET lease_... WHERE run_id IN picked RETURNING
  state``.  PostgreSQL skips rows another claimer has locked, and picks in ordered index
  scans that stop at ``limit`` (overdue waits by deadline, then RUNNING runs oldest first,
  the claimer's own last; see ``_Statements._pg_claimable``); SQLite (which renders no
  ``FOR UPDATE``) runs one unordered scan inside ``BEGIN IMMEDIATE``, i.e. alone.  Which of
  more than ``limit`` candidates SQLite takes is not specified; the result is sorted oldest
  first.
  The commit that finishes a run clears its lease in the same ``UPDATE``
  (``releases_finished``): a worker that drove a run to its end skips ``release``.
* Opening checks the database before writing anything: an empty database, someone else's,
  or one at a schema newer than the code is a ``StoreError`` that says what to do
  (``upgrade=True`` runs the migrations for the first and for an older schema).

Speed.  SQLAlchemy builds every statement (Core) and compiles it once per store for the
dialect; the hot path then runs the compiled SQL on the DBAPI connection of the calling
thread, kept open for the store's life (one per thread; SQLite's ``sqlite3`` and psycopg both
cache prepared statements per connection).  Going through ``Connection.execute`` costs tens
of microseconds per statement, more than SQLite needs for the whole commit.  On PostgreSQL
the statements a worker runs per transition (commit, load, claim, release) skip even
psycopg's cursor: ``sql_engine.PgStatement`` runs them as named prepared statements
straight through libpq, with binary results (about half the client CPU per statement).  Records are
inserted with ``executemany``.  A commit that leaves the indexed columns as they were (most
commits: a step from node to node) updates only ``state``, ``seq`` and ``updated_at``, so
SQLite does not rewrite four index entries; the store knows the columns are unchanged when
*it* wrote the row at ``expected_seq`` (only one commit can ever write a given seq of a run).
``hold`` needs nothing: the seq check is the lock.  On SQLite, ``load`` answers from the
states this thread's connection committed or read while ``PRAGMA data_version`` proves that
no other connection has written since (see ``_states``); PostgreSQL has no such cheap proof,
so it always reads.  The commit path itself issues no read.  Costs measured, and what bounds
them, are in ``benchmarks/bench_sql.py``.

Also here: ``take`` and ``renew`` (leases, one statement each), ``checkpoint`` /
``checkpoints`` (signed checkpoints of the global order, with a Merkle frontier kept in the
store so each checkpoint hashes only the records since the last), and ``watch_due``
(PostgreSQL LISTEN for new deadlines, see ``sql_engine.DueWatcher``).
"""

from __future__ import annotations

import builtins
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import msgspec
from sqlalchemy import bindparam, func, literal_column, null, select, union_all, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Engine
from sqlalchemy.sql import ClauseElement, ColumnElement
from sqlalchemy.sql.elements import ColumnClause

from ..kernel.codec import decode_state, encode_state
from ..kernel.errors import ConflictError, CorruptStore, RunExists, RunNotFound
from ..kernel.types import RunState, Status
from ..ledger.keys import Signer
from ..ledger.logindex import sign_frontier
from ..ledger.merkle import Frontier
from ..ledger.records import Record, Signature
from .base import Durability, StoreError, check_append, no_hold
from .sql_engine import (
    DueWatcher,
    PgStatement,
    SqliteCheckpointer,
    inspect_database,
    int_value,
    make_engine,
    parse_url,
    require_current,
    show,
    sqlite_path,
)
from .sql_schema import WP_CHECKPOINTS, WP_META, WP_RECORDS, WP_RUNS, from_us, to_us

# Constants are rendered into the SQL (not bound) so that SQLite and PostgreSQL can match the
# partial index ``status = 'waiting'`` when planning.
_WAITING: ColumnClause[str] = literal_column(f"'{Status.WAITING.value}'")
_RUNNING: ColumnClause[str] = literal_column(f"'{Status.RUNNING.value}'")
_ONE: ColumnClause[int] = literal_column("1")
_ZERO: ColumnClause[int] = literal_column("0")  # OFFSET 0: SQLite's compiler would bind one

_WRITTEN_MAX = 10_000
"""Runs whose last written indexed columns the store remembers (see "Speed" above)."""

_cosigs_encoder = msgspec.json.Encoder()
_cosigs_decoder = msgspec.json.Decoder(builtins.list[Signature])

WATCH_START_SECONDS = 5.0
"""How long ``watch_due`` waits for its LISTEN to be in effect before returning anyway."""

_CACHED_MAX = 10_000
"""Run states one thread keeps for ``load`` (see ``SqlStore._states``)."""

_fork_generation = 0
_inherited: list[Any] = []
"""Connections a forked child inherited: kept referenced, never used or closed by it."""


def _after_fork() -> None:
    # A child must not use (or close) the connections it inherited: they are the parent's.
    global _fork_generation  # noqa: PLW0603 - one counter for the whole process, on purpose
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork)


def _pg_records(n: int) -> str:
    """The tail of PostgreSQL's one-statement writes, for ``n`` records.

    ``bump`` reads ``run_row`` (an uncorrelated EXISTS, evaluated before the counter row is
    locked), so the run's row is locked first and the counter second, as in the transaction
    form; when the run's write matched no row (a conflict, a taken id) nothing is bumped or
    inserted.  Records come as ``VALUES`` rows of scalar parameters (``s1``, ``i1``, ...),
    numbered ``k`` from the bumped counter: one statement text per record count, each
    prepared once by psycopg.  (Arrays through ``unnest`` were the first form: dumping six
    lists per commit cost the client more than the statement cost the server.)
    """
    if n == 0:
        return "\nSELECT (SELECT count(*) FROM run_row), 0"
    rows = ",\n        ".join(
        f"({k}, %(s{k})s::bigint, %(i{k})s::text, %(b{k})s::bytea, %(g{k})s::bytea, "
        f"%(h{k})s::text, %(c{k})s::bytea)"
        for k in range(1, n + 1)
    )
    return f"""
, bump AS (
    UPDATE {WP_META.name} SET last_position = last_position + {n}
    WHERE id = 1 AND EXISTS (SELECT 1 FROM run_row)
    RETURNING last_position
), added AS (
    INSERT INTO {WP_RECORDS.name}
        (position, run_id, seq, key_id, body, sig, record_hash, cosigs)
    SELECT bump.last_position - {n} + t.k, %(b_run_id)s, t.seq, t.key_id, t.body, t.sig,
           t.hash, t.cosigs
    FROM bump, (VALUES
        {rows}
    ) AS t(k, seq, key_id, body, sig, hash, cosigs)
    RETURNING 1
)
SELECT (SELECT count(*) FROM run_row), (SELECT count(*) FROM added)
"""


class _Statements:
    """Every statement of the store, compiled once for one dialect.

    Each is a SQL string with named parameters (``:name`` on SQLite, ``%(name)s`` on
    psycopg), run with a dict of ``b_``-prefixed values.
    """

    def __init__(self, engine: Engine) -> None:
        self._dialect = engine.dialect
        r, rec = WP_RUNS.c, WP_RECORDS.c
        b = bindparam
        insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
        self.load = self._sql(select(r.state).where(r.run_id == b("b_run_id")))
        self.seq = self._sql(select(r.seq).where(r.run_id == b("b_run_id")))
        create = (
            insert(WP_RUNS)
            .values(
                run_id=b("b_run_id"), state=b("b_state"), status=b("b_status"),
                workflow=b("b_workflow"), logic_id=b("b_logic_id"), seq=b("b_seq"),
                wait_kind=b("b_wait_kind"), wait_key=b("b_wait_key"), due=b("b_due"),
                parent=b("b_parent"), created_at=b("b_created_at"),
                updated_at=b("b_updated_at"),
            )
            .on_conflict_do_nothing(index_elements=[r.run_id])
        )
        full = (
            update(WP_RUNS)
            .where(r.run_id == b("b_run_id"), r.seq == b("b_expected"))
            .values(
                state=b("b_state"), status=b("b_status"), logic_id=b("b_logic_id"),
                seq=b("b_seq"), wait_kind=b("b_wait_kind"), wait_key=b("b_wait_key"),
                due=b("b_due"), updated_at=b("b_updated_at"),
            )
        )
        state_only = (
            update(WP_RUNS)
            .where(r.run_id == b("b_run_id"), r.seq == b("b_expected"))
            .values(state=b("b_state"), seq=b("b_seq"), updated_at=b("b_updated_at"))
        )
        # A commit that finishes the run also ends its lease (see ``releases_finished``).
        finish = full.values(lease_owner=null(), lease_expires=null())
        self.create, self.update, self.update_state, self.finish = map(
            self._sql, (create, full, state_only, finish))
        self.heads = {"update": self.update, "state": self.update_state, "finish": self.finish}
        """SQLite: a commit's write of the run's row, by kind (see ``SqlStore.commit``)."""
        # PostgreSQL: each write is ONE statement (see "PostgreSQL writes" in the header):
        # the run's write, to which ``pg_write`` appends the records' part.
        self._pg_heads = {
            name: self._sql(stmt.returning(r.run_id))
            for name, stmt in (("create", create), ("update", full), ("state", state_only),
                               ("finish", finish))
        }
        self._pg_writes: dict[tuple[str, int], str] = {}
        # SQLite's record insert (PostgreSQL's is inside the statements above).  NULL into
        # SQLite's INTEGER PRIMARY KEY is "the next rowid", the global position.
        record: dict[str, ColumnElement[Any]] = {
            "position": null(), "run_id": b("b_run_id"), "seq": b("b_seq"),
            "key_id": b("b_key_id"), "body": b("b_body"), "sig": b("b_sig"),
            "record_hash": b("b_hash"), "cosigs": b("b_cosigs"),
        }
        # ``inline``: no ``RETURNING position`` (SQLAlchemy adds one for a NULL primary key),
        # which costs SQLite a third more per insert and which nobody reads.
        self.append = self._sql(WP_RECORDS.insert().inline().values(**record))
        self.ledger = self._sql(
            select(rec.seq, rec.key_id, rec.body, rec.sig, rec.record_hash, rec.cosigs)
            .where(rec.run_id == b("b_run_id"))
            .order_by(rec.seq)
        )
        self.exists = self._sql(select(_ONE).where(r.run_id == b("b_run_id")))
        self.find_waiting = self._sql(
            select(r.state)
            .where(r.status == _WAITING, r.wait_key == b("b_key"))
            .order_by(r.run_id)
        )
        self.renew = self._sql(
            update(WP_RUNS)
            .where(r.run_id == b("b_run_id"), r.lease_owner == b("b_worker"))
            .values(lease_expires=b("b_expires"))
        )
        self.take = self._sql(
            update(WP_RUNS)
            .where(
                r.run_id == b("b_run_id"),
                r.lease_owner.is_(None) | (r.lease_expires <= b("b_now"))
                | (r.lease_owner == b("b_worker")),
            )
            .values(lease_owner=b("b_worker"), lease_expires=b("b_expires"))
        )
        self.next_deadline = self._sql(
            select(r.due)
            .where(r.due > b("b_after"), r.status == _WAITING)
            .order_by(r.due)
            .limit(_ONE)
            .offset(_ZERO)
        )
        self.hashes_after = self._sql(
            select(rec.position, rec.record_hash)
            .where(rec.position > b("b_size"))
            .order_by(rec.position)
        )
        self.store_checkpoint = self._sql(
            insert(WP_CHECKPOINTS)
            .values(size=b("b_size"), checkpoint=b("b_checkpoint"),
                    created_at=b("b_created_at"))
            .on_conflict_do_nothing(index_elements=[WP_CHECKPOINTS.c.size])
        )
        self.checkpoint_at = self._sql(
            select(WP_CHECKPOINTS.c.checkpoint).where(WP_CHECKPOINTS.c.size == b("b_size"))
        )
        self.checkpoints = self._sql(
            select(WP_CHECKPOINTS.c.checkpoint).order_by(WP_CHECKPOINTS.c.size)
        )
        self.release = self._sql(
            update(WP_RUNS)
            .where(r.run_id == b("b_run_id"), r.lease_owner == b("b_worker"))
            .values(lease_owner=null(), lease_expires=null())
        )
        # No ORDER BY: it would make SQLite walk an index in created_at order through every
        # run when nothing is claimable (the common case); unordered, both dialects look up
        # the two kinds of candidate through their own indexes.
        picked = (
            select(r.run_id)
            .where(
                (r.status == _RUNNING) | ((r.status == _WAITING) & (r.due <= b("b_now"))),
                r.lease_owner.is_(None) | (r.lease_expires <= b("b_now"))
                | (r.lease_owner == b("b_worker")),
            )
            .limit(b("b_limit"))
            .offset(_ZERO)
            .with_for_update(skip_locked=True)
            .cte("picked")
            .prefix_with("MATERIALIZED", dialect="postgresql")
        )
        if engine.dialect.name == "postgresql":
            picked = self._pg_claimable(b)
        self.claim = self._sql(
            update(WP_RUNS)
            .where(r.run_id.in_(select(picked.c.run_id)))
            .values(lease_owner=b("b_worker"), lease_expires=b("b_expires"))
            .returning(r.state)
        )
        self.last_position = self._sql(select(func.coalesce(func.max(rec.position), _ZERO)))
        self._lists: dict[tuple[bool, ...], str] = {}
        self._sqlite = engine.dialect.name == "sqlite"

    def _sql(self, statement: ClauseElement) -> str:
        return str(statement.compile(dialect=self._dialect))

    @staticmethod
    def _pg_claimable(b: Callable[..., Any]) -> Any:
        """PostgreSQL's claim candidates: overdue waits by deadline, then RUNNING runs no one
        holds oldest first, then RUNNING runs the claimer holds itself; each kind by an
        ordered scan of an index that stops once ``limit`` rows are found (a kind whose
        share of the limit is 0 is not scanned at all).

        The single ``status = 'running' OR (... due <= now)`` scan that SQLite uses was
        planned by PostgreSQL as a sequential scan (or a bitmap of the wait-key index)
        reading every run, finished ones included, on every claim: with 1,000 runs being
        driven, 0.16 ms per claim and 46-70 buffers, against about 10 here.  Overdue waits
        come first because their lateness is what a user sees; the claimer's own runs come
        last because a worker claims for idle threads and skips the runs it is driving
        (oldest first, they would otherwise fill the limit and leave the threads idle)."""
        r = WP_RUNS.c
        unheld = r.lease_owner.is_(None) | (r.lease_expires <= b("b_now"))
        due = (
            select(r.run_id)
            .where(r.status == _WAITING, r.due <= b("b_now"),
                   unheld | (r.lease_owner == b("b_worker")))
            .order_by(r.due)
            .limit(b("b_limit"))
            .offset(_ZERO)
            .with_for_update(skip_locked=True)
            .cte("due")
            .prefix_with("MATERIALIZED")
        )

        def running(name: str, lease: Any, *before: Any) -> Any:
            left = b("b_limit")
            for cte in before:
                left = left - select(func.count()).select_from(cte).scalar_subquery()
            return (
                select(r.run_id)
                .where(r.status == _RUNNING, lease)
                .order_by(r.status, r.created_at, r.run_id)  # the index's order
                .limit(left)
                .offset(_ZERO)
                .with_for_update(skip_locked=True)
                .cte(name)
                .prefix_with("MATERIALIZED")
            )

        free = running("free", unheld, due)
        own = running("own", (r.lease_owner == b("b_worker")) & (r.lease_expires > b("b_now")),
                      due, free)
        return union_all(select(due.c.run_id), select(free.c.run_id),
                         select(own.c.run_id)).cte("picked")

    def pg_write(self, head: str, records: int) -> str:
        """PostgreSQL: the run's write ``head`` (``create``, ``update`` or ``state``) and
        ``records`` records as one statement, whose row is (runs written, records written)."""
        key = (head, records)
        sql = self._pg_writes.get(key)
        if sql is None:
            sql = f"WITH run_row AS ({self._pg_heads[head]}){_pg_records(records)}"
            self._pg_writes[key] = sql
        return sql

    def listing(
        self, status: bool, workflow: bool, wait_kind: bool, due: bool, parent: bool,
        limit: bool,
    ) -> str:
        """The ``list`` query for one combination of filters (compiled on first use)."""
        key = (status, workflow, wait_kind, due, parent, limit)
        sql = self._lists.get(key)
        if sql is None:
            r = WP_RUNS.c
            first: Any = r.created_at
            if due and self._sqlite:
                # SQLite cannot tell how selective ``due <= ?`` is and would rather walk the
                # (created_at, run_id) index through every run to skip a sort; ``+`` makes
                # the order an expression, so it uses the due index and sorts what it finds.
                first = literal_column(f"+{WP_RUNS.name}.created_at")
            query = select(r.state).order_by(first, r.run_id)
            if status:
                query = query.where(r.status == bindparam("b_status"))
            if workflow:
                query = query.where(r.workflow == bindparam("b_workflow"))
            if wait_kind:
                query = query.where(r.wait_kind == bindparam("b_wait_kind"))
            if due:
                query = query.where(r.due <= bindparam("b_due"))
            if parent:
                query = query.where(r.parent == bindparam("b_parent"))
            if limit:
                query = query.limit(bindparam("b_limit")).offset(_ZERO)
            sql = self._lists[key] = self._sql(query)
        return sql


_Indexed = tuple[str, str, str | None, str | None, int | None]


_STATUS = {status: status.value for status in Status}
"""``Status.value`` by dict: an enum's ``value`` is a descriptor call, on every commit."""


def _indexed(state: RunState) -> _Indexed:
    """The columns of ``wp_runs`` a commit may change besides ``state`` and ``seq``."""
    wait = state.wait
    if wait is None:
        return (_STATUS[state.status], state.version, None, None, None)
    due = None if wait.deadline is None else to_us(wait.deadline)
    return (_STATUS[state.status], state.version, wait.kind, wait.key, due)


def _columns(state: RunState, indexed: _Indexed) -> dict[str, Any]:
    """The parameters of a commit: the state's bytes and its indexed copies."""
    status, logic_id, kind, key, due = indexed
    return {
        "b_state": encode_state(state), "b_status": status, "b_logic_id": logic_id,
        "b_seq": state.seq, "b_wait_kind": kind, "b_wait_key": key, "b_due": due,
        "b_updated_at": to_us(state.updated_at),
    }


class SqlStore:
    """A store in a SQL database named by a SQLAlchemy URL (SQLite file or PostgreSQL).

    ``durability``: ``sync``, ``batch`` (default) or ``none`` (see ``stores.sql_engine``).
    ``upgrade``: create or upgrade the schema on open (as ``wakepoint db upgrade URL`` does);
    without it an empty or older database is a ``StoreError`` saying to run that command.
    The store may be shared by the threads of one process (each uses its own connection);
    any number of processes may open the same database.
    """

    releases_finished = True
    """A commit that finishes a run (completed, failed, cancelled) also ends any lease on it,
    in the same statement: a worker need not ``release`` a run it drove to its end (one
    statement less per run)."""

    def __init__(
        self, url: str | URL, *, durability: Durability = "batch", upgrade: bool = False
    ) -> None:
        self.url = parse_url(url)
        self.durability: Durability = durability
        self._shown = show(self.url)
        self._backend = self.url.get_backend_name()
        self._begin_sql = "BEGIN IMMEDIATE" if self._backend == "sqlite" else "BEGIN"
        path = sqlite_path(self.url)
        if path is not None and not upgrade and not path.exists():
            raise StoreError(
                f"{self._shown}: there is no database file at {path}; create it with "
                f"`wakepoint db upgrade {self._shown}` (or open the store with upgrade=True)"
            )
        self._engine = make_engine(self.url, durability)
        self._local = threading.local()
        self._lock = threading.Lock()
        # Every thread's connection, with its thread: a thread that ended leaves its
        # connection here until the next thread opens one, which closes it (a server that
        # starts a thread per request would otherwise hold one connection per request).
        self._connections: list[tuple[threading.Thread, Any]] = []
        self._generation = _fork_generation
        self._closed = False
        self._written: dict[str, tuple[int, _Indexed]] = {}
        self._checkpointer: SqliteCheckpointer | None = None
        self._dbapi: Any = self._engine.dialect.loaded_dbapi
        self._cache_states = self._backend == "sqlite"
        self._pg = self._backend == "postgresql"
        self._pg_statements: dict[str, PgStatement] = {}
        self._frontier = Frontier()
        self._watchers: builtins.list[DueWatcher] = []
        self._frontier_lock = threading.Lock()
        try:
            self.log_id = self._open(upgrade)
            self._sql = _Statements(self._engine)
        except BaseException:
            self._close_connections()
            self._engine.dispose()
            raise

    def _open(self, upgrade: bool) -> str:
        if upgrade:
            from ..migrations import upgrade as run_upgrade

            run_upgrade(self._engine)
        conn = self._conn()
        require_current(inspect_database(conn, self._backend), self._shown)
        cursor = conn.cursor()
        try:
            if self._backend == "sqlite":
                cursor.execute("PRAGMA journal_mode")
                if str(cursor.fetchone()[0]).lower() != "wal":
                    cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute(f"SELECT log_id FROM {WP_META.name} WHERE id = 1")
            row = cursor.fetchone()
        finally:
            cursor.close()
        if row is None:
            raise CorruptStore(f"{self._shown} {WP_META.name}", None,
                               "the table has no row: the database is damaged")
        return str(row[0])

    def __repr__(self) -> str:
        return f"SqlStore({self._shown!r}, durability={self.durability!r})"

    # --- connections ---------------------------------------------------------------------------

    def _conn(self) -> Any:
        """This thread's DBAPI connection (in autocommit mode; transactions are explicit)."""
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is not None and self._generation == _fork_generation:
            return conn
        if self._closed:
            raise StoreError(f"{self!r} is closed")
        if self._generation != _fork_generation:  # forked: forget the parent's connections
            self._generation = _fork_generation
            self._local = local = threading.local()
            _inherited.extend(proxy for _, proxy in self._connections)
            self._connections = []
            self._checkpointer = None  # its thread did not survive the fork
        proxy = self._engine.raw_connection()
        conn = proxy.driver_connection
        if self._backend == "postgresql":
            conn.autocommit = True  # type: ignore[union-attr]
        local.prepared = set()  # names of the PgStatements prepared on this connection
        local.conn = conn
        with self._lock:
            ended = [proxy for thread, proxy in self._connections if not thread.is_alive()]
            self._connections = [(thread, proxy) for thread, proxy in self._connections
                                 if thread.is_alive()]
            self._connections.append((threading.current_thread(), proxy))
        for stale in ended:
            with suppress(Exception):  # closed from another thread, as close() does
                stale.close()
        return conn

    def _discard(self) -> None:
        """Drop this thread's connection after a driver error; the next call reconnects."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            return
        self._local.conn = self._local.cursor = None
        self._local.states = None  # its version numbers belonged to that connection
        with suppress(Exception):  # it is broken already; we only free it
            conn.close()

    def _cursor(self) -> Any:
        """This thread's cursor (one per connection, reused: every statement is read out
        with ``fetchall``/``fetchone`` before the next)."""
        cursor = getattr(self._local, "cursor", None)
        if cursor is None or self._generation != _fork_generation:
            cursor = self._local.cursor = self._conn().cursor()
        return cursor

    def _begin(self) -> Any:
        """Start a write transaction (SQLite: take the write lock now); returns the cursor."""
        cursor = self._cursor()
        try:
            cursor.execute(self._begin_sql)
        except self._dbapi.Error:
            self._discard()
            raise
        return cursor

    def _end(self, cursor: Any) -> None:
        try:
            cursor.execute("COMMIT")
        except self._dbapi.Error:
            # The outcome is unknown (the connection may have died mid-commit); a retry
            # reloads and finds out through the seq check.
            self._discard()
            raise

    def _abort(self, cursor: Any, exc: BaseException) -> None:
        try:
            cursor.execute("ROLLBACK")
        except Exception:
            self._discard()
        else:
            if isinstance(exc, self._dbapi.OperationalError | self._dbapi.InterfaceError):
                self._discard()

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        """A write transaction on this thread's connection; yields its cursor."""
        cursor = self._begin()
        try:
            yield cursor
        except BaseException as exc:
            self._abort(cursor, exc)
            raise
        self._end(cursor)

    def _query(
        self, sql: str, params: Mapping[str, Any], *, planned: bool = False
    ) -> builtins.list[Any]:
        """Rows of one read statement (its own implicit transaction).

        ``planned``: PostgreSQL plans the statement for these very values instead of reusing
        a prepared, generic plan (which cannot know how selective ``due <= $1`` is).
        """
        cursor = self._cursor()
        try:
            if planned and self._backend == "postgresql":
                cursor.execute(sql, params, prepare=False)
            else:
                cursor.execute(sql, params)
            return cursor.fetchall()  # type: ignore[no-any-return]
        except (self._dbapi.OperationalError, self._dbapi.InterfaceError):
            self._discard()
            raise

    def _write(self, sql: str, params: Mapping[str, Any]) -> Any:
        """One write statement in autocommit mode - its own transaction on both dialects
        (SQLite waits for the write lock with ``busy_timeout``: a lone write statement has
        no earlier read to be stale) - returning the cursor to read its result from."""
        cursor = self._cursor()
        try:
            cursor.execute(sql, params)
        except (self._dbapi.OperationalError, self._dbapi.InterfaceError):
            self._discard()
            raise
        return cursor

    def _run_pg(self, sql: str, params: Mapping[str, Any]) -> Any:
        """PostgreSQL: one statement of the hot path (commit, load, claim, release) as a
        prepared statement through libpq (see ``sql_engine.PgStatement``); the result."""
        statement = self._pg_statements.get(sql)
        if statement is None:  # named by its text: threads racing here agree on the name
            name = f"wp_{hashlib.sha256(sql.encode()).hexdigest()[:24]}"
            statement = self._pg_statements[sql] = PgStatement(name, sql)
        conn = self._conn()
        try:
            return statement.run(conn, self._local.prepared, params)
        except (self._dbapi.OperationalError, self._dbapi.InterfaceError):
            self._discard()
            raise

    # --- writes --------------------------------------------------------------------------------

    def _append(self, cursor: Any, records: Sequence[Record]) -> None:
        """SQLite: insert ``records`` at the next rowids (inside the caller's transaction)."""
        if not records:
            return
        rows = [
            {"b_run_id": rec.run_id, "b_seq": rec.seq, "b_key_id": rec.key_id,
             "b_body": rec.body, "b_sig": rec.sig, "b_hash": rec.hash,
             "b_cosigs": _cosigs_encoder.encode(rec.cosigs) if rec.cosigs else None}
            for rec in records
        ]
        if len(rows) == 1:
            cursor.execute(self._sql.append, rows[0])
        else:
            cursor.executemany(self._sql.append, rows)

    def create(self, state: RunState, records: Sequence[Record]) -> None:
        """Store a new run with its first records; ``RunExists`` if the id is taken."""
        check_append(state.run_id, -1, state, records)
        indexed = _indexed(state)
        params = _columns(state, indexed)
        params["b_run_id"] = state.run_id
        params["b_workflow"] = state.workflow
        params["b_parent"] = None if state.parent is None else state.parent.run_id
        params["b_created_at"] = to_us(state.created_at)
        if self._pg:
            if not self._write_pg("create", params, records):
                raise RunExists(state.run_id)
        else:
            self._write_sqlite(self._sql.create, params, records, lambda cursor: RunExists(
                state.run_id))
        self._wrote(state.run_id, state.seq, indexed)
        self._cached(state)

    def commit(
        self, run_id: str, expected_seq: int, state: RunState, records: Sequence[Record]
    ) -> None:
        """Append records and replace the state if the run is at ``expected_seq``."""
        check_append(run_id, expected_seq, state, records)
        indexed = _indexed(state)
        params = _columns(state, indexed)
        params["b_run_id"] = run_id
        params["b_expected"] = expected_seq
        if state.status.finished:
            head = "finish"
        else:
            head = "state" if self._written.get(run_id) == (expected_seq, indexed) else "update"
        if self._pg:
            if not self._write_pg(head, params, records):
                self._refuse(run_id, expected_seq, self._cursor())
        else:
            self._write_sqlite(self._sql.heads[head], params, records,
                               lambda cursor: self._refusal(run_id, expected_seq, cursor))
        self._wrote(run_id, state.seq, indexed)
        self._cached(state)

    def _write_sqlite(self, sql: str, params: Mapping[str, Any], records: Sequence[Record],
                      refusal: Callable[[Any], Exception]) -> None:
        """SQLite: write the run's row and its records in one transaction; when the row's
        statement matched no row, roll back and raise ``refusal(cursor)``."""
        cursor = self._begin()
        try:
            cursor.execute(sql, params)
            if cursor.rowcount != 1:
                raise refusal(cursor)
            self._append(cursor, records)
        except BaseException as exc:
            self._abort(cursor, exc)
            raise
        self._end(cursor)
        self._committed()

    def _refuse(self, run_id: str, expected_seq: int, cursor: Any) -> NoReturn:
        """The run's write matched no row: ``RunNotFound`` or ``ConflictError``."""
        raise self._refusal(run_id, expected_seq, cursor)

    def _refusal(self, run_id: str, expected_seq: int, cursor: Any) -> Exception:
        """Why the run's write matched no row: ``RunNotFound`` or ``ConflictError``."""
        cursor.execute(self._sql.seq, {"b_run_id": run_id})
        row = cursor.fetchone()
        if row is None:
            return RunNotFound(run_id)
        return ConflictError(run_id, expected_seq, int(row[0]))

    def _write_pg(self, head: str, params: dict[str, Any], records: Sequence[Record]) -> bool:
        """Run one of PostgreSQL's one-statement writes (autocommit: the statement is the
        transaction); whether the run's row was written (then every record was too)."""
        for k, rec in enumerate(records, start=1):
            params[f"s{k}"] = rec.seq
            params[f"i{k}"] = rec.key_id
            params[f"b{k}"] = rec.body
            params[f"g{k}"] = rec.sig
            params[f"h{k}"] = rec.hash
            params[f"c{k}"] = _cosigs_encoder.encode(rec.cosigs) if rec.cosigs else None
        # A connection that died mid-commit raises (and is dropped): the outcome is
        # unknown, and a retry reloads and finds out through the seq check.
        result = self._run_pg(self._sql.pg_write(head, len(records)), params)
        runs, added = int_value(result.get_value(0, 0)), int_value(result.get_value(0, 1))
        if runs != 1:
            return False
        if added != len(records):  # cannot happen: one statement, all or nothing
            raise CorruptStore(f"{self._shown} {WP_RECORDS.name}", None,
                               f"a commit wrote {added} of {len(records)} records")
        return True

    def _committed(self) -> None:
        """Tell SQLite's checkpointer (started on the first commit) that the WAL grew."""
        checkpointer = self._checkpointer
        if checkpointer is not None:
            checkpointer.note()
            return
        if self._backend != "sqlite":
            return
        if checkpointer is None:
            with self._lock:
                if self._closed:
                    return
                if self._checkpointer is None:
                    self._checkpointer = SqliteCheckpointer(self._engine)
                checkpointer = self._checkpointer
        checkpointer.note()

    def _wrote(self, run_id: str, seq: int, indexed: _Indexed) -> None:
        """Remember the indexed columns this store committed for ``run_id`` at ``seq``."""
        written = self._written
        if len(written) >= _WRITTEN_MAX:
            written.clear()  # a cache: losing it costs one full update per run
        written[run_id] = (seq, indexed)

    # --- reads ---------------------------------------------------------------------------------

    def load(self, run_id: str) -> RunState:
        """The run's last committed state."""
        states = self._states()
        if states is not None:
            state = states.get(run_id)
            if state is not None:
                return state
        if self._pg:
            result = self._run_pg(self._sql.load, {"b_run_id": run_id})
            if not result.ntuples:
                raise RunNotFound(run_id)
            return decode_state(result.get_value(0, 0))
        rows = self._query(self._sql.load, {"b_run_id": run_id})
        if not rows:
            raise RunNotFound(run_id)
        state = decode_state(rows[0][0])
        if states is not None:
            self._remember(states, state)
        return state

    def _states(self) -> dict[str, RunState] | None:
        """This thread's cache of run states, provably current; None on PostgreSQL.

        SQLite's ``PRAGMA data_version`` changes, as seen from one connection, exactly when
        *another* connection (another thread, another process) committed since it was last
        read.  Invariant: every entry equals the stored state as of the last time the version
        read here was unchanged - entries are added only from this connection's own commits
        and reads - so when the version is still the same, no one else has written since and
        every entry is current; when it moved, the cache is dropped whole (we cannot tell
        which runs changed).  A read that races a commit between the pragma and the SELECT
        caches the newer state, and the next call sees the version move and drops it.
        """
        if not self._cache_states:
            return None
        local = self._local
        cursor = self._cursor()
        try:
            cursor.execute("PRAGMA data_version")
            version = cursor.fetchone()[0]
        except (self._dbapi.OperationalError, self._dbapi.InterfaceError):
            self._discard()
            raise
        states: dict[str, RunState] | None = getattr(local, "states", None)
        if states is None or local.version != version:
            states = local.states = {}
            local.version = version
        return states

    @staticmethod
    def _remember(states: dict[str, RunState], state: RunState) -> None:
        if len(states) >= _CACHED_MAX:
            states.clear()  # a cache: losing it costs one read per run
        states[state.run_id] = state

    def _cached(self, state: RunState) -> None:
        """After this thread's commit of ``state``: keep it for ``load`` (SQLite)."""
        states: dict[str, RunState] | None = getattr(self._local, "states", None)
        if states is not None:
            self._remember(states, state)

    def list(
        self,
        *,
        status: Status | None = None,
        workflow: str | None = None,
        wait_kind: str | None = None,
        due_before: datetime | None = None,
        parent: str | None = None,
        limit: int | None = None,
    ) -> builtins.list[RunState]:
        """Runs matching every given filter, oldest first (``created_at``, then run id)."""
        params: dict[str, Any] = {}
        if status is not None:
            params["b_status"] = Status(status).value
        if workflow is not None:
            params["b_workflow"] = workflow
        if wait_kind is not None:
            params["b_wait_kind"] = wait_kind
        if due_before is not None:
            params["b_due"] = to_us(due_before)
        if parent is not None:
            params["b_parent"] = parent
        if limit is not None:
            params["b_limit"] = max(limit, 0)
        sql = self._sql.listing(status is not None, workflow is not None, wait_kind is not None,
                                due_before is not None, parent is not None, limit is not None)
        return [decode_state(row[0]) for row in self._query(sql, params, planned=True)]

    def find_waiting(self, key: str) -> builtins.list[RunState]:
        """WAITING runs whose wait key is ``key``, by run id."""
        return [decode_state(row[0]) for row in self._query(self._sql.find_waiting,
                                                            {"b_key": key})]

    def ledger(self, run_id: str) -> builtins.list[Record]:
        """The run's records in seq order (the stored bytes, not re-encoded)."""
        rows = self._query(self._sql.ledger, {"b_run_id": run_id})
        if not rows and not self._query(self._sql.exists, {"b_run_id": run_id}):
            raise RunNotFound(run_id)
        return [
            Record(run_id=run_id, seq=int(seq), key_id=key_id, body=bytes(body),
                   sig=bytes(sig), hash=record_hash,
                   cosigs=tuple(_cosigs_decoder.decode(bytes(cosigs))) if cosigs else ())
            for seq, key_id, body, sig, record_hash, cosigs in rows
        ]

    def next_deadline(self, after: datetime) -> datetime | None:
        """The earliest deadline of a WAITING run that is later than ``after`` (None: no
        such run): what a worker's alarm waits for.  One index lookup; ``list(due_before=)``
        would decode every waiting state up to the horizon instead."""
        rows = self._query(self._sql.next_deadline, {"b_after": to_us(after)})
        return from_us(int(rows[0][0])) if rows else None

    def last_position(self) -> int:
        """The global position of the last committed record (0: none yet)."""
        return int(self._query(self._sql.last_position, {})[0][0])

    # --- leases --------------------------------------------------------------------------------

    def claim(
        self, now: datetime, worker: str, lease: timedelta, limit: int
    ) -> builtins.list[RunState]:
        """Lease up to ``limit`` runs that need a worker now (RUNNING, or WAITING past their
        deadline) and that no other worker holds an unexpired lease on; oldest first."""
        if limit <= 0:
            return []
        params = {"b_now": to_us(now), "b_worker": worker, "b_limit": limit,
                  "b_expires": to_us(now + lease)}
        if self._pg:  # one statement: FOR UPDATE SKIP LOCKED does the excluding
            result = self._run_pg(self._sql.claim, params)
            states = [decode_state(result.get_value(i, 0)) for i in range(result.ntuples)]
        else:
            with self._transaction() as cursor:
                cursor.execute(self._sql.claim, params)
                states = [decode_state(row[0]) for row in cursor.fetchall()]
        states.sort(key=lambda s: (s.created_at, s.run_id))
        return states

    def release(self, run_id: str, worker: str) -> None:
        """Give back ``worker``'s lease on ``run_id`` (nothing if it holds none)."""
        params = {"b_run_id": run_id, "b_worker": worker}
        if self._pg:
            self._run_pg(self._sql.release, params)
        else:
            self._write(self._sql.release, params)

    def renew(self, run_id: str, worker: str, lease: timedelta, now: datetime) -> bool:
        """Extend ``worker``'s lease on ``run_id`` to ``now + lease``; False (and nothing
        changed) when ``worker`` does not hold it - never had it, released it, or another
        worker claimed it after it expired.  An expired lease nobody took over is renewed:
        no one else can have driven the run meanwhile."""
        params = {"b_run_id": run_id, "b_worker": worker, "b_expires": to_us(now + lease)}
        return bool(self._write(self._sql.renew, params).rowcount == 1)

    def take(self, run_id: str, worker: str, lease: timedelta, now: datetime) -> bool:
        """Lease ``run_id`` to ``worker`` until ``now + lease`` if no other worker holds an
        unexpired lease on it, whatever the run's state; whether it did.  The worker's
        orphan sweep takes a run WAITING on an effect this way before dispatching the
        effect again: a live dispatcher holds (and renews) that lease, and of several
        sweepers only one can take it."""
        params = {"b_run_id": run_id, "b_worker": worker, "b_now": to_us(now),
                  "b_expires": to_us(now + lease)}
        return bool(self._write(self._sql.take, params).rowcount == 1)

    # --- checkpoints ---------------------------------------------------------------------------

    def checkpoint(self, signer: Signer) -> str:
        """Sign a checkpoint of every record committed so far, store it, and return the note.

        The checkpoint covers the records at global positions 1..n, where n is the last
        position a fresh read sees; positions are dense and in commit order on both
        dialects (see the module header), so that read is a prefix of the one global
        sequence.  The Merkle frontier is kept in the store, so each call hashes only the
        records since the previous one.  A checkpoint of a size already stored (no record
        since) is not signed again: the stored note is returned.  The note is committed
        in the same database after the records it covers, so no crash can keep it and
        lose them (``batch`` durability included); it is durable when ``flush`` returns.
        """
        with self._frontier_lock:
            frontier = self._frontier
            rows = self._query(self._sql.hashes_after, {"b_size": frontier.size})
            if rows and int(rows[-1][0]) != frontier.size + len(rows):
                expected = frontier.size
                for position, _ in rows:  # find the first hole, to name it
                    expected += 1
                    if int(position) != expected:
                        raise CorruptStore(f"{self._shown} {WP_RECORDS.name}", int(position),
                                           f"global positions jump from {expected - 1} to "
                                           f"{position}: the ledger is damaged")
            frontier.extend([bytes.fromhex(record_hash) for _, record_hash in rows])
            size = frontier.size
            existing = self._query(self._sql.checkpoint_at, {"b_size": size})
            if existing:
                return str(existing[0][0])
            note = sign_frontier(self.log_id, frontier, signer)
            with self._transaction() as cursor:
                cursor.execute(self._sql.store_checkpoint, {
                    "b_size": size, "b_checkpoint": note,
                    "b_created_at": to_us(datetime.now(UTC)),
                })
            # another process may have stored one of this size first: that one is the note
            return str(self._query(self._sql.checkpoint_at, {"b_size": size})[0][0])

    def checkpoints(self) -> builtins.list[str]:
        """Every stored checkpoint note, smallest tree size first."""
        return [str(row[0]) for row in self._query(self._sql.checkpoints, {})]

    def watch_due(self, callback: Callable[[datetime], None]) -> Callable[[], None] | None:
        """PostgreSQL: call ``callback(deadline)`` whenever any process commits a new wait
        deadline to this database (LISTEN/NOTIFY, see ``DueWatcher``); returns the function
        that stops watching.  None on SQLite, which has no way to tell other processes: their
        workers' poll finds such timers.  Returns once the LISTEN is in effect (or after
        ``WATCH_START_SECONDS``, the watcher then retrying in the background)."""
        if self._backend != "postgresql":
            return None
        watcher = DueWatcher(self._engine, callback)
        watcher.started(WATCH_START_SECONDS)
        with self._lock:
            self._watchers.append(watcher)

        def stop() -> None:
            with self._lock:
                if watcher in self._watchers:
                    self._watchers.remove(watcher)
            watcher.stop()

        return stop

    def hold(self, run_id: str) -> AbstractContextManager[None]:
        """Nothing to prepare: the seq check in ``commit`` is the only lock a run needs."""
        return no_hold()

    # --- durability and shutdown ---------------------------------------------------------------

    def flush(self) -> None:
        """Make every commit that returned durable now, whatever the durability mode.

        SQLite: fsync the WAL file and its directory (every returned commit has been written
        to the WAL; the database file is fsynced by each checkpoint).  PostgreSQL: commit a
        transaction that has a transaction id with ``synchronous_commit = on``; it returns
        once the WAL is flushed up to its commit record, which lies after every earlier
        commit's.
        """
        if self._closed:
            return
        if self._backend == "sqlite":
            path = sqlite_path(self.url)
            assert path is not None
            # The WAL file, then its directory entry (SQLite does not fsync the directory
            # when it creates the WAL).  No WAL: everything is in the checkpointed file.
            for target, flags in ((f"{path}-wal", os.O_RDONLY),
                                  (str(path.parent or "."), os.O_RDONLY | os.O_DIRECTORY)):
                try:
                    fd = os.open(target, flags)
                except FileNotFoundError:
                    return
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            return
        with self._transaction() as cursor:
            cursor.execute("SET LOCAL synchronous_commit TO on")
            cursor.execute("SELECT txid_current()")

    def close(self) -> None:
        """Flush, then close every thread's connection; the store is unusable afterwards."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            with self._lock:
                self._closed = True
                checkpointer, self._checkpointer = self._checkpointer, None
                watchers, self._watchers = self._watchers, []
            if checkpointer is not None:
                checkpointer.stop()
            for watcher in watchers:
                watcher.stop()
            self._close_connections()
            self._engine.dispose()

    def _close_connections(self) -> None:
        with self._lock:
            proxies, self._connections = [p for _, p in self._connections], []
        for proxy in proxies:
            with suppress(Exception):  # a broken connection: nothing to save
                proxy.close()
        self._local = threading.local()
