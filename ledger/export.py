"""The export file format: ``export`` writes one, ``_export_items`` reads one back; and
``stored_checkpoints``, the other plain read of a store.

An export file (docs/AUDIT.md) is a header line (``ExportHeader``), then one DSSE envelope per
line in global order with the stored checkpoint lines where they stand: the JSONL and the SQL
export of one ledger are the same bytes.  Writing is a transcription, not a verification: it
refuses (``ExportError``) only a store whose records cannot be put in order, and a SQL ledger
is streamed.  Reading is strict (canonical lines, the announced record count) and hands
``stream`` the items to verify.  ``stored_checkpoints`` returns a store's checkpoint notes as
stored (``ledger checkpoint``), unverified like the writer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec

from ._verifycore import (
    _encoder,
    _index_cp,
    _index_leaf,
    _Item,
    _line_decoder,
    _read_log_id,
    _route,
    _sha256,
)
from .logindex import INDEX_FILE, CheckpointLine, read_leaves
from .merkle import leaf_hash
from .records import Envelope
from .report import VerifyUsageError
from .sqlsource import _sql_checkpoints, _sql_source

EXPORT_FORMAT = "wakepoint-ledger-export"
"""The ``format`` value of an export file's header line."""


class ExportHeader(msgspec.Struct, forbid_unknown_fields=True):
    """The first line of an export file.  ``ordered``: records are in the store's global
    order and checkpoints stand where they were taken (false for a JSONL store without
    ``index.jsonl``: records then come run by run, and key ranges and checkpoints cannot be
    checked)."""

    format: str
    v: int
    log_id: str
    ordered: bool
    records: int
    """How many record lines follow (a cut export is ``malformed``, not a shorter ledger)."""


_header_decoder = msgspec.json.Decoder(ExportHeader)
_env_decoder = msgspec.json.Decoder(Envelope)
_EXPORT_HEAD = b'{"format":"' + EXPORT_FORMAT.encode() + b'"'


def is_export(path: Path) -> bool:
    """Whether ``path`` is a file starting with an export header."""
    try:
        with path.open("rb") as f:
            return f.read(len(_EXPORT_HEAD)) == _EXPORT_HEAD
    except OSError:
        return False


def _export_items(data: bytes) -> tuple[ExportHeader, list[_Item], int | None]:
    """The header, the items, and the line number of a torn last line (if any)."""
    lines = data.split(b"\n")
    tail = lines.pop()
    torn = len(lines) + 1 if tail else None
    try:
        header = _header_decoder.decode(lines[0])
    except (ValueError, IndexError) as exc:
        raise VerifyUsageError(f"not a ledger export: header: {exc}") from None
    if header.format != EXPORT_FORMAT or header.v != 1:
        raise VerifyUsageError(f"unsupported export {header.format} v{header.v}")
    items: list[_Item] = []
    count = 0
    for number, raw in enumerate(lines[1:], start=2):
        try:
            if raw.startswith(b'{"checkpoint"'):
                cp = _index_cp.decode(raw)
                if _encoder.encode(cp) != raw:
                    raise ValueError("not in canonical form")
                items.append(_Item(number, note=cp.checkpoint))
                continue
            env = _env_decoder.decode(raw)
            if _encoder.encode(env) != raw:
                raise ValueError("not in canonical form")
            items.append(_Item(number, env=env))
            count += 1
        except ValueError as exc:  # msgspec errors and bad UTF-8 alike
            items.append(_Item(number, problem=f"export line: {exc}"))
            break
    if torn is None and count != header.records and items and items[-1].problem is None:
        items.append(_Item(len(lines) + 1, problem=f"the header announces {header.records} "
                           f"records and the export holds {count}: a cut or padded export"))
    return header, items, torn


def stored_checkpoints(source: str | os.PathLike[str]) -> list[str]:
    """The signed checkpoint notes a store holds, oldest first (not verified): the
    checkpoint lines of a JSONL store's ``index.jsonl``, or the ``wp_checkpoints`` rows of a
    SQL store (none before migration 0002)."""
    text = os.fspath(source)
    if "://" not in text:
        path = Path(text.removeprefix("jsonl:"))
        if not (path / "runs").is_dir():
            raise VerifyUsageError(f"{path}: not a JSONL store (no runs/ directory)")
        index = path / INDEX_FILE
        if not index.exists():
            return []
        lines = index.read_bytes().split(b"\n")[:-1]
        notes = []
        for number, raw in enumerate(lines, start=1):
            if raw.startswith(b'{"checkpoint"'):
                try:
                    notes.append(_index_cp.decode(raw).checkpoint)
                except ValueError as exc:
                    raise VerifyUsageError(f"{INDEX_FILE}:{number}: {exc}") from None
        return notes
    import sqlalchemy

    engine = sqlalchemy.create_engine(text)
    try:
        with engine.connect() as conn:
            inspector = sqlalchemy.inspect(conn)
            if "wp_checkpoints" not in inspector.get_table_names():
                return []
            return [note for _, note in _sql_checkpoints(conn)]
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise VerifyUsageError(f"cannot read the checkpoints of {text}: {exc}") from None
    finally:
        engine.dispose()


class ExportError(ValueError):
    """The store's records cannot be exported as they stand (run files and index disagree,
    a damaged line): ``ledger verify`` on the store says exactly what is wrong."""


