"""jobs/tune.py and sentiment_ray.tune / tune_report: fast unit tests of the experiment setup,
the scheduler rule and the report, plus one slow end-to-end run on a tiny model: a local Ray
cluster, 3 trials at concurrency 2, the driver killed after the first trial finishes and the
same command rerun."""

from __future__ import annotations

import glob
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sentiment_ray import tune as st
from sentiment_ray import tune_report as tr
from sentiment_ray.config import ConfigError, ExperimentConfig, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
JOB = REPO_ROOT / "jobs" / "tune.py"

SPACE = {
    "train.learning_rate": {"type": "loguniform", "lower": 1e-4, "upper": 1e-3},
    "lora.r": {"type": "choice", "values": [8, 16]},
}


def tune_cfg(**sections) -> ExperimentConfig:
    raw = {"tune": {"search_space": SPACE}, "train": {"eval_steps": 10, "max_steps": 70}}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return ExperimentConfig(**raw)


# ============================================================================ setup


def test_prepare_sets_checkpoint_cadence_to_report_cadence():
    cfg, space = st.prepare(tune_cfg(train={"save_steps": 7}))
    assert (cfg.train.eval_steps, cfg.train.save_steps) == (10, 10)
    assert space == SPACE


def test_prepare_default_cadence_from_shortest_max_steps():
    cfg, _ = st.prepare(
        tune_cfg(train={"eval_steps": 0}, tune={"search_space": {**SPACE, "train.max_steps": {"type": "choice", "values": [40, 90]}}})
    )
    assert cfg.train.eval_steps == cfg.train.save_steps == 40 // st.DEFAULT_REPORTS_PER_TRIAL


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"tune": {"search_space": {}}}, "search_space is empty"),
        ({"tune": {"metric": "val_f1"}}, "reports"),
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
        tune_cfg(tune={"grace_period": 2, "reduction_factor": 2, "search_space": {**SPACE, "train.max_steps": {"type": "choice", "values": [50, 90]}}})
    )
    sched = st.build_scheduler(cfg, space)
    assert sched._time_attr == "step" and sched._max_t == 90
    assert sorted(m for m, _ in sched._brackets[0]._rungs) == [20, 40, 80]
    assert type(st.build_scheduler(cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"scheduler": "fifo"})}), space)).__name__ == "FIFOScheduler"


def _trial(trial_id, max_steps=None):
    return SimpleNamespace(trial_id=trial_id, config={} if max_steps is None else {"train.max_steps": max_steps})


def test_scheduler_never_stops_a_trial_at_its_final_step():
    cfg, space = st.prepare(tune_cfg(train={"eval_steps": 10, "max_steps": 40}, tune={"grace_period": 1}))
    sched = st.build_scheduler(cfg, space)
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
    state = str(tmp_path / "scheduler_state.json")
    sched = st.build_scheduler(cfg, space, state_path=state)
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
    fresh._state_path = None
    fresh.set_search_properties(cfg.tune.metric, cfg.tune.mode)
    fresh.on_trial_add(None, _trial("c"))
    assert fresh.on_trial_result(None, _trial("c"), {"step": 10, "val_macro_f1": 0.1}) == fresh.CONTINUE


def test_history_callback_keeps_reports_across_driver_restarts(tmp_path):
    exp = str(tmp_path / "exp")
    cb = st.HistoryCallback(exp)
    trial = SimpleNamespace(trial_id="t_00000")
    cb.on_trial_result(0, [], trial, {"step": 2, "val_macro_f1": 0.5, "config": {"lora.r": 8}, "nested": {"a": 1}})
    # The driver dies; Tune unpickles the callback from tuner.pkl on restore.
    restored = pickle.loads(pickle.dumps(cb))
    assert type(restored) is type(cb)
    restored.on_trial_result(0, [], trial, {"step": 4, "val_macro_f1": 0.6})
    rows = st.read_history(exp, "t_00000")
    assert [(r["step"], r["val_macro_f1"]) for r in rows] == [(2, 0.5), (4, 0.6)]
    assert "config" not in rows[0] and "nested" not in rows[0]
    assert st.read_history(exp, "t_00001") is None


