"""The interface every model backend implements, and helpers they share.

Pure at import time: torch is imported inside the helpers, never at module level.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import warnings
import zlib
from typing import Any, Protocol, runtime_checkable

from sentiment_ray.config import ExperimentConfig
from sentiment_ray.errors import UserError
from sentiment_ray.weights import UnsafeWeightsError, check_adapter_weights


class BackendError(UserError, RuntimeError):
    """A backend cannot do what the config asks (missing GPU, package, module...)."""


@runtime_checkable
class Backend(Protocol):
    name: str

    def load_for_training(self, cfg: ExperimentConfig, device: Any) -> tuple[Any, Any]:
        """(base model with trainable LoRA adapters and frozen base weights, tokenizer)."""
        ...

    def load_for_inference(self, cfg: ExperimentConfig, adapter_path: str | None, device: Any) -> tuple[Any, Any]:
        """(model in eval mode with the adapter attached when given, tokenizer)."""
        ...

    def save_adapter(self, model: Any, tokenizer: Any, out_dir: str) -> None:
        """Write the LoRA adapter (not the base weights) and the tokenizer into `out_dir`."""
        ...

    def can_fuse(self, model: Any) -> bool:
        """Whether this backend can run `model`'s adapter as fused LoRA forwards."""
        ...

    def apply_adapter_form(self, model: Any, form: str) -> Any:
        """The inference model with its adapter in `form` (backends/adapter_forms.py)."""
        ...


def resolve_dtype(requested: str, device: Any):
    """The torch dtype for `model.dtype`: `auto` is bfloat16 on GPUs that support it,
    float16 on older GPUs, float32 on CPU."""
    import torch

    device = torch.device(device)
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def existing_target_modules(model: Any, requested: list[str], model_name: str) -> list[str]:
    """The requested LoRA target module names that exist as Linear-like layers in `model`.

    Presets list all seven Llama projections; other architectures name theirs differently,
    so keep the ones present and fail, naming what was asked and what exists, if none are.
    """
    import torch

    present: set[str] = set()
    linear_names: set[str] = set()
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        # bitsandbytes' Linear4bit subclasses torch.nn.Linear, so 4-bit layers count too.
        if isinstance(module, torch.nn.Linear):
            linear_names.add(leaf)
            if leaf in requested:
                present.add(leaf)
    if not present:
        raise BackendError(
            f"none of lora.target_modules {requested} exist in model {model_name!r}; "
            f"its linear layers are named {sorted(linear_names)}"
        )
    return [m for m in requested if m in present]


