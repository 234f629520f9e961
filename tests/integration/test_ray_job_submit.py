"""`ray job submit --working-dir .` of jobs/train.py against a real `ray start --head`, with
Ray 2.60's token authentication on (the default), on the tiny model.

The head runs as `ray start --head --block` in its own session with a private --temp-dir
and free ports: it neither collides with nor is found by other Ray clusters on the machine
(`ray.init()` elsewhere would otherwise attach to it), and teardown signals only the
processes this test started. (`ray stop --force` would kill every Ray process on the
machine, other people's clusters included.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    cli = Path(sys.executable).parent / "ray"
    return str(cli) if cli.exists() else "ray"


def _wait_for_dashboard(url: str, head: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {head.returncode}")
        try:
            # Unauthenticated: any HTTP answer (even 401) means the server is up.
            urllib.request.urlopen(url + "/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"the dashboard at {url} did not come up in {timeout:.0f} s")


def _stop_head(head: subprocess.Popen) -> None:
    """SIGTERM the `ray start --block` process (it shuts down the processes it started),
    then SIGKILL whatever is left in its process group."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # our own session (start_new_session=True)
    except ProcessLookupError:
        pass
    head.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head():
    """(dashboard URL, env for CLI calls, temp dir) of a private head node; stopped afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="rayjs-", dir="/tmp")  # short: Ray puts unix sockets here
    dashboard_port = _free_port()
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    # Token authentication: `ray start` turns it on because a token exists (~/.ray/auth_token,
    # created by the first local ray.init); the `ray job` CLI sends the token only when the
    # client side says token mode too.
    env["RAY_AUTH_MODE"] = "token"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    ports = {
        "--port": _free_port(),
        "--dashboard-port": dashboard_port,
        "--ray-client-server-port": _free_port(),
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--node-manager-port": _free_port(),
        "--object-manager-port": _free_port(),
    }
    cmd = [
        _ray_cli(),
        "start",
        "--head",
        "--block",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    cmd += [f"{flag}={port}" for flag, port in ports.items()]
    log = open(os.path.join(temp_dir, "head.log"), "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_dashboard(url, head)
        yield url, env, temp_dir
    finally:
        _stop_head(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _tiny_config_file(tiny_model_dir: str, tmp_path: Path) -> Path:
    config = {
        "model": {"name": tiny_model_dir, "backend": "hf", "load_in_4bit": False, "dtype": "float32", "max_seq_length": 128},
        "lora": {"r": 4, "alpha": 8, "gradient_checkpointing": "false"},
        "data": {
            "train_path": str(REPO_ROOT / "data" / "demo" / "sentiment_demo.csv"),
            "validation_fraction": 0.1,
            "max_train_rows": 64,
            "max_validation_rows": 32,
        },
        "train": {
            "per_device_train_batch_size": 4,
            "max_steps": 2,
            "warmup_steps": 0,
            "optim": "adamw_8bit",
            "packing": False,
            "eval_batch_size": 16,
            "zero_shot_eval": True,
            "seed": 0,
        },
        "run": {"name": "job-submit", "storage_path": str(tmp_path / "runs"), "use_gpu": "auto"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _ray_job(env: dict, *args: str, timeout: float = 60) -> str:
    """Run `ray job <args>`; its stdout + stderr (the CLI logs status lines to stderr)."""
    cmd = [_ray_cli(), "job", args[0], "--log-style=record", *args[1:]]
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"ray job {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def test_job_submit_trains_and_prints_one_json_line(ray_head, tiny_model_dir, tmp_path):
    url, env, temp_dir = ray_head
    config_path = _tiny_config_file(tiny_model_dir, tmp_path)
    submission_id = f"sentiment-train-{os.getpid()}-{int(time.time())}"
    submitted = subprocess.run(
        [
            _ray_cli(),
            "job",
            "submit",
            "--address",
            url,
            "--submission-id",
            submission_id,
            "--working-dir",
            ".",
            "--",
            sys.executable,
            "jobs/train.py",
            "--config",
            str(config_path),
            "train.learning_rate=1e-3",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    status = _ray_job(env, "status", "--address", url, submission_id)
    logs = _ray_job(env, "logs", "--address", url, submission_id)
    assert submitted.returncode == 0, (
        f"{status}\n--- submit output ---\n{submitted.stdout[-3000:]}\n{submitted.stderr[-3000:]}"
        f"\n--- job logs ---\n{logs[-6000:]}"
    )
    assert f"Job '{submission_id}' succeeded" in status, (
        f"{status}\n--- submit output ---\n{submitted.stdout[-3000:]}\n{submitted.stderr[-3000:]}"
        f"\n--- job logs ---\n{logs[-6000:]}"
    )
    # The working dir reached the cluster as a small package: Ray's defaults, .gitignore and
    # .rayignore kept the venv, runs, .git and caches out.
    unpacked = [p for p in Path(temp_dir).glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert len(unpacked) == 1, unpacked
    names = {p.name for p in unpacked[0].iterdir()}
    assert {"jobs", "sentiment_ray", "data"} <= names
    assert not names & {".venv", ".git", "runs", ".pytest_cache"}
    size = sum(f.stat().st_size for f in unpacked[0].rglob("*") if f.is_file())
    assert size < 5 * 2**20, f"working-dir package is {size / 2**20:.1f} MiB"

    json_lines = [line for line in logs.splitlines() if line.startswith("{") and line.endswith("}")]
    assert len(json_lines) == 1, f"expected exactly one JSON line, got {json_lines}"
    result = json.loads(json_lines[0])
    run_dir = tmp_path / "runs" / "job-submit"
    assert result["run_dir"] == str(run_dir)
    assert result["adapter"] == str(run_dir / "adapter")
    assert result["backend"] == "hf"
    assert result["device"] == "cpu"
    assert result["steps"] == 2
    for key in ("zero_shot", "fine_tuned"):
        assert 0.0 <= result[key]["accuracy"] <= 1.0
        assert result[key]["n"] == 32

    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["fine_tuned"]["accuracy"] == result["fine_tuned"]["accuracy"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["train"]["learning_rate"] == 1e-3  # the trailing override reached the worker
    # NVLink multicast settings are the user's: the worker records what it saw, nothing forced.
    assert set(manifest["worker_env"]) == {"NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"}
    # adamw_8bit stays in the config; without CUDA the worker trained with adamw_torch.
    assert manifest["config"]["train"]["optim"] == "adamw_8bit"
    assert metrics["train"]["optimizer"] == "adamw_torch"
