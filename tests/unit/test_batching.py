"""Cutting each worker's share of the global batch into micro-batches: what the config
fixes, and what `train.micro_batch_size: auto` picks from a GPU's memory (a pure estimate
from the model's shape, the sequence length and gradient checkpointing)."""

from __future__ import annotations

import pytest

from sentiment_ray.bench.flops import ModelShape
from sentiment_ray.bench.shapes import SHAPES
from sentiment_ray.config import ConfigError, TrainConfig, validate
from sentiment_ray.train.batching import (
    BatchPlan,
    activation_budget,
    activation_bytes_per_row,
    configured_plan,
    micro_batch_that_fits,
)

GIB = 2**30
LLAMA_8B = ModelShape.from_config(SHAPES["llama8b-shape"])
LORA_8B = 41_943_040  # r=16 on the seven projections of the 8B shape


def train(**fields) -> TrainConfig:
    return TrainConfig(per_device_train_batch_size=2, gradient_accumulation_steps=4, **fields)


def auto_micro_batch(
    gpu_gib: float, *, backend="unsloth", checkpointing="false", weights_gib=5.5, attention="sdpa", seq_len=2048, share=8
) -> int:
    """What `auto` picks for the 8B shape on a GPU of `gpu_gib` with the 4-bit model loaded."""
    budget = activation_budget((gpu_gib - weights_gib) * GIB, LORA_8B, eight_bit_optimizer=True)
    per_row = activation_bytes_per_row(
        LLAMA_8B, seq_len=seq_len, backend=backend, gradient_checkpointing=checkpointing, attention=attention
    )
    return micro_batch_that_fits(share, budget_bytes=budget, bytes_per_row=per_row)


def test_the_config_fixes_the_cut_unless_auto_meets_a_gpu():
    assert configured_plan(train()) == BatchPlan(2, 4, "config")
    assert configured_plan(train(micro_batch_size=8)) == BatchPlan(8, 1, "config")
    assert configured_plan(train(micro_batch_size=4), on_gpu=True) == BatchPlan(4, 2, "config")
    assert configured_plan(train(micro_batch_size="auto")) == BatchPlan(2, 4, "cpu")  # a CPU keeps the preset's
    assert configured_plan(train(micro_batch_size="auto"), on_gpu=True) is None  # the GPU's memory decides
    assert all(p.rows_per_step == 8 for p in (BatchPlan(2, 4, "config"), BatchPlan(8, 1, "memory")))


def test_a_micro_batch_that_does_not_divide_the_share_is_refused():
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=3 does not divide .* = 8"):
        validate({"train": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "micro_batch_size": 3}})
    with pytest.raises(ConfigError, match="micro_batch_size"):
        validate({"train": {"micro_batch_size": 0}})
    assert validate({"train": {"micro_batch_size": "auto"}}).train.micro_batch_size == "auto"


def test_the_largest_divisor_of_the_share_that_fits():
    assert micro_batch_that_fits(8, budget_bytes=100, bytes_per_row=10) == 8
    assert micro_batch_that_fits(8, budget_bytes=79, bytes_per_row=10) == 4  # 7 rows fit; 7 does not divide 8
    assert micro_batch_that_fits(12, budget_bytes=65, bytes_per_row=10) == 6
    assert micro_batch_that_fits(8, budget_bytes=5, bytes_per_row=10) == 1  # nothing fits: the smallest cut


def test_the_reference_recipe_on_an_h200_takes_its_whole_share_in_one_pass():
    assert auto_micro_batch(139.8) == 8  # H200: one forward pass of 8 x 2048, no accumulation
    assert auto_micro_batch(79.1) == 4  # H100 80GB
    assert auto_micro_batch(139.8, backend="hf") == 4  # peft keeps more per token than Unsloth
    assert auto_micro_batch(22.0) == 1  # a 24 GB card, without checkpointing
    assert auto_micro_batch(22.0, checkpointing="unsloth") == 8  # checkpointing keeps a layer's input per token


def test_more_memory_never_gives_a_narrower_micro_batch():
    picks = [auto_micro_batch(gib, backend=b) for b in ("unsloth", "hf") for gib in range(16, 160, 4)]
    assert all(a <= b for a, b in zip(picks[:36], picks[1:36]))
    assert all(a <= b for a, b in zip(picks[36:], picks[37:]))


def test_the_estimate_covers_the_measured_peaks_of_the_8b_shape():
    """docs/benchmarks.md: 2 x 2048 tokens without checkpointing peaked at 20.87 GiB (unsloth)
    and 46.16 GiB (hf), of which about 5.3 and 7.3 GiB are the loaded weights and 0.4 the
    LoRA optimizer state. The estimate must not be below what was measured."""
    for backend, peak, weights in (("unsloth", 20.87, 5.3), ("hf", 46.16, 7.3)):
        measured_activations = (peak - weights - 0.4) * GIB
        estimate = 2 * activation_bytes_per_row(
            LLAMA_8B, seq_len=2048, backend=backend, gradient_checkpointing="false", attention="sdpa"
        )
        assert measured_activations <= estimate <= 1.15 * measured_activations, backend


def test_what_changes_the_memory_of_a_row():
    def per_row(**kw):
        settings = {"seq_len": 2048, "backend": "unsloth", "gradient_checkpointing": "false", "attention": "sdpa", **kw}
        return activation_bytes_per_row(LLAMA_8B, **settings)

    assert per_row(gradient_checkpointing="unsloth") < per_row() / 10
    assert per_row(attention="eager") > per_row()
    assert per_row(seq_len=1024) == pytest.approx(per_row() / 2)
