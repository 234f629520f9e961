"""A folder, local or on an object store, whose files appear whole or not at all.

    out = Storage("s3://bucket/label-run")            # or a local path
    out.write_json("summary.json", summary)           # temp name, then moved into place
    with out.atomic_writer("submission.csv") as f:    # streamed, still all-or-nothing
        f.write(b"ID,label\\n")
    out.upload_dir("/tmp/outputs")                    # a local folder's files into the root

Names are relative to the root (`predictions/part-000001.parquet`); `out.path(name)` gives
the full path or URI. A write goes to a hidden temporary name in the same folder and is
moved into place: a rename on local disks (atomic), a copy on object stores (where an object
appears whole or not at all). A crash leaves at most a temporary file, which
`remove_stale_temporaries` deletes on the next run. JSON written here is redacted: a secret
never reaches a manifest or a summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from sentiment_ray.io.uris import filesystem, is_uri, move_dir, redact

TMP_MARK = ".tmp-"


class Storage:
    def __init__(self, root: str):
        if not is_uri(root):
            root = os.path.abspath(os.path.expanduser(root))
        self.root = root.rstrip("/") or "/"
        self.fs, self._inner_root = filesystem(self.root)

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    # -- names

    def path(self, *names: str) -> str:
        """The full path or URI of a name inside the root."""
        joined = "/".join(n.strip("/") for n in names if n)
        return f"{self.root}/{joined}" if joined else self.root

    def _inner(self, name: str) -> str:
        name = name.strip("/")
        return f"{self._inner_root.rstrip('/')}/{name}" if name else self._inner_root

    def child(self, name: str) -> "Storage":
        return Storage(self.path(name))

    # -- queries

    def _type(self, name: str):
        return self.fs.get_file_info(self._inner(name)).type

    def exists(self, name: str = "") -> bool:
        from pyarrow import fs as pafs

        return self._type(name) != pafs.FileType.NotFound

    def is_file(self, name: str) -> bool:
        from pyarrow import fs as pafs

        return self._type(name) == pafs.FileType.File

    def is_dir(self, name: str = "") -> bool:
        from pyarrow import fs as pafs

        return self._type(name) == pafs.FileType.Directory

    def list_names(self, folder: str = "") -> list[str]:
        """File names directly in `folder` (empty if it does not exist), sorted."""
        from pyarrow import fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self._inner(folder), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def list_dirs(self, folder: str = "") -> list[str]:
        """Folder names directly in `folder` (empty if it does not exist), sorted."""
        from pyarrow import fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self._inner(folder), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    # -- writing

    def makedirs(self, name: str = "") -> None:
        self.fs.create_dir(self._inner(name), recursive=True)

    @contextlib.contextmanager
    def atomic_writer(self, name: str) -> Iterator[Any]:
        """A binary output stream whose content appears under `name` only when the block
        ends without an exception."""
        folder, _, base = name.strip("/").rpartition("/")
        tmp = f"{folder}/.{base}{TMP_MARK}{uuid.uuid4().hex[:12]}" if folder else f".{base}{TMP_MARK}{uuid.uuid4().hex[:12]}"
        self.makedirs(folder)
        try:
            with self.fs.open_output_stream(self._inner(tmp)) as out:
                yield out
            self.fs.move(self._inner(tmp), self._inner(name))
        except BaseException:
            with contextlib.suppress(OSError):
                self.delete(tmp, missing_ok=True)
            raise

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.atomic_writer(name) as out:
            out.write(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, payload: Any) -> None:
        """Indented JSON, atomically, credentials masked in every string."""
        text = json.dumps(payload, indent=2, ensure_ascii=False, default=str)
        self.write_text(name, redact(text) + "\n")

    def upload_dir(self, local_dir: str, name: str = "") -> None:
        """Copy every file under a local folder into `name` (created)."""
        from pyarrow import fs as pafs

        self.makedirs(name)
        pafs.copy_files(local_dir, self._inner(name), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def copy_dir(self, source: str, destination: str) -> None:
        """Copy a folder inside the root (created; existing files replaced)."""
        from pyarrow import fs as pafs

        self.makedirs(destination)
        pafs.copy_files(self._inner(source), self._inner(destination), source_filesystem=self.fs, destination_filesystem=self.fs)

    def copy_file(self, source: str, destination: str) -> None:
        self.fs.copy_file(self._inner(source), self._inner(destination))

    def move_dir(self, source: str, destination: str) -> None:
        """Move a folder inside the root (a rename on local disks, copy + delete on object stores)."""
        move_dir(self.fs, self._inner(source), self._inner(destination))

    # -- reading

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self._inner(name)) as f:
            return f.read()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def read_json_or_none(self, name: str) -> Any:
        """The JSON in `name`, or None when there is no such file."""
        try:
            return self.read_json(name)
        except FileNotFoundError:
            return None

    def open_input(self, name: str):
        """A random-access input file (what pyarrow.parquet.ParquetFile takes)."""
        return self.fs.open_input_file(self._inner(name))

    # -- deleting

    def delete(self, name: str, *, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self._inner(name))
        except FileNotFoundError:
            if not missing_ok:
                raise

    def delete_dir(self, name: str) -> None:
        if self.is_dir(name):
            self.fs.delete_dir(self._inner(name))

    def remove_stale_temporaries(self, folders: Sequence[str] = ("",)) -> int:
        """Delete temporary files a crashed writer left in `folders`; returns how many."""
        removed = 0
        for folder in folders:
            for base in self.list_names(folder):
                if base.startswith(".") and TMP_MARK in base:
                    self.delete(f"{folder}/{base}" if folder else base, missing_ok=True)
                    removed += 1
        return removed
