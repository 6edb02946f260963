"""Reading a SQL store's ledger as a stream of ``_Item`` (reading only: no checks).

``_sql_source`` opens the database and yields the rows of ``wp_records`` in position order,
fetched in batches so memory stays flat however large the ledger is, with the checkpoint notes
of ``wp_checkpoints`` placed right after the record each one's size ends at (``_place``); it
says what the schema cannot hold (before migration 0002: checkpoints and co-signatures).  Its
two users are ``stream`` (verify a SQL database) and ``export`` (transcribe one); SQLAlchemy is
imported inside the functions so that JSONL-only use never loads it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import msgspec

from ._verifycore import _Item
from .checkpoint import CheckpointError, parse_checkpoint
from .records import PAYLOAD_TYPE, Envelope, Signature
from .report import VerifyUsageError

_cosigs = msgspec.json.Decoder(list[Signature])


class _SqlSource(msgspec.Struct):
    """A SQL store's ledger, read as a stream (memory stays flat however large it is)."""

    log_id: str | None
    lacks: list[str]
    """What the schema cannot hold (before migration 0002: ``checkpoints``, ``rotation``)."""
    total: int
    """Records (for progress)."""
    items: Iterator[_Item]
    """Records in global order (with ``cosigs`` when the schema has that column) and the
    stored checkpoints (when it has ``wp_checkpoints``), each right after the last record
    it covers.  Close it when stopping early (it holds a connection)."""


def _sql_source(url: str) -> _SqlSource:
    """Open a SQL store's ledger for reading (``VerifyUsageError`` if it is not one)."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
        raise VerifyUsageError(f"cannot open {url}: {exc}") from None
    try:
        with engine.connect() as conn:
            inspector = sqlalchemy.inspect(conn)
            tables = set(inspector.get_table_names())
            if "wp_records" not in tables:
                raise VerifyUsageError(f"{url}: not a wakepoint SQL store (no wp_records)")
            columns = {c["name"] for c in inspector.get_columns("wp_records")}
            total = int(conn.execute(sqlalchemy.text(
                "SELECT count(*) FROM wp_records")).scalar_one())
            log_id = None
            if "wp_meta" in tables:
                found = conn.execute(sqlalchemy.text("SELECT log_id FROM wp_meta")).all()
                log_id = str(found[0][0]) if len(found) == 1 else None
            notes: list[tuple[int, str]] = []
            if "wp_checkpoints" in tables:
                notes = _sql_checkpoints(conn)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        engine.dispose()
        raise VerifyUsageError(f"cannot read the ledger of {url}: {exc}") from None
    cosigs = "cosigs" in columns
    lacks = [name for name, present in (("checkpoints", "wp_checkpoints" in tables),
                                        ("rotation", cosigs)) if not present]
    return _SqlSource(log_id, lacks, total,
                      _place(_sql_rows(engine, url, cosigs), notes))


def _sql_rows(engine: object, url: str, cosigs: bool) -> Iterator[_Item]:
    """The records of ``wp_records`` in position order, fetched in batches."""
    import sqlalchemy

    statement = sqlalchemy.text(
        "SELECT position, run_id, seq, key_id, body, sig, record_hash" +
        (", cosigs" if cosigs else "") + " FROM wp_records ORDER BY position")
    try:
        with engine.connect() as conn:  # type: ignore[attr-defined]
            result = conn.execution_options(stream_results=True, yield_per=2000).execute(
                statement)
            try:
                for row in result:
                    yield _sql_item(row, cosigs)
            finally:
                result.close()  # a server-side cursor on PostgreSQL: closed when we stop early
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise VerifyUsageError(f"cannot read the ledger of {url}: {exc}") from None
    finally:
        engine.dispose()  # type: ignore[attr-defined]


def _sql_item(row: Any, cosigs: bool) -> _Item:
    """One ``wp_records`` row as a stream item (a SQLAlchemy row: untyped)."""
    position, run_id, seq, key_id, body, sig, stored_hash = row[:7]
    problem = None
    extra: list[Signature] = []
    raw = row[7] if cosigs else None
    if raw:
        try:
            extra = _cosigs.decode(raw if isinstance(raw, str) else bytes(raw))
        except ValueError as exc:
            problem = f"cosigs: {exc}"
    env = Envelope(PAYLOAD_TYPE, bytes(body), [Signature(key_id, bytes(sig)), *extra])
    return _Item(int(position), env=env, run_id=run_id, seq=int(seq),
                 stored_hash=stored_hash, problem=problem)


def _sql_checkpoints(conn: object) -> list[tuple[int, str]]:
    """The checkpoint notes of ``wp_checkpoints`` (migration 0002: one per tree size, the
    primary key), smallest first, with that key."""
    import sqlalchemy

    rows = conn.execute(sqlalchemy.text(  # type: ignore[attr-defined]
        "SELECT size, checkpoint FROM wp_checkpoints ORDER BY size")).all()
    return [(int(r[0]), r[1] if isinstance(r[1], str)
             else bytes(r[1]).decode("utf-8", "replace")) for r in rows]


def _place(items: Iterable[_Item], notes: Sequence[tuple[int, str]]) -> Iterator[_Item]:
    """Interleave checkpoint notes (row key, note) into records: each right after the record
    its own stated size ends at, never before an earlier note; a note that does not parse
    goes where it was found in order (it is reported ``malformed``), one whose size exceeds
    the records at the end (``behind_checkpoint``).  Positions name a note by its row's key
    (``wp_checkpoints size=<n>``)."""
    placed: list[tuple[int, _Item]] = []
    for k, (key, note) in enumerate(notes, start=1):
        try:
            size = parse_checkpoint(note)[0].size
        except CheckpointError:
            size = 0
        placed.append((size, _Item(-k, note=note, where=f"wp_checkpoints size={key}")))
    waiting = iter(placed)
    nxt = next(waiting, None)
    for count, item in enumerate(items):
        while nxt is not None and nxt[0] <= count:
            yield nxt[1]
            nxt = next(waiting, None)
        yield item
    while nxt is not None:
        yield nxt[1]
        nxt = next(waiting, None)
