"""Reading, validating and splitting labelled sentiment data. Pure: pyarrow and numpy only.

    files = expand_paths("s3://bucket/train/*.parquet")       # or a path, glob, directory
    data = load_labelled(cfg.data.train_path, cfg.data, LabelSet(cfg.prompt.labels),
                         quarantine_path="runs/demo/quarantine-train.jsonl")
    train, val = split_train_validation(data.table, cfg.data.validation_fraction, cfg.data.split_seed)

Formats by extension: .csv, .parquet/.pq, .jsonl/.json (JSON lines; a .json file holding
one JSON array also works), each of the text formats optionally .gz-compressed.

CSV and JSON lines are parsed row by row in Python (not by pyarrow's readers) so that
every problem - invalid UTF-8, a short row, a number where text belongs - is reported
with its file, data row (1-based, header excluded) and line, and so that CSV values stay
exactly as written (no type guessing: IDs keep leading zeros, labels 0/1 stay "0"/"1").

Bad rows are never dropped silently: `data.on_bad_rows=error` stops at the first one;
`skip` writes each to a JSON-lines quarantine file with its reason and counts them.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import hashlib
import io
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from sentiment_ray import storage
from sentiment_ray.config import DataConfig, HFDatasetConfig
from sentiment_ray.labels import LabelSet

TEXT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
BINARY_FORMATS = {".parquet": "parquet", ".pq": "parquet"}
SUPPORTED_SUFFIXES = ".csv, .parquet, .pq, .jsonl, .json (text formats optionally .gz)"
SKIP_HINT = "set data.on_bad_rows=skip to quarantine bad rows instead of stopping"

# Bad-row kinds: the keys of BadRows.by_reason.
EMPTY_TEXT = "empty text"
MISSING_TEXT = "missing text"
NOT_A_STRING = "text is not a string"
UNDECODABLE = "undecodable bytes"
MISSING_LABEL = "missing label"
UNKNOWN_LABEL = "unknown label"
MISSING_ID = "missing ID"
DUPLICATE_ID = "duplicate ID"
MALFORMED_ROW = "malformed row"

# Python's csv module refuses fields over 128 KiB by default; long reviews exceed that.
_CSV_FIELD_LIMIT = 64 * 1024 * 1024


class DataError(ValueError):
    """Bad input data. The message names the file, the row (and line) and the reason;
    credentials in it (a URI's userinfo, secret env values) are masked (storage.redact)."""

    def __init__(self, message: str):
        super().__init__(storage.redact(message))


def _where(file: str, row: int | None = None, line: int | None = None) -> str:
    out = file
    if row is not None:
        out += f": row {row}"
        if line is not None:
            out += f" (line {line})"
    return out


# ----------------------------------------------------------------------------- paths


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _suffix(path: str) -> str:
    """The format suffix, looking through a trailing .gz: 'x.CSV.gz' -> '.csv'."""
    name = path.rsplit("/", 1)[-1].lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return os.path.splitext(name)[1]


def file_format(path: str) -> str:
    """'csv', 'jsonl' or 'parquet' from the extension; DataError for anything else."""
    suffix = _suffix(path)
    if path.lower().endswith(".gz") and suffix in BINARY_FORMATS:
        raise DataError(f"{path}: gzip-compressed Parquet is not supported (Parquet compresses internally)")
    fmt = TEXT_FORMATS.get(suffix) or BINARY_FORMATS.get(suffix)
    if fmt is None:
        raise DataError(f"{path}: unsupported file type {suffix or '(no extension)'!r}; supported: {SUPPORTED_SUFFIXES}")
    return fmt


def _is_supported(path: str) -> bool:
    return _suffix(path) in TEXT_FORMATS or _suffix(path) in BINARY_FORMATS


def _is_hidden(relative: str) -> bool:
    # Spark/pyarrow convention: _SUCCESS, _metadata, .ipynb_checkpoints are not data.
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def data_filesystem(path: str):
    """(pyarrow FileSystem, path inside it) for a local path or a URI (storage.filesystem;
    a URI with inline credentials or one pyarrow cannot open is a DataError)."""
    try:
        return storage.filesystem(path)
    except storage.StorageError as err:
        raise DataError(str(err)) from None


def _glob_matches(pattern: str, candidate: str) -> bool:
    """Shell-style match where '*' stays inside one path component and '**' spans any."""
    if "**" in pattern:
        return fnmatch.fnmatchcase(candidate, pattern)
    pattern_parts, parts = pattern.split("/"), candidate.split("/")
    return len(pattern_parts) == len(parts) and all(fnmatch.fnmatchcase(c, p) for c, p in zip(parts, pattern_parts))


def expand_paths(path_or_glob_or_uri: str) -> list[str]:
    """The data files a path names, sorted: a file, a glob, a directory (its supported files,
    recursively, skipping names starting with '.' or '_'), or a URI of any of these
    (s3://bucket/x/*.parquet, file:///data/dir). Local paths come back as absolute paths,
    file:// URIs as local paths, other URIs as URIs. Matching nothing is a DataError."""
    from pyarrow import fs as pafs

    given = path_or_glob_or_uri
    if not given or not str(given).strip():
        raise DataError("no data path given (data.train_path / the input path is empty)")
    fs, inner = data_filesystem(given)
    local = isinstance(fs, pafs.LocalFileSystem)
    prefix = "" if local else storage.uri_prefix(given)

    def outward(p: str) -> str:
        return prefix + p

    if _has_glob(inner):
        if local:
            matches = sorted(glob.glob(inner, recursive=True))
        else:
            parts = inner.split("/")
            first_glob = next(i for i, part in enumerate(parts) if _has_glob(part))
            base = "/".join(parts[:first_glob])
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            matches = sorted(i.path for i in infos if _glob_matches(inner, i.path))
        files: list[str] = []
        for match in matches:
            files.extend(_files_in(fs, match, outward) if _is_dir(fs, match) else [outward(match)])
        if not files:
            raise DataError(f"{given}: no files match this pattern")
    else:
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{given}: no such file or directory")
        if info.type == pafs.FileType.Directory:
            files = _files_in(fs, inner, outward)
            if not files:
                raise DataError(f"{given}: directory holds no data files ({SUPPORTED_SUFFIXES})")
            return files
        files = [outward(inner)]
    for f in files:
        file_format(f)  # an unsupported file a glob picked up is an error, not skipped
    return files


def _is_dir(fs, path: str) -> bool:
    from pyarrow import fs as pafs

    return fs.get_file_info(path).type == pafs.FileType.Directory


def _files_in(fs, directory: str, outward) -> list[str]:
    from pyarrow import fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=True))
    found = []
    for info in infos:
        relative = info.path[len(directory) :].lstrip("/")
        if info.type == pafs.FileType.File and _is_supported(info.path) and not _is_hidden(relative):
            found.append(outward(info.path))
    return sorted(found)


