"""The base model an adapter was trained on, recorded with the adapter and checked before it
is applied to another.

    write_record(adapter_dir, cfg.model.name)            # training, next to the adapter
    check(adapter_dir, cfg.model.name, allow_mismatch)   # labelling's and export's driver, before loading

The record (`base_model.json`) holds the base's name, its architecture and shape (from its
config.json) and a fingerprint of its weights: the sha256 of the first 64 KiB of a few named
tensors (the token embedding and the first two tensors by name), read straight from the
safetensors files (their header says where each tensor's bytes lie), so checking costs a few
reads whatever the model's size. Another seed of the same architecture has the same shape
and another fingerprint. A base that is not a local folder (a hub id not downloaded) has no
fingerprint; its name and shape are compared when known.

Pure: the standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any

from sentiment_ray.errors import UserError
from sentiment_ray.models import resolve_model_path

BASE_FILE = "base_model.json"
_SLICE_BYTES = 64 * 1024
# config.json fields that decide whether the adapter's weights fit the base's.
SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)


class BaseMismatch(UserError, ValueError):
    """An adapter applied to a base other than the one it was trained on."""


def _local_folder(model_name: str) -> str | None:
    try:
        path = resolve_model_path(model_name)
    except Exception:  # noqa: BLE001 - a missing model is reported by the loader
        return None
    return path if os.path.isdir(path) else None


def _tensor_offsets(path: str) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return 8 + size, {k: v for k, v in header.items() if k != "__metadata__"}


def weights_fingerprint(folder: str) -> str | None:
    """sha256 of the first bytes of the embedding and the first two tensors by name, or None
    without safetensors files."""
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    where: dict[str, tuple[str, int, list[int], str]] = {}
    for name in files:
        start, tensors = _tensor_offsets(os.path.join(folder, name))
        for tensor, info in tensors.items():
            where[tensor] = (os.path.join(folder, name), start, info["data_offsets"], info.get("dtype", ""))
    if not where:
        return None
    embedding = [t for t in sorted(where) if t.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))]
    chosen = list(dict.fromkeys(embedding[:1] + sorted(where)[:2]))
    digest = hashlib.sha256()
    for tensor in chosen:
        path, start, (begin, end), dtype = where[tensor]
        with open(path, "rb") as f:
            f.seek(start + begin)
            digest.update(f"{tensor}:{dtype}:{end - begin}\0".encode())
            digest.update(f.read(min(_SLICE_BYTES, end - begin)))
    return digest.hexdigest()


def identify(model_name: str) -> dict[str, Any]:
    """The base's name, architecture, shape and weights fingerprint (None where unknown)."""
    folder = _local_folder(model_name)
    config: dict[str, Any] = {}
    if folder and os.path.isfile(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    return {
        "name": model_name,
        "architectures": config.get("architectures"),
        "shape": {k: text_config.get(k) for k in SHAPE_FIELDS if text_config.get(k) is not None} or None,
        "weights_sha256": weights_fingerprint(folder) if folder else None,
    }


def write_record(adapter_dir: str, model_name: str) -> None:
    """Record the base next to a saved adapter (a local folder)."""
    with open(os.path.join(adapter_dir, BASE_FILE), "w", encoding="utf-8") as f:
        json.dump(identify(model_name), f, indent=2)


def _describe(identity: dict[str, Any]) -> str:
    arch = ",".join(identity.get("architectures") or []) or "unknown architecture"
    shape = identity.get("shape") or {}
    dims = ", ".join(f"{k} {shape[k]}" for k in ("hidden_size", "num_hidden_layers", "vocab_size") if k in shape)
    sha = identity.get("weights_sha256")
    return f"{identity['name']} ({arch}{', ' + dims if dims else ''}{', weights ' + sha[:12] if sha else ''})"


def check(adapter_dir: str, model_name: str, allow_mismatch: bool = False) -> None:
    """Refuse, in one line naming both, an adapter whose recorded base is not `model_name`'s:
    another shape always (its weights cannot take the adapter), other weights or architecture
    unless `allow_mismatch`. An adapter without a record (or a base whose files are not
    here to compare) passes."""
    path = os.path.join(adapter_dir, BASE_FILE)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        trained = json.load(f)
    base = identify(model_name)
    shape_a, shape_b = trained.get("shape") or {}, base.get("shape") or {}
    different = [k for k in SHAPE_FIELDS if k in shape_a and k in shape_b and shape_a[k] != shape_b[k]]
    if different:
        cause = ", ".join(f"{k} {shape_a[k]} vs {shape_b[k]}" for k in different)
        raise BaseMismatch(
            f"--adapter {adapter_dir} was trained on {_describe(trained)} and cannot be applied to "
            f"model.name {_describe(base)}: another shape ({cause}); set model.name to the adapter's base"
        )
    same_arch = (
        not trained.get("architectures") or not base.get("architectures") or trained["architectures"] == base["architectures"]
    )
    same_weights = (
        not trained.get("weights_sha256") or not base.get("weights_sha256") or trained["weights_sha256"] == base["weights_sha256"]
    )
    if (not same_arch or not same_weights) and not allow_mismatch:
        raise BaseMismatch(
            f"--adapter {adapter_dir} was trained on {_describe(trained)}, not on model.name {_describe(base)}; "
            "set model.name to the adapter's base, or model.allow_base_mismatch=true to apply it anyway"
        )