def stored_leaves(source: str | os.PathLike[str]) -> list[bytes]:
    """The leaf hashes of a store's global order, first to last (not verified): the index of
    a JSONL store, the records of a SQL store by position.  For checks of a checkpoint
    against the records a store holds now (``ledger checkpoint --export``)."""
    text = os.fspath(source)
    if "://" not in text:
        path = Path(text.removeprefix("jsonl:"))
        if not (path / "runs").is_dir():
            raise VerifyUsageError(f"{path}: not a JSONL store (no runs/ directory)")
        return read_leaves(path)
    _, lines = _sql_export_lines(text)
    leaves = []
    for line in lines:
        if not line.startswith(b'{"checkpoint"'):
            leaves.append(leaf_hash(_envelope.decode(line).payload))
    return leaves


_envelope = msgspec.json.Decoder(Envelope)


def _jsonl_export(root_dir: Path) -> tuple[str, bool, list[bytes]]:
    """Log id, ordered, and the export's body lines of a JSONL store."""
    log_id = _read_log_id(root_dir)
    if log_id is None:
        raise ExportError(f"{root_dir}: no readable log.json")
    runs: dict[str, list[Envelope]] = {}
    for f in sorted((root_dir / "runs").iterdir()):
        if not f.name.endswith(".jsonl"):
            continue
        envs: list[Envelope] = []
        lines = f.read_bytes().split(b"\n")
        lines.pop()  # a torn last line is a write that never completed: not in the ledger
        for number, raw in enumerate(lines, start=1):
            try:
                envs.extend(_line_decoder.decode(raw).records)
            except ValueError as exc:
                raise ExportError(f"runs/{f.name}:{number}: {exc}") from None
        if envs:
            try:
                run_id = _route.decode(envs[0].payload).run_id
            except ValueError as exc:
                raise ExportError(f"runs/{f.name}:1: {exc}") from None
            runs[run_id] = envs
    index = root_dir / INDEX_FILE
    if not index.exists():
        return log_id, False, [_encoder.encode(e) for envs in runs.values() for e in envs]
    out: list[bytes] = []
    done: dict[str, int] = {}
    lines = index.read_bytes().split(b"\n")
    lines.pop()
    for number, raw in enumerate(lines, start=1):
        if raw.startswith(b'{"checkpoint"'):
            out.append(raw)
            continue
        try:
            leaf = _index_leaf.decode(raw)
        except ValueError as exc:
            raise ExportError(f"{INDEX_FILE}:{number}: {exc}") from None
        envs = runs.get(leaf.run_id, [])
        for offset, h in enumerate(leaf.hashes):
            seq = leaf.seq + offset
            if (seq != done.get(leaf.run_id, 0) or seq >= len(envs)
                    or _sha256(b"\x00" + envs[seq].payload).hexdigest() != h):
                raise ExportError(f"{INDEX_FILE}:{number}: the index and the run files "
                                  f"disagree at {leaf.run_id!r} seq {seq}")
            done[leaf.run_id] = seq + 1
            out.append(_encoder.encode(envs[seq]))
    for run_id, envs in runs.items():
        if done.get(run_id, 0) != len(envs):
            raise ExportError(f"run {run_id!r} holds records the index does not list")
    return log_id, True, out


def _sql_export_lines(url: str) -> tuple[str, Iterator[bytes]]:
    source = _sql_source(url)
    if source.log_id is None:
        source.items.close()  # type: ignore[attr-defined]
        raise ExportError(f"{url}: no log id in wp_meta")

    def lines() -> Iterator[bytes]:
        position = 0
        try:
            for item in source.items:
                if item.note is not None:
                    yield _encoder.encode(CheckpointLine(item.note))
                    continue
                position += 1
                if item.problem is not None:
                    raise ExportError(f"{url}: row {item.number}: {item.problem}")
                if item.number != position:
                    raise ExportError(f"{url}: record positions are not dense from 1 (rows "
                                      f"were deleted before row {item.number})")
                yield _encoder.encode(item.env)
        finally:
            source.items.close()  # type: ignore[attr-defined]

    return source.log_id, lines()


def export(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> int:
    """Write the ledger of ``source`` (a JSONL store directory or a SQLAlchemy URL) to the
    new file ``out`` as an export file (see docs/AUDIT.md); returns the number of records.

    The export is a transcription, not a verification: records and checkpoints as stored,
    in global order.  Refuses (``ExportError``) a store whose records cannot be put in order
    (run files and index disagree, SQL positions with holes) and (``FileExistsError``) an
    existing ``out``.  A SQL ledger is streamed (memory stays flat)."""
    text = os.fspath(source)
    body: Iterable[bytes]
    if "://" in text:
        log_id, body = _sql_export_lines(text)
        ordered = True
    else:
        path = Path(text.removeprefix("jsonl:"))
        if not (path / "runs").is_dir():
            raise ExportError(f"{path}: not a JSONL store (no runs/ directory)")
        log_id, ordered, body = _jsonl_export(path)
    target = Path(out)
    if target.exists() or target.is_symlink():
        raise FileExistsError(f"{target} exists")
    stem = f".{target.name}.{os.getpid()}"
    lines_file = target.with_name(stem + ".lines")
    temp = target.with_name(stem + ".tmp")
    records = 0
    try:
        # The header states the record count, known only at the end: the lines go to a side
        # file first, then header and lines to the file that is linked into place.
        with open(lines_file, "xb") as f:
            for line in body:
                records += not line.startswith(b'{"checkpoint"')
                f.write(line + b"\n")
        header = _encoder.encode(ExportHeader(EXPORT_FORMAT, 1, log_id, ordered, records))
        with open(temp, "xb") as f, open(lines_file, "rb") as lines:
            f.write(header + b"\n")
            shutil.copyfileobj(lines, f, 1 << 20)
            f.flush()
            os.fsync(f.fileno())
        os.link(temp, target)  # never replaces an existing file
    finally:
        for leftover in (lines_file, temp):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
    return records