def _open_binary(path: str):
    """A readable binary stream, gunzipped when the name ends in .gz."""
    fs, inner = data_filesystem(path)
    try:
        return fs.open_input_stream(inner, compression="gzip" if path.lower().endswith(".gz") else None)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot open: {err}") from None


# ----------------------------------------------------------------------------- raw reading


@dataclass
class RawFile:
    """A file's rows before validation, column-wise. Values are as the format gives them
    (CSV: str, possibly holding undecodable bytes as surrogate escapes; JSON: any JSON
    value; Parquet: the column's Python values). `problems[i]` is a parse-level problem
    of row i+1 (a short CSV row, an invalid JSON line), else None."""

    path: str
    columns: list[str]
    values: dict[str, list[Any]]
    lines: list[int] | None
    problems: list[str | None]
    raw_rows: dict[int, Any] = field(default_factory=dict)  # row index -> raw text of malformed rows

    def __len__(self) -> int:
        return len(self.problems)

    def line(self, i: int) -> int | None:
        return self.lines[i] if self.lines is not None else None


def read_raw(path: str, columns: Sequence[str] | None = None) -> RawFile:
    """Parse one file into a RawFile, keeping only `columns` (all when None) that exist."""
    fmt = file_format(path)
    try:
        if fmt == "parquet":
            return _read_parquet_raw(path, columns)
        with _open_binary(path) as stream:
            if fmt == "csv":
                return _read_csv_raw(path, stream, columns)
            return _read_jsonl_raw(path, stream, columns)
    except (OSError, pa.ArrowException) as err:
        # A truncated .gz, an unreadable Parquet footer: the file as a whole is broken.
        raise DataError(f"{path}: cannot read: {err}") from None


