"""Did a rerun change what defines the run? One comparison for train, label and tune.

Each stage records its run's definition when the run starts (train: run_definition.json;
label: the manifest's prediction_config; tune: sentiment_ray_tune.json) and, when a rerun
would continue that run, names what differs in one format:

    changes(recorded, current)   # ["lora.r (16 -> 8)", ...]

A definition is a mapping of sections to their fields (`{"lora": {"r": 16}}`) or already
flat (`{"lora.r": 16}`); both compare field by field and name a field `section.field`. The stage decides what a definition
holds: fields that may change between a run and its rerun are left out of it (train's
RESUMABLE, tune's run section, label's batch sizes and actor counts).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

SHOWN_CHARS = 60  # a long value (a prompt template, a fingerprint) is cut to this


def flatten(definition: Mapping[str, Any]) -> dict[str, Any]:
    """`{"lora": {"r": 16}, "data.label_map": {...}}` -> `{"lora.r": 16, "data.label_map": {...}}`:
    a key without a dot is a section, opened one level; a field's own value (a mapping
    such as `data.label_map`) compares whole."""
    flat: dict[str, Any] = {}
    for key, value in definition.items():
        if "." not in key and isinstance(value, Mapping):
            flat.update({f"{key}.{field}": v for field, v in value.items()})
        else:
            flat[key] = value
    return flat


def changed_fields(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The fields whose values differ, sorted."""
    old, new = flatten(before), flatten(now)
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))


def changes(
    before: Mapping[str, Any],
    now: Mapping[str, Any],
    *,
    name: Callable[[str], str] = str,
) -> list[str]:
    """One entry per changed field, `field (old -> new)`; `name` may say more about a field
    (how a derived value is made)."""
    old, new = flatten(before), flatten(now)
    return [f"{name(key)} ({show(old.get(key))} -> {show(new.get(key))})" for key in changed_fields(old, new)]


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."
