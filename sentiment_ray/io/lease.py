"""One writer per output folder: an exclusive lease file, taken before a job plans and held
until it ends.

    with Lease(Storage(output), purpose="label") as lease:   # LockHeld: a live job has it
        ...                                                  # a thread renews the heartbeat
        lease.check()                                        # LockLost: another job took it

`<folder>/_lock.json` names its holder: a random owner token, host, pid (with the process's
start time, boot id and pid namespace, so a reused pid is not mistaken for the holder), the
command, when it was taken and `heartbeat_utc`, renewed every `heartbeat_s` seconds.

A lock is *live* while its heartbeat is younger than `ttl_s` and, when it was taken on this
host (same boot, same pid namespace), its process still runs. A stale lock (its process
gone, or its heartbeat expired) is taken over with a warning naming the previous holder; a
live one is refused in one line naming it. Clocks of hosts sharing a folder must agree to
well within `ttl_s`.

How the file is created:

- local disks and shared POSIX filesystems: created with O_CREAT|O_EXCL (atomic
  create-if-absent); reading, taking over, renewing and releasing happen under an flock of
  the folder, so two jobs never both win;
- object stores (s3://, gs://; pyarrow offers no conditional write): written, then read back
  after `settle_s` seconds; the job whose token is there holds the lock, and each renewal
  checks the token again (a job that finds another token there has lost the lock). Two jobs
  that start within `settle_s` of each other are told apart; ones that start less than a
  write's latency apart may, in the worst case, both proceed until the next renewal.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psutil

from sentiment_ray.errors import UserError
from sentiment_ray.io.storage import Storage
from sentiment_ray.io.uris import redact

log = logging.getLogger(__name__)

LOCK_FILE = "_lock.json"
TTL_S = 60.0
HEARTBEAT_S = 10.0
SETTLE_S = 2.0


class LockHeld(UserError, RuntimeError):
    """Another live job holds the folder's lock."""


class LockLost(UserError, RuntimeError):
    """This job's lock was taken over by another job (its heartbeat stopped for longer than
    the lease, or an object store's last writer won)."""


# ----------------------------------------------------------------------------- this process


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _boot_id() -> str | None:
    return _read_text("/proc/sys/kernel/random/boot_id")


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


# psutil derives a start time from the boot time, which Linux reports to the second and
# may round differently in two processes: starts this close are one process. A pid reused
# within a second of the holder's own start would pass as the holder until its heartbeat
# expires (ttl_s), when the lock is stale anyway.
START_TOLERANCE_S = 1.0


def process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch, psutil), or None where the
    system does not say: with the boot id it tells a reused pid from the original."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def process_runs(pid: int, start: float | str | None) -> bool:
    """Whether process `pid` (started at `start`, when known) still runs on this host."""
    try:
        process = psutil.Process(pid)
        now = process.create_time()
    except psutil.NoSuchProcess:
        return False
    except (psutil.AccessDenied, OSError):
        return True  # exists, but its start time is not ours to read
    if start is None:
        return True
    try:
        recorded = float(start)
    except (TypeError, ValueError):
        return True  # not a start time this code wrote: the pid alone decides
    return abs(now - recorded) <= START_TOLERANCE_S  # otherwise the pid was reused


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode("utf-8")


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# ----------------------------------------------------------------------------- the lease


