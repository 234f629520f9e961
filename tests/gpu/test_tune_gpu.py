"""GPU only: jobs/tune.py on the GPU machine: one GPU per trial, Unsloth (when installed) in the
Train workers only, the best adapter promoted. Skips cleanly without CUDA (conftest's `gpu`
marker hook).

The tiny random Llama keeps it to a couple of minutes: 2 trials, 4 steps, a report every 2
steps; `tune.max_concurrent_trials: 0` = one trial per GPU of the local cluster.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.gpu_tune]

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_tune_on_gpu(tiny_cfg, tmp_path):
    import torch

    gpus = torch.cuda.device_count()
    unsloth = importlib.util.find_spec("unsloth") is not None
    cfg = tiny_cfg
    cfg.model.backend = "auto"  # unsloth when installed, else hf
    cfg.model.load_in_4bit = True
    cfg.model.dtype = "auto"
    cfg.run.use_gpu = "true"
    cfg.train.optim = "adamw_8bit"
    cfg.train.max_steps = 4
    cfg.train.eval_steps = 2
    cfg.tune.num_samples = 2
    cfg.tune.max_concurrent_trials = 0
    cfg.tune.experiment_name = "gpu-tune"
    cfg.tune.search_space = {
        "train.learning_rate": {"type": "loguniform", "lower": 1e-4, "upper": 1e-3},
        "lora.r": {"type": "choice", "values": [4, 8]},
        "lora.alpha": {"type": "ratio_of", "field": "lora.r", "values": [1, 2]},
    }
    config_path = tmp_path / "tune.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "UNSLOTH_COMPILE_LOCATION")}
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "jobs" / "tune.py"), "--config", str(config_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=1500,
    )
    log = out.stdout + out.stderr
    (tmp_path / "tune.log").write_text(log)
    assert out.returncode == 0, log[-8000:]
    assert out.stdout.strip().splitlines()[-1].startswith("{")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    exp = Path(summary["experiment"])
    assert summary["trials"] == 2
    assert summary["best_dir"]

    # One GPU per trial: as many trials at once as there are GPUs.
    assert f"({gpus} concurrent trials)" in log

    for run_dir in sorted((exp / "train_runs").iterdir()):
        metrics_file = run_dir / "metrics.json"
        if not metrics_file.exists():  # stopped by ASHA
            continue
        metrics = json.loads(metrics_file.read_text())
        assert metrics["device"].startswith("cuda"), metrics["device"]
        assert metrics["backend"] == ("unsloth" if unsloth else "hf")

    # Unsloth is imported in the Train workers only: its import banner never comes from the
    # Tune driver or a trial driver (Ray prefixes actor output with the actor's class name).
    if unsloth:
        banners = [line for line in log.splitlines() if "🦥" in line or "Unsloth: Will patch" in line]
        foreign = [line for line in banners if "(RayTrainWorker" not in line]
        assert not foreign, "\n".join(foreign[:5])

    best = exp / "best"
    assert (best / "adapter" / "adapter_config.json").is_file()
    info = json.loads((best / "trial.json").read_text())
    assert info["trial_id"] == summary["best_trial"]
    assert info["metric"] == "val_macro_f1"
