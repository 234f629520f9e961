"""Work units for offline labelling: planning, naming, duplicate-ID check, committing.

Pure: pyarrow, sqlite3 and the standard library only (no torch, transformers or ray).
Reading and validating a unit's rows is `label_rows`.

A *work unit* is a row range of one input file. The driver plans the units once (from
Parquet row-group metadata; by one streaming parse of CSV/JSON-lines files, which also
records the byte offset where each unit starts, so an actor seeks straight to its rows)
and stores the plan in `<output>/_manifest.json`. Each unit owns exactly one set of
output files, written to a temporary name and renamed into place, and a commit marker
`<output>/_done/<unit>.json` written last:

    <output>/predictions/part-000003-1a2b3c4d5e.parquet   every input column + predictions
    <output>/csv/part-000003-1a2b3c4d5e.csv                 ID,label (the seed's submission format)
    <output>/quarantine/part-000003-1a2b3c4d5e.jsonl        bad rows with reasons (when any)
    <output>/_done/part-000003-1a2b3c4d5e.json              the commit marker (counts, timings)

A unit is done exactly when its marker exists, so a rerun after any crash labels only the
units without one, and a half-written file never sits under a final name.

Rows are numbered like `sentiment_ray.data` numbers them: 1-based data rows (the CSV
header excluded), with the line a CSV/JSON-lines row starts on.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import sqlite3
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sentiment_ray.data import DataError, as_key, data_filesystem, file_format, value_problem
from sentiment_ray.label_rows import csv_header, csv_problem, csv_records, is_json_array_file, json_line, open_stream

DEFAULT_ROWS_PER_UNIT = 50_000
MANIFEST_NAME = "_manifest.json"
PREDICTIONS_DIR = "predictions"
CSV_DIR = "csv"
QUARANTINE_DIR = "quarantine"
DONE_DIR = "_done"
FAILED_DIR = "_failed"
"""Why a unit failed (error type and message), written by the actor: Ray hands the driver
only the traceback text of an actor's exception, not the exception itself."""
OUTPUT_DIRS = (PREDICTIONS_DIR, CSV_DIR, QUARANTINE_DIR, DONE_DIR, FAILED_DIR)

# Columns the labeller adds besides label_rows.SOURCE_COLUMNS and one `p_<label>` per class;
# an input column with one of these names is an error.
IDENTITY_COLUMNS = ("model_name", "adapter_id")
PREDICTION_COLUMNS = ("pred_label", "confidence", "truncated", "parse_failed", "generated_text")



# ----------------------------------------------------------------------------- units


@dataclass(frozen=True)
class WorkUnit:
    """Rows [start, stop) (1-based data rows) of one input file."""

    index: int
    """Position in input order (files in `expand_paths` order, then rows)."""
    file: str
    fmt: str
    start: int
    stop: int
    has_ids: bool
    """The file has the ID column; otherwise IDs are generated as `<id_name>:<row>`."""
    id_name: str
    """The file's name for generated IDs: its path relative to the inputs' common folder."""
    byte_offset: int = 0
    """CSV/JSON lines: where row `start` begins (in the decompressed stream for .gz)."""
    first_line: int = 0
    """CSV/JSON lines: the line row `start` begins on."""
    row_groups: tuple[int, ...] = ()
    """Parquet: the row groups this unit covers."""
    whole_file: bool = False
    """A .json file holding one JSON array: read whole (it cannot be streamed)."""

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    @property
    def unit_id(self) -> str:
        """Stable name: input position (for humans and sorting) + hash of file and range."""
        digest = hashlib.sha256(f"{self.file}\0{self.start}\0{self.stop}".encode()).hexdigest()[:10]
        return f"part-{self.index:06d}-{digest}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["row_groups"] = list(self.row_groups)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorkUnit":
        return cls(**{**d, "row_groups": tuple(d.get("row_groups") or ())})


@dataclass(frozen=True)
class UnitPaths:
    predictions: str
    csv: str
    quarantine: str
    done: str


def unit_paths(output_dir: str, unit_id: str) -> UnitPaths:
    return UnitPaths(
        predictions=f"{output_dir}/{PREDICTIONS_DIR}/{unit_id}.parquet",
        csv=f"{output_dir}/{CSV_DIR}/{unit_id}.csv",
        quarantine=f"{output_dir}/{QUARANTINE_DIR}/{unit_id}.jsonl",
        done=f"{output_dir}/{DONE_DIR}/{unit_id}.json",
    )


# ----------------------------------------------------------------------------- output storage


