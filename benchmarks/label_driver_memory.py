"""The label job's driver memory as the input grows (docs/benchmarks.md): `jobs/label.py` on
N rows (the demo sample repeated with new IDs, gold labels kept, so the job ends with the
evaluation and a submission.csv) with a tiny random model on the CPU, the driver process's
resident memory sampled every 0.2 s. What grows with the rows on the driver is what would
exhaust a head node at 100M rows; the actors' memory is per unit and not measured here.

    .venv/bin/python benchmarks/label_driver_memory.py 100000 1000000    # prints one JSON line per size

The model's speed is irrelevant here (a 2-layer model, hidden 64): the rows only have to go
through the whole job.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

OVERRIDES = [
    "model.backend=hf",
    "model.dtype=float32",
    "model.max_seq_length=96",
    "run.use_gpu=false",
    "label.num_actors=1",
    "label.write_submission=true",
]


def write_input(path: Path, rows: int) -> None:
    """`rows` rows: the demo sample over and over, each with an ID of its own."""
    from tiny_model import DEMO_CSV

    with DEMO_CSV.open(encoding="utf-8", newline="") as f:
        demo = list(csv.DictReader(f))
    with path.open("w", encoding="utf-8", newline="") as f:
        out = csv.writer(f)
        out.writerow(["ID", "sentence", "label", "lang"])
        for i in range(rows):
            row = demo[i % len(demo)]
            out.writerow([f"r{i}", row["sentence"], row["label"], row["lang"]])


def peak_rss_mib(process: subprocess.Popen) -> tuple[float, list[tuple[float, float]]]:
    """Poll the process's resident memory until it exits: (peak MiB, (seconds, MiB) samples)."""
    import psutil

    proc = psutil.Process(process.pid)
    started, peak, samples = time.monotonic(), 0.0, []
    while process.poll() is None:
        try:
            rss = proc.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            break
        peak = max(peak, rss)
        samples.append((round(time.monotonic() - started, 1), round(rss, 1)))
        time.sleep(0.2)
    return peak, samples


def measure(rows: int, model_dir: str, work: Path) -> dict:
    data = work / f"in-{rows}.csv"
    write_input(data, rows)
    out = work / f"out-{rows}"
    args = [
        sys.executable,
        str(REPO_ROOT / "jobs" / "label.py"),
        "--input",
        str(data),
        "--output",
        str(out),
        "--overwrite",
        f"model.name={model_dir}",
        *OVERRIDES,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    started = time.perf_counter()
    with open(work / f"log-{rows}.txt", "w") as log:
        process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        result: dict = {}
        reader = threading.Thread(target=lambda: result.setdefault("stdout", process.stdout.read()), daemon=True)
        reader.start()
        peak, samples = peak_rss_mib(process)
        reader.join()
    summary = json.loads(result["stdout"].strip().splitlines()[-1]) if process.returncode == 0 else {}
    return {
        "rows": rows,
        "returncode": process.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "driver_peak_rss_mib": round(peak, 1),
        "labelled": summary.get("labelled"),
        "metrics_n": (summary.get("metrics") or {}).get("n"),
        "rss_at_end_mib": samples[-1][1] if samples else None,
    }


def main(argv: list[str]) -> int:
    from tiny_model import build_tiny_model

    sizes = [int(x) for x in argv] or [100_000, 1_000_000]
    with tempfile.TemporaryDirectory(prefix="sr-driver-memory-") as tmp:
        work = Path(tmp)
        model_dir = str(build_tiny_model(work / "tiny"))
        for rows in sizes:
            print(json.dumps(measure(rows, model_dir, work)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
