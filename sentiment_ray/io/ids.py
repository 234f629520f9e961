"""The one duplicate-ID check: every ID seen so far, with the file and row where it was first
seen, in an on-disk SQLite index, so a million-row input is checked in bounded memory.

    with IdIndex() as ids:
        for chunk in chunks:
            for dup in ids.add(chunk.file, chunk.first_row, chunk_ids):
                ...  # Duplicate(id, file, row, first_file, first_row)

Used by training (a duplicate is a bad row: an error, or quarantined) and by the labelling
planner (duplicates are listed, then the run is refused). The index file is unlinked as soon
as it is open: nothing is left in the temp folder however the process ends.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from sentiment_ray.io.uris import StorageIOError, io_error


@dataclass(frozen=True)
class Duplicate:
    id: str
    file: str
    row: int
    first_file: str
    first_row: int

    def reason(self) -> str:
        """`duplicate ID ('7', first at row 3)`: the bad-row reason."""
        where = f"row {self.first_row}" if self.first_file == self.file else f"{self.first_file}: row {self.first_row}"
        return f"duplicate ID ({self.id!r}, first at {where})"


def _index_full(err: sqlite3.Error) -> StorageIOError:
    return StorageIOError(
        f"{tempfile.gettempdir()}: the duplicate-ID index cannot grow in the temp folder: {err}; "
        "set TMPDIR to a folder with room (it needs about 100 bytes per input row)"
    )


class IdIndex:
    def __init__(self) -> None:
        try:
            handle, path = tempfile.mkstemp(prefix="sentiment-ray-ids-", suffix=".sqlite")
        except OSError as err:
            raise io_error(tempfile.gettempdir(), err, "create the duplicate-ID index there") from err
        os.close(handle)
        try:
            self.db = sqlite3.connect(path)
            self.db.executescript(
                "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA temp_store=FILE;"
                "CREATE TABLE ids (id TEXT PRIMARY KEY, file INTEGER NOT NULL, row INTEGER NOT NULL) WITHOUT ROWID;"
            )
        except sqlite3.Error as err:
            raise _index_full(err) from err
        finally:
            os.unlink(path)  # the open connection keeps the data; no file outlives the process
        self._files: list[str] = []
        self._file_index: dict[str, int] = {}
        self.count = 0

    def _file_id(self, file: str) -> int:
        if file not in self._file_index:
            self._file_index[file] = len(self._files)
            self._files.append(file)
        return self._file_index[file]

    def add(self, file: str, first_row: int, ids: Sequence[str | None]) -> list[Duplicate]:
        """Record the IDs of rows first_row, first_row + 1, ... of `file` (None: a row without
        a usable ID, skipped) and return those seen before, in row order."""
        return self.add_rows(file, [(first_row + i, value) for i, value in enumerate(ids) if value])

    def add_rows(self, file: str, rows: Sequence[tuple[int, str]]) -> list[Duplicate]:
        """`add` for (row, id) pairs."""
        if not rows:
            return []
        f = self._file_id(file)
        before = self.db.total_changes
        try:
            self.db.executemany("INSERT OR IGNORE INTO ids VALUES (?, ?, ?)", ((value, f, row) for row, value in rows))
        except sqlite3.OperationalError as err:  # "database or disk is full"
            raise _index_full(err) from err
        inserted = self.db.total_changes - before
        self.count += inserted
        if inserted == len(rows):
            return []
        # Some were already there (or repeat inside this batch): find which rows lost.
        out = []
        for row, value in rows:
            first = self.db.execute("SELECT file, row FROM ids WHERE id = ?", (value,)).fetchone()
            if first != (f, row):
                out.append(Duplicate(value, file, row, self._files[first[0]], first[1]))
        return out

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> IdIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def duplicates_message(duplicates: Sequence[Duplicate], id_column: str, total: int | None = None, shown: int = 20) -> str:
    """The error for an input with repeated IDs, listing where (up to `shown`)."""
    count = total if total is not None else len(duplicates)
    lines = [f"{count} duplicate ID{'' if count == 1 else 's'} in column {id_column!r} (each input row needs a unique ID):"]
    for dup in list(duplicates)[:shown]:
        lines.append(f"  {dup.id!r}: {dup.file}: row {dup.row}, first at {dup.first_file}: row {dup.first_row}")
    if count > shown:
        lines.append(f"  ... and {count - shown} more")
    return "\n".join(lines)
