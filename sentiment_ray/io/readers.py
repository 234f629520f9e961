"""The one reader: rows of CSV, JSON lines, JSON array, Parquet files or a Hugging Face
dataset, in chunks, each row with its file, 1-based data row and line.

    for chunk in read_chunks("reviews.csv.gz", columns=["ID", "sentence"], chunk_rows=4096):
        chunk.first_row, chunk.column_values("sentence"), chunk.problems, chunk.lines
    # resume mid-file where a planner stopped (`chunk.next` of an earlier pass):
    read_chunks(path, start=Position(row=50_001, byte_offset=7_340_211, line=50_002))

Training reads whole files, the labelling planner reads the ID column in unit-sized chunks
and records where each unit starts (`Chunk.next`), and each labelling actor reads its unit
from that position: one parser for all three, so a row is numbered, decoded and judged
malformed the same way everywhere.

CSV and JSON lines are parsed here (the C `csv` module and `json`) rather than by pyarrow's
readers: those give neither the line a valid row starts on nor the byte offset of a row
(needed to start a unit mid-file), they infer types (IDs would lose leading zeros, labels
0/1 become integers), and an invalid UTF-8 byte fails a whole block instead of one row.
CSV values stay exactly as written; undecodable bytes are carried as surrogate escapes so
the validator reports each on its own row. Parquet goes through pyarrow (row groups,
`iter_batches`), whose types are kept.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sentiment_ray.config import HFDatasetConfig
from sentiment_ray.io.files import BOM, data_filesystem, file_format, is_json_array_file, open_stream
from sentiment_ray.io.values import MALFORMED_ROW, UNDECODABLE, DataError, undecodable_offset

DEFAULT_CHUNK_ROWS = 65_536
# Python's csv module refuses fields over 128 KiB by default; long reviews exceed that.
CSV_FIELD_LIMIT = 64 * 1024 * 1024


@dataclass(frozen=True)
class Position:
    """Where a row starts: its 1-based data row and, for CSV / JSON lines, the byte offset
    (in the decompressed stream of a .gz) and line of its first character."""

    row: int = 1
    byte_offset: int = 0
    line: int = 0  # 0: the start of the file (the reader finds the header itself)


@dataclass
class Chunk:
    """Consecutive rows of one file before validation.

    Text formats fill `values` (CSV: str exactly as written; JSON: any JSON value), Parquet
    and datasets fill `table` (Arrow, types kept); `column_values` reads either.
    `problems[i]` is a parse-level problem of row `first_row + i` (a short CSV row, an
    invalid JSON line), else None; `raw_rows[i]` the raw text of such a row."""

    file: str
    first_row: int
    columns: list[str]
    values: dict[str, list[Any]]
    problems: list[str | None]
    lines: list[int] | None = None
    raw_rows: dict[int, Any] = field(default_factory=dict)
    table: Any = None
    next: Position | None = None
    """Where the row after this chunk starts (CSV / JSON lines)."""

    def __len__(self) -> int:
        return len(self.problems)

    def line(self, i: int) -> int | None:
        return self.lines[i] if self.lines is not None else None

    def column_values(self, name: str) -> list[Any]:
        """Python values of a column (None for every row when the chunk lacks it)."""
        if name in self.values:
            return self.values[name]
        if self.table is not None and name in self.table.column_names:
            self.values[name] = self.table.column(name).to_pylist()
            return self.values[name]
        return [None] * len(self)

    def row_values(self, i: int) -> dict[str, Any]:
        """Every column of row i (for a quarantine entry)."""
        if self.table is not None:
            return {c: self.table.column(c)[i].as_py() for c in self.table.column_names}
        return {c: v[i] for c, v in self.values.items()}


def read_chunks(
    path: str,
    *,
    columns: Sequence[str] | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    start: Position | None = None,
    stop_row: int | None = None,
    row_groups: Sequence[int] | None = None,
) -> Iterator[Chunk]:
    """The rows of one file from `start` (default: the first row) up to `stop_row`
    (exclusive; default: the end), at most `chunk_rows` per chunk, one chunk in memory at a
    time, keeping `columns` (all when None). Parquet reads `row_groups` (default: all)."""
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    fmt = file_format(path)
    start = start or Position()
    keep = set(columns) if columns is not None else None
    try:
        if fmt == "parquet":
            yield from _parquet_chunks(path, keep, chunk_rows, start.row, row_groups)
        elif fmt == "csv":
            yield from _csv_chunks(path, keep, chunk_rows, start, stop_row)
        elif is_json_array_file(path):
            yield from _json_array_chunks(path, keep, chunk_rows, start.row, stop_row)
        else:
            yield from _jsonl_chunks(path, keep, chunk_rows, start, stop_row)
    except (OSError, _arrow_error()) as err:
        # A truncated .gz, an unreadable Parquet footer: the file as a whole is broken.
        raise DataError(f"{path}: cannot read: {err}") from None


def _arrow_error():
    import pyarrow as pa

    return pa.ArrowException


# ----------------------------------------------------------------------------- CSV


class _Lines:
    """Decoded lines of a binary stream for `csv.reader`, counting the bytes consumed, so
    the offset of the next record is known after each record (csv.reader pulls exactly the
    lines of one record, never more)."""

    def __init__(self, stream, offset: int, strip_bom: bool):
        self.stream = stream
        self.offset = offset
        self.strip_bom = strip_bom
        self.ended = False
        """The stream ran out. csv.reader finishes a record at its line end without asking
        for more; only a quoted field still open asks past the last line."""

    def __iter__(self):
        return self

    def __next__(self) -> str:
        raw = self.stream.readline()
        if not raw:
            self.ended = True
            raise StopIteration
        self.offset += len(raw)
        if self.strip_bom:
            self.strip_bom = False
            if raw.startswith(BOM):
                raw = raw[len(BOM) :]
        # surrogateescape keeps invalid bytes in the text: reported per row, not per file.
        return raw.decode("utf-8", "surrogateescape")


def csv_header(path: str) -> list[str]:
    """The header of a CSV file, checked (decodable, no duplicate names)."""
    with open_stream(path) as stream:
        header, _, _ = _open_csv(path, stream)
    return header


def csv_header_size(path: str) -> int:
    """Bytes of a CSV file's header record (BOM included): what every row's meaning depends on."""
    with open_stream(path) as stream:
        _, lines, _ = _open_csv(path, stream)
    return lines.offset


def _open_csv(path: str, stream):
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
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


def check_header(path: str, header: list[str]) -> None:
    """DataError naming `path` for an undecodable or duplicated column name."""
    if any(undecodable_offset(name) is not None for name in header):
        raise DataError(f"{path}: line 1: the header is not valid UTF-8: {header!r}")
    seen, duplicated = set(), set()
    for name in header:
        (duplicated if name in seen else seen).add(name)
    if duplicated:
        raise DataError(f"{path}: line 1: duplicate column names {sorted(duplicated)}")


def _csv_chunks(path, keep, chunk_rows, start: Position, stop_row):
    with open_stream(path) as head_stream:
        header, lines, reader = _open_csv(path, head_stream)
        if start.byte_offset == 0:
            yield from _csv_records(path, header, keep, lines, reader, 0, start.row, chunk_rows, stop_row)
            return
    with open_stream(path, start.byte_offset) as stream:
        lines = _Lines(stream, start.byte_offset, strip_bom=False)
        yield from _csv_records(path, header, keep, lines, csv.reader(lines), start.line - 1, start.row, chunk_rows, stop_row)


def _csv_records(path, header, keep, lines: _Lines, reader, line_base: int, row: int, chunk_rows, stop_row):
    width = len(header)
    kept = [(i, name) for i, name in enumerate(header) if keep is None or name in keep]
    previous = reader.line_num
    chunk = None
    try:
        for record in reader:
            if chunk is None:
                chunk = Chunk(path, row, list(header), {name: [] for _, name in kept}, [], [])
            chunk.lines.append(line_base + previous + 1)  # the line the record starts on
            previous = reader.line_num
            if lines.ended and record:
                raise DataError(_unclosed_quote(path, record[-1], line_base + reader.line_num, row))
            problem = None
            if not record:
                problem = f"{MALFORMED_ROW} (blank line)"
            elif len(record) != width:
                problem = f"{MALFORMED_ROW} (has {len(record)} fields, the header has {width}{_spanned(chunk.lines[-1], line_base + reader.line_num)})"
            if problem:
                chunk.raw_rows[len(chunk.problems)] = record
            for i, name in kept:
                chunk.values[name].append(None if problem else record[i])
            chunk.problems.append(problem)
            row += 1
            if len(chunk) >= chunk_rows or (stop_row is not None and row >= stop_row):
                chunk.next = Position(row, lines.offset, line_base + reader.line_num + 1)
                yield chunk
                chunk = None
                if stop_row is not None and row >= stop_row:
                    return
    except csv.Error as err:
        # The parser cannot resynchronise (e.g. a field over the size limit): fatal.
        raise DataError(f"{path}: line {line_base + reader.line_num}: CSV parse error: {err}") from None
    if chunk is not None:
        chunk.next = Position(row, lines.offset, line_base + reader.line_num + 1)
        yield chunk


def _unclosed_quote(path: str, last_field: str, last_line: int, row: int) -> str:
    """The error for a quoted field still open at the end of the file: its line and the
    lines it swallowed. A file error, not a bad row: no row after the quote can be located,
    so quarantining one row would hide the rest of the file (a stray quote near the top of a
    million-row file would read as "rows: 1")."""
    breaks = last_field.count("\n")
    swallowed = breaks - 1 if last_field.endswith("\n") else breaks
    opened = last_line - swallowed
    return (
        f"{path}: line {opened}: a quote opens in row {row} and is never closed: the {swallowed} line"
        f"{'' if swallowed == 1 else 's'} after it, to the end of the file, would be one field; close the quote, "
        'or double a quote inside a quoted field ("")'
    )


def _spanned(first_line: int, last_line: int) -> str:
    """For a malformed record over several lines: a quote that opened and closed in the
    wrong places may have joined rows (counted, so a swallowed stretch is not silent)."""
    if last_line <= first_line:
        return ""
    n = last_line - first_line
    return f"; one quoted field runs over lines {first_line}-{last_line}: {n} line{'' if n == 1 else 's'} swallowed by an unbalanced quote?"


# ----------------------------------------------------------------------------- JSON


def json_line(raw: bytes) -> tuple[dict | None, str | None, str]:
    """(record, problem, printable text) of one JSON line."""
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


def _records_chunk(path, first_row, records, problems, raw_rows, lines, keep) -> Chunk:
    present: dict[str, None] = {}
    for record in records:
        for key in record or ():
            present.setdefault(key, None)
    names = list(present)
    values = {n: [(r or {}).get(n) for r in records] for n in names if keep is None or n in keep}
    return Chunk(path, first_row, names, values, problems, lines, raw_rows)


def _jsonl_chunks(path, keep, chunk_rows, start: Position, stop_row):
    row, offset = start.row, start.byte_offset
    line = start.line or start.row  # one row per line
    with open_stream(path, start.byte_offset) as stream:
        records, problems, raw_rows, lines = [], [], {}, []
        first = row
        for raw in stream:
            offset += len(raw)
            record, problem, text = json_line(raw)
            if problem:
                raw_rows[len(problems)] = text
            records.append(record)
            problems.append(problem)
            lines.append(line)
            row, line = row + 1, line + 1
            if len(problems) >= chunk_rows or (stop_row is not None and row >= stop_row):
                chunk = _records_chunk(path, first, records, problems, raw_rows, lines, keep)
                chunk.next = Position(row, offset, line)
                yield chunk
                records, problems, raw_rows, lines = [], [], {}, []
                first = row
                if stop_row is not None and row >= stop_row:
                    return
        if problems:
            chunk = _records_chunk(path, first, records, problems, raw_rows, lines, keep)
            chunk.next = Position(row, offset, line)
            yield chunk


def _json_array_chunks(path, keep, chunk_rows, start_row, stop_row):
    with open_stream(path) as stream:
        data = stream.read()
    if data.startswith(BOM):
        data = data[len(BOM) :]
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 at byte {err.start} (a JSON array file; rows cannot be located)") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {err.lineno}: invalid JSON: {err.msg}") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: a .json file must hold JSON lines or one array of objects")
    end = len(items) if stop_row is None else min(len(items), stop_row - 1)
    for begin in range(start_row - 1, end, chunk_rows):
        part = items[begin : min(begin + chunk_rows, end)]
        problems = [None if isinstance(x, dict) else f"{MALFORMED_ROW} (a JSON {type(x).__name__}, not an object)" for x in part]
        raw_rows = {i: json.dumps(x) for i, x in enumerate(part) if problems[i]}
        records = [x if isinstance(x, dict) else None for x in part]
        yield _records_chunk(path, begin + 1, records, problems, raw_rows, None, keep)


# ----------------------------------------------------------------------------- Parquet


def parquet_file(path: str):
    """pyarrow.parquet.ParquetFile of `path`; a DataError for a missing or broken file."""
    import pyarrow.parquet as pq

    fs, inner = data_filesystem(path)
    try:
        return pq.ParquetFile(inner, filesystem=fs)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied (cannot read it)") from None
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad footer
        raise DataError(f"{path}: cannot read the Parquet footer: {err}") from None


def _parquet_chunks(path, keep, chunk_rows, start_row, row_groups):
    import pyarrow as pa

    reader = parquet_file(path)
    names = reader.schema_arrow.names
    wanted = [n for n in names if keep is None or n in keep]
    row = start_row
    groups = list(row_groups) if row_groups is not None else None
    for batch in reader.iter_batches(batch_size=chunk_rows, row_groups=groups, columns=wanted):
        table = pa.Table.from_batches([batch])
        yield Chunk(path, row, list(names), {}, [None] * table.num_rows, table=table)
        row += table.num_rows


# ----------------------------------------------------------------------------- datasets


def read_dataset_chunks(
    source: HFDatasetConfig, *, columns: Sequence[str] | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> Iterator[Chunk]:
    """A Hugging Face dataset split in chunks, named `source.describe()` (`hf:imdb:train`):
    `datasets.load_dataset(name, config, split=..., revision=...)`, or `load_from_disk(name)`
    (its `split` when it holds a DatasetDict). ClassLabel columns keep their integer codes
    (IMDB: 0/1, mapped through data.label_map)."""
    import datasets

    name = source.describe()
    try:
        if source.load_from_disk:
            loaded = datasets.load_from_disk(source.name)
            if isinstance(loaded, datasets.DatasetDict):
                if source.split not in loaded:
                    raise DataError(f"{name}: no split {source.split!r} in {source.name}; splits: {sorted(loaded)}")
                loaded = loaded[source.split]
        else:
            loaded = datasets.load_dataset(source.name, source.config, split=source.split, revision=source.revision)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - the hub, the cache and fsspec raise many kinds
        raise DataError(f"{name}: cannot load the dataset: {type(err).__name__}: {err}") from None
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"{name}: expected one split (a Dataset), got {type(loaded).__name__}; set data.*_dataset.split")
    names = list(loaded.column_names)
    wanted = [n for n in names if columns is None or n in columns]
    arrow = loaded.select_columns(wanted).with_format("arrow") if wanted else None
    for begin in range(0, loaded.num_rows, chunk_rows):
        end = min(begin + chunk_rows, loaded.num_rows)
        # Through the dataset's own indexing (it honours an indices mapping; .data would not).
        table = arrow[begin:end] if arrow is not None else None
        yield Chunk(name, begin + 1, names, {}, [None] * (end - begin), table=table)