def _read_csv_raw(path: str, stream, columns: Sequence[str] | None) -> RawFile:
    # surrogateescape keeps invalid bytes in the text so they are reported per row, not
    # as one file-level decode error; utf-8-sig drops a BOM from the first header name.
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    reader = csv.reader(text)
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file (no header row)")
        check_header(path, header)
        keep = [(i, name) for i, name in enumerate(header) if columns is None or name in columns]
        values: dict[str, list[Any]] = {name: [] for _, name in keep}
        lines: list[int] = []
        problems: list[str | None] = []
        raw_rows: dict[int, Any] = {}
        previous_line = reader.line_num
        for record in reader:
            lines.append(previous_line + 1)  # the line the record starts on
            previous_line = reader.line_num
            problem = None
            if not record:
                problem = f"{MALFORMED_ROW} (blank line)"
            elif len(record) != len(header):
                problem = f"{MALFORMED_ROW} (has {len(record)} fields, the header has {len(header)})"
            if problem:
                raw_rows[len(problems)] = record
                for _, name in keep:
                    values[name].append(None)
            else:
                for i, name in keep:
                    values[name].append(record[i])
            problems.append(problem)
    except csv.Error as err:
        # The parser cannot resynchronise (e.g. a field over the size limit): fatal.
        raise DataError(f"{path}: line {reader.line_num}: CSV parse error: {err}") from None
    return RawFile(path, list(header), values, lines, problems, raw_rows)


def check_header(path: str, header: list[str]) -> None:
    """DataError naming `path` for an undecodable or duplicated column name."""
    if any(_undecodable_offset(name) is not None for name in header):
        raise DataError(f"{path}: line 1: the header is not valid UTF-8: {header!r}")
    duplicated = sorted(name for name, n in Counter(header).items() if n > 1)
    if duplicated:
        raise DataError(f"{path}: line 1: duplicate column names {duplicated}")


def _read_jsonl_raw(path: str, stream, columns: Sequence[str] | None) -> RawFile:
    data = stream.read()
    if _suffix(path) == ".json" and data.lstrip()[:1] == b"[":
        return _read_json_array_raw(path, data, columns)
    records: list[dict | None] = []
    lines: list[int] = []
    problems: list[str | None] = []
    raw_rows: dict[int, Any] = {}
    for number, line_bytes in enumerate(data.splitlines(), start=1):
        record, problem = None, None
        try:
            line_text = line_bytes.decode("utf-8")
        except UnicodeDecodeError as err:
            problem = f"{UNDECODABLE} (not valid UTF-8 at byte {err.start} of the line)"
            line_text = line_bytes.decode("utf-8", "backslashreplace")
        if problem is None and not line_text.strip():
            problem = f"{MALFORMED_ROW} (blank line)"
        if problem is None:
            try:
                record = json.loads(line_text)
            except json.JSONDecodeError as err:
                problem = f"{MALFORMED_ROW} (invalid JSON: {err.msg} at column {err.colno})"
        if problem is None and not isinstance(record, dict):
            problem = f"{MALFORMED_ROW} (a JSON {type(record).__name__}, not an object)"
            record = None
        if problem:
            raw_rows[len(problems)] = line_text
        records.append(record)
        lines.append(number)
        problems.append(problem)
    return _records_to_raw(path, records, lines, problems, raw_rows, columns)


