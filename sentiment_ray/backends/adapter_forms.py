"""The form a LoRA adapter runs in when a model labels: merged, fused, or peft's layers.

    form = choose_adapter_form("auto", has_adapter=True, can_fuse=True, free_bytes=..., ...)
    model = merge_lora(peft_model)          # a plain model: W = dequant(W_base) + s * B @ A

- **merged**: every LoRA layer folded into a plain 16-bit `Linear` holding
  `dequant(W_base) + scaling * B @ A`, computed in float32 and rounded once. That is what
  training computed (the frozen 4-bit base, dequantised, plus the update), up to 16-bit
  rounding, and the forward then costs what the model without an adapter costs. Merging
  back into 4-bit weights is not done: re-quantising rounds the small update away.
  Needs room for the 16-bit weights of the quantised layers.
- **fused**: the 4-bit base kept, the adapter applied inside Unsloth's fused LoRA
  forwards (one dequantise + matmul + LoRA product per projection group), the form
  Unsloth's own adapter loader installs. Unsloth backend, dropout 0, no bias.
- **unmerged**: peft's LoRA layers as loaded (each projection runs its base layer, then
  the two LoRA matmuls, separately).

`label.merge_adapter` picks: `true` merged, `false` fused where possible else unmerged,
`auto` merged when the device has room for the 16-bit weights beside the batch budget's
activations, else as `false`. `jobs/export.py` writes the merged model through `merge_lora`
too, so the exported weights are the ones the labeller runs.

torch, peft and bitsandbytes are imported inside functions.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

from sentiment_ray.errors import UserError

AdapterForm = Literal["merged", "fused", "unmerged", "none"]
MERGE_SETTINGS = ("auto", "true", "false")

# Activation memory per padded token of a scoring batch is estimated from the model's shape
# (the key/value cache of every layer, which a prefix-reusing forward keeps, plus one
# layer's hidden, attention and MLP intermediates) times this factor: the allocator's
# fragmentation and attention's temporaries come on top, and too little room is an
# out-of-memory mid-run while too much only costs the merged form's speed.
ACTIVATION_SAFETY = 3.0
# Kept free beyond the estimate (CUDA context, cuBLAS workspaces, the compile cache).
MEMORY_MARGIN_BYTES = 2 * 2**30


class AdapterFormError(UserError, ValueError):
    """An adapter cannot take the requested form (the message says why and what to set)."""


@dataclass(frozen=True)
class AdapterFormChoice:
    form: AdapterForm
    reason: str
    weights_gib: float | None = None
    """The model's weights on the device after the form was applied (GPU only)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- choosing


def choose_adapter_form(
    setting: str,
    *,
    has_adapter: bool,
    can_fuse: bool,
    free_bytes: int | None,
    merge_extra_bytes: int,
    batch_bytes: int,
) -> AdapterFormChoice:
    """The form for `label.merge_adapter=setting`, given the memory there is.

    `free_bytes`: free device memory with the model loaded (None: a CPU, where memory is
    not the constraint); `merge_extra_bytes`: what merging adds (16-bit minus 4-bit weights,
    0 for a base that is not quantised); `batch_bytes`: the activations of one batch."""
    if setting not in MERGE_SETTINGS:
        raise AdapterFormError(f"label.merge_adapter={setting!r}: expected one of {', '.join(MERGE_SETTINGS)}")
    if not has_adapter:
        return AdapterFormChoice("none", "no adapter")
    kept = "fused" if can_fuse else "unmerged"
    if setting == "true":
        return AdapterFormChoice("merged", "label.merge_adapter=true")
    if setting == "false":
        return AdapterFormChoice(kept, "label.merge_adapter=false")
    if free_bytes is None or merge_extra_bytes <= 0:
        return AdapterFormChoice("merged", "merging needs no extra memory here")
    needed = merge_extra_bytes + batch_bytes + MEMORY_MARGIN_BYTES
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    if needed <= free_bytes:
        return AdapterFormChoice("merged", f"{gib(free_bytes)} free, merging and a batch need {gib(needed)}")
    return AdapterFormChoice(kept, f"{gib(free_bytes)} free, merging and a batch would need {gib(needed)}")


def batch_activation_bytes(config: Any, max_batch_tokens: int, dtype_bytes: int = 2) -> int:
    """Estimated activation memory of one scoring batch of `max_batch_tokens` padded tokens."""
    config = getattr(config, "text_config", None) or config
    hidden = int(config.hidden_size)
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    per_token = layers * 2 * kv_heads * head_dim + 4 * hidden + 3 * intermediate
    return int(ACTIVATION_SAFETY * per_token * dtype_bytes * max(max_batch_tokens, 1))


def merge_extra_bytes(model: Any, dtype_bytes: int = 2) -> int:
    """Bytes merging adds on the device: each quantised linear layer's 16-bit weight minus
    what it holds now (0 for a model without quantised layers)."""
    extra = 0
    for module in _model_modules(model):
        weight = getattr(module, "weight", None)
        if weight is not None and _is_quantized(weight):
            rows, cols = _dense_shape(module)
            extra += rows * cols * dtype_bytes - weight.numel() * weight.element_size()
    return max(extra, 0)


def free_device_bytes(device: Any) -> int | None:
    """Free memory of a CUDA device (None for a CPU)."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def weights_gib(model: Any) -> float:
    """Parameters and buffers of `model`, in GiB (counted once when tied)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return round(total / 2**30, 3)


