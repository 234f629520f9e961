"""The output folder's lock (io/lease.py): one holder, a one-line refusal naming it, stale
locks taken over, lost locks noticed, on local disks and with the object-store protocol."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time

import pytest

from sentiment_ray.io.lease import LOCK_FILE, Lease, LockHeld, LockLost, process_start
from sentiment_ray.io.storage import Storage


def lock_record(folder) -> dict:
    return json.loads((folder / LOCK_FILE).read_text())


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_job_is_refused_in_one_line_naming_the_holder(tmp_path):
    with Lease(Storage(str(tmp_path)), purpose="label") as first:
        record = lock_record(tmp_path)
        assert record["owner"] == first.token
        assert record["pid"] == first.record["pid"]
        assert record["host"] == socket.gethostname()
        assert record["process_start"] == process_start(record["pid"])
        with pytest.raises(LockHeld) as refused:
            Lease(Storage(str(tmp_path)), purpose="label").acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert f"{tmp_path} is in use by another label job, pid {record['pid']} on host {record['host']}" in message
        assert lock_record(tmp_path)["owner"] == first.token  # the refused job changed nothing
    assert not (tmp_path / LOCK_FILE).exists()  # released
    Lease(Storage(str(tmp_path)), purpose="label").acquire().release()  # free again


def test_a_lock_whose_process_is_gone_is_taken_over_with_a_warning(tmp_path, caplog):
    with Lease(Storage(str(tmp_path)), purpose="label"):
        pass
    stale = {**json.loads(json.dumps(Lease(Storage(str(tmp_path)), purpose="label")._new_record())), "pid": dead_pid()}
    stale["process_start"] = None
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING), Lease(Storage(str(tmp_path)), purpose="label") as lease:
        assert lease.taken_over["pid"] == stale["pid"]
        assert lock_record(tmp_path)["owner"] == lease.token
    assert f"taking over a stale lock (process {stale['pid']} no longer runs)" in caplog.text


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path):
    """A live process with the recorded pid but another start time is not the holder."""
    import os

    record = Lease(Storage(str(tmp_path)), purpose="label")._new_record()
    record.update(owner="old", pid=os.getpid(), process_start="1")  # this process, but "started" at tick 1
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with Lease(Storage(str(tmp_path)), purpose="label") as lease:
        assert lease.taken_over["owner"] == "old"


def test_another_hosts_lock_is_live_until_its_lease_expires(tmp_path):
    record = Lease(Storage(str(tmp_path)), purpose="label")._new_record()
    record.update(owner="other", host="elsewhere", pid=1, heartbeat_utc=time.time())
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with pytest.raises(LockHeld, match="pid 1 on host elsewhere"):
        Lease(Storage(str(tmp_path)), purpose="train").acquire()
    record["heartbeat_utc"] = time.time() - 3600  # its job stopped renewing an hour ago
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    with Lease(Storage(str(tmp_path)), purpose="train") as lease:
        assert lease.taken_over["host"] == "elsewhere"


def test_the_heartbeat_renews_and_a_lost_lock_is_noticed(tmp_path):
    lease = Lease(Storage(str(tmp_path)), purpose="label", ttl_s=5, heartbeat_s=0.1).acquire()
    try:
        first = lock_record(tmp_path)["heartbeat_utc"]
        deadline = time.time() + 10  # a busy machine may delay the heartbeat thread
        while lock_record(tmp_path)["heartbeat_utc"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert lock_record(tmp_path)["heartbeat_utc"] > first
        lease.check()
        # Another job took the folder over (say this one was frozen past its lease).
        (tmp_path / LOCK_FILE).write_text(json.dumps({**lock_record(tmp_path), "owner": "intruder", "pid": 4242}))
        time.sleep(0.5)
        with pytest.raises(LockLost, match="now belongs to .*pid 4242.*rerun with --overwrite"):
            lease.check()
    finally:
        lease.release()
    assert lock_record(tmp_path)["owner"] == "intruder"  # release never deletes another job's lock


def test_a_folder_the_lease_created_goes_when_it_is_left_empty(tmp_path):
    fresh = tmp_path / "new" / "out"
    with Lease(Storage(str(fresh)), purpose="label"):
        assert (fresh / LOCK_FILE).exists()
    assert not (tmp_path / "new").exists()  # a job that stopped before writing anything leaves no folder
    with Lease(Storage(str(fresh)), purpose="label"):
        (fresh / "manifest.json").write_text("{}")
    assert sorted(p.name for p in fresh.iterdir()) == ["manifest.json"]  # something written: kept
    existing = tmp_path / "existing"
    existing.mkdir()
    with Lease(Storage(str(existing)), purpose="label"):
        pass
    assert existing.is_dir()  # the user's folder, not the lease's


def test_racing_jobs_get_exactly_one_lock(tmp_path):
    won, refused, start = [], [], threading.Barrier(8)

    def contend():
        lease = Lease(Storage(str(tmp_path)), purpose="label")
        start.wait()
        try:
            won.append(lease.acquire())
        except LockHeld:
            refused.append(lease)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert len(refused) == 7
    won[0].release()


def test_object_store_protocol_writes_then_verifies(tmp_path):
    """Without create-if-absent (object stores) the job whose token is there after the
    settle time holds the lock; one that lost the race is refused."""
    folder = Storage(str(tmp_path))
    with Lease(folder, purpose="label", exclusive_create=False, settle_s=0.05) as first:
        with pytest.raises(LockHeld):
            Lease(folder, purpose="label", exclusive_create=False, settle_s=0.05).acquire()
        assert lock_record(tmp_path)["owner"] == first.token

    late = Lease(folder, purpose="label", exclusive_create=False, settle_s=0.3)

    def overwrite_during_settle():
        time.sleep(0.1)
        (tmp_path / LOCK_FILE).write_text(json.dumps({**late._new_record(), "owner": "faster", "pid": 4343}))

    racer = threading.Thread(target=overwrite_during_settle)
    racer.start()
    with pytest.raises(LockHeld, match="pid 4343"):
        late.acquire()
    racer.join()


def test_an_unwritable_folder_is_one_line_naming_the_lock_file(tmp_path, monkeypatch):
    import errno
    import os

    real_open = os.open

    def refuse(path, flags, *args):
        if str(path).endswith(LOCK_FILE) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse)
    from sentiment_ray.io.uris import StorageIOError

    with pytest.raises(StorageIOError, match=rf"^{tmp_path}/{LOCK_FILE}: cannot create the lock file: permission denied$"):
        Lease(Storage(str(tmp_path)), purpose="label").acquire()
