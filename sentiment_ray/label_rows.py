"""Reading a work unit's rows, streaming, and splitting them into good rows and quarantined ones.

Pure: pyarrow and the standard library only. Conventions follow `sentiment_ray.data` (the
training reader): CSV values stay exactly as written (no type guessing), undecodable bytes
are reported on their own row, rows are 1-based data rows with the line they start on.

CSV and JSON lines are read from a byte offset the planner recorded (`label_units`), so a
unit never re-parses the part of its file before it; gzip streams are read through to it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sentiment_ray.data import (
    MALFORMED_ROW,
    MISSING_ID,
    UNDECODABLE,
    DataError,
    as_key,
    as_text,
    check_header,
    data_filesystem,
    printable,
    reason_kind,
    text_problem,
    value_problem,
)

if TYPE_CHECKING:
    from sentiment_ray.label_units import WorkUnit

# Provenance columns added to every good row (the labeller adds its predictions after them).
SOURCE_COLUMNS = ("source_file", "source_row")

_CSV_FIELD_LIMIT = 64 * 1024 * 1024  # as data.py: long reviews exceed csv's 128 KiB default
_BOM = b"\xef\xbb\xbf"


def open_stream(path: str, offset: int = 0) -> io.BufferedReader:
    """A buffered binary stream positioned at `offset` (decompressed position for .gz,
    reached by reading through; a plain file seeks)."""
    fs, inner = data_filesystem(path)
    try:
        if path.lower().endswith(".gz"):
            stream = io.BufferedReader(fs.open_input_stream(inner, compression="gzip"), 1 << 20)
            remaining = offset
            while remaining > 0:
                skipped = len(stream.read(min(remaining, 1 << 24)))
                if not skipped:
                    raise DataError(f"{path}: shorter than when it was planned (changed since?)")
                remaining -= skipped
            return stream
        stream = io.BufferedReader(fs.open_input_file(inner), 1 << 20)
        stream.seek(offset)
        return stream
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None


class _Lines:
    """Decoded lines of a binary stream for `csv.reader`, counting bytes consumed, so the
    byte offset of the next record is known after each record (csv.reader pulls exactly
    the lines of one record, never more). Undecodable bytes stay as surrogate escapes
    (as data.py reads CSV) so each is reported on its own row."""

    def __init__(self, stream: io.BufferedReader, offset: int, strip_bom: bool):
        self.stream = stream
        self.offset = offset
        self.strip_bom = strip_bom

    def __iter__(self):
        return self

    def __next__(self) -> str:
        raw = self.stream.readline()
        if not raw:
            raise StopIteration
        self.offset += len(raw)
        if self.strip_bom:
            self.strip_bom = False
            if raw.startswith(_BOM):
                raw = raw[len(_BOM) :]
        return raw.decode("utf-8", "surrogateescape")


@dataclass
class _CsvRecord:
    fields: list[str]
    line: int
    end_offset: int
    """Byte offset just past this record (= where the next one starts)."""
    end_line: int


def csv_header(path: str, stream: io.BufferedReader) -> tuple[list[str], _Lines, "csv._reader"]:
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    lines = _Lines(stream, 0, strip_bom=True)
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
    except csv.Error as err:
        raise DataError(f"{path}: line 1: CSV parse error: {err}") from None
    if header is None:
        raise DataError(f"{path}: empty file (no header row)")
    check_header(path, header)
    return header, lines, reader


def csv_records(path: str, lines: _Lines, reader, line_base: int) -> Iterator[_CsvRecord]:
    """Records with the line each starts on: `line_base` + the reader's own line count
    (0 for a reader that also read the header; first_line - 1 after a seek)."""
    previous = reader.line_num
    try:
        for record in reader:
            yield _CsvRecord(record, line_base + previous + 1, lines.offset, line_base + reader.line_num)
            previous = reader.line_num
    except csv.Error as err:
        raise DataError(f"{path}: line {line_base + reader.line_num}: CSV parse error: {err}") from None


def csv_problem(record: list[str], width: int) -> str | None:
    if not record:
        return f"{MALFORMED_ROW} (blank line)"
    if len(record) != width:
        return f"{MALFORMED_ROW} (has {len(record)} fields, the header has {width})"
    return None


def json_line(raw: bytes) -> tuple[dict | None, str | None, str]:
    """(record, problem, printable text) of one JSON line, checked as data.py checks them."""
    raw = raw.rstrip(b"\r\n")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"{UNDECODABLE} (not valid UTF-8 at byte {err.start} of the line)", raw.decode("utf-8", "backslashreplace")
    if not text.strip():
        return None, f"{MALFORMED_ROW} (blank line)", text
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"{MALFORMED_ROW} (invalid JSON: {err.msg} at column {err.colno})", text
    if not isinstance(record, dict):
        return None, f"{MALFORMED_ROW} (a JSON {type(record).__name__}, not an object)", text
    return record, None, text


def is_json_array_file(path: str) -> bool:
    if not path.lower().removesuffix(".gz").endswith(".json"):
        return False
    with open_stream(path) as stream:
        head = stream.read(4096).lstrip()
    return head.startswith(_BOM + b"[") or head[:1] == b"["


# ----------------------------------------------------------------------------- reading units


@dataclass
class Chunk:
    """Consecutive rows of one unit, before validation. `values` holds Python values per
    column (CSV: str, exactly as written; JSON: any JSON value); for Parquet, `table`
    holds the rows and `values` only the text and ID columns."""

    first_row: int
    columns: list[str]
    values: dict[str, list[Any]]
    problems: list[str | None]
    lines: list[int] | None = None
    table: Any = None
    raw_rows: dict[int, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.problems)


def iter_unit_chunks(unit: "WorkUnit", *, text_column: str, id_column: str, chunk_rows: int) -> Iterator[Chunk]:
    """The unit's rows in chunks of at most `chunk_rows`, streaming (one chunk in memory)."""
    if unit.fmt == "parquet":
        yield from _parquet_chunks(unit, text_column, id_column, chunk_rows)
    elif unit.fmt == "csv":
        yield from _csv_chunks(unit, chunk_rows)
    elif unit.whole_file:
        yield from _json_array_chunks(unit, chunk_rows)
    else:
        yield from _jsonl_chunks(unit, chunk_rows)