def _read_json_array_raw(path: str, data: bytes, columns: Sequence[str] | None) -> RawFile:
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 at byte {err.start} (a JSON array file; rows cannot be located)") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {err.lineno}: invalid JSON: {err.msg}") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: a .json file must hold JSON lines or one array of objects")
    problems = [None if isinstance(x, dict) else f"{MALFORMED_ROW} (a JSON {type(x).__name__}, not an object)" for x in items]
    raw_rows = {i: json.dumps(x) for i, x in enumerate(items) if problems[i]}
    records = [x if isinstance(x, dict) else None for x in items]
    return _records_to_raw(path, records, None, problems, raw_rows, columns)


def _records_to_raw(path, records, lines, problems, raw_rows, columns) -> RawFile:
    present: dict[str, None] = {}
    for record in records:
        for key in record or ():
            present.setdefault(key, None)
    names = list(present)
    keep = [n for n in names if columns is None or n in columns]
    values = {n: [(r or {}).get(n) for r in records] for n in keep}
    return RawFile(path, names, values, lines, problems, raw_rows)


def _read_parquet_raw(path: str, columns: Sequence[str] | None) -> RawFile:
    import pyarrow.parquet as pq

    fs, inner = data_filesystem(path)
    schema = pq.read_schema(inner, filesystem=fs)
    names = list(schema.names)
    keep = [n for n in names if columns is None or n in columns]
    table = pq.read_table(inner, filesystem=fs, columns=keep)
    values = {n: table.column(n).to_pylist() for n in keep}
    return RawFile(path, names, values, None, [None] * table.num_rows)


def read_dataset_raw(source: HFDatasetConfig, columns: Sequence[str] | None = None) -> RawFile:
    """A Hugging Face dataset split as a RawFile named `source.describe()` (`hf:imdb:train`):
    `datasets.load_dataset(name, config, split=..., revision=...)`, or `load_from_disk(name)`
    (its `split` when it holds a DatasetDict). ClassLabel columns keep their integer codes
    (IMDB: 0/1, mapped through data.label_map)."""
    import datasets

    where = source.describe()
    try:
        if source.load_from_disk:
            loaded = datasets.load_from_disk(source.name)
            if isinstance(loaded, datasets.DatasetDict):
                if source.split not in loaded:
                    raise DataError(f"{where}: no split {source.split!r} in {source.name}; splits: {sorted(loaded)}")
                loaded = loaded[source.split]
        else:
            loaded = datasets.load_dataset(source.name, source.config, split=source.split, revision=source.revision)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - the hub, the cache and fsspec raise many kinds
        raise DataError(f"{where}: cannot load the dataset: {type(err).__name__}: {err}") from None
    if not isinstance(loaded, datasets.Dataset):
        raise DataError(f"{where}: expected one split (a Dataset), got {type(loaded).__name__}; set data.*_dataset.split")
    names = list(loaded.column_names)
    keep = [n for n in names if columns is None or n in columns]
    # Through the dataset's own indexing (it honours an indices mapping; .data would not).
    table = loaded.select_columns(keep).with_format("arrow")[:] if keep else None
    values = {n: table.column(n).to_pylist() for n in keep}
    return RawFile(where, names, values, None, [None] * loaded.num_rows)


