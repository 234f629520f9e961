"""What defines a training run: recorded when the run starts, checked when a rerun resumes it.

A rerun with the same run.name and run.storage_path resumes from the run's latest checkpoint
(Ray Train restores it from the run folder). That continues the same run only if what it
trains is the same, so the driver records the run's definition in
`<run dir>/run_definition.json` when the run starts and refuses, in one line naming the
changed fields, a rerun whose definition differs: `--new-run` (or another run.name) starts
over instead.

The definition: model (name, backend, dtype, 4-bit, sequence length, attention), LoRA shape
(r, alpha, dropout, bias, targets, rsLoRA), the prompt and label set, the data (content
fingerprint of the training and validation files; for a Hugging Face dataset its name,
config, split and revision; columns, label map, split fraction and seed, row limits,
bad-row policy), the optimiser and schedule (learning rate, scheduler, warmup, weight
decay, optimiser, seed, packing, padding, loss) and the global batch:
run.num_workers x train.per_device_train_batch_size x train.gradient_accumulation_steps.
How the global batch is cut may change on resume (2 workers of 4 rows resume as 1 of 8; a
micro-batch of 2 with 4 accumulation steps as one of 8, on a larger GPU): each optimizer
step then sees the same rows, and the loss is normalised over the whole step, which is what
the run's maths depends on.

What may change on resume (RESUMABLE): train.max_steps upward (the run trains on to the new
last step; a linear or cosine schedule then decays over the new length from where it is),
train.eval_steps, train.save_steps, train.logging_steps, train.eval_batch_size,
train.zero_shot_eval, train.per_device_train_batch_size, train.gradient_accumulation_steps
and train.micro_batch_size (through the global batch), lora.gradient_checkpointing (memory,
not the maths),
data.train_path / data.validation_path (the content fingerprint decides, not the path),
data.quarantine_path, model.allow_unsafe_weights, run.* (placement and bookkeeping; the
number of workers through the global batch), and the label, tune and tracking sections.
"""

from __future__ import annotations

import time
from typing import Any

from sentiment_ray import rerun
from sentiment_ray.config import ExperimentConfig
from sentiment_ray.errors import UserError
from sentiment_ray.io.files import expand_paths, fingerprint
from sentiment_ray.io.storage import Storage
from sentiment_ray.train import layout

DEFINITION_VERSION = 1
# Sections that take part, and within them the fields that may change on resume.
SECTIONS = ("model", "lora", "prompt", "data", "train", "run")
RESUMABLE = {
    "model": {"allow_unsafe_weights", "allow_base_mismatch"},
    "lora": {"gradient_checkpointing"},
    "data": {"train_path", "validation_path", "quarantine_path"},
    "train": {
        "max_steps",
        "eval_steps",
        "save_steps",
        "logging_steps",
        "eval_batch_size",
        "zero_shot_eval",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "micro_batch_size",
    },
    "run": {
        "name",
        "storage_path",
        "use_gpu",
        "cpus_per_worker",
        "max_failures",
        "checkpoints_to_keep",
        "ray_address",
        "num_workers",
    },
}
GLOBAL_BATCH = "train.global_batch_size"  # run.num_workers x per_device_train_batch_size x gradient_accumulation_steps


class RunChanged(UserError, RuntimeError):
    """A rerun would resume a run whose definition differs (or was never recorded)."""


def data_fingerprints(cfg: ExperimentConfig) -> dict[str, Any]:
    """Content fingerprints of the training and validation files (io.files.fingerprint:
    names, sizes and bytes), or a Hugging Face dataset's description (in the data section)."""
    d = cfg.data
    out: dict[str, Any] = {}
    for kind in ("train", "validation"):
        path = getattr(d, f"{kind}_path")
        out[kind] = fingerprint(expand_paths(path)) if path else None
    return out


def run_definition(cfg: ExperimentConfig, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fields that define the run (flattened `section.field` -> value), with the data's
    content fingerprints (`data` when the caller computed them)."""
    dump = cfg.model_dump(mode="json")
    flat = {
        f"{section}.{key}": value
        for section in SECTIONS
        for key, value in dump[section].items()
        if key not in RESUMABLE.get(section, set())
    }
    flat[GLOBAL_BATCH] = global_batch_size(cfg)
    for kind, value in (data if data is not None else data_fingerprints(cfg)).items():
        flat[f"data.{kind}_fingerprint"] = value
    return flat


def global_batch_size(cfg: ExperimentConfig) -> int:
    """Rows (or packed sequences) per optimizer step, over all workers."""
    return cfg.run.num_workers * cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps


def has_checkpoints(run: Storage) -> bool:
    """The run folder holds Ray Train checkpoints: a rerun resumes it."""
    return any(name.startswith(layout.CHECKPOINT_PREFIX) for name in run.list_dirs())


def check_or_record(cfg: ExperimentConfig, run: Storage) -> dict[str, Any]:
    """Before a run starts: record its definition when the run folder has no checkpoint
    (a fresh run), else refuse a definition that differs from the recorded one (RunChanged,
    one line naming the changed fields). Returns the record written."""
    definition = run_definition(cfg)
    max_steps = cfg.train.max_steps
    if has_checkpoints(run):
        recorded = run.read_json_or_none(layout.DEFINITION_FILE)
        if recorded is None:
            raise RunChanged(
                f"{run.root} has checkpoints but no {layout.DEFINITION_FILE} (started by an older version): "
                "what it was trained with is unknown; start over with --new-run, or choose another run.name"
            )
        before = recorded.get("definition", {})
        problems = rerun.changes(before, definition, name=_name)
        if max_steps < int(recorded.get("max_steps", 0)):
            problems.append(f"train.max_steps ({recorded['max_steps']} -> {max_steps}: it may only grow on resume)")
        if problems:
            raise RunChanged(
                f"{run.root} holds a run trained with other settings, which a rerun would resume: "
                f"{'; '.join(problems)}. Rerun with the run's settings to resume it, with --new-run to start over, "
                "or with another run.name"
            )
        record = {**recorded, "max_steps": max_steps, "resumed_utc": _now()}
    else:
        record = {"version": DEFINITION_VERSION, "created_utc": _now(), "max_steps": max_steps, "definition": definition}
    run.write_json(layout.DEFINITION_FILE, record)
    return record


def _name(key: str) -> str:
    if key == GLOBAL_BATCH:
        return f"{key} (run.num_workers x train.per_device_train_batch_size x train.gradient_accumulation_steps)"
    return key


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
