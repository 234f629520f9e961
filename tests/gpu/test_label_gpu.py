"""GPU only: the labelling job with the real demo model on CUDA (unsloth backend when it is
installed, 4-bit), and a bare throughput measurement of the labeller. Skips without CUDA.

Each check runs in a fresh interpreter: Unsloth must be imported before transformers in
its process, and the pytest process has already imported transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.gpu_models]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CSV = REPO_ROOT / "data" / "demo" / "sentiment_demo.csv"

# Floor for the 135M demo model in 4-bit: far below what it should reach on any data-centre
# GPU; the project's target (30k prompt tokens/s per H100) is for an 8B model.
MIN_TOKENS_PER_S = 30_000

BENCH_SCRIPT = textwrap.dedent(
    """
    import csv, json, sys, time
    from sentiment_ray.config import load_config
    from sentiment_ray.label.labeler import Labeler       # imports nothing heavy; Labeler imports unsloth first

    cfg = load_config("demo", ["label.batch_size=64"])
    with open(sys.argv[1], newline="", encoding="utf-8") as f:
        sentences = [row["sentence"] for row in csv.DictReader(f)]
    labeler = Labeler(cfg)
    labeler.predict(sentences[:256])              # warm-up: kernels, allocator
    import torch
    torch.cuda.synchronize()
    start = time.perf_counter()
    columns, tokens = labeler.predict(sentences)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    probs = [columns["p_Positive"][i].as_py() + columns["p_Negative"][i].as_py() for i in range(len(sentences))]
    print(json.dumps({
        "backend": labeler.backend_name, "rows": len(sentences), "prompt_tokens": tokens,
        "seconds": seconds, "tokens_per_s": tokens / seconds, "rows_per_s": len(sentences) / seconds,
        "max_prob_sum_error": max(abs(p - 1.0) for p in probs), "load_seconds": labeler.load_seconds,
    }))
    """
)


def _run(args: list[str], timeout: int = 900) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))}
    done = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_bare_labeler_throughput_on_the_demo_model(demo_model_dir):
    result = _run([sys.executable, "-c", BENCH_SCRIPT, str(DEMO_CSV)])
    print("label throughput:", json.dumps(result))
    assert result["rows"] == 4000
    assert result["max_prob_sum_error"] < 1e-3
    assert result["tokens_per_s"] >= MIN_TOKENS_PER_S, result


def test_label_job_on_gpu_labels_every_id_once(demo_model_dir, tmp_path):
    out = tmp_path / "out"
    summary = _run(
        [
            sys.executable,
            "jobs/label.py",
            "--config",
            "demo",
            "--input",
            str(DEMO_CSV),
            "--output",
            str(out),
            "--rows-per-unit",
            "1000",
            "run.use_gpu=true",
            "label.write_submission=true",
        ]
    )
    print(
        "label job:",
        json.dumps({k: summary[k] for k in ("rows", "rows_per_s", "prompt_tokens_per_s", "prompt_tokens_per_predict_s")}),
    )
    ids = pacsv.read_csv(DEMO_CSV, convert_options=pacsv.ConvertOptions(include_columns=["ID"])).column("ID").to_pylist()
    table = pq.read_table(out / "predictions", columns=["ID", "p_Positive", "p_Negative"])
    assert sorted(table.column("ID").to_pylist()) == sorted(ids)
    assert table.num_rows == len(ids)
    assert summary["units"]["total"] == 4
    assert summary["bad_rows"] == 0
    submission = (out / "submission.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in submission[1:]] == ids
    assert summary["metrics"]["n"] == len(ids)
