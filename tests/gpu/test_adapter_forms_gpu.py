"""GPU only: the demo model with an adapter held each way the labeller can hold it (peft's
layers, Unsloth's fused forwards, merged into 16-bit weights, merged and compiled) labels the
demo sample alike. Runs the label benchmark's `--forms` comparison in a child process
(Unsloth must be imported first in its process). Skips without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.gpu_models]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CSV = REPO_ROOT / "data" / "demo" / "sentiment_demo.csv"


def test_adapter_forms_label_the_demo_sample_alike(demo_model_dir, tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "jobs/benchmark.py",
            "label",
            "--model",
            "smollm2-135m-instruct",
            "--config",
            "demo",
            "--adapter",
            "random",
            "--forms",
            "unmerged,fused,merged,merged+compiled",
            "--data",
            str(DEMO_CSV),
            "--n",
            "4000",
            "--token-budgets",
            "32768",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    print(done.stdout[-3000:])
    run = json.loads((tmp_path / "label_benchmark.json").read_text())["runs"]["unsloth"]
    forms = run["forms"]
    assert set(forms) == {"unmerged", "fused", "merged", "merged+compiled"}
    for name in ("fused", "merged", "merged+compiled"):
        assert "error" not in forms[name], forms[name]
        for x in forms[name]["runs"]:
            assert x["same_label_share"] >= 0.999, (name, x)
            assert x["max_prob_difference"] <= 0.01, (name, x)
    assert forms["merged+compiled"]["compiled"], "the compiled forward fell back to eager"
