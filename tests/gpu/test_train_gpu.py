"""GPU only: jobs/train.py on the demo preset on CUDA, on a local Ray cluster with a GPU
worker (the unsloth backend when it is installed, 4-bit). Skips without CUDA.

Runs in a fresh interpreter: Unsloth must be imported before transformers in its process
(the training worker does that), and the pytest process has already imported transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.gpu_ray]

REPO_ROOT = Path(__file__).resolve().parents[2]


def _train(tmp_path: Path, *overrides: str, timeout: int = 1200) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "jobs/train.py", "--config", "demo", f"run.storage_path={tmp_path / 'runs'}", *overrides]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + "\n" + done.stderr[-5000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_demo_finetune_on_gpu_beats_zero_shot(demo_model_dir, tmp_path):
    import importlib.util

    result = _train(tmp_path, "run.name=gpu-demo")
    print("gpu demo:", json.dumps(result))
    expected_backend = "unsloth" if importlib.util.find_spec("unsloth") else "hf"
    assert result["backend"] == expected_backend
    assert result["device"].startswith("cuda")
    assert result["steps"] == 60
    assert result["fine_tuned"]["accuracy"] > result["zero_shot"]["accuracy"] + 0.05
    metrics = json.loads((Path(result["run_dir"]) / "metrics.json").read_text())
    assert metrics["peak_gpu_memory_gb"] > 0
    assert metrics["train"]["optimizer"] == "adamw_8bit"  # bitsandbytes' 8-bit AdamW on CUDA
    manifest = json.loads((Path(result["run_dir"]) / "manifest.json").read_text())
    assert manifest["worker_env"] == {
        "NCCL_NVLS_ENABLE": "0",
        "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
        "NVSHMEM_DISABLE_NVLS": "1",
    }
    assert (Path(result["adapter"]) / "adapter_config.json").is_file()


def test_gpu_run_resumes_after_an_injected_failure(demo_model_dir, tmp_path):
    """The resume path on CUDA (Unsloth's trainer patches, 8-bit optimizer state)."""
    overrides = ("run.name=gpu-resume", "train.max_steps=8", "train.save_steps=4", "train.zero_shot_eval=false")
    env_key = "SENTIMENT_RAY_TEST_FAIL_AT_STEP"
    os.environ[env_key] = "6"
    try:
        with pytest.raises(AssertionError, match="test-injected failure"):
            _train(tmp_path, *overrides)
    finally:
        del os.environ[env_key]
    result = _train(tmp_path, *overrides)
    assert result["resumed_from_step"] == 4
    assert result["steps"] == 8


def test_auto_gradient_checkpointing_follows_the_gpu_memory(demo_model_dir, tmp_path):
    """`lora.gradient_checkpointing=auto` resolved on the worker's GPU: none on >= 40 GiB
    (H100/H200), Unsloth's below; the run trains either way and records what it used."""
    import torch

    from sentiment_ray.backends.base import resolve_gradient_checkpointing

    expected = resolve_gradient_checkpointing("auto", torch.cuda.get_device_properties(0).total_memory / 2**30)
    result = _train(
        tmp_path, "run.name=gpu-auto-gc", "lora.gradient_checkpointing=auto", "train.max_steps=6", "train.zero_shot_eval=false"
    )
    metrics = json.loads((Path(result["run_dir"]) / "metrics.json").read_text())
    assert result["steps"] == 6
    assert metrics["train"]["gradient_checkpointing"] == expected
    assert metrics["train"]["loss_last"] < metrics["train"]["loss_first"]