def test_finished_run_report(tmp_path):
    run_dir = tmp_path / "trial_x"
    assert st.finished_run_report(str(run_dir), 4) is None
    run_dir.mkdir()
    metrics = {"train": {"global_step": 4, "loss_last": 1.5}, "fine_tuned": {"accuracy": 0.9, "macro_f1": 0.8, "ece": 0.1}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    report = st.finished_run_report(str(run_dir), 4)
    assert report["step"] == 4 and report["val_macro_f1"] == 0.8 and report["train_loss"] == 1.5
    assert st.finished_run_report(str(run_dir), 6) is None  # an earlier, shorter run


# ============================================================================ report


def _hist(*pairs, metric="val_macro_f1", dt=1.0):
    return [{"step": s, metric: v, "time_this_iter_s": dt} for s, v in pairs]


RECORDS = [
    {"trial_id": "a_00000", "status": "TERMINATED", "values": {"lora.r": 8}, "max_steps": 6,
     "history": _hist((2, 0.5), (4, 0.7), (6, 0.6)), "finished": True, "adapter": "/x/a", "run_dir": "/x"},
    # resumed from step 2 after a crash: steps 4 reported twice, the later report counts
    {"trial_id": "a_00001", "status": "TERMINATED", "values": {"lora.r": 16}, "max_steps": 6,
     "history": _hist((2, 0.4), (4, 0.1), (4, 0.65), (6, 0.8)), "finished": True, "adapter": "/x/b", "run_dir": "/y"},
    {"trial_id": "a_00002", "status": "TERMINATED", "values": {"lora.r": [1, 2]}, "max_steps": 6,
     "history": _hist((2, 0.2)), "finished": False, "adapter": "/x/c", "run_dir": "/z"},
    {"trial_id": "a_00003", "status": "ERROR", "values": {"lora.r": 8}, "max_steps": 6, "history": [],
     "error": "RuntimeError: boom", "finished": False, "adapter": "/x/d"},
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
    assert a["stopped_at_step"] is None and a["adapter"] == "/x/a"
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
    paths = tr.write_table(rows, str(tmp_path))
    for table in (pq.read_table(paths["parquet"]), pacsv.read_csv(paths["csv"])):
        assert table.num_rows == len(RECORDS)
        assert table.column("trial_id").to_pylist() == [r["trial_id"] for r in RECORDS]
        assert table.column("outcome").to_pylist()[2] == "stopped_by_scheduler"
        assert table.column("final_val_macro_f1").to_pylist()[:2] == [0.6, 0.8]
    text = tr.format_table(rows, best_id="a_00001")
    assert "stopped_by_scheduler" in text and "RuntimeError: boom" in text
    assert next(line for line in text.splitlines() if "a_00001" in line).startswith("*")


def test_metric_plot_is_a_png():
    png = tr.render_metric_plot(RECORDS, "val_macro_f1", best_id="a_00001")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert tr.render_metric_plot([], "val_macro_f1")[:4] == b"\x89PNG"


def test_summary_line_is_one_json_line():
    line = st.summary_line({"experiment": "/e", "best_trial": "x", "best_config": {"lora.r": 8}, "best_metric": float("nan"), "other": 1})
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["best_config"] == {"lora.r": 8} and "other" not in parsed


# ============================================================================ preset and job


def test_shipped_tune_preset_is_around_the_reference():
    cfg = load_config("llama31_8b_tune")
    prepared, space = st.prepare(cfg)
    lr = space["train.learning_rate"]
    assert lr["type"] == "loguniform" and lr["lower"] < 3e-4 < lr["upper"]
    assert space["lora.r"] == {"type": "choice", "values": [8, 16, 32]}
    assert space["lora.alpha"] == {"type": "ratio_of", "field": "lora.r", "values": [1, 2]}
    steps = space["train.max_steps"]["values"]
    assert 70 in steps and min(steps) >= 40 and max(steps) <= 100
    assert cfg.tune.metric == "val_macro_f1" and cfg.tune.mode == "max" and cfg.tune.scheduler == "asha"
    assert cfg.tune.max_concurrent_trials == 0 and cfg.run.use_gpu == "true"
    assert prepared.train.save_steps == prepared.train.eval_steps > 0
    assert cfg.model.name == load_config("llama31_8b_multilingual").model.name


def test_tune_and_trial_drivers_never_import_the_model_stack():
    """What the Tune driver and a trial driver import (sentiment_ray.tune, Ray Tune, the
    Train->Tune callback, build_trainer's TorchTrainer) must not pull in unsloth,
    transformers, trl or peft: those belong to the Train worker, unsloth first."""
    code = (
        "import sys\n"
        "import sentiment_ray.tune, sentiment_ray.train, sentiment_ray.ray_cluster, sentiment_ray.manifest\n"
        "import ray.tune\n"
        "from ray.tune.integration.ray_train import TuneReportCallback\n"
        "from ray.tune.schedulers import AsyncHyperBandScheduler\n"
        "from ray.train.torch import TorchTrainer\n"
        "sentiment_ray.tune.HistoryCallback, sentiment_ray.tune.FinalStepAwareASHA\n"
        "print(','.join(m for m in ('unsloth', 'transformers', 'trl', 'peft') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=str(REPO_ROOT))
    assert out.stdout.strip() == ""


def test_job_rejects_bad_config_with_exit_2(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("jobs_tune", JOB)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.main(["--config", "llama31_8b_tune", "tune.search_space={lora.q: {type: choice, values: [1]}}"]) == 2
    assert "lora.q" in capsys.readouterr().err


# ============================================================================ end to end


def _trial_states(exp: Path) -> dict[str, str]:
    """trial id -> status, from the newest experiment_state file Tune synced to storage."""
    files = sorted(glob.glob(str(exp / "experiment_state-*.json")), key=os.path.getmtime)
    for path in reversed(files):
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):  # being rewritten
            continue
        return {s["trial_id"]: s["status"] for s in (json.loads(t[0]) for t in data["trial_data"])}
    return {}


def _tree_snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()
    }


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the job's driver (as a crash would), then what it started (its local Ray
    cluster), by pid."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=30)


def _run_to_end(cmd: list[str], *, env: dict, cwd: str, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run that, on a timeout, also ends the local Ray cluster the job started."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the rerun did not finish in {timeout}s:\n{(stdout + stderr)[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _json_line(stdout: str) -> dict:
    return json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("{")))


