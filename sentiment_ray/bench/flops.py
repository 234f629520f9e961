"""FLOPs conventions for the benchmarks. Pure: no torch, no transformers.

All counts are *model* FLOPs (the arithmetic the maths requires, one multiply-add = 2 FLOPs),
not what a kernel happens to execute:

Dense part. `N` = the parameters of every matrix multiply a token goes through: in each
layer q, k, v, o, gate, up, down, plus the LM head (hidden x vocab, counted whether or not
it is tied to the embedding). Embedding lookups, norms, RoPE, activations and the softmax
are not counted (a few per cent at most).

Attention. Per layer, for a causal sequence of n tokens: QK^T and AV each cost
2 * d_attn * n(n+1)/2 FLOPs (n(n+1)/2 = the causal (query, key) pairs) (d_attn = query heads x head_dim; GQA shrinks the K/V
projections, counted in N, not the score matmuls), so forward = 2 * d_attn * n(n+1).
Only the useful (causal, per document) part counts: a packed row of several documents
costs the sum over its documents, and padding costs nothing, even where SDPA computes a
full masked square.

Training, LoRA with a frozen base (QLoRA), per token:
    forward 2N + backward 2N (input gradients only: the frozen base needs no weight
    gradients) = 4N, plus 6 x (LoRA parameters), plus 3 x forward attention (the backward
    of the score and value matmuls is twice the forward).
The forward that gradient checkpointing recomputes is NOT in the MFU numerator (it is in
`hardware_flops`: + 2N + 1 x forward attention). The LM head is counted at every
position (Unsloth and TRL compute the loss over the whole packed row).

Inference (label-token scoring), per prompt of n tokens:
    2 x (N - LM head) x n  +  2 x LM head (only the last position's logits are computed,
    `logits_to_keep=1`)  +  forward attention.

MFU = model FLOPs / wall time / peak. The default peak is the H100 SXM's dense bf16 tensor
throughput, 989 TFLOP/s (no sparsity); the 4-bit dequantisation work is not counted: the
matmuls run in bf16 after it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

H100_SXM_BF16_DENSE_TFLOPS = 989.0

TRAIN_CONVENTION = (
    "model FLOPs per token = 4 x N (forward 2N + input-gradient backward 2N; frozen base, no "
    "weight gradients) + 6 x LoRA params + 3 x causal forward attention (2 x layers x "
    "heads x head_dim x n(n+1) per document of n tokens); N = matmul params incl. LM head, "
    "excl. embeddings; checkpointing recompute excluded (see hardware_flops)"
)
SCORING_CONVENTION = (
    "model FLOPs per prompt of n tokens = 2 x (N - LM head) x n + 2 x LM head (last position "
    "only, logits_to_keep=1) + causal forward attention; padding not counted"
)


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that decide a decoder-only transformer's FLOPs."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> ModelShape:
        """From an HF config object or its dict (config.json)."""
        get = config.get if isinstance(config, Mapping) else lambda k, d=None: getattr(config, k, d)
        hidden = int(get("hidden_size"))
        heads = int(get("num_attention_heads"))
        kv = get("num_key_value_heads") or heads
        head_dim = get("head_dim") or hidden // heads
        return cls(
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")),
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(kv),
            head_dim=int(head_dim),
            vocab_size=int(get("vocab_size")),
        )

    @property
    def attention_width(self) -> int:
        """d_attn = query heads x head_dim."""
        return self.num_attention_heads * self.head_dim

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each of the seven Llama projections in one layer."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        q = self.attention_width
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_matmul_params(self) -> int:
        return sum(a * b for a, b in self.projection_shapes().values())

    def lm_head_params(self) -> int:
        return self.hidden_size * self.vocab_size

    def matmul_params(self) -> int:
        """N: every layer's projections plus the LM head."""
        return self.num_hidden_layers * self.layer_matmul_params() + self.lm_head_params()

    def lora_params(self, r: int, target_modules: Iterable[str]) -> int:
        """Trainable LoRA parameters: r x (in + out) per adapted projection per layer."""
        shapes = self.projection_shapes()
        unknown = sorted(set(target_modules) - set(shapes))
        if unknown:
            raise ValueError(f"unknown LoRA target modules {unknown}; known: {sorted(shapes)}")
        return self.num_hidden_layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in set(target_modules))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def causal_pairs(doc_lengths: Iterable[int]) -> int:
    """(query, key) pairs a causal model attends over documents of these lengths:
    n(n+1)/2 each. Equals the sum over tokens of (position in its document + 1), which is
    how the training benchmark counts it on the device without a host sync."""
    return sum(int(n) * (int(n) + 1) // 2 for n in doc_lengths)


def attention_forward_flops(shape: ModelShape, pairs: int) -> float:
    """Causal forward attention FLOPs, all layers: QK^T and AV, 2 FLOPs per multiply-add,
    d_attn wide, for `pairs` (query, key) pairs."""
    return 4.0 * shape.num_hidden_layers * shape.attention_width * pairs


def train_flops(shape: ModelShape, tokens: int, pairs: int, lora_params: int) -> dict[str, float]:
    """Model and hardware FLOPs of training on `tokens` real tokens whose documents attend
    over `pairs` causal pairs (see causal_pairs)."""
    n = shape.matmul_params()
    attn = attention_forward_flops(shape, pairs)
    model = 4.0 * n * tokens + 6.0 * lora_params * tokens + 3.0 * attn
    # Checkpointing re-runs each layer's forward (LoRA's share included, LM head not) in the backward.
    hardware = model + 2.0 * (n - shape.lm_head_params() + lora_params) * tokens + attn
    return {"tokens": float(tokens), "model_flops": model, "hardware_flops": hardware, "attention_forward_flops": attn}


def scoring_flops(shape: ModelShape, prompt_lengths: Sequence[int], lora_params: int = 0) -> dict[str, float]:
    """Model FLOPs of label-token scoring for prompts of these lengths."""
    tokens = sum(int(n) for n in prompt_lengths)
    body = shape.matmul_params() - shape.lm_head_params()
    attn = attention_forward_flops(shape, causal_pairs(prompt_lengths))
    model = 2.0 * (body + lora_params) * tokens + 2.0 * shape.lm_head_params() * len(prompt_lengths) + attn
    return {"tokens": float(tokens), "model_flops": model, "attention_forward_flops": attn}


def doc_lengths_from_position_ids(position_ids: Sequence[int]) -> list[int]:
    """Document lengths of one packed (padding-free) row: a document starts at position 0."""
    lengths: list[int] = []
    for p in position_ids:
        if int(p) == 0 or not lengths:
            lengths.append(1)
        else:
            lengths[-1] += 1
    return lengths


def mfu(flops: float, seconds: float, peak_tflops: float = H100_SXM_BF16_DENSE_TFLOPS) -> float | None:
    if seconds <= 0 or peak_tflops <= 0:
        return None
    return flops / seconds / (peak_tflops * 1e12)
