"""One line per fault (terminal/faults.py, io/uris.py): the path and the cause, the trace in a log
file; Ray's wrappers looked through to the worker's own error."""

from __future__ import annotations

import errno
from pathlib import Path

from sentiment_ray.io.storage import Storage
from sentiment_ray.io.uris import StorageIOError, error_cause, io_error, remove_orphaned_copies
from sentiment_ray.terminal import faults

RAY_TEXT = """\x1b[36mray::MapWorker(MapBatches(Labeler)).submit()\x1b[39m (pid=123, ip=127.0.0.1)
Traceback (most recent call last):
  File "/x/labeler.py", line 10, in label_unit
    out.write(b"...")
OSError: [Errno 28] No space left on device

The above exception was the direct cause of the following exception:

ray::MapWorker(MapBatches(Labeler)).submit() (pid=123, ip=127.0.0.1)
ray.exceptions.UserCodeException: UDF failed to process a data block.
"""


def test_the_worker_error_is_found_behind_rays_wrappers():
    assert faults.remote_error_line(RAY_TEXT) == "OSError: [Errno 28] No space left on device"
    assert faults.remote_error_line("ray.exceptions.UserCodeException: UDF failed") is None


def test_os_errors_read_as_path_and_cause():
    assert error_cause(OSError(errno.ENOSPC, "No space left on device")) == "no space left on device (disk full)"
    assert error_cause(PermissionError(errno.EACCES, "x")) == "permission denied"
    s3 = OSError("When uploading part for key 'out/x': AWS Error ACCESS_DENIED during UploadPart operation: Access Denied\nmore")
    assert (
        error_cause(s3)
        == "When uploading part for key 'out/x': AWS Error ACCESS_DENIED during UploadPart operation: Access Denied"
    )
    err = io_error("/out/x.parquet", OSError(errno.EROFS, "Read-only file system"), "write")
    assert isinstance(err, StorageIOError)
    assert str(err) == "/out/x.parquet: cannot write: read-only file system"
    assert faults.one_line(FileNotFoundError(errno.ENOENT, "No such file", "/in/a.csv")) == "/in/a.csv: no such file or directory"


def test_a_failed_write_names_the_final_file_never_its_temporary(tmp_path):
    storage = Storage(str(tmp_path))
    try:
        with storage.atomic_writer("predictions/part-1.parquet") as out:
            out.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    except StorageIOError as err:
        assert str(err) == f"{tmp_path}/predictions/part-1.parquet: cannot write: no space left on device (disk full)"
    assert list((tmp_path / "predictions").iterdir()) == []  # the temporary is gone too


def test_report_writes_the_trace_to_a_log_named_in_the_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SENTIMENT_RAY_CACHE", str(tmp_path))
    try:
        raise io_error("/out/_manifest.json", OSError(errno.ENOSPC, "No space left on device"), "write")
    except StorageIOError as err:
        line = faults.report(err, "label")
    assert line.startswith("/out/_manifest.json: cannot write: no space left on device (disk full) (full trace: ")
    log = Path(line.rsplit("(full trace: ", 1)[1].rstrip(")"))
    assert log.parent == tmp_path / "logs"
    assert "Traceback" in log.read_text()


def test_copies_left_by_killed_processes_are_removed(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    (tmp_path / f"sentiment-ray-copy-{child.pid}-abc").mkdir()
    mine = f"sentiment-ray-copy-{os.getpid()}-def"
    (tmp_path / mine).mkdir()  # this process's: kept
    (tmp_path / "sentiment-ray-123-rank0-x").mkdir()  # not a copy: kept
    assert remove_orphaned_copies("sentiment-ray-copy-") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine, "sentiment-ray-123-rank0-x"])


def test_a_stop_signal_is_a_keyboard_interrupt_and_is_remembered():
    import os
    import signal

    import pytest

    with pytest.raises(KeyboardInterrupt):
        with faults.on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):
                pass
    assert faults.interrupted() == signal.SIGTERM
    assert faults.exit_code(signal.SIGTERM) == 143


def test_a_signal_a_library_handled_itself_is_still_noted():
    """Ray Train's fit() installs its own SIGINT handler: the signal is noted all the same."""
    import os
    import signal

    seen = []
    before = signal.getsignal(signal.SIGINT)  # whatever an earlier test in this process left
    with faults.on_signals():
        signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            pass
    assert seen == [signal.SIGINT]
    assert faults.interrupted() == signal.SIGINT
    assert faults.exit_code(signal.SIGINT) == 130
    assert signal.getsignal(signal.SIGINT) is before  # put back
