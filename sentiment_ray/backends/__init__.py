"""Model backends: `unsloth` (GPU, QLoRA kernels) and `hf` (transformers + peft, anywhere).

Importing this package is cheap: torch is imported only when a function needs it, and
unsloth only by `early_import("unsloth")`, which the training worker and the labelling
actor call first thing (Unsloth must be imported before transformers/trl/peft in a process,
or its patches are silently lost; and it raises on machines without a GPU).
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from sentiment_ray.backends.base import Backend, BackendError, early_import
from sentiment_ray.backends.hf import HFBackend
from sentiment_ray.backends.unsloth import UnslothBackend

__all__ = ["Backend", "BackendError", "early_import", "get_backend", "resolve_backend_name"]

BackendName = Literal["unsloth", "hf"]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _unsloth_installed() -> bool:
    # find_spec only looks the package up; importing unsloth to probe would patch
    # transformers in this process (and raise on a CPU-only machine).
    return importlib.util.find_spec("unsloth") is not None


def resolve_backend_name(requested: str) -> BackendName:
    """`auto` -> `unsloth` when CUDA is available and unsloth is installed, else `hf`.
    An explicit `unsloth` that cannot work here is an error, never a silent fallback."""
    if requested == "hf":
        return "hf"
    if requested == "auto":
        return "unsloth" if _cuda_available() and _unsloth_installed() else "hf"
    if requested == "unsloth":
        if not _cuda_available():
            raise BackendError(
                "model.backend=unsloth needs a CUDA GPU, and none is visible in this process "
                "(on Ray, give the worker/actor num_gpus=1); use model.backend=hf or auto on CPU"
            )
        if not _unsloth_installed():
            raise BackendError(
                "model.backend=unsloth but the unsloth package is not installed: "
                "pip install 'sentiment-ray[gpu]' (or use model.backend=hf)"
            )
        return "unsloth"
    raise BackendError(f"unknown model.backend {requested!r}; expected one of: auto, unsloth, hf")


def get_backend(name: str) -> Backend:
    """The backend object for a resolved name (`unsloth` or `hf`; resolve `auto` first)."""
    if name == "hf":
        return HFBackend()
    if name == "unsloth":
        return UnslothBackend()
    raise BackendError(f"unknown backend {name!r}; call resolve_backend_name() first (auto -> unsloth|hf)")