def read_file(path: str) -> pa.Table:
    """One file as a pyarrow Table, strictly: any malformed row or undecodable value is a
    DataError naming the row. CSV columns are all strings (exactly as written)."""
    if file_format(path) == "parquet":
        import pyarrow.parquet as pq

        fs, inner = data_filesystem(path)
        return pq.read_table(inner, filesystem=fs)
    raw = read_raw(path)
    for i, problem in enumerate(raw.problems):
        if problem:
            raise DataError(f"{_where(path, i + 1, raw.line(i))}: {problem}")
    arrays = {}
    for name in raw.columns:
        column = raw.values[name]
        for i, value in enumerate(column):
            if isinstance(value, str) and _undecodable_offset(value) is not None:
                raise DataError(f"{_where(path, i + 1, raw.line(i))}: {_undecodable_reason(value, name)}")
        try:
            arrays[name] = pa.array(column)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise DataError(f"{path}: column {name!r} mixes value types: {err}") from None
    return pa.table(arrays) if arrays else pa.table({})


# ----------------------------------------------------------------------------- per-value checks


def _undecodable_offset(value: str) -> int | None:
    """Byte offset of the first invalid UTF-8 byte carried as a surrogate escape, else None."""
    try:
        value.encode("utf-8")
        return None
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogateescape")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            return err.start
        return 0  # a lone surrogate from a JSON \ud800 escape: not encodable either


def _undecodable_reason(value: str | bytes, column: str | None = None) -> str:
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    try:
        raw.decode("utf-8")
        start = 0
    except UnicodeDecodeError as err:
        start = err.start
    where = f" in column {column!r}" if column else ""
    snippet = raw[max(0, start - 10) : start + 10]
    return f"{UNDECODABLE} (not valid UTF-8{where} at byte {start}: {snippet!r})"


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def text_problem(value: Any) -> str | None:
    """None when `value` is usable text, else the reason (the bad-row kind first).

    Accepts str (with undecodable CSV bytes carried as surrogate escapes), bytes (decoded
    as UTF-8), or anything a reader or a pandas batch may hand over (None, NaN, numbers)."""
    if _is_null(value):
        return MISSING_TEXT + " (null)"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return _undecodable_reason(value)
    if not isinstance(value, str):
        return f"{NOT_A_STRING} (got {type(value).__name__} {value!r})"
    if _undecodable_offset(value) is not None:
        return _undecodable_reason(value)
    if not value:
        return EMPTY_TEXT
    if not value.strip():
        return EMPTY_TEXT + " (whitespace only)"
    return None


def as_text(value: Any) -> str:
    """The text of a value `text_problem` accepted (bytes decoded)."""
    return value.decode("utf-8") if isinstance(value, bytes) else value


def as_key(value: Any) -> str | None:
    """A label/ID/lang value as a comparable string: ints and integral floats without a
    decimal point (IMDB labels 0/1 from Parquet or JSON match label_map keys "0"/"1")."""
    if _is_null(value):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8")  # callers check decodability first
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def value_problem(value: Any, column: str) -> str | None:
    """The reason `value` of `column` is not valid UTF-8 text, or None."""
    if isinstance(value, bytes):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return _undecodable_reason(value, column)
    if isinstance(value, str) and _undecodable_offset(value) is not None:
        return _undecodable_reason(value, column)
    return None


def resolve_label(value: Any, labels: LabelSet, label_map: dict[str, str] | None = None) -> tuple[str | None, str | None]:
    """(canonical label, None) or (None, reason). `label_map` is applied first (keys
    compared as strings after stripping), then the label set matches case-insensitively."""
    problem = value_problem(value, "label")
    if problem:
        return None, problem
    key = as_key(value)
    if not key:
        return None, MISSING_LABEL
    mapped = (label_map or {}).get(key, key)
    label = labels.normalise(mapped)
    if label is None:
        expected = ", ".join(labels.labels)
        mapping = f"; label_map keys: {sorted(label_map)}" if label_map else ""
        return None, f"{UNKNOWN_LABEL} ({key!r}; expected one of {expected}{mapping})"
    return label, None


