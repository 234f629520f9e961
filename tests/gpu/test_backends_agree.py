"""The two backends train alike: the demo model, 4-bit, the demo preset's batches, 20 optimizer
steps on unsloth and on hf from the same seeded LoRA start; the per-step losses agree within
2% (each backend runs in a child process of the training benchmark, so Unsloth's patches never
reach the hf run). Skips without CUDA."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.gpu_models]
AGREE_WITHIN = 0.02


def test_unsloth_and_hf_losses_agree_over_20_steps_on_the_demo_model(demo_model_dir, tmp_path):
    if importlib.util.find_spec("unsloth") is None:
        pytest.skip("unsloth is not installed")
    from sentiment_ray.bench.train_bench import run_train_benchmark

    result = run_train_benchmark(
        model=demo_model_dir, out_dir=str(tmp_path), backends=["unsloth", "hf"], config="demo",
        warmup=0, steps=20, overrides=["model.load_in_4bit=true", "model.dtype=bfloat16"], child_timeout=300,
    )
    for backend in ("unsloth", "hf"):
        assert "error" not in result["runs"][backend], result["runs"][backend].get("error")
    agreement = result["comparisons"]["unsloth/hf"]["loss_agreement"]
    losses = zip(result["runs"]["unsloth"]["losses"], result["runs"]["hf"]["losses"])
    assert agreement["max_rel_diff"] <= AGREE_WITHIN, [(round(u, 4), round(h, 4)) for u, h in losses]
