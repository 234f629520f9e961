"""Unsloth backend: 4-bit QLoRA with Unsloth's kernels (CUDA only).

Call `backends.early_import("unsloth")` first in the process (before transformers, trl and
peft are imported); `load_*` re-checks and raises if Unsloth was imported too late.
Written against unsloth 2026.10 (`FastLanguageModel.from_pretrained`, `get_peft_model`,
`for_inference`); exercised by tests/gpu/test_unsloth_backend.py on a GPU machine.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from sentiment_ray.backends.adapter_forms import AdapterFormError, merge_lora
from sentiment_ray.backends.base import (
    BackendError,
    check_adapter_dir,
    early_import,
    ensure_pad_token,
    existing_target_modules,
    gradient_checkpointing_for,
    missing_target_modules,
    normalise_device,
    reset_lora_weights,
)
from sentiment_ray.backends.hf import save_peft_adapter
from sentiment_ray.config import ExperimentConfig
from sentiment_ray.models import resolve_model_path
from sentiment_ray.weights import check_model_source, from_pretrained_kwargs

# The architectures whose projections Unsloth's patch_peft_model fuses with LoRA
# (unsloth/models/llama.py); others keep peft's layers when not merged.
FUSED_LORA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "cohere", "granite")

# lora.gradient_checkpointing (resolved) -> Unsloth's use_gradient_checkpointing
_CHECKPOINTING = {"unsloth": "unsloth", "true": True, "false": False}


def _require_unsloth():
    if "unsloth" not in sys.modules:
        # Importing here is still correct when nothing has imported transformers yet;
        # early_import warns if something has.
        early_import("unsloth")
    from unsloth import FastLanguageModel

    return FastLanguageModel


def _torch_dtype(name: str):
    import torch

    # None lets Unsloth choose: bfloat16 where supported, else float16.
    return None if name == "auto" else getattr(torch, name)


class UnslothBackend:
    name = "unsloth"

    def _load_base(self, cfg: ExperimentConfig, device: Any) -> tuple[Any, Any]:
        return self.from_pretrained(resolve_model_path(cfg.model.name), cfg, device)

    def from_pretrained(self, path: str, cfg: ExperimentConfig, device: Any) -> tuple[Any, Any]:
        """`FastLanguageModel.from_pretrained` of `path` (a model, or an adapter folder whose
        base Unsloth then loads) with the config's length, dtype and 4-bit setting."""
        device = normalise_device(device)
        if device.type != "cuda":
            raise BackendError(f"the unsloth backend needs a CUDA device, got {device}; use model.backend=hf")
        FastLanguageModel = _require_unsloth()
        check_model_source(path, allow_unsafe=cfg.model.allow_unsafe_weights)
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=path,
            max_seq_length=cfg.model.max_seq_length,
            dtype=_torch_dtype(cfg.model.dtype),
            load_in_4bit=cfg.model.load_in_4bit,
            # Unsloth would pick cuda:{global rank} under a process group; Ray Train gives
            # each worker its own device, so say which one (ARCHITECTURE.md).
            device_map={"": device},
            # A local folder is loaded as is; hub ids may map to Unsloth's pre-quantised repos.
            use_exact_model_name=os.path.isdir(path),
            # Unsloth hands this on to transformers' from_pretrained (weights.py).
            **from_pretrained_kwargs(cfg.model.allow_unsafe_weights),
        )
        return model, ensure_pad_token(tokenizer)

    def load_for_training(self, cfg: ExperimentConfig, device: Any) -> tuple[Any, Any]:
        model, tokenizer = self._load_base(cfg, device)
        targets = existing_target_modules(model, cfg.lora.target_modules, cfg.model.name)
        missing = missing_target_modules(cfg.lora.target_modules, targets)
        if missing:
            import logging

            logging.getLogger(__name__).warning(
                "LoRA target modules %s do not exist in %s; adapting %s", missing, cfg.model.name, targets
            )
        from unsloth import FastLanguageModel

        model = FastLanguageModel.get_peft_model(
            model,
            r=cfg.lora.r,
            target_modules=targets,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            bias=cfg.lora.bias,
            use_gradient_checkpointing=_CHECKPOINTING[gradient_checkpointing_for(cfg, device)],
            random_state=cfg.train.seed,
            use_rslora=cfg.lora.use_rslora,
            max_seq_length=cfg.model.max_seq_length,
        )
        if cfg.lora.init == "seeded":
            reset_lora_weights(model, cfg.train.seed)  # the same start as the hf backend
        return model, tokenizer

    def load_for_inference(self, cfg: ExperimentConfig, adapter_path: str | None, device: Any) -> tuple[Any, Any]:
        # The base comes from the config, not from the adapter's recorded
        # base_model_name_or_path (Unsloth's own adapter-dir loader uses that): the recorded
        # path is where the training worker found the model, which another node may not have.
        model, tokenizer = self._load_base(cfg, device)
        if adapter_path:
            from peft import PeftModel

            check_adapter_dir(adapter_path, cfg.model.allow_unsafe_weights)
            model = PeftModel.from_pretrained(model, adapter_path, is_trainable=False)
            if os.path.isfile(os.path.join(adapter_path, "tokenizer_config.json")):
                from transformers import AutoTokenizer

                tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(adapter_path))
        from unsloth import FastLanguageModel

        # Eval mode, no checkpointing, Unsloth's fast decode path for generate().
        model = FastLanguageModel.for_inference(model) or model
        model.eval()
        return model, tokenizer

    # ------------------------------------------------------------------ adapter forms

    def can_fuse(self, model: Any) -> bool:
        """Unsloth fuses LoRA into its projection forwards only for dropout 0 and no bias,
        on the architectures its patcher knows."""
        peft_config = getattr(model, "peft_config", None)
        if not peft_config:
            return False
        adapter = next(iter(peft_config.values()))
        model_type = getattr(model.config, "model_type", None)
        return adapter.lora_dropout == 0 and adapter.bias == "none" and model_type in FUSED_LORA_MODEL_TYPES

    def apply_adapter_form(self, model: Any, form: str) -> Any:
        """`merged`: plain 16-bit layers (backends/adapter_forms.py); `fused`: the 4-bit
        base with Unsloth's fused LoRA forwards, as Unsloth's own adapter loader installs
        them (`patch_peft_model`); `unmerged`, `none`: as loaded. Then Unsloth's inference mode."""
        from unsloth import FastLanguageModel

        if form == "merged":
            model = merge_lora(model)
        elif form == "fused":
            try:
                model = FastLanguageModel.patch_peft_model(model, use_gradient_checkpointing=False)
            except Exception as err:  # noqa: BLE001 - peft's layers compute the same, slower
                raise AdapterFormError(
                    f"Unsloth could not fuse this adapter's LoRA forwards ({type(err).__name__}: {err})"
                ) from err
        model = FastLanguageModel.for_inference(model) or model
        model.eval()
        return model

    def save_adapter(self, model: Any, tokenizer: Any, out_dir: str) -> None:
        # Unsloth returns a peft model: its save_pretrained writes the adapter only.
        save_peft_adapter(model, tokenizer, out_dir)