def _parquet_chunks(unit, text_column, id_column, chunk_rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, inner = data_filesystem(unit.file)
    reader = pq.ParquetFile(inner, filesystem=fs)
    row = unit.start
    for batch in reader.iter_batches(batch_size=chunk_rows, row_groups=list(unit.row_groups)):
        table = pa.Table.from_batches([batch])
        values = {c: table.column(c).to_pylist() for c in (text_column, id_column) if c in table.column_names}
        yield Chunk(row, table.column_names, values, [None] * table.num_rows, table=table)
        row += table.num_rows
    _check_count(unit, row)


def _csv_chunks(unit, chunk_rows):
    with open_stream(unit.file) as head:
        header, _, _ = csv_header(unit.file, head)
    with open_stream(unit.file, unit.byte_offset) as stream:
        lines = _Lines(stream, unit.byte_offset, strip_bom=False)
        records = csv_records(unit.file, lines, csv.reader(lines), line_base=unit.first_line - 1)
        row = unit.start
        while row < unit.stop:
            values: dict[str, list[Any]] = {c: [] for c in header}
            problems, line_numbers, raw_rows = [], [], {}
            for record in records:
                problem = csv_problem(record.fields, len(header))
                if problem:
                    raw_rows[len(problems)] = record.fields
                for i, name in enumerate(header):
                    values[name].append(None if problem else record.fields[i])
                problems.append(problem)
                line_numbers.append(record.line)
                if len(problems) >= chunk_rows or row + len(problems) >= unit.stop:
                    break
            if not problems:
                break
            yield Chunk(row, list(header), values, problems, line_numbers, raw_rows=raw_rows)
            row += len(problems)
    _check_count(unit, row)


def _jsonl_chunks(unit, chunk_rows):
    with open_stream(unit.file, unit.byte_offset) as stream:
        row = unit.start
        while row < unit.stop:
            records, problems, raw_rows = [], [], {}
            for raw in stream:
                record, problem, text = json_line(raw)
                if problem:
                    raw_rows[len(problems)] = text
                records.append(record)
                problems.append(problem)
                if len(problems) >= chunk_rows or row + len(problems) >= unit.stop:
                    break
            if not problems:
                break
            first_line = unit.first_line + (row - unit.start)  # one row per line
            yield _records_chunk(row, records, problems, raw_rows, list(range(first_line, first_line + len(problems))))
            row += len(problems)
    _check_count(unit, row)


def _json_array_chunks(unit, chunk_rows):
    from sentiment_ray.data import read_raw

    raw = read_raw(unit.file)
    for begin in range(0, len(raw), chunk_rows):
        end = min(begin + chunk_rows, len(raw))
        values = {c: raw.values[c][begin:end] for c in raw.columns}
        raw_rows = {i - begin: v for i, v in raw.raw_rows.items() if begin <= i < end}
        yield Chunk(begin + 1, list(raw.columns), values, raw.problems[begin:end], raw_rows=raw_rows)
    _check_count(unit, len(raw) + 1)


def _records_chunk(first_row, records, problems, raw_rows, lines) -> Chunk:
    columns: dict[str, None] = {}
    for record in records:
        for key in record or ():
            columns.setdefault(key, None)
    values = {c: [(r or {}).get(c) for r in records] for c in columns}
    return Chunk(first_row, list(columns), values, problems, lines, raw_rows=raw_rows)


def _check_count(unit: "WorkUnit", next_row: int) -> None:
    if next_row != unit.stop:
        raise DataError(
            f"{unit.file}: rows {unit.start}-{unit.stop - 1} were planned but {next_row - unit.start} were read; "
            "the file changed since the run was planned (rerun with --overwrite)"
        )


# ----------------------------------------------------------------------------- validation


@dataclass
class ValidChunk:
    """The good rows of a chunk as an Arrow table (every input column, `ID` as string,
    `source_file`, `source_row`), their texts, and quarantine entries for the rest."""

    table: Any
    sentences: list[str]
    quarantined: list[dict[str, Any]]


def validate_chunk(chunk: Chunk, unit: "WorkUnit", *, text_column: str, id_column: str) -> ValidChunk:
    """Split a chunk into good rows and quarantined ones. A row is bad when it is
    malformed, its text is empty/missing/not a string/undecodable, its ID is missing or
    undecodable, or (CSV/JSON) another of its values is undecodable."""
    import pyarrow as pa

    n = len(chunk)
    texts = chunk.values.get(text_column, [None] * n)
    if unit.has_ids:
        ids = chunk.values.get(id_column, [None] * n)
    good_rows: list[int] = []
    out_ids: list[str] = []
    quarantined: list[dict[str, Any]] = []
    other_columns = [c for c in chunk.columns if c not in (text_column, id_column)] if chunk.table is None else []
    for i in range(n):
        row = chunk.first_row + i
        problem = chunk.problems[i] or text_problem(texts[i])
        id_value = None
        if problem is None:
            if unit.has_ids:
                problem = value_problem(ids[i], "ID")
                id_value = as_key(ids[i]) if problem is None else None
                if problem is None and not id_value:
                    problem = MISSING_ID
            else:
                id_value = f"{unit.id_name}:{row}"
        if problem is None:
            for column in other_columns:
                problem = value_problem(chunk.values[column][i], column)
                if problem:
                    break
        if problem is not None:
            values = {c: chunk.values[c][i] for c in chunk.values}
            if chunk.table is not None:
                values = {c: chunk.table.column(c)[i].as_py() for c in chunk.columns}
            if i in chunk.raw_rows:
                values["_raw"] = chunk.raw_rows[i]
            quarantined.append(
                {
                    "file": unit.file,
                    "row": row,
                    "line": chunk.lines[i] if chunk.lines else None,
                    "reason": problem,
                    "kind": reason_kind(problem),
                    "values": {k: printable(v) for k, v in values.items()},
                }
            )
            continue
        good_rows.append(i)
        out_ids.append(id_value)
    sentences = [as_text(texts[i]) for i in good_rows]
    if chunk.table is not None:
        table = chunk.table.take(pa.array(good_rows, type=pa.int64())) if len(good_rows) < n else chunk.table
        table = _set_column(table, id_column, pa.array(out_ids, type=pa.string()))
    else:
        arrays = {}
        for column in chunk.columns:
            column_values = chunk.values[column]
            if column == id_column:
                arrays[column] = pa.array(out_ids, type=pa.string())
                continue
            try:
                arrays[column] = pa.array([column_values[i] for i in good_rows])
            except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
                raise DataError(
                    f"{unit.file}: rows {chunk.first_row}-{chunk.first_row + n - 1}: column {column!r} mixes "
                    f"value types ({err}); make the column one type"
                ) from None
        if id_column not in arrays:
            arrays[id_column] = pa.array(out_ids, type=pa.string())
        table = pa.table(arrays)
    clash = [c for c in SOURCE_COLUMNS if c in table.column_names]
    if clash:
        raise DataError(f"{unit.file}: input column(s) {clash} clash with columns the labeller adds; rename them")
    rows = pa.array([chunk.first_row + i for i in good_rows], type=pa.int64())
    table = table.append_column("source_file", pa.array([unit.file] * len(good_rows), type=pa.string()))
    table = table.append_column("source_row", rows)
    return ValidChunk(table=table, sentences=sentences, quarantined=quarantined)


def _set_column(table, name: str, array):
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, array)
    return table.append_column(name, array)
