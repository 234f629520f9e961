"""The two backends train alike: the demo model, the demo preset's batches, 20 optimizer steps
on unsloth and on hf from the same seeded LoRA start (each backend in a child process of the
training benchmark, so Unsloth's patches never reach the hf run; both hash their first
batches). What the agreement experiment (benchmarks/backend_agreement.py, docs/benchmarks.md)
established:

- with a 16-bit base, the per-step losses agree: within 2% on average, 5% at any step;
- with the 4-bit base, both train float32 LoRA weights, and the forward passes agree within
  2.5% over 20 batches (frozen weights); the rest is the two 4-bit stacks' own numerics
  (peft upcasts the norms and embeddings to float32, Unsloth keeps them in bfloat16).

Skips without CUDA."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.gpu_models]


def _relative_differences(result: dict) -> list[float]:
    for backend in ("unsloth", "hf"):
        assert "error" not in result["runs"][backend], result["runs"][backend].get("error")
    u, h = result["runs"]["unsloth"], result["runs"]["hf"]
    assert u["batch_fingerprints"] == h["batch_fingerprints"]  # the same batches
    return [abs(a - b) / abs(b) for a, b in zip(u["losses"], h["losses"])]


def _run(demo_model_dir, out, overrides):
    from sentiment_ray.bench.train_bench import run_train_benchmark

    return run_train_benchmark(
        model=demo_model_dir,
        out_dir=str(out),
        backends=["unsloth", "hf"],
        config="demo",
        warmup=0,
        steps=20,
        overrides=["model.dtype=bfloat16", *overrides],
        child_timeout=300,
    )


def test_unsloth_and_hf_train_alike_over_20_steps_on_the_demo_model(demo_model_dir, tmp_path):
    if importlib.util.find_spec("unsloth") is None:
        pytest.skip("unsloth is not installed")

    sixteen_bit = _run(demo_model_dir, tmp_path / "16bit", ["model.load_in_4bit=false"])
    diffs = _relative_differences(sixteen_bit)
    assert sum(diffs) / len(diffs) <= 0.02, [round(d, 3) for d in diffs]
    assert max(diffs) <= 0.05, [round(d, 3) for d in diffs]

    frozen = _run(demo_model_dir, tmp_path / "4bit-frozen", ["model.load_in_4bit=true", "train.learning_rate=1e-9"])
    diffs = _relative_differences(frozen)
    assert max(diffs) <= 0.025, [round(d, 3) for d in diffs]
    for backend in ("unsloth", "hf"):
        trained = frozen["runs"][backend]["numerics"]["trained_dtypes"]
        assert list(trained) == ["float32"], (backend, trained)