class Lease:
    """The lock of one folder. `acquire()` (or `with`) takes it, `release()` gives it back."""

    def __init__(
        self,
        folder: Storage,
        *,
        purpose: str,
        name: str = LOCK_FILE,
        ttl_s: float = TTL_S,
        heartbeat_s: float = HEARTBEAT_S,
        settle_s: float = SETTLE_S,
        exclusive_create: bool | None = None,
    ):
        if not 0 < heartbeat_s < ttl_s:
            raise ValueError(f"the heartbeat ({heartbeat_s} s) must be positive and shorter than the lease ({ttl_s} s)")
        self.folder = folder
        self.name = name
        self.purpose = purpose
        self.ttl_s = ttl_s
        self.heartbeat_s = heartbeat_s
        self.settle_s = settle_s
        # Local disks: create-if-absent and an flock; object stores: write, then verify.
        self.local = folder.is_local if exclusive_create is None else exclusive_create
        self.token = uuid.uuid4().hex
        self.record: dict[str, Any] | None = None
        self.taken_over: dict[str, Any] | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created: str | None = None
        """The topmost local folder `acquire` created for the lock (None: it existed)."""

    @property
    def path(self) -> str:
        return self.folder.path(self.name)

    # -- records

    def _new_record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "owner": self.token,
            "purpose": self.purpose,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_start": process_start(os.getpid()),
            "boot_id": _boot_id(),
            "pid_namespace": _pid_namespace(),
            "command": redact(" ".join(sys.argv))[:500],
            "taken_utc": _iso(now),
            "heartbeat_utc": now,
            "ttl_s": self.ttl_s,
        }

    def _read(self) -> dict[str, Any] | None:
        try:
            data = self.folder.read_bytes(self.name)
        except FileNotFoundError:
            return None
        try:
            record = json.loads(data)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            # Unreadable content: a writer without this module, or a torn write on a store
            # without atomic replace. Judged by age alone.
            return {"owner": None, "heartbeat_utc": 0.0, "unreadable": True}
        return record

    def stale_reason(self, record: dict[str, Any]) -> str | None:
        """Why a lock record no longer protects anything (None: it is live)."""
        if record.get("unreadable"):
            return "its content is unreadable"
        age = time.time() - float(record.get("heartbeat_utc") or 0.0)
        ttl = float(record.get("ttl_s") or self.ttl_s)
        if age > ttl:
            return f"its last heartbeat was {age:.0f} s ago (the lease is {ttl:.0f} s)"
        same_process_space = (
            record.get("host") == socket.gethostname()
            and record.get("boot_id") == _boot_id()
            and record.get("pid_namespace") == _pid_namespace()
        )
        if same_process_space and isinstance(record.get("pid"), int):
            if not process_runs(record["pid"], record.get("process_start")):
                return f"process {record['pid']} no longer runs"
        return None

    def describe(self, record: dict[str, Any]) -> str:
        age = time.time() - float(record.get("heartbeat_utc") or 0.0)
        what = record.get("purpose") or "a job"
        return (
            f"{what} job, pid {record.get('pid')} on host {record.get('host')}, since {record.get('taken_utc')}, "
            f"last heartbeat {age:.0f} s ago"
        )

    # -- local disks

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """An exclusive flock of the folder (local disks); a no-op elsewhere or where the
        filesystem has no locks (the O_EXCL create still decides who creates the file)."""
        if not self.local:
            yield
            return
        import fcntl

        try:
            fd = os.open(self.folder.local_path(), os.O_RDONLY)
        except OSError:
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                    raise
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _create_exclusive(self, record: dict[str, Any]) -> bool:
        """Create the lock file only if absent (local disks); False when it exists."""
        try:
            return self.folder.create_exclusive(self.name, _encode(record), action="create the lock file")
        except FileNotFoundError:
            # Another job that had created this folder released it empty just now.
            self.folder.makedirs()
            return self._create_exclusive(record)

    def _write(self, record: dict[str, Any]) -> None:
        self.folder.put(self.name, _encode(record))

    # -- taking and giving back

    def acquire(self) -> Lease:
        """Take the lock, or raise LockHeld naming the live holder. A stale lock is taken
        over with a warning (also in `taken_over`)."""
        self._created = self._first_missing_folder()
        self.folder.makedirs()
        record = self._new_record()
        if self.local:
            with self._guard():
                current = self._read()
                if current is not None:
                    self._refuse_if_live(current)
                    self._write(record)
                elif not self._create_exclusive(record):
                    current = self._read() or {}
                    raise LockHeld(self._held_message(current))
        else:
            current = self._read()
            if current is not None:
                self._refuse_if_live(current)
            self._write(record)
            time.sleep(self.settle_s)
            back = self._read() or {}
            if back.get("owner") != self.token:
                raise LockHeld(self._held_message(back))
        self.record = record
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _refuse_if_live(self, current: dict[str, Any]) -> None:
        reason = self.stale_reason(current)
        if reason is None:
            raise LockHeld(self._held_message(current))
        self.taken_over = current
        log.warning(
            "%s: taking over a stale lock (%s): %s",
            self.path,
            reason,
            self.describe(current) if not current.get("unreadable") else "unreadable lock file",
        )

    def _held_message(self, current: dict[str, Any]) -> str:
        return (
            f"{self.folder.root} is in use by another {self.describe(current)} ({self.path}); "
            f"wait for it to end or use another folder (a lock whose job is gone expires "
            f"{float(current.get('ttl_s') or self.ttl_s):.0f} s after its last heartbeat)"
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except LockLost:
                return
            except Exception as err:  # noqa: BLE001 - a transient store error: retried next beat
                log.warning("%s: cannot renew the lock: %s", self.path, err)

    def renew(self) -> None:
        """Refresh the heartbeat; LockLost when another job holds the file now."""
        if self.record is None:
            raise LockLost(f"{self.path}: not held")
        with self._guard():
            current = self._read()
            if current is None or current.get("owner") != self.token:
                holder = self.describe(current) if current else "nobody (the file was removed)"
                self._lost = f"{self.folder.root}: this job's lock ({self.path}) now belongs to {holder}"
                raise LockLost(self._lost)
            self.record = {**self.record, "heartbeat_utc": time.time()}
            self._write(self.record)

    def check(self) -> None:
        """LockLost when a renewal found another job holding the lock."""
        if self._lost:
            raise LockLost(self._lost + "; its outputs may be mixed with this job's: rerun with --overwrite")

    def release(self) -> None:
        """Stop renewing and delete the lock file if it is still this job's; then remove
        the folders `acquire` created if nothing else was written into them (a job that
        stopped at its checks leaves no empty output folder behind)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
        if self.record is None:
            return
        self.record = None
        with contextlib.suppress(OSError), self._guard():
            current = self._read()
            if current is not None and current.get("owner") == self.token:
                self.folder.delete(self.name, missing_ok=True)
        self._remove_created_folders()

    def _first_missing_folder(self) -> str | None:
        """The topmost missing folder on the way to a local lock folder (what makedirs will
        create), else None."""
        if not self.folder.is_local:
            return None  # object stores have no folders to leave behind
        path, missing = os.path.abspath(self.folder.local_path()), None
        while not os.path.exists(path):
            missing, parent = path, os.path.dirname(path)
            if parent == path:
                break
            path = parent
        return missing

    def _remove_created_folders(self) -> None:
        """rmdir from the lock folder up to the topmost one `acquire` created, stopping at
        the first that is not empty (rmdir never removes content: another job's lock file,
        a manifest, a user's file keep their folder)."""
        if self._created is None:
            return
        path, top = os.path.abspath(self.folder.local_path()), self._created
        while True:
            try:
                os.rmdir(path)
            except OSError:
                return
            if path == top or len(path) <= len(top):
                return
            path = os.path.dirname(path)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
