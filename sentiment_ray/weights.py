"""Which weight files may be loaded: safetensors by default, pickle formats only on request.

A pickle file (`.bin`, `.pt`, `.pth`, `.ckpt`, `.pkl`) is a program: unpickling one can run
code planted in it, and `weights_only=True` loading is a restricted unpickler, not a format.
safetensors files hold tensors only. So by default:

- a LoRA adapter folder must hold `adapter_model.safetensors` (PEFT loads that one when it is
  there); one with only `adapter_model.bin` is refused, naming the file;
- a local model folder must hold `*.safetensors` weights; models load with
  `from_pretrained(use_safetensors=True)` (a hub repository without safetensors is refused by
  transformers itself);

and `model.allow_unsafe_weights=true` lifts both for weights whose origin you trust.

Pure: the standard library only.
"""

from __future__ import annotations

import os

from sentiment_ray.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
OPT_IN = "set model.allow_unsafe_weights=true only if you trust where the file came from"


class UnsafeWeightsError(UserError, ValueError):
    """A weight file would be unpickled without the user's opt-in (or there are no weights)."""


def _names(folder: str) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except OSError:
        return []


def check_adapter_weights(folder: str, *, allow_unsafe: bool) -> str:
    """The adapter weights file PEFT will load from `folder` (a local folder); an
    UnsafeWeightsError for pickle-only weights without `allow_unsafe`, or for none at all."""
    names = _names(folder)
    if ADAPTER_SAFETENSORS in names:
        return os.path.join(folder, ADAPTER_SAFETENSORS)
    pickles = [n for n in names if n.startswith("adapter_model") and n.endswith(PICKLE_SUFFIXES)]
    if not pickles:
        raise UnsafeWeightsError(f"{folder}: no adapter weights ({ADAPTER_SAFETENSORS}) in the adapter folder")
    path = os.path.join(folder, pickles[0])
    if not allow_unsafe:
        raise UnsafeWeightsError(
            f"{path}: the adapter's weights are a pickle file, and loading one can run code planted in it; "
            f"save the adapter as {ADAPTER_SAFETENSORS} (peft's save_pretrained does by default), or {OPT_IN}"
        )
    return path


def check_model_folder(folder: str, *, allow_unsafe: bool) -> None:
    """UnsafeWeightsError when a local model folder has pickle weights and no safetensors
    (without `allow_unsafe`). A folder without weight files is left to the loader (a GGUF
    checkpoint, a folder transformers explains better)."""
    names = _names(folder)
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names) or allow_unsafe:
        return
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES) and not n.startswith("training_args")]
    if pickles:
        raise UnsafeWeightsError(
            f"{os.path.join(folder, pickles[0])}: the model's weights are a pickle file (no *.safetensors in "
            f"{folder}), and loading one can run code planted in it; convert the model to safetensors "
            f"(save_pretrained(..., safe_serialization=True)), or {OPT_IN}"
        )


def check_model_source(name: str, *, allow_unsafe: bool) -> None:
    """`check_model_folder` when `name` (model.name) is a local folder; hub ids are checked
    by transformers (`use_safetensors=True`) when they load."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        check_model_folder(path, allow_unsafe=allow_unsafe)


def from_pretrained_kwargs(allow_unsafe: bool) -> dict:
    """What `from_pretrained` gets: `use_safetensors=True` unless the user opted in."""
    return {} if allow_unsafe else {"use_safetensors": True}
