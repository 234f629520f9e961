"""The `tune.search_space` of a config: validated against the config schema, turned into Ray
Tune domains (lazily), and resolved back into a trial's ExperimentConfig.

Pure module: pydantic/yaml through `config` only; `ray.tune` is imported inside
`to_param_space`.

A search space maps a dotted config field to a domain:

    tune:
      search_space:
        train.learning_rate: {type: loguniform, lower: 1.5e-4, upper: 6.0e-4}
        train.warmup_steps:  {type: randint, lower: 0, upper: 11}     # upper exclusive (Tune's)
        train.weight_decay:  {type: uniform, lower: 0.0, upper: 0.05}
        lora.r:              {type: choice, values: [8, 16, 32]}
        lora.alpha:          {type: ratio_of, field: lora.r, values: [1, 2]}   # alpha = r or 2r

`ratio_of` is the one dependent domain: the trial samples a ratio from `values` (a Tune
`choice`, so seeded searchers reproduce it) and the field becomes `ratio * <field>`, where
`<field>` is the sampled value if that field is searched too, else the config's value. In
Tune's trial config the ratio appears under `<field>:ratio` (e.g. `lora.alpha:ratio: 2`);
`resolve_trial_values` turns a trial config back into plain field values
(`lora.alpha: 32`).

Fields that may be searched: anything under model, lora, prompt, data and train, except the
reporting cadence (`train.eval_steps`, `train.save_steps`: every trial must report at the
same steps for ASHA to compare them). run, label and tune are experiment-level settings.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from sentiment_ray.config import (
    NOT_SEARCHABLE,
    SEARCH_DOMAIN_TYPES,
    SEARCHABLE_SECTIONS,
    ConfigError,
    ExperimentConfig,
    check_search_space_shape,
    field_exists,
    validate,
)

__all__ = ["NOT_SEARCHABLE", "SEARCH_DOMAIN_TYPES", "SEARCHABLE_SECTIONS", "field_exists"]

RATIO_SUFFIX = ":ratio"


def ratio_key(field: str) -> str:
    """The key under which a `ratio_of` field's sampled ratio appears in a trial config."""
    return field + RATIO_SUFFIX


# ----------------------------------------------------------------------------- schema


def get_path(raw: dict, field: str) -> Any:
    node: Any = raw
    for part in field.split("."):
        node = node[part]
    return node


def set_path(raw: dict, field: str, value: Any) -> None:
    parts = field.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _candidates(entry: dict) -> list[Any]:
    """Values a domain can produce, for validation: all choices; both ends and an interior,
    non-round point of a range (so a float range on an int field is caught)."""
    kind = entry["type"]
    if kind == "choice":
        return list(entry["values"])
    if kind == "randint":
        return [entry["lower"], entry["upper"] - 1]
    lower, upper = entry["lower"], entry["upper"]
    if kind == "loguniform":
        interior = math.exp(math.log(lower) + 0.3719 * (math.log(upper) - math.log(lower)))
    else:
        interior = lower + 0.3719 * (upper - lower)
    return [lower, interior, upper]


def validate_search_space(cfg: ExperimentConfig) -> dict[str, dict]:
    """Check `cfg.tune.search_space` against the config schema; return it (a deep copy).

    TuneConfig already checked its shape (searchable leaf fields, well-formed domains); here
    every value a domain can produce must give a valid config (a float range on an int
    field, a negative dropout, an unknown scheduler name... are errors here, not in a trial)."""
    space = copy.deepcopy(cfg.tune.search_space)
    base = cfg.model_dump(mode="json")
    check_search_space_shape(space)  # TuneConfig checked it; a config built without validation too
    # Values: each candidate of each domain, the others at the base config's values
    # (ratio_of against every candidate of its source).
    for field, entry in space.items():
        if entry["type"] == "ratio_of":
            source = entry["field"]
            sources = _candidates(space[source]) if source in space else [get_path(base, source)]
            values = [_ratio_value(s, r) for s in sources for r in entry["values"]]
        else:
            values = _candidates(entry)
        for value in values:
            raw = copy.deepcopy(base)
            set_path(raw, field, value)
            try:
                validate(raw, source=f"tune.search_space.{field}={value!r}")
            except ConfigError as err:
                raise ConfigError(f"tune.search_space.{field}: value {value!r} is not valid:\n{err}") from None
    return space