class DuplicateIds:
    """Remembers IDs seen so far (across files and streamed batches); `problem` says
    whether an ID is missing or was seen before, naming where."""

    def __init__(self) -> None:
        self._first_seen: dict[str, tuple[str, int]] = {}

    def problem(self, value: Any, file: str, row: int) -> str | None:
        bad = value_problem(value, "ID")
        if bad:
            return bad
        key = as_key(value)
        if not key:
            return MISSING_ID
        seen = self._first_seen.get(key)
        if seen is not None:
            where = f"row {seen[1]}" if seen[0] == file else f"{seen[0]}: row {seen[1]}"
            return f"{DUPLICATE_ID} ({key!r}, first at {where})"
        self._first_seen[key] = (file, row)
        return None


def check_unique_ids(ids: Iterable[Any], file: str, *, first_row: int = 1, seen: DuplicateIds | None = None) -> None:
    """Raise DataError at the first missing or repeated ID; pass `seen` to carry the
    check across batches or files."""
    tracker = seen if seen is not None else DuplicateIds()
    for offset, value in enumerate(ids):
        problem = tracker.problem(value, file, first_row + offset)
        if problem:
            raise DataError(f"{_where(file, first_row + offset)}: {problem}")


def reason_kind(reason: str) -> str:
    """The bad-row kind a reason starts with: 'unknown label (...)' -> 'unknown label'."""
    return reason.split(" (", 1)[0]


# ----------------------------------------------------------------------------- quarantine


