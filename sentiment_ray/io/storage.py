"""A folder, local or on an object store, whose files appear whole or not at all.

    out = Storage("s3://bucket/label-run")            # or a local path
    out.write_json("summary.json", summary)           # temp name, then moved into place
    with out.atomic_writer("submission.csv") as f:    # streamed, still all-or-nothing
        f.write(b"ID,label\\n")
    out.upload_dir("/tmp/outputs")                    # a local folder's files into the root

    with local_atomic_dir(cache / "model") as tmp:    # a local folder filled, then moved into place
        model.save_pretrained(tmp)

Names are relative to the root (`predictions/part-000001.parquet`); `out.path(name)` gives
the full path or URI. A write goes to a hidden temporary name in the same folder and is
moved into place: a rename on local disks (atomic), a copy on object stores (where an object
appears whole or not at all). A crash leaves at most a temporary file, which
`remove_stale_temporaries` deletes on the next run. JSON written here is redacted: a secret
never reaches a manifest or a summary.

A failed read or write (permission, a missing folder, a full disk, an object store's error)
raises `StorageIOError`: one line naming the file (never its temporary name) and the cause.
A missing file on reading stays FileNotFoundError, which callers expect.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sentiment_ray.io.uris import StorageError, filesystem, io_error, is_uri, move_dir, redact

TMP_MARK = ".tmp-"
# Temporary names of `put` (the lease file's renewals): not TMP_MARK, so that
# remove_stale_temporaries never removes one a live writer is about to move into place.
PUT_MARK = ".put-"


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

    def child(self, name: str) -> Storage:
        return Storage(self.path(name))

    @property
    def is_local(self) -> bool:
        """A local (or locally mounted) folder, where files can be created exclusively."""
        from pyarrow import fs as pafs

        return isinstance(self.fs, pafs.LocalFileSystem)

    def local_path(self, name: str = "") -> str:
        """The operating-system path of `name` (local folders only)."""
        if not self.is_local:
            raise ValueError(f"{self.root} is not a local folder")
        return self._inner(name)

    @contextlib.contextmanager
    def _faults(self, name: str, action: str, *, missing_passes: bool = False) -> Iterator[None]:
        """OSError -> StorageIOError naming `name` (FileNotFoundError passes when asked)."""
        try:
            yield
        except StorageError:
            raise
        except FileNotFoundError as err:
            if missing_passes:
                raise
            raise io_error(self.path(name), err, action) from err
        except OSError as err:
            raise io_error(self.path(name), err, action) from err

    # -- queries

    def _type(self, name: str):
        with self._faults(name, "look it up"):
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

        with self._faults(folder, "list it"):
            infos = self.fs.get_file_info(pafs.FileSelector(self._inner(folder), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def list_dirs(self, folder: str = "") -> list[str]:
        """Folder names directly in `folder` (empty if it does not exist), sorted."""
        from pyarrow import fs as pafs

        with self._faults(folder, "list it"):
            infos = self.fs.get_file_info(pafs.FileSelector(self._inner(folder), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    # -- writing

    def makedirs(self, name: str = "") -> None:
        with self._faults(name, "create the folder"):
            self.fs.create_dir(self._inner(name), recursive=True)

    @contextlib.contextmanager
    def atomic_writer(self, name: str) -> Iterator[Any]:
        """A binary output stream whose content appears under `name` only when the block
        ends without an exception."""
        folder, _, base = name.strip("/").rpartition("/")
        tmp = f"{folder}/.{base}{TMP_MARK}{uuid.uuid4().hex[:12]}" if folder else f".{base}{TMP_MARK}{uuid.uuid4().hex[:12]}"
        self.makedirs(folder)
        try:
            try:
                with self.fs.open_output_stream(self._inner(tmp)) as out:
                    yield out
                self.fs.move(self._inner(tmp), self._inner(name))
            except (StorageError, FileNotFoundError):
                raise  # a read inside the block (already named), or a missing input
            except OSError as err:
                raise io_error(self.path(name), err, "write") from err
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.delete_file(self._inner(tmp))
            raise

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.atomic_writer(name) as out:
            out.write(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def put(self, name: str, data: bytes) -> None:
        """Replace `name` with `data` in one step: an object store's single PUT, or on local
        disks a temporary file renamed over it. Unlike `atomic_writer`'s temporaries, this
        one is not removed by `remove_stale_temporaries` while its writer runs."""
        folder, _, base = name.strip("/").rpartition("/")
        with self._faults(name, "write"):
            if not self.is_local:
                with self.fs.open_output_stream(self._inner(name)) as out:
                    out.write(data)
                return
            tmp = f"{folder + '/' if folder else ''}.{base}{PUT_MARK}{uuid.uuid4().hex[:12]}"
            try:
                with self.fs.open_output_stream(self._inner(tmp)) as out:
                    out.write(data)
                os.replace(self._inner(tmp), self._inner(name))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(self._inner(tmp))
                raise

    def create_exclusive(self, name: str, data: bytes, *, action: str = "create") -> bool:
        """Create `name` with `data` only if it does not exist (local folders: O_CREAT|O_EXCL,
        then fsync, so the content is on disk before anyone acts on it); False when it
        exists. A missing folder stays FileNotFoundError (the caller decides whether to
        create it); any other failure is a StorageIOError saying it could not `action`."""
        path = self.local_path(name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except FileNotFoundError:
            raise
        except OSError as err:
            raise io_error(self.path(name), err, action) from err
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def write_json(self, name: str, payload: Any) -> None:
        """Indented JSON, atomically, credentials masked in every string."""
        text = json.dumps(payload, indent=2, ensure_ascii=False, default=str)
        self.write_text(name, redact(text) + "\n")

    def upload_dir(self, local_dir: str, name: str = "") -> None:
        """Copy every file under a local folder into `name` (created)."""
        from pyarrow import fs as pafs

        self.makedirs(name)
        with self._faults(name, f"copy {local_dir} into it"):
            pafs.copy_files(
                local_dir, self._inner(name), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs
            )

    def copy_dir(self, source: str, destination: str) -> None:
        """Copy a folder inside the root (created; existing files replaced)."""
        from pyarrow import fs as pafs

        self.makedirs(destination)
        with self._faults(destination, f"copy {self.path(source)} into it"):
            pafs.copy_files(
                self._inner(source), self._inner(destination), source_filesystem=self.fs, destination_filesystem=self.fs
            )

    def copy_file(self, source: str, destination: str) -> None:
        with self._faults(destination, f"copy {self.path(source)} to it"):
            self.fs.copy_file(self._inner(source), self._inner(destination))

    def move_dir(self, source: str, destination: str) -> None:
        """Move a folder inside the root (a rename on local disks, copy + delete on object stores)."""
        with self._faults(destination, f"move {self.path(source)} to it"):
            move_dir(self.fs, self._inner(source), self._inner(destination))

    # -- reading

    def read_bytes(self, name: str) -> bytes:
        with self._faults(name, "read", missing_passes=True), self.fs.open_input_stream(self._inner(name)) as f:
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
        with self._faults(name, "read", missing_passes=True):
            return self.fs.open_input_file(self._inner(name))

    # -- deleting

    def delete(self, name: str, *, missing_ok: bool = False) -> None:
        try:
            with self._faults(name, "delete", missing_passes=True):
                self.fs.delete_file(self._inner(name))
        except FileNotFoundError:
            if not missing_ok:
                raise

    def delete_dir(self, name: str) -> None:
        if self.is_dir(name):
            with self._faults(name, "delete"):
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


# ----------------------------------------------------------------------------- local folders


@dataclass
class StagedDir:
    """A temporary folder (`path`) that `local_atomic_dir` moves to `target` when its block
    ends. The block may set `target` once it knows the name (it must stay in the same folder,
    so the move is a rename)."""

    path: Path
    target: Path


@contextlib.contextmanager
def local_atomic_dir(target: str | os.PathLike) -> Iterator[StagedDir]:
    """A local folder that appears whole or not at all: filled under a temporary name beside
    `target`, then renamed over it (an earlier `target` removed) when the block ends without
    an exception. The temporary folder is removed on every path out.

    For local caches written by libraries that take a folder path (save_pretrained, a Ray
    checkpoint's to_directory), which `Storage.atomic_writer`'s single streams cannot hold."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = StagedDir(Path(tempfile.mkdtemp(prefix=target.name + TMP_MARK, dir=target.parent)), target)
    try:
        yield stage
        if stage.target.parent.resolve() != stage.path.parent.resolve():
            raise ValueError(f"{stage.target} is not beside its temporary folder {stage.path}")
        if stage.target.exists():
            shutil.rmtree(stage.target)
        os.replace(stage.path, stage.target)
    finally:
        if stage.path.exists():
            shutil.rmtree(stage.path, ignore_errors=True)
