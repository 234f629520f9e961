"""Random-weight models with a real architecture's shape, for speed and memory benchmarks.

Throughput does not depend on the weights' values, so a Llama-3.1-8B-shaped model with
random weights, built on the GPU itself, measures what the real 8B would (no download).

    path = prepare_model("llama8b-shape")          # built once into the cache, then reused
    python -m sentiment_ray.bench.shapes --model llama8b-shape   # the same, in its own process

Shapes (`SHAPES`): `llama8b-shape` (Llama-3.1-8B: hidden 4096, 32 layers, 32 heads, 8 KV
heads, intermediate 14336, vocab 128256, RoPE theta 500000 with Llama-3 scaling),
`llama1b-shape` (Llama-3.2-1B: hidden 2048, 16 layers, 32/8 heads, intermediate 8192, tied
embeddings) and `tiny-shape` (for CPU tests: vocab 128256 at hidden 64).

Tokenizer. Building needs no download, so the folder gets the demo
model's tokenizer (SmolLM2, 49,152 tokens) or the one named by `tokenizer`. Its ids are all
below 128,256, so they index the model's embedding directly (no remapping); the model keeps
the full 128,256-row embedding and LM head, so the LM head costs what Llama-3's does. What
differs from the real model is only how many tokens a sentence becomes (SmolLM2's BPE splits
Chinese, for instance, differently from Llama-3's): compare throughput in tokens/s, not
examples/s, between these shapes and real checkpoints.

The bf16 build runs on the GPU when there is one and takes ~25 s and ~16 GB of GPU memory
for the 8B shape; run it in its own process (`prepare_model` callers in the benchmark do)
so that memory is gone before a measured run loads the folder in 4-bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from sentiment_ray.backends.base import ensure_pad_token
from sentiment_ray.errors import UserError
from sentiment_ray.io.storage import local_atomic_dir
from sentiment_ray.models import cache_dir, resolve_model_path

SHAPE_MARKER = "bench_shape.json"
DEFAULT_TOKENIZER = "smollm2-135m-instruct"

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# LlamaConfig keyword arguments (transformers 5: RoPE settings live in `rope_parameters`).
SHAPES: dict[str, dict[str, Any]] = {
    "llama8b-shape": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_parameters": _LLAMA3_ROPE,
        "tie_word_embeddings": False,
    },
    "llama1b-shape": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {**_LLAMA3_ROPE, "factor": 32.0},
        "tie_word_embeddings": True,
    },
    "tiny-shape": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_parameters": _LLAMA3_ROPE,
        "tie_word_embeddings": False,
    },
}


class ShapeError(UserError, ValueError):
    """A model shape cannot be built as named (the message says why)."""


def is_shape(name: str) -> bool:
    return name in SHAPES


def shape_cache_dir(name: str, tokenizer: str, cache_root: str | os.PathLike | None = None) -> Path:
    """`<cache>/bench-shapes/<name>-<hash of shape + tokenizer>`: a changed shape or tokenizer
    never reuses a stale folder."""
    key = json.dumps({"shape": SHAPES[name], "tokenizer": tokenizer}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    root = Path(cache_root) if cache_root else cache_dir()
    return root / "bench-shapes" / f"{name}-{digest}"


def build_shape(
    name: str,
    out_dir: str | os.PathLike,
    tokenizer: str = DEFAULT_TOKENIZER,
    device: str | None = None,
    seed: int = 0,
) -> Path:
    """Build shape `name` with random weights (bf16) on `device` (default: the GPU when there
    is one) and save it with `tokenizer` (alias, local folder or hub id) into `out_dir`.
    Atomic: the folder appears complete or not at all."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if name not in SHAPES:
        raise ShapeError(f"unknown shape {name!r}; shapes: {', '.join(SHAPES)}")
    spec = SHAPES[name]
    started = time.perf_counter()
    tok_path = resolve_model_path(tokenizer)
    tok = ensure_pad_token(AutoTokenizer.from_pretrained(tok_path))
    if len(tok) > spec["vocab_size"]:
        raise ShapeError(f"tokenizer {tokenizer!r} has {len(tok)} tokens, more than {name}'s vocab {spec['vocab_size']}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = LlamaConfig(
        **spec,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    out_dir = Path(out_dir)
    with local_atomic_dir(out_dir) as stage:
        tmp = stage.path
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        built = time.perf_counter()
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        saved = time.perf_counter()
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        marker = {
            "shape": name,
            "config": spec,
            "parameters": int(params),
            "tokenizer": tokenizer,
            "tokenizer_vocab": len(tok),
            "device": device,
            "seed": seed,
            "build_seconds": round(built - started, 1),
            "save_seconds": round(saved - built, 1),
            "note": "random weights; tokenizer ids index the model's vocab directly (no remapping)",
        }
        (tmp / SHAPE_MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
    return out_dir


def prepare_model(
    name: str, tokenizer: str = DEFAULT_TOKENIZER, cache_root: str | os.PathLike | None = None, device: str | None = None
) -> str:
    """A local folder for `name`: a shape (built once into the cache), an alias (converted
    once, models.resolve_model_path), a local folder or a hub id (passed through)."""
    if is_shape(name):
        target = shape_cache_dir(name, tokenizer, cache_root)
        if not (target / SHAPE_MARKER).is_file():
            build_shape(name, target, tokenizer=tokenizer, device=device)
        return str(target)
    return resolve_model_path(name)


# Where each LoRA target sits in a Llama-style decoder layer, and its (in, out) features.
_LORA_SITES = {
    "q_proj": ("self_attn", lambda c: (c["hidden_size"], c["num_attention_heads"] * c["head_dim"])),
    "k_proj": ("self_attn", lambda c: (c["hidden_size"], c["num_key_value_heads"] * c["head_dim"])),
    "v_proj": ("self_attn", lambda c: (c["hidden_size"], c["num_key_value_heads"] * c["head_dim"])),
    "o_proj": ("self_attn", lambda c: (c["num_attention_heads"] * c["head_dim"], c["hidden_size"])),
    "gate_proj": ("mlp", lambda c: (c["hidden_size"], c["intermediate_size"])),
    "up_proj": ("mlp", lambda c: (c["hidden_size"], c["intermediate_size"])),
    "down_proj": ("mlp", lambda c: (c["intermediate_size"], c["hidden_size"])),
}


def write_random_adapter(model_dir: str, out_dir: str, lora: Any, seed: int = 0) -> str:
    """A LoRA adapter (peft's files) for a Llama-style model folder with random A and B, of the
    config's rank and targets: what labelling with a trained adapter costs, measured without
    training one. Built from config.json alone (numpy + safetensors, no model load)."""
    import numpy as np
    from safetensors.numpy import save_file

    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for target in lora.target_modules:
            block, features = _LORA_SITES[target]
            fan_in, fan_out = features(config)
            prefix = f"base_model.model.model.layers.{layer}.{block}.{target}"
            bound = 1.0 / np.sqrt(fan_in)
            tensors[f"{prefix}.lora_A.weight"] = rng.uniform(-bound, bound, (lora.r, fan_in)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, 0.01, (fan_out, lora.r)).astype(np.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "bias": lora.bias,
        "target_modules": list(lora.target_modules),
        "use_rslora": lora.use_rslora,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": str(model_dir),
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2), encoding="utf-8")
    return str(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (once) / resolve a benchmark model; print its folder as JSON.")
    parser.add_argument("--model", required=True, help=f"a shape ({', '.join(SHAPES)}), an alias or a folder")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tokenizer saved with a shape")
    parser.add_argument("--cache-dir", default=None, help="root for built shapes (default: the sentiment-ray cache)")
    parser.add_argument("--device", default=None, help="where to build a shape (default: cuda if available)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    path = prepare_model(args.model, args.tokenizer, args.cache_dir, args.device)
    info: dict[str, Any] = {"model": args.model, "path": path, "seconds": round(time.perf_counter() - started, 1)}
    marker = Path(path) / SHAPE_MARKER
    if marker.is_file():
        info["shape"] = json.loads(marker.read_text(encoding="utf-8"))
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