def printable(value: Any) -> Any:
    """A raw value as JSON-safe text: undecodable bytes shown as \\x escapes, None kept."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, (list, tuple)):
        return [printable(v) for v in value]
    return str(value)


class _Quarantine:
    """JSON-lines sink for skipped rows; created (truncated) up front so the file always
    reflects this load, even when it ends up empty."""

    def __init__(self, path: str):
        self.path = path
        if storage.is_uri(path):
            fs, inner = data_filesystem(path)
            self._stream = io.TextIOWrapper(fs.open_output_stream(inner), encoding="utf-8")
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._stream = open(path, "w", encoding="utf-8")
        self.by_reason: Counter[str] = Counter()

    def write(self, file: str, row: int, line: int | None, reason: str, values: dict[str, Any]) -> None:
        entry = {"file": file, "row": row, "line": line, "reason": reason, "kind": reason_kind(reason)}
        entry["values"] = {k: printable(v) for k, v in values.items()}
        self._stream.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.by_reason[reason_kind(reason)] += 1

    def close(self) -> None:
        self._stream.close()


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class BadRows:
    count: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    quarantine_path: str | None = None


@dataclass(frozen=True)
class LabelledData:
    """Validated rows: `sentence`, `label` (canonical spelling), `lang` and `ID` when the
    input has them (ID as string), `source_file`, `source_row` (1-based data row)."""

    table: pa.Table
    bad_rows: BadRows
    files: list[str]  # the files read, or a Hugging Face dataset's name (`hf:imdb:train`)
    content_digest: str | None = None  # a Hugging Face dataset's sha256 (files: see fingerprint)

    def __len__(self) -> int:
        return self.table.num_rows

    def fingerprint(self) -> str:
        """For manifests: `fingerprint(files)`, or for a Hugging Face dataset the sha256 of
        the columns read from it."""
        return self.content_digest or fingerprint(self.files)


def load_labelled(
    path: str | HFDatasetConfig, data_cfg: DataConfig, labels: LabelSet, *, quarantine_path: str | None = None
) -> LabelledData:
    """Read every file `path` names (or the Hugging Face dataset split it describes),
    validate each row and normalise labels.

    `on_bad_rows=error` raises DataError at the first bad row; `skip` quarantines bad rows
    to `quarantine_path` (or `data_cfg.quarantine_path`) and counts them. An empty file,
    or input where no row is good, is a DataError in both modes."""
    dataset = path if isinstance(path, HFDatasetConfig) else None
    if dataset is not None:
        path = dataset.describe()
        files = [path]
    else:
        files = expand_paths(path)
    digest = hashlib.sha256() if dataset is not None else None
    skip = data_cfg.on_bad_rows == "skip"
    sink = None
    if skip:
        target = quarantine_path or data_cfg.quarantine_path
        if not target:
            raise DataError(f"{path}: data.on_bad_rows=skip needs a quarantine path (data.quarantine_path)")
        sink = _Quarantine(target)
    text_col, label_col = data_cfg.text_column, data_cfg.label_column
    id_col, lang_col = data_cfg.id_column, data_cfg.lang_column
    out: dict[str, list[Any]] = {k: [] for k in ("sentence", "label", "ID", "lang", "source_file", "source_row")}
    has_id = has_lang = False
    ids = DuplicateIds()
    total = 0
    try:
        for file in files:
            wanted = [text_col, label_col, id_col, lang_col]
            raw = read_dataset_raw(dataset, wanted) if dataset is not None else read_raw(file, wanted)
            if digest is not None:
                digest.update(json.dumps(raw.values, sort_keys=True, default=str).encode())
            missing = [c for c in (text_col, label_col) if c not in raw.columns]
            if missing:
                raise DataError(
                    f"{file}: missing column(s) {missing}; columns found: {raw.columns} "
                    "(set data.text_column / data.label_column)"
                )
            if len(raw) == 0:
                raise DataError(f"{file}: no data rows")
            file_has_id, file_has_lang = id_col in raw.columns, lang_col in raw.columns
            has_id, has_lang = has_id or file_has_id, has_lang or file_has_lang
            texts, label_values = raw.values[text_col], raw.values[label_col]
            id_values = raw.values.get(id_col, [None] * len(raw))
            lang_values = raw.values.get(lang_col, [None] * len(raw))
            for i in range(len(raw)):
                row = i + 1
                total += 1
                problem = raw.problems[i] or text_problem(texts[i])
                label = None
                if problem is None:
                    label, problem = resolve_label(label_values[i], labels, data_cfg.label_map)
                if problem is None and file_has_lang:
                    problem = value_problem(lang_values[i], "lang")
                if problem is None and file_has_id:
                    problem = ids.problem(id_values[i], file, row)
                if problem is not None:
                    if sink is None:
                        raise DataError(f"{_where(file, row, raw.line(i))}: {problem}; {SKIP_HINT}")
                    values = {c: raw.values[c][i] for c in raw.values}
                    if i in raw.raw_rows:
                        values["_raw"] = raw.raw_rows[i]
                    sink.write(file, row, raw.line(i), problem, values)
                    continue
                out["sentence"].append(as_text(texts[i]))
                out["label"].append(label)
                out["ID"].append(as_key(id_values[i]) if file_has_id else None)
                out["lang"].append(as_key(lang_values[i]) if file_has_lang else None)
                out["source_file"].append(file)
                out["source_row"].append(row)
    finally:
        if sink is not None:
            sink.close()
    bad = BadRows(
        count=sum(sink.by_reason.values()) if sink else 0,
        by_reason=dict(sink.by_reason) if sink else {},
        quarantine_path=sink.path if sink else None,
    )
    if not out["sentence"]:
        raise DataError(
            f"{path}: none of the {total} rows is usable; {bad.count} quarantined to {bad.quarantine_path} "
            f"(reasons: {bad.by_reason})"
        )
    columns = {"sentence": pa.string(), "label": pa.string()}
    if has_lang:
        columns["lang"] = pa.string()
    if has_id:
        columns["ID"] = pa.string()
    columns.update(source_file=pa.string(), source_row=pa.int64())
    table = pa.table({name: pa.array(out[name], type=typ) for name, typ in columns.items()})
    return LabelledData(table=table, bad_rows=bad, files=files, content_digest=digest.hexdigest() if digest else None)


# ----------------------------------------------------------------------------- splits


def _strata(table: pa.Table, stratify: Sequence[str]) -> dict[tuple, np.ndarray]:
    """Row indices (ascending) per stratum key, for the stratify columns the table has."""
    keys = [table.column(c).to_pylist() for c in stratify if c in table.column_names]
    groups: dict[tuple, list[int]] = {}
    for i in range(table.num_rows):
        groups.setdefault(tuple(k[i] for k in keys), []).append(i)
    # Sorted keys (None first) so the random draws do not depend on row order of strata.
    ordered = sorted(groups, key=lambda key: tuple((v is not None, str(v)) for v in key))
    return {key: np.asarray(groups[key], dtype=np.int64) for key in ordered}


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def split_train_validation(
    table: pa.Table, fraction: float, seed: int, *, stratify: Sequence[str] = ("label", "lang")
) -> tuple[pa.Table, pa.Table]:
    """(train, validation), deterministic for a given table and seed, stratified by the
    `stratify` columns present. Each stratum of n rows gives round(fraction * n) rows to
    validation, at least 1 when n >= 2 and at most n - 1 (training sees every stratum);
    a single-row stratum stays in training. Both keep the input's row order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or table.num_rows == 0:
        return table, table.slice(0, 0)
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for indices in _strata(table, stratify).values():
        n = len(indices)
        take = 0 if n < 2 else min(n - 1, max(1, _round_half_up(fraction * n)))
        chosen.append(rng.permutation(indices)[:take])
    val_mask = np.zeros(table.num_rows, dtype=bool)
    if chosen:
        val_mask[np.concatenate(chosen)] = True
    return table.filter(pa.array(~val_mask)), table.filter(pa.array(val_mask))