class Storage:
    """The output folder (local path or URI) with atomic whole-file writes.

    A write goes to a hidden temporary name in the same folder and is moved into place:
    a rename on local disks (atomic), a copy on object stores (where an object appears
    whole or not at all). Readers never see a half-written file under a final name."""

    TMP_MARK = ".tmp-"

    def __init__(self, root: str):
        if "://" not in root:
            root = os.path.abspath(os.path.expanduser(root))
        self.root = root.rstrip("/") or "/"
        self.fs, self._inner_root = data_filesystem(self.root)

    def _inner(self, path: str) -> str:
        if not path.startswith(self.root):
            raise ValueError(f"{path} is outside the output folder {self.root}")
        return self._inner_root + path[len(self.root) :]

    def exists(self, path: str) -> bool:
        from pyarrow import fs as pafs

        return self.fs.get_file_info(self._inner(path)).type != pafs.FileType.NotFound

    def makedirs(self, path: str) -> None:
        self.fs.create_dir(self._inner(path), recursive=True)

    @contextlib.contextmanager
    def atomic_writer(self, path: str) -> Iterator[Any]:
        """A binary output stream whose content appears under `path` only when the block
        ends without an exception."""
        folder, name = path.rsplit("/", 1)
        tmp = f"{folder}/.{name}{self.TMP_MARK}{uuid.uuid4().hex[:12]}"
        self.fs.create_dir(self._inner(folder), recursive=True)
        try:
            with self.fs.open_output_stream(self._inner(tmp)) as out:
                yield out
            self.fs.move(self._inner(tmp), self._inner(path))
        except BaseException:
            self.delete(tmp, missing_ok=True)
            raise

    def write_bytes(self, path: str, data: bytes) -> None:
        with self.atomic_writer(path) as out:
            out.write(data)

    def write_json(self, path: str, payload: Any) -> None:
        self.write_bytes(path, (json.dumps(payload, indent=2, ensure_ascii=False, default=str) + "\n").encode())

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(self._inner(path)) as f:
            return f.read()

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_bytes(path))

    def open_input(self, path: str):
        return self.fs.open_input_file(self._inner(path))

    def delete(self, path: str, *, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self._inner(path))
        except FileNotFoundError:
            if not missing_ok:
                raise

    def delete_dir(self, path: str) -> None:
        from pyarrow import fs as pafs

        if self.fs.get_file_info(self._inner(path)).type == pafs.FileType.Directory:
            self.fs.delete_dir(self._inner(path))

    def list_names(self, folder: str) -> list[str]:
        """File names directly in `folder` (empty if it does not exist)."""
        from pyarrow import fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self._inner(folder), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files a crashed run left behind; returns how many."""
        removed = 0
        for sub in ("", *OUTPUT_DIRS):
            folder = f"{self.root}/{sub}".rstrip("/")
            for name in self.list_names(folder):
                if name.startswith(".") and self.TMP_MARK in name:
                    self.delete(f"{folder}/{name}", missing_ok=True)
                    removed += 1
        return removed


def done_unit_ids(storage: Storage) -> set[str]:
    """Units with a commit marker."""
    return {n[: -len(".json")] for n in storage.list_names(f"{storage.root}/{DONE_DIR}") if n.endswith(".json")}


# ----------------------------------------------------------------------------- input files


@dataclass(frozen=True)
class InputFile:
    path: str
    fmt: str
    size: int
    mtime_ns: int | None

    def identity(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.fmt, "size": self.size, "mtime_ns": self.mtime_ns}


def describe_inputs(files: Sequence[str]) -> list[InputFile]:
    """Size and modification time of each file (from the filesystem, no reading)."""
    out = []
    for path in files:
        fs, inner = data_filesystem(path)
        info = fs.get_file_info(inner)
        if info.size is None:
            raise DataError(f"{path}: no such file")
        out.append(InputFile(path, file_format(path), int(info.size), info.mtime_ns))
    return out


def id_names(files: Sequence[str]) -> dict[str, str]:
    """Short stable names for generated IDs: each path relative to the files' common
    folder (`train/a.csv`), the base name for a single file."""
    if len(files) == 1:
        return {files[0]: files[0].rstrip("/").rsplit("/", 1)[-1]}
    common = os.path.commonpath([f.split("://", 1)[-1] for f in files])
    return {f: f.split("://", 1)[-1][len(common) :].lstrip("/") for f in files}


# ----------------------------------------------------------------------------- duplicate IDs


class IdRegistry:
    """Every ID of the input with its file and row, in an on-disk SQLite table, so duplicate
    IDs are found (and located) without holding all IDs in memory."""

    def __init__(self, files: Sequence[str]):
        self.files = list(files)
        handle, self.path = tempfile.mkstemp(prefix="sentiment-ray-ids-", suffix=".sqlite")
        os.close(handle)
        self.db = sqlite3.connect(self.path)
        self.db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA temp_store=FILE;"
            "CREATE TABLE ids (id TEXT NOT NULL, file INTEGER NOT NULL, row INTEGER NOT NULL);"
        )

    def add(self, file_index: int, first_row: int, ids: Sequence[str | None]) -> None:
        self.db.executemany(
            "INSERT INTO ids VALUES (?, ?, ?)",
            ((value, file_index, first_row + i) for i, value in enumerate(ids) if value),
        )

    def add_pairs(self, file_index: int, pairs: Sequence[tuple[int, str | None]]) -> None:
        """(row, id) pairs, for sources where IDs are sparse (JSON lines)."""
        self.db.executemany("INSERT INTO ids VALUES (?, ?, ?)", ((v, file_index, r) for r, v in pairs if v))

    def duplicates(self, limit: int = 20, places: int = 5) -> list[tuple[str, int, list[tuple[str, int]]]]:
        """Up to `limit` repeated IDs: (id, occurrences, first `places` (file, row))."""
        self.db.execute("CREATE INDEX IF NOT EXISTS ids_by_id ON ids(id)")
        repeated = self.db.execute(
            "SELECT id, COUNT(*) FROM ids GROUP BY id HAVING COUNT(*) > 1 ORDER BY MIN(rowid) LIMIT ?", (limit,)
        ).fetchall()
        out = []
        for value, count in repeated:
            rows = self.db.execute(
                "SELECT file, row FROM ids WHERE id = ? ORDER BY rowid LIMIT ?", (value, places)
            ).fetchall()
            out.append((value, count, [(self.files[f], r) for f, r in rows]))
        return out

    def close(self) -> None:
        self.db.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def duplicate_id_error(duplicates: list[tuple[str, int, list[tuple[str, int]]]], id_column: str) -> DataError:
    lines = [f"duplicate IDs in column {id_column!r} (each input row needs a unique ID):"]
    for value, count, places in duplicates:
        where = "; ".join(f"{f}: row {r}" for f, r in places)
        more = f" and {count - len(places)} more" if count > len(places) else ""
        lines.append(f"  {value!r} x{count}: {where}{more}")
    return DataError("\n".join(lines))

# ----------------------------------------------------------------------------- planning


@dataclass
class Plan:
    units: list[WorkUnit]
    total_rows: int
    files_without_ids: list[str] = field(default_factory=list)


def plan_units(
    files: Sequence[str],
    *,
    text_column: str,
    id_column: str,
    generate_ids: bool,
    rows_per_unit: int = DEFAULT_ROWS_PER_UNIT,
    registry: IdRegistry | None = None,
    reserved_columns: Sequence[str] = (),
) -> Plan:
    """Split the input files into work units of about `rows_per_unit` rows, checking each
    file has the text column and (unless `generate_ids`) the ID column, and feeding every
    ID to `registry` for the duplicate check.

    Parquet: consecutive row groups up to `rows_per_unit` rows (a larger row group is one
    unit), from the footer alone. CSV and JSON lines: one streaming parse (the only way to
    count CSV records, whose quoted fields may span lines), recording the byte offset and
    line where each unit starts; memory stays at one record. An input column named like
    one in `reserved_columns` (what the labeller adds) is an error (CSV header, Parquet
    schema; JSON lines are checked row by row when labelled)."""
    if rows_per_unit <= 0:
        raise ValueError(f"rows_per_unit must be positive, got {rows_per_unit}")
    names = id_names(files)
    units: list[WorkUnit] = []
    without_ids: list[str] = []
    total = 0
    for file_index, path in enumerate(files):
        fmt = file_format(path)
        common = dict(file=path, fmt=fmt, id_name=names[path])
        if fmt == "parquet":
            spans, has_ids, n, columns = _plan_parquet(path, file_index, text_column, id_column, rows_per_unit, registry)
        elif fmt == "csv":
            spans, has_ids, n, columns = _plan_csv(path, file_index, text_column, id_column, rows_per_unit, registry)
        elif is_json_array_file(path):
            spans, has_ids, n, columns = _plan_json_array(path, file_index, id_column, registry)
        else:
            spans, has_ids, n, columns = _plan_jsonl(path, file_index, id_column, rows_per_unit, registry)
        if n == 0:
            raise DataError(f"{path}: no data rows")
        clash = sorted(set(reserved_columns) & set(columns))
        if clash:
            raise DataError(f"{path}: input column(s) {clash} clash with columns the labeller adds; rename them")
        if not has_ids:
            without_ids.append(path)
        for span in spans:
            units.append(WorkUnit(index=len(units), has_ids=has_ids, **common, **span))
        total += n
    if without_ids and not generate_ids:
        shown = ", ".join(without_ids[:5]) + (f" and {len(without_ids) - 5} more" if len(without_ids) > 5 else "")
        raise DataError(
            f"no {id_column!r} column in {shown}: every prediction needs the input's ID. "
            f"Set data.id_column to the ID column, or label.generate_ids=true to number rows as <file>:<row>"
        )
    return Plan(units=units, total_rows=total, files_without_ids=without_ids)


def _plan_parquet(path, file_index, text_column, id_column, rows_per_unit, registry):
    import pyarrow.parquet as pq

    fs, inner = data_filesystem(path)
    try:
        meta = pq.ParquetFile(inner, filesystem=fs)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad footer
        raise DataError(f"{path}: cannot read the Parquet footer: {err}") from None
    names = meta.schema_arrow.names
    if text_column not in names:
        raise DataError(f"{path}: no text column {text_column!r}; columns: {names} (set data.text_column)")
    has_ids = id_column in names
    spans, groups, start, rows = [], [], 1, 0
    for g in range(meta.num_row_groups):
        n = meta.metadata.row_group(g).num_rows
        if groups and rows + n > rows_per_unit:
            spans.append(dict(start=start, stop=start + rows, row_groups=tuple(groups)))
            start, groups, rows = start + rows, [], 0
        groups.append(g)
        rows += n
    if rows:
        spans.append(dict(start=start, stop=start + rows, row_groups=tuple(groups)))
    total = meta.metadata.num_rows
    if registry is not None and has_ids:
        row = 1
        for batch in meta.iter_batches(columns=[id_column], batch_size=65536):
            values = batch.column(0).to_pylist()
            registry.add(file_index, row, [_id_key(v) for v in values])
            row += len(values)
    return spans, has_ids, total, names


def _plan_csv(path, file_index, text_column, id_column, rows_per_unit, registry):
    with open_stream(path) as stream:
        header, lines, reader = csv_header(path, stream)
        if text_column not in header:
            raise DataError(f"{path}: no text column {text_column!r}; header: {header} (set data.text_column)")
        has_ids = id_column in header
        id_at = header.index(id_column) if has_ids else -1
        spans: list[dict] = []
        unit_start = dict(start=1, byte_offset=lines.offset, first_line=reader.line_num + 1)
        rows, batch = 0, []
        for record in csv_records(path, lines, reader, line_base=0):
            rows += 1
            if has_ids and registry is not None:
                batch.append(_id_key(record.fields[id_at]) if csv_problem(record.fields, len(header)) is None else None)
                if len(batch) >= 65536:
                    registry.add(file_index, rows - len(batch) + 1, batch)
                    batch = []
            if rows % rows_per_unit == 0:
                spans.append({**unit_start, "stop": rows + 1})
                unit_start = dict(start=rows + 1, byte_offset=record.end_offset, first_line=record.end_line + 1)
        if batch and registry is not None:
            registry.add(file_index, rows - len(batch) + 1, batch)
        if rows % rows_per_unit:
            spans.append({**unit_start, "stop": rows + 1})
    return spans, has_ids, rows, header


def _plan_jsonl(path, file_index, id_column, rows_per_unit, registry):
    spans: list[dict] = []
    ids: list[tuple[int, str | None]] = []
    has_ids = False
    rows, offset = 0, 0
    unit_start = dict(start=1, byte_offset=0, first_line=1)
    with open_stream(path) as stream:
        for raw in stream:
            rows += 1
            offset += len(raw)
            record, _, _ = json_line(raw)
            if record is not None and id_column in record:
                has_ids = True
                ids.append((rows, _id_key(record[id_column])))
            if len(ids) >= 65536:
                if registry is not None:
                    registry.add_pairs(file_index, ids)
                ids.clear()
            if rows % rows_per_unit == 0:
                spans.append({**unit_start, "stop": rows + 1})
                unit_start = dict(start=rows + 1, byte_offset=offset, first_line=rows + 1)
    if registry is not None:
        registry.add_pairs(file_index, ids)
    if rows % rows_per_unit:
        spans.append({**unit_start, "stop": rows + 1})
    return spans, has_ids, rows, ()


def _plan_json_array(path, file_index, id_column, registry):
    from sentiment_ray.data import read_raw

    raw = read_raw(path, [id_column])
    has_ids = id_column in raw.columns
    if registry is not None and has_ids:
        registry.add(file_index, 1, [_id_key(v) for v in raw.values[id_column]])
    return [dict(start=1, stop=len(raw) + 1, whole_file=True)], has_ids, len(raw), raw.columns


def _id_key(value: Any) -> str | None:
    """An ID as the string the outputs carry, or None when it is missing or undecodable
    (such rows are quarantined, so they take no part in the duplicate check)."""
    if value_problem(value, "ID") is not None:
        return None
    return as_key(value) or None


# ----------------------------------------------------------------------------- shards


def submission_csv(ids: Sequence[str], labels: Sequence[str | None], header: bool = True) -> bytes:
    """`ID,label` rows in the seed's submission format (a missing label is an empty field)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(["ID", "label"])
    writer.writerows(zip(ids, ("" if x is None else x for x in labels)))
    return buffer.getvalue().encode("utf-8")


def quarantine_jsonl(entries: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode("utf-8")