def reset_lora_weights(model: Any, seed: int) -> int:
    """Initialise every LoRA weight from `seed` and the parameter's name alone: A as peft
    does (kaiming-uniform, a=sqrt(5): uniform within +-1/sqrt(fan_in)), B zeros. Both
    backends then start from the same adapter, whatever random numbers their loading drew
    before. Returns how many tensors were set."""
    import torch

    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                generator = torch.Generator().manual_seed((zlib.crc32(name.encode()) + seed) % 2**63)
                bound = 1.0 / math.sqrt(param.shape[1])
                values = torch.empty(param.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
                param.copy_(values.to(param.device, param.dtype))
                count += 1
            elif ".lora_B." in name:
                param.zero_()
                count += 1
    return count


def missing_target_modules(requested: list[str], present: list[str]) -> list[str]:
    return [m for m in requested if m not in present]


def trainable_parameter_summary(model: Any) -> dict[str, int]:
    """Counts of trainable and total parameters (for logs and the LoRA invariant tests)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": int(trainable), "total": int(total)}


def train_lora_in_float32(model: Any) -> int:
    """Make every trainable (LoRA) weight float32, in place; returns how many were cast.

    Small optimizer updates round away in bfloat16 (8 bits of mantissa): a LoRA weight of
    0.01 does not move for an update below about 4e-5. Both backends train float32 LoRA
    weights over a 16- or 4-bit frozen base (the matmuls still run in the base's dtype
    under autocast). `param.data` is replaced, not the Parameter, so an optimizer built
    before or after holds the same objects."""
    import torch

    cast = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast += 1
    return cast


def trainable_dtypes(parameters: Any) -> dict[str, int]:
    """Element counts per dtype of the trainable parameters among `parameters`."""
    counts: dict[str, int] = {}
    for param in parameters:
        if param.requires_grad:
            name = str(param.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + param.numel()
    return counts


def ensure_pad_token(tokenizer: Any) -> Any:
    """Batching needs a pad token; many base models ship without one. Use EOS (padding is
    masked out of attention and loss, so which id fills it does not matter)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise BackendError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_adapter_dir(adapter_path: str, allow_unsafe_weights: bool = False) -> None:
    """A saved LoRA adapter whose weights may be loaded: adapter_config.json, and
    safetensors weights unless `allow_unsafe_weights` (weights.py)."""
    if not os.path.isfile(os.path.join(adapter_path, "adapter_config.json")):
        raise BackendError(f"adapter folder {adapter_path!r} has no adapter_config.json (not a saved LoRA adapter)")
    try:
        check_adapter_weights(adapter_path, allow_unsafe=allow_unsafe_weights)
    except UnsafeWeightsError as err:
        raise BackendError(str(err)) from None


def normalise_device(device: Any):
    """torch.device from a str/device/None (None: the first GPU when there is one, else CPU)."""
    import torch

    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# lora.gradient_checkpointing=auto: none on GPUs with at least this much memory, Unsloth's
# (offloaded) checkpointing below and on CPUs. Without checkpointing a step recomputes
# nothing but keeps every activation; 40 GiB is a margin of about twice what the 8B model
# needs at the presets' batch (docs/benchmarks.md).
NO_CHECKPOINTING_MIN_GPU_GIB = 40.0


def resolve_gradient_checkpointing(setting: str, gpu_memory_gib: float | None) -> str:
    """`unsloth` | `true` | `false` for a `lora.gradient_checkpointing` setting on a device
    with `gpu_memory_gib` of memory (None: not a GPU)."""
    if setting != "auto":
        return setting
    if gpu_memory_gib is not None and gpu_memory_gib >= NO_CHECKPOINTING_MIN_GPU_GIB:
        return "false"
    return "unsloth"


def gpu_memory_gib(device: Any) -> float | None:
    """Total memory of a CUDA device in GiB; None for other devices."""
    import torch

    device = normalise_device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def gradient_checkpointing_for(cfg: Any, device: Any) -> str:
    """The checkpointing a training run on `device` uses (cfg.lora.gradient_checkpointing resolved)."""
    return resolve_gradient_checkpointing(cfg.lora.gradient_checkpointing, gpu_memory_gib(device))


# ----------------------------------------------------------------------------- import order


def default_compile_dir() -> str:
    """A per-process Unsloth compile cache, so concurrent workers/trials never share one."""
    return os.path.join(tempfile.gettempdir(), "unsloth_cache", str(os.getpid()))


def early_import(name: str, compile_dir: str | None = None) -> None:
    """Call first thing in a training worker or labelling actor, with the resolved name.

    For `unsloth`: point UNSLOTH_COMPILE_LOCATION at a per-process folder (unless the
    environment already sets one) and import unsloth before anything imports
    transformers, trl or peft. For `hf`: nothing to do.
    """
    if name == "hf":
        return
    if name != "unsloth":
        raise BackendError(f"unknown backend {name!r} (expected unsloth or hf)")
    if "unsloth" in sys.modules:
        return
    if "UNSLOTH_COMPILE_LOCATION" not in os.environ:
        target = compile_dir or default_compile_dir()
        os.makedirs(target, exist_ok=True)
        os.environ["UNSLOTH_COMPILE_LOCATION"] = target
    already = [m for m in ("transformers", "trl", "peft") if m in sys.modules]
    if already:
        warnings.warn(
            f"{', '.join(already)} already imported before unsloth in process {os.getpid()}: "
            "Unsloth's patches may not apply. Call backends.early_import('unsloth') before "
            "importing them (e.g. before ray.train.huggingface.transformers).",
            RuntimeWarning,
            stacklevel=2,
        )
    import unsloth  # noqa: F401  (imported for its patches)