def stratified_subsample(
    table: pa.Table, max_rows: int | None, seed: int, *, stratify: Sequence[str] = ("label", "lang")
) -> pa.Table:
    """At most `max_rows` rows, deterministically, keeping the strata's proportions
    (largest-remainder allocation, so exactly `max_rows` come back). Row order is kept."""
    if max_rows is None or table.num_rows <= max_rows:
        return table
    if max_rows <= 0:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    strata = list(_strata(table, stratify).values())
    quotas = np.array([max_rows * len(s) / table.num_rows for s in strata])
    counts = np.floor(quotas).astype(int)
    # Hand out the remaining rows to the largest fractional parts (stable: stratum order).
    order = np.argsort(-(quotas - counts), kind="stable")
    counts[order[: max_rows - counts.sum()]] += 1
    rng = np.random.default_rng(seed)
    keep = np.zeros(table.num_rows, dtype=bool)
    for indices, count in zip(strata, counts):
        keep[rng.permutation(indices)[:count]] = True
    return table.filter(pa.array(keep))


def apply_row_limits(train: pa.Table, validation: pa.Table, data_cfg: DataConfig) -> tuple[pa.Table, pa.Table]:
    """Honour data.max_train_rows / data.max_validation_rows (stratified, seeded by split_seed)."""
    return (
        stratified_subsample(train, data_cfg.max_train_rows, data_cfg.split_seed),
        stratified_subsample(validation, data_cfg.max_validation_rows, data_cfg.split_seed + 1),
    )


# ----------------------------------------------------------------------------- fingerprint


def fingerprint(paths: str | Sequence[str]) -> str:
    """sha256 hex digest over each file's base name, size and bytes (streamed), in the
    given order (a str is expanded with expand_paths, which sorts). For run manifests:
    the same data under another directory gives the same fingerprint."""
    files = expand_paths(paths) if isinstance(paths, str) else list(paths)
    digest = hashlib.sha256()
    for path in files:
        fs, inner = data_filesystem(path)
        name = path.rstrip("/").rsplit("/", 1)[-1].encode("utf-8")
        digest.update(len(name).to_bytes(8, "little") + name)
        file_digest = hashlib.sha256()
        size = 0
        try:
            with fs.open_input_stream(inner, compression=None) as stream:
                while chunk := stream.read(1 << 20):
                    file_digest.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            raise DataError(f"{path}: no such file") from None
        digest.update(size.to_bytes(8, "little") + file_digest.digest())
    return digest.hexdigest()
