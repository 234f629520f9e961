"""What the object-store tests share (tests/integration/test_s3_storage.py, tests/integration/test_gcs_storage.py):
a loopback server started as a subprocess and waited for, demo rows as CSV bytes, the tiny
model's config with data and runs in a bucket, and the jobs run as the user runs them."""

from __future__ import annotations

import csv
import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CSV = REPO_ROOT / "data" / "demo" / "sentiment_demo.csv"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], ready_url: str, log_path: Path, timeout_s: float = 60) -> subprocess.Popen:
    """`python <args>` in the background (output to log_path), returned once `ready_url`
    answers; RuntimeError naming the log if it exits or stays silent for timeout_s."""
    log = open(log_path, "wb")
    server = subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT)
    log.close()  # the child holds its own descriptor
    deadline = time.time() + timeout_s
    while True:
        try:
            urllib.request.urlopen(ready_url, timeout=1)
            return server
        except urllib.error.HTTPError:  # it answers (a 4xx for a probe path is fine)
            return server
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise RuntimeError(f"{args[:2]} did not start (exit code {server.poll()}); see {log_path}") from None
            time.sleep(0.2)


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()


def demo_rows(n: int, start: int = 0) -> list[dict]:
    with open(DEMO_CSV, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [{k: r[k] for k in ("ID", "sentence", "label", "lang")} for r in rows[start : start + n]]


def to_csv(rows: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def check_globs_and_quarantine(store, root: str) -> list[str]:
    """On a store with `put(key, bytes)` / `get(key)` under URI `root`: two CSV parts (one bad
    row) expand as a folder and as a glob, load with the bad row skipped, and the quarantine
    entry lands in the store naming file and row. Returns the expanded files."""
    from sentiment_ray.config import load_config
    from sentiment_ray.io.files import expand_paths
    from sentiment_ray.labels import LabelSet
    from sentiment_ray.train.data import load_labelled

    rows = demo_rows(30)
    store.put("data/part-1.csv", to_csv(rows[:20] + [dict(rows[0], ID="bad-1", label="Neutral")]))
    store.put("data/part-2.csv", to_csv(rows[20:]))
    files = expand_paths(f"{root}/data/")
    assert files == [f"{root}/data/part-1.csv", f"{root}/data/part-2.csv"]
    assert expand_paths(f"{root}/data/*-2.csv") == files[1:]

    cfg = load_config("demo", ["data.on_bad_rows=skip"])
    quarantine = f"{root}/q/quarantine.jsonl"
    data = load_labelled(f"{root}/data/*.csv", cfg.data, LabelSet(cfg.prompt.labels), quarantine_path=quarantine)
    assert len(data) == 30
    assert data.bad_rows.count == 1
    assert data.bad_rows.quarantine_path == quarantine
    entry = json.loads(store.get("q/quarantine.jsonl"))
    assert entry["file"] == files[0]
    assert entry["row"] == 21
    assert entry["kind"] == "unknown label"
    return files


def run_job(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def last_json_line(stdout: str) -> dict:
    return json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("{")))


def write_tiny_config(path: Path, model_dir: str, train_uri: str, storage_path: str, name: str, **sections) -> Path:
    """tiny_cfg's settings (tests/conftest.py) with data and runs in a bucket, as a YAML file."""
    raw = {
        "model": {"name": model_dir, "backend": "hf", "load_in_4bit": False, "dtype": "float32", "max_seq_length": 128},
        "lora": {"r": 4, "alpha": 8, "gradient_checkpointing": "false"},
        "data": {"train_path": train_uri, "validation_fraction": 0.1, "max_validation_rows": 16, "on_bad_rows": "skip"},
        "train": {
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "max_steps": 2,
            "warmup_steps": 0,
            "optim": "adamw_torch",
            "packing": False,
            "eval_batch_size": 16,
            "zero_shot_eval": False,
            "seed": 0,
        },
        "run": {"name": name, "storage_path": storage_path, "use_gpu": "false", "num_workers": 1, "cpus_per_worker": 1},
        "label": {"batch_size": 16, "num_actors": 1},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path
