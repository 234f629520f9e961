"""Merge a LoRA adapter into its base model and save a plain Hugging Face folder.

    summary = export_merged(load_config("demo"), "runs/demo/adapter", "runs/demo/merged")

The folder holds `config.json`, safetensors weights, the tokenizer (the one the adapter was
trained with) and `sentiment_ray_export.json` (base model, adapter identity, dtype, the
prompt + label set the model was fine-tuned on: the merged model classifies only with that
prompt, and the temperature that calibrates its label probabilities). `transformers.AutoModelForCausalLM.from_pretrained(folder)` loads it with no peft,
and label-token scoring gives the labels of base + adapter (tests/integration/test_export.py).

The base is loaded as the labeller loads it (the config's `model.backend`, `auto` resolved
as in training; 4-bit on a GPU when `model.load_in_4bit`, as training had it) and the
adapter folded in by `backends.adapter_forms.merge_lora`, the labeller's own merge: each
weight dequantised plus the adapter's update, in float32, rounded once to `dtype`. Never
merged into 4-bit weights: re-quantising rounds the adapter's small update away.

Light at import time: torch, transformers, peft and unsloth are imported inside functions.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

from sentiment_ray import backends, base_identity, languages, risk
from sentiment_ray.backends.adapter_forms import merge_lora
from sentiment_ray.backends.base import BackendError, check_adapter_dir, normalise_device
from sentiment_ray.calibration import adapter_temperature
from sentiment_ray.config import ExperimentConfig
from sentiment_ray.errors import UserError
from sentiment_ray.export.layout import EXPORT_INFO_FILE

DTYPES = ("bfloat16", "float16", "float32")


class ExportError(UserError, RuntimeError):
    """The adapter, the base or --output cannot be exported as asked (the message says why)."""


def _prepare_output(output: str, overwrite: bool) -> None:
    if "://" in output:
        raise ExportError(f"--output {output}: export writes a local folder; copy it to object storage afterwards")
    if os.path.isfile(output):
        raise ExportError(f"--output {output} is a file; give a folder")
    if os.path.isdir(output) and os.listdir(output):
        if not overwrite:
            raise ExportError(f"--output {output} is not empty; pass --overwrite to replace its contents")
        shutil.rmtree(output)
    os.makedirs(output, exist_ok=True)


def _check_adapter(adapter: str, allow_unsafe: bool = False) -> None:
    if "://" in adapter:
        raise ExportError(f"--adapter {adapter}: give a local folder (download the adapter first)")
    try:
        check_adapter_dir(adapter, allow_unsafe)  # the labeller's own check
    except BackendError as err:
        raise ExportError(f"--adapter: {err}") from None


def export_merged(
    cfg: ExperimentConfig,
    adapter: str,
    output: str,
    *,
    dtype: str = "bfloat16",
    device: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Merge `adapter` into cfg.model.name and write a standard HF folder to `output`.
    Returns a summary (output folder, backend, dtype, files, seconds)."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    _check_adapter(adapter, cfg.model.allow_unsafe_weights)
    try:
        base_identity.check(adapter, cfg.model.name, cfg.model.allow_base_mismatch)
    except base_identity.BaseMismatch as err:
        raise ExportError(str(err)) from None
    started = time.perf_counter()

    requested = cfg.model.backend
    if device is not None and str(device).startswith("cpu") and requested == "auto":
        requested = "hf"
    try:
        backend_name = backends.resolve_backend_name(requested)
    except backends.BackendError as err:
        raise ExportError(str(err)) from None
    backends.early_import(backend_name)  # unsloth before transformers/peft
    target = normalise_device(device)
    _prepare_output(output, overwrite)
    saved_dtype = _merge(cfg, backend_name, adapter, output, target, dtype)
    info = {
        "base_model": cfg.model.name,
        "adapter": os.path.abspath(adapter),
        "adapter_config": _read_json(os.path.join(adapter, "adapter_config.json")),
        "backend": backend_name,
        "dtype": saved_dtype,
        "prompt": cfg.prompt.model_dump(mode="json"),
        "max_seq_length": cfg.model.max_seq_length,
        # Label probabilities are softmax(label-token logits / temperature).
        "temperature": adapter_temperature(adapter),
        # What the adapter knows: its training and calibration rows' languages and labels;
        # the thresholds certified for a few error targets on its calibration rows (risk.py).
        "data_profile": languages.read_profile(adapter),
        "risk_control": risk.summary(scores) if (scores := risk.read_scores(adapter)) else None,
    }
    with open(os.path.join(output, EXPORT_INFO_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    _usual_permissions(output)
    return {
        "output": os.path.abspath(output),
        "base_model": cfg.model.name,
        "adapter": os.path.abspath(adapter),
        "backend": backend_name,
        "device": str(target),
        "dtype": saved_dtype,
        "files": sorted(os.listdir(output)),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _usual_permissions(folder: str) -> None:
    """Every file as readable as a file this process creates (0644 under the usual umask):
    the weights are written through a private temporary file (mode 0600), the rest is not."""
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask
    for root, _, names in os.walk(folder):
        for name in names:
            os.chmod(os.path.join(root, name), mode)


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _merge(cfg: ExperimentConfig, backend_name: str, adapter: str, output: str, device, dtype: str) -> str:
    """Load base + adapter as the labeller does (4-bit where training was), fold the adapter
    into plain `dtype` weights with the labeller's own merge, save."""
    import torch

    model, tokenizer = backends.get_backend(backend_name).load_for_inference(cfg, adapter, device)
    merged = merge_lora(model, dtype=getattr(torch, dtype))
    merged = merged.to(getattr(torch, dtype))  # embeddings, norms and head too
    merged.config.dtype = dtype
    merged.config.use_cache = True
    merged.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    return dtype