# ----------------------------------------------------------------------------- merging


def merge_lora(model: Any, dtype: Any = None) -> Any:
    """Fold `model`'s LoRA adapter into plain `torch.nn.Linear` layers and return the base
    model without peft: each adapted layer gets `dequant(W_base) + scaling * B @ A` (float32
    arithmetic, one rounding to `dtype`), and every other quantised linear layer its
    dequantised weight, so the result holds no 4-bit weight and no LoRA layer.

    `dtype`: the merged weights' dtype; default the base layer's compute dtype (bfloat16 /
    float16 for a 4-bit base, the weight's own dtype otherwise). A model without a LoRA
    layer comes back with its quantised layers dequantised."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    replaced = []
    for name, module in list(base.named_modules()):
        if _is_lora_layer(module):
            replaced.append((name, _merged_linear(module, dtype)))
        elif _is_quantized(getattr(module, "weight", None)) and not _inside_lora_layer(base, name):
            replaced.append((name, _dense_linear(module, None, dtype)))
    for name, linear in replaced:
        parent_name, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent_name) if parent_name else base, child, linear)
    _forget_quantization(base)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the 4-bit weights just freed
    return base


def prepare_adapter(backend: Any, model: Any, setting: str, max_batch_tokens: int) -> tuple[Any, AdapterFormChoice]:
    """Put the adapter of a model loaded by `backend.load_for_inference` into the form
    `label.merge_adapter=setting` picks for this device; (the model to score with, the choice)."""
    from dataclasses import replace

    device = next(model.parameters()).device
    choice = choose_adapter_form(
        setting,
        has_adapter=hasattr(model, "peft_config"),
        can_fuse=backend.can_fuse(model),
        free_bytes=free_device_bytes(device),
        merge_extra_bytes=merge_extra_bytes(model),
        batch_bytes=batch_activation_bytes(model.config, max_batch_tokens),
    )
    try:
        model = backend.apply_adapter_form(model, choice.form)
    except AdapterFormError as err:
        if choice.form != "fused":
            raise
        # The fused forwards are a speed-up of peft's layers: without them, the same labels.
        warnings.warn(f"{err}; labelling with peft's LoRA layers", RuntimeWarning, stacklevel=2)
        model = backend.apply_adapter_form(model, "unmerged")
        choice = replace(choice, form="unmerged", reason=f"{choice.reason}; the fused forwards failed")
    return model, replace(choice, weights_gib=weights_gib(model) if device.type == "cuda" else None)


def _model_modules(model: Any):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.modules()


def _is_lora_layer(module: Any) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "scaling")


def _inside_lora_layer(root: Any, name: str) -> bool:
    """`name` is the base layer of a LoRA layer (merged with it, not on its own)."""
    parent, _, child = name.rpartition(".")
    return child == "base_layer" and _is_lora_layer(root.get_submodule(parent) if parent else root)


def _is_quantized(weight: Any) -> bool:
    """A bitsandbytes 4-bit or 8-bit weight."""
    return weight is not None and type(weight).__name__ in ("Params4bit", "Int8Params")


def _dense_shape(layer: Any) -> tuple[int, int]:
    return int(layer.out_features), int(layer.in_features)


def _dense_weight(layer: Any):
    """The layer's weight as a float32 tensor [out, in] on its device (dequantised)."""
    weight = layer.weight
    if _is_quantized(weight):
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(weight, state=getattr(layer, "state", None)).float().reshape(_dense_shape(layer))
    return weight.detach().float()


def _compute_dtype(layer: Any):
    import torch

    if _is_quantized(layer.weight):
        return getattr(layer, "compute_dtype", None) or torch.bfloat16
    return layer.weight.dtype


def _dense_linear(layer: Any, delta, dtype):
    """A plain Linear holding `layer`'s dense weight (+ `delta`), in `dtype`."""
    import torch

    weight = _dense_weight(layer)
    if delta is not None:
        weight += delta
    dtype = dtype or _compute_dtype(layer)
    bias = getattr(layer, "bias", None)
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.detach().float())
    linear.requires_grad_(False)
    return linear


def _merged_linear(module: Any, dtype):
    """The LoRA layer `module` as one plain Linear: dense base weight + every active adapter's
    scaling * B @ A (transposed for fan-in-fan-out layers)."""
    delta = None
    for adapter in module.active_adapters:
        if adapter not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(adapter):
            raise AdapterFormError("a DoRA adapter cannot be merged here; set label.merge_adapter=false")
        if getattr(module, "lora_bias", {}).get(adapter):
            raise AdapterFormError("an adapter with LoRA bias terms cannot be merged here; set label.merge_adapter=false")
        a = module.lora_A[adapter].weight.detach().float()
        b = module.lora_B[adapter].weight.detach().float()
        d = (b @ a) * float(module.scaling[adapter])
        if getattr(module, "fan_in_fan_out", False):
            d = d.T
        delta = d if delta is None else delta + d
    return _dense_linear(module.base_layer, delta, dtype)


def _forget_quantization(model: Any) -> None:
    """The merged model holds no quantised weight: drop the quantisation metadata, so that
    saving it writes a plain model and nothing treats it as 4-bit."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            try:
                setattr(model, flag, False)
            except AttributeError:  # a read-only property in this transformers version
                pass
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        try:
            del config.quantization_config
        except AttributeError:
            config.quantization_config = None
