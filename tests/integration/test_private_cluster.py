"""A local cluster a job starts is private: another `ray start --head` on the same host
changes nothing, and the run finishes.

Ray's processes that are given no address find a cluster through a discovery file in the
host's Ray temp folder (`<tmp>/ray/ray_current_cluster`), which every `ray start --head`
rewrites, or, without that file, by listing the GCS processes of the host; Ray Train's
placement-group cleaner is one of them (it asks the state API whether the controller is
alive, with no address). Pointed at the other cluster, it finds no such controller and
removes the run's placement group; finding several GCS processes, its thread dies and nothing
watches the run any more. The other head is started before the run's cluster, so that the
cleaner's first look already finds its discovery file; the run then trains with it alive.

The host's temp folder here is a folder of this test (TMPDIR for both the run and the second
head), so the test never touches the machine's real /tmp/ray: the second head writes the
discovery file there exactly as a person's `ray start` would write /tmp/ray's. The head runs in
its own session and is stopped by signalling that session alone (never `ray stop`, which ends
every Ray cluster on the machine).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_terminal import _registered_checkpoint, tiny_overrides

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_second_head(env: dict, log_path: Path) -> subprocess.Popen:
    """`ray start --head --block` with free ports, no CPUs, in a session of its own."""
    cli = Path(sys.executable).parent / "ray"
    ports = [
        "--port",
        "--dashboard-port",
        "--ray-client-server-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--node-manager-port",
        "--object-manager-port",
    ]
    cmd = [
        str(cli) if cli.exists() else "ray",
        "start",
        "--head",
        "--block",
        "--num-cpus=0",
        "--include-dashboard=true",
        "--node-ip-address=127.0.0.1",
        "--disable-usage-stats",
    ]
    cmd += [f"{flag}={_free_port()}" for flag in ports]
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the process this test started, then SIGKILL whatever is left of its session."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: start_new_session=True
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def test_another_ray_start_on_the_host_changes_nothing_and_the_run_finishes(tiny_model_dir, tmp_path):
    host_tmp = tempfile.mkdtemp(prefix="host-", dir="/tmp")  # short: Ray puts unix sockets under it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR", "SENTIMENT_RAY_LOG")}
    env.update(TMPDIR=host_tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # the head on loopback only
    discovery_file = Path(host_tmp) / "ray" / "ray_current_cluster"
    args = tiny_overrides(tiny_model_dir, tmp_path / "runs", "private", **{"train.max_steps": 24, "train.save_steps": 4})
    run_dir = tmp_path / "runs" / "private"
    head = _start_second_head(env, tmp_path / "head.log")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not discovery_file.exists() and head.poll() is None:
            time.sleep(0.2)
        assert discovery_file.exists(), (tmp_path / "head.log").read_text()[-3000:]
        other = discovery_file.read_text().strip()
        run = subprocess.run(
            [sys.executable, "jobs/train.py", *args], cwd=REPO_ROOT, env=env, text=True, capture_output=True, timeout=600
        )
        assert discovery_file.read_text().strip() == other  # the run did not claim the host's file
    finally:
        _stop(head)
        shutil.rmtree(host_tmp, ignore_errors=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _registered_checkpoint(run_dir) == 24
    log = next((run_dir / "logs").glob("train-*.log")).read_text(encoding="utf-8")
    assert "PlacementGroupCleanerMonitor" not in log, log[-3000:]
    assert "placement group" not in log, log[-3000:]
