"""What defines a training run (train/fingerprint.py): recorded on a fresh start, and a
resume with other settings refused in one line naming them; max_steps may grow."""

from __future__ import annotations

from pathlib import Path

import pytest

from sentiment_ray.config import ExperimentConfig
from sentiment_ray.io.storage import Storage
from sentiment_ray.train import layout
from sentiment_ray.train.fingerprint import RESUMABLE, RunChanged, check_or_record, run_definition

DEMO_CSV = Path(__file__).resolve().parents[2] / "data" / "demo" / "sentiment_demo.csv"


def cfg(**sections) -> ExperimentConfig:
    raw = {"data": {"train_path": str(DEMO_CSV)}, "train": {"max_steps": 40, "learning_rate": 3e-4}, "lora": {"r": 16}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return ExperimentConfig(**raw)


def started_run(tmp_path) -> Storage:
    """A run folder as Ray Train leaves it after a checkpoint, with its recorded definition."""
    run = Storage(str(tmp_path / "run"))
    check_or_record(cfg(), run)
    run.makedirs(layout.checkpoint_dir_name(40))
    return run


def test_a_resume_with_a_changed_learning_rate_or_lora_rank_is_refused_naming_them(tmp_path):
    run = started_run(tmp_path)
    with pytest.raises(RunChanged) as refused:
        check_or_record(cfg(train={"learning_rate": 1e-3, "max_steps": 50}, lora={"r": 8}), run)
    message = str(refused.value)
    assert "\n" not in message
    assert "lora.r (16 -> 8); train.learning_rate (0.0003 -> 0.001)" in message
    assert "--new-run" in message
    assert "run.name" in message
    assert run.read_json(layout.DEFINITION_FILE)["max_steps"] == 40  # the refused rerun recorded nothing


def test_a_resume_may_raise_max_steps_and_change_bookkeeping_but_not_lower_max_steps(tmp_path):
    run = started_run(tmp_path)
    record = check_or_record(cfg(train={"max_steps": 60, "eval_steps": 5, "eval_batch_size": 8}, run={"max_failures": 3}), run)
    assert record["max_steps"] == 60
    with pytest.raises(RunChanged, match=r"train\.max_steps \(60 -> 50: it may only grow on resume\)"):
        check_or_record(cfg(train={"max_steps": 50}), run)


def test_the_data_counts_by_content_not_by_path(tmp_path):
    run = started_run(tmp_path)
    copy = tmp_path / "elsewhere.csv"
    copy.write_bytes(DEMO_CSV.read_bytes())
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / DEMO_CSV.name).write_bytes(DEMO_CSV.read_bytes())
    check_or_record(cfg(data={"train_path": str(moved / DEMO_CSV.name)}), run)  # same name and bytes
    with pytest.raises(RunChanged, match=r"data\.train_fingerprint"):
        check_or_record(cfg(data={"train_path": str(copy)}), run)  # another name: another fingerprint
    edited = moved / DEMO_CSV.name
    edited.write_bytes(DEMO_CSV.read_bytes().replace(b"Positive", b"Negative", 1))
    with pytest.raises(RunChanged, match=r"data\.train_fingerprint"):
        check_or_record(cfg(data={"train_path": str(edited)}), run)


def test_checkpoints_without_a_recorded_definition_are_refused(tmp_path):
    run = Storage(str(tmp_path / "old"))
    run.makedirs(layout.checkpoint_dir_name(2))
    with pytest.raises(RunChanged, match="no run_definition.json .*--new-run"):
        check_or_record(cfg(), run)


def test_a_fresh_run_overwrites_an_earlier_definition(tmp_path):
    run = Storage(str(tmp_path / "run"))
    check_or_record(cfg(), run)
    check_or_record(cfg(train={"learning_rate": 1e-3}), run)  # no checkpoint yet: a new start
    assert run.read_json(layout.DEFINITION_FILE)["definition"]["train.learning_rate"] == 1e-3


def test_every_resumable_field_exists_and_the_rest_define_the_run():
    dump = ExperimentConfig().model_dump()
    for section, names in RESUMABLE.items():
        assert names <= set(dump[section]), (section, names - set(dump[section]))
    definition = run_definition(cfg(), data={"train": "f", "validation": None})
    for key in (
        "model.name",
        "lora.r",
        "lora.target_modules",
        "prompt.labels",
        "prompt.instruction",
        "train.learning_rate",
        "train.lr_scheduler_type",
        "train.warmup_steps",
        "train.optim",
        "train.seed",
        "train.global_batch_size",
        "data.label_map",
        "data.train_fingerprint",
    ):
        assert key in definition, key
    assert "train.max_steps" not in definition
    assert "run.name" not in definition


def test_workers_and_per_device_batch_may_trade_places_when_the_global_batch_stays(tmp_path):
    run = Storage(str(tmp_path / "run"))
    check_or_record(cfg(run={"num_workers": 2}, train={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}), run)
    run.makedirs(layout.checkpoint_dir_name(2))
    check_or_record(
        cfg(run={"num_workers": 1}, train={"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2}), run
    )  # same rows per step
    with pytest.raises(RunChanged, match=r"train.global_batch_size \(run.num_workers x .*\) \(16 -> 8\)"):
        check_or_record(
            cfg(run={"num_workers": 1}, train={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}), run
        )


def test_a_resume_may_cut_the_global_batch_into_other_micro_batches(tmp_path):
    """The global batch defines the run; how a worker cuts its share (per-device rows,
    accumulation steps, train.micro_batch_size) may change, on another GPU for instance."""
    run = Storage(str(tmp_path / "run"))
    check_or_record(cfg(train={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4}), run)
    run.makedirs(layout.checkpoint_dir_name(2))
    check_or_record(cfg(train={"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}), run)
    check_or_record(
        cfg(train={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "micro_batch_size": "auto"}), run
    )
    with pytest.raises(RunChanged, match=r"train.global_batch_size \(.*\) \(8 -> 16\)"):
        check_or_record(cfg(train={"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2}), run)