# ----------------------------------------------------------------------------- Tune domains


def to_param_space(space: dict[str, dict]) -> dict[str, Any]:
    """Ray Tune `param_space` (flat, keyed by dotted field; `<field>:ratio` for ratio_of).
    Imports ray.tune."""
    from ray import tune

    out: dict[str, Any] = {}
    for field, entry in space.items():
        kind = entry["type"]
        if kind == "loguniform":
            out[field] = tune.loguniform(entry["lower"], entry["upper"])
        elif kind == "uniform":
            out[field] = tune.uniform(entry["lower"], entry["upper"])
        elif kind == "randint":
            out[field] = tune.randint(entry["lower"], entry["upper"])
        elif kind == "choice":
            out[field] = tune.choice(list(entry["values"]))
        elif kind == "ratio_of":
            out[ratio_key(field)] = tune.choice(list(entry["values"]))
        else:  # validate_search_space rejects these first
            raise ConfigError(f"tune.search_space.{field}: unknown type {kind!r}")
    return out


# ----------------------------------------------------------------------------- trials


def _ratio_value(source_value: Any, ratio: Any) -> Any:
    value = source_value * ratio
    if isinstance(source_value, int) and isinstance(ratio, int):
        return int(value)
    if isinstance(source_value, int) and float(value).is_integer():
        return int(value)
    return value


def resolve_trial_values(space: dict[str, dict], trial_config: dict[str, Any], base: dict) -> dict[str, Any]:
    """A trial's sampled config (Tune keys) -> {dotted field: value}, ratio_of resolved
    against the sampled (or base) value of its source field. Keys of `trial_config` that
    are not in the space are ignored."""
    values: dict[str, Any] = {}
    for field, entry in space.items():
        if entry["type"] != "ratio_of" and field in trial_config:
            values[field] = trial_config[field]
    for field, entry in space.items():
        if entry["type"] == "ratio_of" and ratio_key(field) in trial_config:
            source = entry["field"]
            source_value = values[source] if source in values else get_path(base, source)
            values[field] = _ratio_value(source_value, trial_config[ratio_key(field)])
    return values


def trial_experiment_config(base: dict, space: dict[str, dict], trial_config: dict[str, Any]) -> ExperimentConfig:
    """The validated ExperimentConfig of one trial: `base` (a config dict) with the trial's
    sampled values applied."""
    raw = copy.deepcopy(base)
    for field, value in resolve_trial_values(space, trial_config, base).items():
        set_path(raw, field, value)
    return validate(raw, source="tune trial config")


def value_range(space: dict[str, dict], field: str, base: dict) -> tuple[Any, Any]:
    """(smallest, largest) value a numeric field can take in the experiment (ASHA's max_t
    and the default reporting cadence come from train.max_steps)."""
    entry = space.get(field)
    if entry is None:
        value = get_path(base, field)
        return value, value
    kind = entry["type"]
    if kind == "choice":
        return min(entry["values"]), max(entry["values"])
    if kind == "randint":
        return entry["lower"], entry["upper"] - 1
    if kind == "ratio_of":
        low, high = value_range(space, entry["field"], base)
        return low * min(entry["values"]), high * max(entry["values"])
    return entry["lower"], entry["upper"]


def max_value(space: dict[str, dict], field: str, base: dict) -> Any:
    """The largest value a field can take in the experiment."""
    return value_range(space, field, base)[1]


def min_value(space: dict[str, dict], field: str, base: dict) -> Any:
    """The smallest value a field can take in the experiment."""
    return value_range(space, field, base)[0]
