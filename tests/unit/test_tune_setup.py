"""Tune experiments without a cluster: the setup checks, the scheduler rule and its saved
rungs, trial histories, the trials table and plot, the summary line, the shipped preset."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from sentiment_ray.config import ConfigError, ExperimentConfig, load_config, validate
from sentiment_ray.io.storage import Storage
from sentiment_ray.report import plots
from sentiment_ray.tune import layout, scheduler
from sentiment_ray.tune import recipe as st
from sentiment_ray.tune import results as tr

REPO_ROOT = Path(__file__).resolve().parents[2]
JOB = REPO_ROOT / "jobs" / "tune.py"

SPACE = {
    "train.learning_rate": {"type": "loguniform", "lower": 1e-4, "upper": 1e-3},
    "lora.r": {"type": "choice", "values": [8, 16]},
}


def tune_cfg(**sections) -> ExperimentConfig:
    raw = {"tune": {"search_space": SPACE}, "train": {"eval_steps": 10, "max_steps": 70}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return validate(raw)


# ============================================================================ setup


def test_prepare_sets_checkpoint_cadence_to_report_cadence():
    cfg, space = st.prepare(tune_cfg(train={"save_steps": 7}))
    assert (cfg.train.eval_steps, cfg.train.save_steps) == (10, 10)
    assert space == SPACE


def test_prepare_default_cadence_from_shortest_max_steps():
    cfg, _ = st.prepare(
        tune_cfg(
            train={"eval_steps": 0}, tune={"search_space": {**SPACE, "train.max_steps": {"type": "choice", "values": [40, 90]}}}
        )
    )
    assert cfg.train.eval_steps == cfg.train.save_steps == 40 // st.DEFAULT_REPORTS_PER_TRIAL


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"tune": {"search_space": {}}}, "search_space is empty"),
        ({"tune": {"metric": "val_f1"}}, "tune.metric: Input should be 'val_macro_f1'"),
        ({"tune": {"metric": "val_ece", "mode": "max"}}, "tune.mode=min"),
        ({"tune": {"metric": "train_loss"}}, "tune.mode=min"),
        ({"data": {"validation_fraction": 0.0}}, "validation split"),
        ({"tune": {"search_space": {"train.eval_steps": {"type": "choice", "values": [5]}}}}, "cannot be searched"),
    ],
)
def test_prepare_rejects(sections, message):
    with pytest.raises(ConfigError, match=message):
        st.prepare(tune_cfg(**sections))


@pytest.mark.parametrize(
    "run, wanted, cluster, use_gpu, expected",
    [
        ({}, 0, {"CPU": 64, "GPU": 8}, True, 8),  # one trial per GPU
        ({"num_workers": 2}, 0, {"CPU": 64, "GPU": 8}, True, 4),  # one trial per 2 GPUs
        ({}, 3, {"CPU": 64, "GPU": 8}, True, 3),
        ({}, 16, {"CPU": 64, "GPU": 8}, True, 8),  # capped: more would wait for GPUs
        ({}, 0, {"CPU": 4}, False, 2),  # CPU-only: CPUs // 2
        ({}, 2, {"CPU": 4}, False, 2),
        ({}, 2, {"CPU": 2}, False, 1),  # 2 workers + 2 trial drivers do not fit 2 CPUs
        ({"cpus_per_worker": 4}, 0, {"CPU": 16, "GPU": 8}, True, 3),  # CPU-bound on a GPU cluster
    ],
)
def test_max_concurrent_trials(run, wanted, cluster, use_gpu, expected):
    cfg = tune_cfg(run=run, tune={"max_concurrent_trials": wanted})
    assert st.max_concurrent_trials(cfg, cluster, use_gpu) == expected


def test_max_concurrent_trials_cluster_too_small():
    with pytest.raises(st.TuneError, match="cannot hold one trial"):
        st.max_concurrent_trials(tune_cfg(run={"num_workers": 2}), {"CPU": 8, "GPU": 1}, True)


def test_experiment_state_guards_resume(tmp_path):
    exp = str(tmp_path / "exp")
    cfg = tune_cfg()
    assert st.check_experiment_state(exp, cfg) is False
    assert st.check_experiment_state(exp, cfg) is True
    # run.* (addresses, retries) may differ between the first run and a resume
    assert st.check_experiment_state(exp, tune_cfg(run={"ray_address": "auto", "max_failures": 3})) is True
    with pytest.raises(st.TuneError, match="train.learning_rate"):
        st.check_experiment_state(exp, tune_cfg(train={"learning_rate": 1e-3}))
    with pytest.raises(st.TuneError, match="tune.num_samples"):
        st.check_experiment_state(exp, tune_cfg(tune={"num_samples": 9}))


# ============================================================================ scheduler


def test_asha_rungs_in_steps():
    cfg, space = st.prepare(
        tune_cfg(
            tune={
                "grace_period": 2,
                "reduction_factor": 2,
                "search_space": {**SPACE, "train.max_steps": {"type": "choice", "values": [50, 90]}},
            }
        )
    )
    sched = scheduler.build_scheduler(cfg, space)
    assert sched._time_attr == "step"
    assert sched._max_t == 90
    assert sorted(m for m, _ in sched._brackets[0]._rungs) == [20, 40, 80]
    assert (
        type(
            scheduler.build_scheduler(cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"scheduler": "fifo"})}), space)
        ).__name__
        == "FIFOScheduler"
    )


def _trial(trial_id, max_steps=None):
    return SimpleNamespace(trial_id=trial_id, config={} if max_steps is None else {"train.max_steps": max_steps})


def test_scheduler_never_stops_a_trial_at_its_final_step():
    cfg, space = st.prepare(tune_cfg(train={"eval_steps": 10, "max_steps": 40}, tune={"grace_period": 1}))
    sched = scheduler.build_scheduler(cfg, space)
    sched.set_search_properties(cfg.tune.metric, cfg.tune.mode)
    good, bad, bad_short = _trial("good"), _trial("bad"), _trial("short", max_steps=20)
    for t in (good, bad, bad_short):
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, good, {"step": 10, "val_macro_f1": 0.9}) == sched.CONTINUE
    assert sched.on_trial_result(None, good, {"step": 20, "val_macro_f1": 0.9}) == sched.CONTINUE
    # Below the rung's cutoff before its last step: stopped.
    assert sched.on_trial_result(None, bad, {"step": 10, "val_macro_f1": 0.1}) == sched.STOP
    # The same result at a trial's last step (max_steps 20): it is writing its adapter; let it.
    assert sched.on_trial_result(None, bad_short, {"step": 20, "val_macro_f1": 0.1}) == sched.CONTINUE
    # max_t reached: plain ASHA stops, we let the trial finish.
    assert sched.on_trial_result(None, good, {"step": 40, "val_macro_f1": 0.9}) == sched.CONTINUE
    # Survives pickling (tuner.pkl) as the same class.
    assert type(pickle.loads(pickle.dumps(sched))) is type(sched)


def test_scheduler_rungs_survive_a_restore(tmp_path):
    cfg, space = st.prepare(tune_cfg(train={"eval_steps": 10, "max_steps": 40}, tune={"grace_period": 1}))
    state = tmp_path / layout.SCHEDULER_STATE_FILE
    sched = scheduler.build_scheduler(cfg, space, experiment=str(tmp_path))
    pickled = pickle.dumps(sched)  # as tuner.pkl holds it: before any result
    sched.set_search_properties(cfg.tune.metric, cfg.tune.mode)
    for t in (_trial("a"), _trial("b")):
        sched.on_trial_add(None, t)
    sched.on_trial_result(None, _trial("a"), {"step": 10, "val_macro_f1": 0.9})
    sched.on_trial_result(None, _trial("b"), {"step": 10, "val_macro_f1": 0.8})
    assert json.loads(Path(state).read_text())["rungs"][0][-1] == [10, {"a": 0.9, "b": 0.8}]
    # The driver dies. The restored scheduler knows the rung at step 10: a weak newcomer stops.
    restored = pickle.loads(pickled)
    restored.set_search_properties(cfg.tune.metric, cfg.tune.mode)
    restored.on_trial_add(None, _trial("c"))
    assert restored.on_trial_result(None, _trial("c"), {"step": 10, "val_macro_f1": 0.1}) == restored.STOP
    # Without the saved state the newcomer would have been the first at the rung.
    fresh = pickle.loads(pickled)
    fresh._experiment = None
    fresh.set_search_properties(cfg.tune.metric, cfg.tune.mode)
    fresh.on_trial_add(None, _trial("c"))
    assert fresh.on_trial_result(None, _trial("c"), {"step": 10, "val_macro_f1": 0.1}) == fresh.CONTINUE


def test_history_callback_keeps_reports_across_driver_restarts(tmp_path):
    exp = str(tmp_path / "exp")
    cb = scheduler.history_callback(exp)
    trial = SimpleNamespace(trial_id="t_00000")
    cb.on_trial_result(0, [], trial, {"step": 2, "val_macro_f1": 0.5, "config": {"lora.r": 8}, "nested": {"a": 1}})
    # The driver dies; Tune unpickles the callback from tuner.pkl on restore.
    restored = pickle.loads(pickle.dumps(cb))
    assert type(restored) is type(cb)
    restored.on_trial_result(0, [], trial, {"step": 4, "val_macro_f1": 0.6})
    rows = scheduler.read_history(exp, "t_00000")
    assert [(r["step"], r["val_macro_f1"]) for r in rows] == [(2, 0.5), (4, 0.6)]
    assert "config" not in rows[0]
    assert "nested" not in rows[0]
    assert scheduler.read_history(exp, "t_00001") is None


def test_finished_run_report(tmp_path):
    run_dir = tmp_path / "trial_x"
    assert st.finished_run_report(str(run_dir), 4) is None
    run_dir.mkdir()
    metrics = {"train": {"global_step": 4, "loss_last": 1.5}, "fine_tuned": {"accuracy": 0.9, "macro_f1": 0.8, "ece": 0.1}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    report = st.finished_run_report(str(run_dir), 4)
    assert report["step"] == 4
    assert report["val_macro_f1"] == 0.8
    assert report["train_loss"] == 1.5
    assert st.finished_run_report(str(run_dir), 6) is None  # an earlier, shorter run


# ============================================================================ report


def _hist(*pairs, metric="val_macro_f1", dt=1.0):
    return [{"step": s, metric: v, "time_this_iter_s": dt} for s, v in pairs]


RECORDS = [
    {
        "trial_id": "a_00000",
        "status": "TERMINATED",
        "values": {"lora.r": 8},
        "max_steps": 6,
        "history": _hist((2, 0.5), (4, 0.7), (6, 0.6)),
        "finished": True,
        "adapter": "/x/a",
        "run_dir": "/x",
    },
    # resumed from step 2 after a crash: steps 4 reported twice, the later report counts
    {
        "trial_id": "a_00001",
        "status": "TERMINATED",
        "values": {"lora.r": 16},
        "max_steps": 6,
        "history": _hist((2, 0.4), (4, 0.1), (4, 0.65), (6, 0.8)),
        "finished": True,
        "adapter": "/x/b",
        "run_dir": "/y",
    },
    {
        "trial_id": "a_00002",
        "status": "TERMINATED",
        "values": {"lora.r": [1, 2]},
        "max_steps": 6,
        "history": _hist((2, 0.2)),
        "finished": False,
        "adapter": "/x/c",
        "run_dir": "/z",
    },
    {
        "trial_id": "a_00003",
        "status": "ERROR",
        "values": {"lora.r": 8},
        "max_steps": 6,
        "history": [],
        "error": "RuntimeError: boom",
        "finished": False,
        "adapter": "/x/d",
    },
    {"trial_id": "a_00004", "status": "PENDING", "values": {}, "max_steps": 6, "history": [], "finished": False},
]


def test_trial_rows_outcomes_and_metrics():
    rows = {r["trial_id"]: r for r in tr.trial_rows(RECORDS, "val_macro_f1", "max", ["lora.r"])}
    assert [rows[t]["outcome"] for t in sorted(rows)] == ["completed", "completed", "stopped_by_scheduler", "error", "unfinished"]
    a, b, c = rows["a_00000"], rows["a_00001"], rows["a_00002"]
    assert (a["final_val_macro_f1"], a["best_val_macro_f1"], a["best_step"], a["steps"]) == (0.6, 0.7, 4, 6)
    assert (b["final_val_macro_f1"], b["best_val_macro_f1"], b["best_step"], b["reports"]) == (0.8, 0.8, 6, 4)
    assert b["wall_time_s"] == 4.0  # time across attempts
    assert (c["stopped_at_step"], c["steps"], c["adapter"]) == (2, 2, None)
    assert a["stopped_at_step"] is None
    assert a["adapter"] == "/x/a"
    assert c["lora.r"] == "[1, 2]"  # non-scalars as JSON
    assert rows["a_00003"]["error"] == "RuntimeError: boom"
    assert tr.best_row(list(rows.values()), "val_macro_f1", "max")["trial_id"] == "a_00001"
    assert tr.best_row(list(rows.values()), "val_macro_f1", "min")["trial_id"] == "a_00000"


def test_best_row_ties_go_to_the_earlier_trial_and_need_an_adapter():
    recs = [
        {**RECORDS[0], "trial_id": "t_00002", "history": _hist((6, 0.5))},
        {**RECORDS[0], "trial_id": "t_00001", "history": _hist((6, 0.5))},
        {**RECORDS[0], "trial_id": "t_00000", "history": _hist((6, 0.9)), "finished": False},
    ]
    rows = tr.trial_rows(recs, "val_macro_f1", "max", [])
    assert tr.best_row(rows, "val_macro_f1", "max")["trial_id"] == "t_00001"
    assert tr.best_row(tr.trial_rows(RECORDS[2:], "val_macro_f1", "max", []), "val_macro_f1", "max") is None


def test_table_files_round_trip_and_text(tmp_path):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rows = tr.trial_rows(RECORDS, "val_macro_f1", "max", ["lora.r"])
    tr.write_table(rows, Storage(str(tmp_path)), "t.csv", "t.parquet")
    for table in (pq.read_table(tmp_path / "t.parquet"), pacsv.read_csv(tmp_path / "t.csv")):
        assert table.num_rows == len(RECORDS)
        assert table.column("trial_id").to_pylist() == [r["trial_id"] for r in RECORDS]
        assert table.column("outcome").to_pylist()[2] == "stopped_by_scheduler"
        assert table.column("final_val_macro_f1").to_pylist()[:2] == [0.6, 0.8]
    text = tr.format_table(rows, best_id="a_00001")
    assert "stopped_by_scheduler" in text
    assert "RuntimeError: boom" in text
    assert next(line for line in text.splitlines() if "a_00001" in line).startswith("*")


def test_metric_plot_is_a_png():
    png = plots.render_metric_plot(RECORDS, "val_macro_f1", best_id="a_00001")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 5000
    assert plots.render_metric_plot([], "val_macro_f1")[:4] == b"\x89PNG"


def test_json_summary_is_valid_json_without_the_internal_fields():
    shown = st.json_summary(
        {"experiment": "/e", "best_trial": "x", "best_config": {"lora.r": 8}, "best_metric": float("nan"), "other": 1}
    )
    parsed = json.loads(json.dumps(shown, allow_nan=False))
    assert parsed["best_config"] == {"lora.r": 8}
    assert parsed["best_metric"] is None
    assert "other" not in parsed


# ============================================================================ preset and job


def test_shipped_tune_preset_is_around_the_reference():
    cfg = load_config("llama31_8b_tune")
    prepared, space = st.prepare(cfg)
    lr = space["train.learning_rate"]
    assert lr["type"] == "loguniform"
    assert lr["lower"] < 3e-4 < lr["upper"]
    assert space["lora.r"] == {"type": "choice", "values": [8, 16, 32]}
    assert space["lora.alpha"] == {"type": "ratio_of", "field": "lora.r", "values": [1, 2]}
    steps = space["train.max_steps"]["values"]
    assert 70 in steps
    assert min(steps) >= 40
    assert max(steps) <= 100
    assert cfg.tune.metric == "val_macro_f1"
    assert cfg.tune.mode == "max"
    assert cfg.tune.scheduler == "asha"
    assert cfg.tune.max_concurrent_trials == 0
    assert cfg.run.use_gpu == "true"
    assert prepared.train.save_steps == prepared.train.eval_steps > 0
    assert cfg.model.name == load_config("llama31_8b_multilingual").model.name


def test_tune_and_trial_drivers_never_import_the_model_stack():
    """What the Tune driver and a trial driver import (sentiment_ray.tune, Ray Tune, the
    Train->Tune callback, build_trainer's TorchTrainer) must not pull in unsloth,
    transformers, trl or peft: those belong to the Train worker, unsloth first."""
    code = (
        "import sys\n"
        "import sentiment_ray.tune.recipe, sentiment_ray.tune.scheduler, sentiment_ray.train.recipe, sentiment_ray.cluster\n"
        "import ray.tune\n"
        "from ray.tune.integration.ray_train import TuneReportCallback\n"
        "from ray.tune.schedulers import AsyncHyperBandScheduler\n"
        "from ray.train.torch import TorchTrainer\n"
        "sentiment_ray.tune.scheduler.HistoryCallback, sentiment_ray.tune.scheduler.FinalStepAwareASHA\n"
        "print(','.join(m for m in ('unsloth', 'transformers', 'trl', 'peft') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=str(REPO_ROOT))
    assert out.stdout.strip() == ""


def test_job_rejects_bad_config_in_one_error_line(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("jobs_tune", JOB)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--config", "llama31_8b_tune", "tune.search_space={lora.q: {type: choice, values: [1]}}"]) == 1
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert line.startswith("error: ")
    assert "lora.q" in line
