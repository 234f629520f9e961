"""Which data files a path names, their formats, byte streams over them, and fingerprints.

    files = expand_paths("s3://bucket/train/*.parquet")   # or a path, glob, directory, URI
    fmt = file_format(files[0])                           # 'csv' | 'jsonl' | 'parquet'

Formats by extension: .csv, .parquet/.pq, .jsonl/.json (JSON lines; a .json file holding
one JSON array also works), each text format optionally .gz-compressed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sentiment_ray.io.uris import StorageError, filesystem, uri_prefix
from sentiment_ray.io.values import DataError

TEXT_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
BINARY_FORMATS = {".parquet": "parquet", ".pq": "parquet"}
SUPPORTED_SUFFIXES = ".csv, .parquet, .pq, .jsonl, .json (text formats optionally .gz)"
BOM = b"\xef\xbb\xbf"


def data_filesystem(path: str):
    """(pyarrow FileSystem, path inside it) for a local path or a URI; a URI with inline
    credentials or one pyarrow cannot open is a DataError."""
    try:
        return filesystem(path)
    except StorageError as err:
        raise DataError(str(err)) from None


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


def _glob_matches(pattern: str, candidate: str) -> bool:
    """Shell-style match where '*' stays inside one path component and '**' spans any."""
    if "**" in pattern:
        return fnmatch.fnmatchcase(candidate, pattern)
    pattern_parts, parts = pattern.split("/"), candidate.split("/")
    return len(pattern_parts) == len(parts) and all(fnmatch.fnmatchcase(c, p) for c, p in zip(parts, pattern_parts))


@dataclass(frozen=True)
class Inputs:
    """What a path names: the data files read, and the files in the folders it names that
    are not read (another type, or a hidden name), so a job can say so."""

    files: list[str]
    not_read: list[str]


def expand_paths(path_or_glob_or_uri: str) -> list[str]:
    """The data files a path names (`expand_inputs(...).files`)."""
    return expand_inputs(path_or_glob_or_uri).files


def not_read_warning(given: str, not_read: Sequence[str], shown: int = 10) -> str:
    """One line naming the files of `given` that are not read (relative to their common
    folder), at most `shown` of them."""
    base = os.path.commonpath([os.path.dirname(p) for p in not_read]) if all("://" not in p for p in not_read) else ""
    names = [os.path.relpath(p, base) if base else p for p in not_read]
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    count = len(not_read)
    return (
        f"{given}: {count} file{'' if count == 1 else 's'} there {'is' if count == 1 else 'are'} not read "
        f"(not {SUPPORTED_SUFFIXES}, or a hidden name starting with '.' or '_'): {listed}"
    )


def expand_inputs(path_or_glob_or_uri: str) -> Inputs:
    """The data files a path names, sorted: a file, a glob, a directory (its supported files,
    recursively, skipping names starting with '.' or '_'), or a URI of any of these
    (s3://bucket/x/*.parquet, file:///data/dir). Local paths come back as absolute paths,
    file:// URIs as local paths, other URIs as URIs. Matching nothing is a DataError. The
    files of a named directory that are skipped come back in `not_read` (a glob naming an
    unsupported file is an error instead)."""
    from pyarrow import fs as pafs

    given = path_or_glob_or_uri
    if not given or not str(given).strip():
        raise DataError("no data path given (data.train_path / the input path is empty)")
    fs, inner = data_filesystem(given)
    local = isinstance(fs, pafs.LocalFileSystem)
    prefix = "" if local else uri_prefix(given)

    def outward(p: str) -> str:
        return prefix + p

    try:
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
            not_read: list[str] = []
            for match in matches:
                if fs.get_file_info(match).type == pafs.FileType.Directory:
                    found, skipped = _files_in(fs, match, outward)
                    files.extend(found)
                    not_read.extend(skipped)
                else:
                    files.append(outward(match))
            if not files:
                raise DataError(f"{given}: no files match this pattern")
        else:
            info = fs.get_file_info(inner)
            if info.type == pafs.FileType.NotFound:
                raise DataError(f"{given}: no such file or directory")
            if info.type == pafs.FileType.Directory:
                files, not_read = _files_in(fs, inner, outward)
                if not files:
                    raise DataError(f"{given}: directory holds no data files ({SUPPORTED_SUFFIXES})")
                return Inputs(files, not_read)
            files, not_read = [outward(inner)], []
    except PermissionError as err:
        raise DataError(f"{given}: permission denied ({err})") from None
    except OSError as err:
        raise DataError(f"{given}: cannot list it: {err}") from None
    for f in files:
        file_format(f)  # an unsupported file a glob picked up is an error, not skipped
    return Inputs(files, sorted(not_read))


def _files_in(fs, directory: str, outward) -> tuple[list[str], list[str]]:
    """(data files, other files) under `directory`, each sorted."""
    from pyarrow import fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=True))
    found, skipped = [], []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(directory) :].lstrip("/")
        (found if _is_supported(info.path) and not _is_hidden(relative) else skipped).append(outward(info.path))
    return sorted(found), sorted(skipped)


@contextlib.contextmanager
def reading(path: str, action: str | None = None):
    """Reading `path` inside the block: a missing file, a refused permission and (with an
    `action`) any other OSError become one-line DataErrors naming the file."""
    try:
        yield
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except PermissionError:
        raise DataError(f"{path}: permission denied (cannot read it)") from None
    except OSError as err:
        if action is None:
            raise
        raise DataError(f"{path}: cannot {action}: {err}") from None


def open_stream(path: str, offset: int = 0) -> io.BufferedReader:
    """A buffered binary stream over the (decompressed, for .gz) bytes of `path`,
    positioned at `offset`: a plain file seeks, a .gz stream is read through to it."""
    fs, inner = data_filesystem(path)
    with reading(path, "open"):
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


def is_json_array_file(path: str) -> bool:
    """A .json file holding one JSON array (read whole) rather than JSON lines."""
    if not path.lower().removesuffix(".gz").endswith(".json"):
        return False
    with open_stream(path) as stream:
        head = stream.read(4096).lstrip()
    return head.startswith(BOM + b"[") or head[:1] == b"["


# ----------------------------------------------------------------------------- identity


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


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes (as stored, not decompressed), streamed."""
    fs, inner = data_filesystem(path)
    digest = hashlib.sha256()
    with reading(path):
        with fs.open_input_stream(inner, compression=None) as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def span_digests(
    path: str, spans: Sequence[tuple[int, int | None]], *, decompressed: bool = False, prefix: bytes = b""
) -> list[str]:
    """sha256 of `prefix` + the bytes [start, stop) of each span (stop None: to the end), in
    one pass over the file. `decompressed`: offsets in the decompressed stream of a .gz
    (as the planner records them); else in the bytes as stored. Spans may repeat; distinct
    ones must not overlap. A file shorter than a span is a DataError (it changed)."""
    distinct = sorted(set(spans), key=lambda s: (s[0], float("inf") if s[1] is None else s[1]))
    for (a0, a1), (b0, _) in zip(distinct, distinct[1:]):
        if a1 is None or a1 > b0:
            raise ValueError(f"{path}: overlapping spans {(a0, a1)} and {b0}")
    digests: dict[tuple[int, int | None], str] = {}
    sequential = decompressed and path.lower().endswith(".gz")
    with reading(path, "read"):
        if sequential:
            stream = open_stream(path)
        else:
            fs, inner = data_filesystem(path)
            stream = fs.open_input_file(inner)
        with stream:
            position = 0
            for start, stop in distinct:
                if sequential:
                    while position < start:  # a .gz stream is read through, not seeked
                        skipped = len(stream.read(min(start - position, 1 << 24)))
                        if not skipped:
                            raise DataError(f"{path}: shorter than when it was planned (changed since?)")
                        position += skipped
                else:
                    stream.seek(start)
                    position = start
                digest = hashlib.sha256(prefix)
                while stop is None or position < stop:
                    block = stream.read(1 << 20 if stop is None else min(1 << 20, stop - position))
                    if not block:
                        if stop is not None:
                            raise DataError(f"{path}: shorter than when it was planned (changed since?)")
                        break
                    digest.update(block)
                    position += len(block)
                digests[(start, stop)] = digest.hexdigest()
    return [digests[s] for s in spans]


def parquet_footer(path: str) -> tuple[bytes, int]:
    """(the footer bytes of a Parquet file: metadata, length and magic; the file's size)."""
    fs, inner = data_filesystem(path)
    with reading(path, "read"):
        with fs.open_input_file(inner) as f:
            size = f.size()
            if size < 12:
                raise DataError(f"{path}: too short for a Parquet file ({size} bytes)")
            f.seek(size - 8)
            tail = f.read(8)
            length = int.from_bytes(tail[:4], "little")
            if tail[4:] != b"PAR1" or length + 8 > size:
                raise DataError(f"{path}: not a Parquet file (no footer)")
            f.seek(size - 8 - length)
            return f.read(length + 8), size


def fingerprint(paths: str | Sequence[str]) -> str:
    """sha256 over each file's base name, size and bytes, in the given order (a str is
    expanded with expand_paths, which sorts): the same data under another directory gives
    the same fingerprint."""
    files = expand_paths(paths) if isinstance(paths, str) else list(paths)
    digest = hashlib.sha256()
    for path in files:
        fs, inner = data_filesystem(path)
        name = path.rstrip("/").rsplit("/", 1)[-1].encode("utf-8")
        digest.update(len(name).to_bytes(8, "little") + name)
        info = fs.get_file_info(inner)
        size = int(info.size or 0)
        digest.update(size.to_bytes(8, "little") + bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()


def id_names(files: Sequence[str]) -> dict[str, str]:
    """Short stable names for generated IDs: each path relative to the files' common
    folder (`train/a.csv`), the base name for a single file."""
    if len(files) == 1:
        return {files[0]: files[0].rstrip("/").rsplit("/", 1)[-1]}
    common = os.path.commonpath([f.split("://", 1)[-1] for f in files])
    return {f: f.split("://", 1)[-1][len(common) :].lstrip("/") for f in files}
