"""transformers + peft backend: QLoRA via bitsandbytes on CUDA, float32 LoRA on CPU.

The portable path: CPU tests, CPU Ray clusters, and GPUs without Unsloth.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from sentiment_ray.backends.adapter_forms import merge_lora
from sentiment_ray.backends.base import (
    BackendError,
    check_adapter_dir,
    ensure_pad_token,
    existing_target_modules,
    gradient_checkpointing_for,
    missing_target_modules,
    normalise_device,
    reset_lora_weights,
    resolve_dtype,
    train_lora_in_float32,
)
from sentiment_ray.config import ExperimentConfig
from sentiment_ray.models import resolve_model_path
from sentiment_ray.weights import check_model_source, from_pretrained_kwargs

log = logging.getLogger(__name__)


class HFBackend:
    name = "hf"

    # ------------------------------------------------------------------ loading

    def _load_base(self, cfg: ExperimentConfig, device: Any) -> tuple[Any, bool]:
        """(base model on `device`, whether it is 4-bit quantised)."""
        import torch
        from transformers import AutoModelForCausalLM

        device = normalise_device(device)
        path = resolve_model_path(cfg.model.name)
        dtype = resolve_dtype(cfg.model.dtype, device)
        quantise = cfg.model.load_in_4bit and device.type == "cuda"
        attn = cfg.model.attn_implementation
        if attn == "flash_attention_2" and device.type != "cuda":
            raise BackendError("model.attn_implementation=flash_attention_2 needs CUDA; use sdpa or eager on CPU")
        allow_unsafe = cfg.model.allow_unsafe_weights
        check_model_source(path, allow_unsafe=allow_unsafe)
        kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn, **from_pretrained_kwargs(allow_unsafe)}
        if quantise:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16,
            )
            kwargs["device_map"] = {"": device}
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if not quantise:
            model.to(device)
        return model, quantise

    def _load_tokenizer(self, path: str) -> Any:
        from transformers import AutoTokenizer

        return ensure_pad_token(AutoTokenizer.from_pretrained(path))

    def load_for_training(self, cfg: ExperimentConfig, device: Any) -> tuple[Any, Any]:
        import torch
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        model, quantised = self._load_base(cfg, device)
        tokenizer = self._load_tokenizer(resolve_model_path(cfg.model.name))
        targets = existing_target_modules(model, cfg.lora.target_modules, cfg.model.name)
        missing = missing_target_modules(cfg.lora.target_modules, targets)
        if missing:
            log.warning("LoRA target modules %s do not exist in %s; adapting %s", missing, cfg.model.name, targets)

        checkpointing = gradient_checkpointing_for(cfg, device) != "false"
        # Non-reentrant checkpointing works with frozen inputs and with LoRA; the reentrant
        # default would need every checkpointed block's input to require grad.
        gc_kwargs = {"use_reentrant": False}
        if quantised:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=gc_kwargs
            )
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
        if checkpointing:
            model.config.use_cache = False  # the KV cache is useless (and warned about) under checkpointing

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            bias=cfg.lora.bias,
            target_modules=targets,
            use_rslora=cfg.lora.use_rslora,
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(cfg.train.seed)  # `library` init: peft's draw, reproducible per seed
        model = get_peft_model(model, lora)
        if cfg.lora.init == "seeded":
            reset_lora_weights(model, cfg.train.seed)  # the same start as the unsloth backend
        # peft gives a 4-bit layer's LoRA weights the base's compute dtype (bfloat16), where
        # small optimizer updates round away; train them in float32, as Unsloth does. TRL's
        # SFTTrainer casts them back for a 4-bit base: train/trainer.py's build_sft_trainer
        # casts again after it and checks them at the first optimizer step.
        train_lora_in_float32(model)
        return model, tokenizer

    def load_for_inference(self, cfg: ExperimentConfig, adapter_path: str | None, device: Any) -> tuple[Any, Any]:
        model, _ = self._load_base(cfg, device)
        tokenizer_source = resolve_model_path(cfg.model.name)
        if adapter_path:
            from peft import PeftModel

            check_adapter_dir(adapter_path, cfg.model.allow_unsafe_weights)
            model = PeftModel.from_pretrained(model, adapter_path, is_trainable=False)
            # save_adapter writes the tokenizer the adapter was trained with; prefer it.
            if os.path.isfile(os.path.join(adapter_path, "tokenizer_config.json")):
                tokenizer_source = adapter_path
        model.eval()
        model.config.use_cache = True
        return model, self._load_tokenizer(tokenizer_source)

    # ------------------------------------------------------------------ adapter forms

    def can_fuse(self, model: Any) -> bool:
        return False  # fused LoRA forwards are Unsloth's

    def apply_adapter_form(self, model: Any, form: str) -> Any:
        """The loaded model with its adapter `merged` (plain layers) or as peft's layers
        (`unmerged`, `none`); backends/adapter_forms.py."""
        if form == "merged":
            model = merge_lora(model)
            model.eval()
            return model
        if form == "fused":
            raise BackendError("label.merge_adapter: the fused LoRA forward needs the unsloth backend")
        return model

    # ------------------------------------------------------------------ saving

    def save_adapter(self, model: Any, tokenizer: Any, out_dir: str) -> None:
        save_peft_adapter(model, tokenizer, out_dir)


def save_peft_adapter(model: Any, tokenizer: Any, out_dir: str) -> None:
    """Adapter weights + adapter_config.json + tokenizer; never the base weights."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise BackendError(f"save_adapter needs a peft model with LoRA adapters, got {type(model).__name__}")
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