@pytest.mark.slow
def test_tune_end_to_end_kill_and_resume(tiny_cfg, tmp_path):
    # Deterministic ASHA: the metric is the training loss at step 2, which depends on the
    # learning rate; seed 1 draws (high, low, low) learning rates for the 3 trials, so the
    # third (or the second) trial is below the rung's cutoff and stopped at step 2.
    cfg = tiny_cfg
    cfg.train.max_steps = 4
    cfg.train.eval_steps = 2
    cfg.train.logging_steps = 1
    cfg.train.seed = 1
    cfg.data.max_validation_rows = 16
    cfg.tune.num_samples = 3
    cfg.tune.max_concurrent_trials = 2
    cfg.tune.metric = "train_loss"
    cfg.tune.mode = "min"
    cfg.tune.scheduler = "asha"
    cfg.tune.grace_period = 1
    cfg.tune.reduction_factor = 2
    cfg.tune.experiment_name = "e2e"
    cfg.tune.search_space = {
        "train.learning_rate": {"type": "choice", "values": [1e-2, 1e-5]},
        "lora.r": {"type": "choice", "values": [2, 4]},
        "lora.alpha": {"type": "ratio_of", "field": "lora.r", "values": [1, 2]},
    }
    config_path = tmp_path / "tune.yaml"
    # Key order matters: Tune draws the domains in the search space's order.
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    exp = Path(cfg.run.storage_path) / "e2e"
    cmd = [sys.executable, str(JOB), "--config", str(config_path), "--num-cpus", "4"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)

    # ---- first run: kill the driver once a trial has finished
    log1 = open(tmp_path / "run1.log", "w")
    proc = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path), start_new_session=True)
    deadline = time.time() + 400
    try:
        while True:
            states = _trial_states(exp)
            if any(s == "TERMINATED" for s in states.values()):
                break
            assert proc.poll() is None, f"job exited early:\n{(tmp_path / 'run1.log').read_text()[-5000:]}"
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(1)
    finally:
        _kill_tree(proc)
        log1.close()
    states_at_kill = _trial_states(exp)
    finished_before = sorted(t for t, s in states_at_kill.items() if s == "TERMINATED")
    assert len(finished_before) < 3, f"every trial had finished before the kill: {states_at_kill}"
    before = {
        t: {
            "results": (exp / f"trial_{t}" / "result.json").read_text(),
            "run": _tree_snapshot(exp / "train_runs" / f"trial_{t}"),
        }
        for t in finished_before
    }

    unfinished_at_kill = {}
    for t in set(states_at_kill) - set(finished_before):
        run = exp / "train_runs" / f"trial_{t}"
        snapshot = run / "checkpoint_manager_snapshot.json"
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") if snapshot.exists() else None
        unfinished_at_kill[t] = {
            "checkpoint_step": latest["metrics"]["step"] if latest else None,
            "metrics": (run / "metrics.json").read_text() if (run / "metrics.json").exists() else None,
        }

    # ---- rerun the same command: the experiment resumes and completes
    out = _run_to_end(cmd, env=env, cwd=str(tmp_path), timeout=500)
    (tmp_path / "run2.log").write_text(out.stdout + out.stderr)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    assert out.stdout.strip().splitlines()[-1].startswith("{"), "the job must end with its JSON line"
    summary = _json_line(out.stdout)
    assert summary["experiment"] == str(exp)

    import pyarrow.parquet as pq

    rows = pq.read_table(exp / "trials.parquet").to_pylist()
    csv_ids = [line.split(",")[0].strip('"') for line in (exp / "trials.csv").read_text().splitlines()[1:]]
    by_id = {r["trial_id"]: r for r in rows}
    # The same trials, all of them, each reported, finished one way or the other.
    assert sorted(by_id) == sorted(states_at_kill) and len(rows) == 3 and sorted(csv_ids) == sorted(by_id)
    assert summary["trials"] == 3
    for r in rows:
        assert r["reports"] >= 1 and r["final_train_loss"] is not None, r
        assert r["outcome"] in ("completed", "stopped_by_scheduler"), r
        assert r["lora.alpha"] in (r["lora.r"], 2 * r["lora.r"])
        if r["outcome"] == "completed":
            # (>=: a run killed between its last checkpoint and writing its outputs resumes
            # from that checkpoint, and HF's Trainer then takes one more step.)
            assert r["steps"] >= r["max_steps"] == 4 and r["adapter"]
        else:  # ASHA's decision, visible in the table
            assert r["stopped_at_step"] == r["steps"] == 2 and r["max_steps"] == 4
    drawn = [by_id[t]["train.learning_rate"] for t in sorted(by_id)]
    assert drawn[2] == 1e-5 and 1e-2 in drawn[:2], f"seed 1 no longer draws high, low, low learning rates: {drawn}"
    assert any(r["outcome"] == "stopped_by_scheduler" for r in rows), rows
    assert summary["outcomes"]["stopped_by_scheduler"] >= 1

    # Finished trials were not run again: same Tune results, untouched Train run folders.
    for t in finished_before:
        assert (exp / f"trial_{t}" / "result.json").read_text() == before[t]["results"]
        assert _tree_snapshot(exp / "train_runs" / f"trial_{t}") == before[t]["run"]

    # Unfinished trials resumed: a run that had finished training is not trained again; a
    # run with a checkpoint continued from it.
    for t, seen in unfinished_at_kill.items():
        metrics_file = exp / "train_runs" / f"trial_{t}" / "metrics.json"
        if seen["metrics"] is not None:
            assert metrics_file.read_text() == seen["metrics"], f"{t} trained again"
        elif seen["checkpoint_step"] is not None and metrics_file.exists():
            assert json.loads(metrics_file.read_text())["train"]["resumed_from_step"] == seen["checkpoint_step"]

    # The best trial is the completed one with the lowest final loss.
    completed = [r for r in rows if r["outcome"] == "completed"]
    best = min(completed, key=lambda r: (r["final_train_loss"], r["trial_id"]))
    assert summary["best_trial"] == best["trial_id"]
    assert summary["best_metric"] == pytest.approx(best["final_train_loss"])
    assert summary["best_config"]["train.learning_rate"] == best["train.learning_rate"]
    best_dir = exp / "best"
    info = json.loads((best_dir / "trial.json").read_text())
    assert info["trial_id"] == best["trial_id"] and info["metric"] == "train_loss"
    assert json.loads((best_dir / "metrics.json").read_text())["run_name"] == f"trial_{best['trial_id']}"
    assert (exp / tr.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"

    # best/ reloads and scores: the adapter reproduces the trial's validation predictions.
    import numpy as np
    import torch

    from sentiment_ray.backends import get_backend
    from sentiment_ray.config import validate
    from sentiment_ray.labels import LabelSet
    from sentiment_ray.prompts import PromptTemplate
    from sentiment_ray.scoring import LabelScorer

    best_cfg = validate(yaml.safe_load((best_dir / "config.yaml").read_text()))
    assert best_cfg.train.learning_rate == best["train.learning_rate"] and best_cfg.lora.r == best["lora.r"]
    model, tokenizer = get_backend("hf").load_for_inference(best_cfg, str(best_dir / "adapter"), torch.device("cpu"))
    predictions = pq.read_table(best_dir / "validation_predictions.parquet").to_pylist()
    scorer = LabelScorer(
        model, tokenizer, PromptTemplate.from_config(best_cfg.prompt), LabelSet(best_cfg.prompt.labels),
        max_length=best_cfg.model.max_seq_length, batch_size=8,
    )
    result = scorer.score([p["sentence"] for p in predictions])
    expected = np.array([[p[f"p_{label}"] for label in result.labels] for p in predictions])
    np.testing.assert_allclose(result.probs, expected, atol=1e-4)
