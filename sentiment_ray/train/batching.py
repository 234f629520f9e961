"""How each worker cuts its share of the global batch into micro-batches (forward passes).

The recipe's optimisation is defined by its global batch, run.num_workers x
train.per_device_train_batch_size x train.gradient_accumulation_steps rows per optimizer
step; how many of a worker's share go through one forward pass is a matter of memory and
speed. A wider micro-batch keeps a large GPU busy (fewer, larger kernels; fewer host
round trips per step), so `train.micro_batch_size: auto` takes the largest divisor of the
share whose activations fit the GPU, and gradient accumulation the rest. The HF Trainer
normalises the loss by the label tokens of the whole optimizer step (`num_items_in_batch`),
so the update does not depend on the cut (tests/integration/test_train.py compares them).

Pure: the memory model below is arithmetic on the model's shape and the bytes the caller
measured (train/trainer.py's `plan_batches` measures them on the GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from sentiment_ray.bench.flops import ModelShape
from sentiment_ray.config import TrainConfig

# Activations the backend keeps per token, relative to `layer_activation_bytes` (what a
# Llama decoder layer must keep for its backward, in bfloat16). Fitted to the peaks of the
# 8B shape at 2 x 2048 tokens without checkpointing (docs/benchmarks.md: Unsloth 20.9 GiB,
# hf 46.2 GiB; less the weights and optimizer state: 0.74 and 1.88), rounded up: Unsloth's
# fused kernels keep less, peft's float32 norms and embeddings (its 4-bit preparation
# upcasts them) keep more. The factors cover the loss's own memory too, at that shape.
ACTIVATION_FACTOR = {"unsloth": 0.8, "hf": 2.0}
# Of the memory free once the model is loaded, what a plan may fill: the allocator's
# fragmentation and the kernels' workspaces take the rest.
USABLE_FRACTION = 0.85
RESERVE_BYTES = 2 * 2**30


@dataclass(frozen=True)
class BatchPlan:
    """One worker's cut of its share: `micro_batch_size` rows per forward pass,
    `gradient_accumulation_steps` forward passes per optimizer step."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    chosen_by: str  # "config" (the two batch fields, or a number) | "memory" (auto on a GPU) | "cpu" (auto on a CPU)

    @property
    def rows_per_step(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps


def worker_share(train: TrainConfig) -> int:
    """Rows one worker contributes to each optimizer step."""
    return train.per_device_train_batch_size * train.gradient_accumulation_steps


def cut(train: TrainConfig, micro_batch_size: int, chosen_by: str) -> BatchPlan:
    share = worker_share(train)
    if micro_batch_size <= 0 or share % micro_batch_size:
        raise ValueError(f"a micro-batch of {micro_batch_size} rows does not divide the worker's share of {share}")
    return BatchPlan(micro_batch_size, share // micro_batch_size, chosen_by)


def configured_plan(train: TrainConfig, on_gpu: bool = False) -> BatchPlan | None:
    """The plan the config fixes, or None where `auto` leaves it to the GPU's memory."""
    micro = train.micro_batch_size
    if micro is None:
        return cut(train, train.per_device_train_batch_size, "config")
    if micro == "auto":
        return None if on_gpu else cut(train, train.per_device_train_batch_size, "cpu")
    return cut(train, micro, "config")


def layer_activation_bytes(shape: ModelShape) -> int:
    """Bytes per token one Llama-style decoder layer keeps for its backward in bfloat16: the
    inputs of its two norms and their outputs (the projections' inputs), q, k and v, the
    attention output, and the MLP's gate, up, activation and product."""
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.attention_width, shape.num_key_value_heads * shape.head_dim
    return 2 * (4 * h + 2 * q + 2 * kv + 4 * i)


def activation_bytes_per_row(
    shape: ModelShape, *, seq_len: int, backend: str, gradient_checkpointing: str, attention: str
) -> float:
    """Training memory one row of `seq_len` tokens adds to a micro-batch.

    Without checkpointing every layer keeps its activations. With checkpointing a layer
    keeps its input (the hidden state, bfloat16) and one layer's activations exist at a
    time, during its recompute. Eager attention also keeps each head's seq_len x seq_len
    probabilities; sdpa and flash-attention keep none."""
    factor = ACTIVATION_FACTOR.get(backend, max(ACTIVATION_FACTOR.values()))
    layer = factor * layer_activation_bytes(shape)
    layers = shape.num_hidden_layers
    if gradient_checkpointing == "false":
        per_token = layers * layer
    else:
        per_token = layers * 2 * shape.hidden_size + layer
    if attention == "eager":
        per_token += layers * shape.num_attention_heads * seq_len * 2 * 2
    return per_token * seq_len


def activation_budget(free_bytes: float, trainable_params: int, eight_bit_optimizer: bool) -> float:
    """Of `free_bytes` (GPU memory free with the model loaded), what activations may take:
    the usable fraction, less a reserve, less the LoRA gradients and optimizer state
    (float32 gradients; Adam's two moments in float32, or 8-bit)."""
    optimizer = trainable_params * (4 + (2 if eight_bit_optimizer else 8))
    return free_bytes * USABLE_FRACTION - RESERVE_BYTES - optimizer


def micro_batch_that_fits(share: int, *, budget_bytes: float, bytes_per_row: float) -> int:
    """The largest divisor of `share` whose rows' activations fit `budget_bytes`; 1 when
    none does (the smallest cut; the run then stops with the GPU's own out-of-memory)."""
    fitting = [d for d in range(1, share + 1) if share % d == 0 and d * bytes_per_row <= budget_bytes]
    return max(fitting, default=1)
