"""jobs/tune.py end to end on a tiny model: a local Ray cluster, 3 trials at concurrency 2,
the driver killed after the first trial finishes and the same command rerun."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sentiment_ray.config import TuneConfig
from sentiment_ray.tune import layout

REPO_ROOT = Path(__file__).resolve().parents[2]
JOB = REPO_ROOT / "jobs" / "tune.py"

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
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()}


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
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd, start_new_session=True
    )
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
    cfg.tune = TuneConfig(**{**cfg.tune.model_dump(), "metric": "train_loss", "mode": "min"})  # a pair, checked together
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
    assert sorted(by_id) == sorted(states_at_kill)
    assert len(rows) == 3
    assert sorted(csv_ids) == sorted(by_id)
    assert summary["trials"] == 3
    for r in rows:
        assert r["reports"] >= 1, r
        assert r["final_train_loss"] is not None, r
        assert r["outcome"] in ("completed", "stopped_by_scheduler"), r
        assert r["lora.alpha"] in (r["lora.r"], 2 * r["lora.r"])
        if r["outcome"] == "completed":
            # (>=: a run killed between its last checkpoint and writing its outputs resumes
            # from that checkpoint, and HF's Trainer then takes one more step.)
            assert r["steps"] >= r["max_steps"] == 4
            assert r["adapter"]
        else:  # ASHA's decision, visible in the table
            assert r["stopped_at_step"] == r["steps"] == 2
            assert r["max_steps"] == 4
    drawn = [by_id[t]["train.learning_rate"] for t in sorted(by_id)]
    assert drawn[2] == 1e-5, f"seed 1 no longer draws high, low, low learning rates: {drawn}"
    assert 1e-2 in drawn[:2], f"seed 1 no longer draws high, low, low learning rates: {drawn}"
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
    assert info["trial_id"] == best["trial_id"]
    assert info["metric"] == "train_loss"
    assert json.loads((best_dir / "metrics.json").read_text())["run_name"] == f"trial_{best['trial_id']}"
    assert (exp / layout.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"

    # best/ reloads and scores: the adapter reproduces the trial's validation predictions.
    import numpy as np
    import torch

    from sentiment_ray.backends import get_backend
    from sentiment_ray.config import validate
    from sentiment_ray.labels import LabelSet
    from sentiment_ray.prompts import PromptTemplate
    from sentiment_ray.scoring import LabelScorer

    best_cfg = validate(yaml.safe_load((best_dir / "config.yaml").read_text()))
    assert best_cfg.train.learning_rate == best["train.learning_rate"]
    assert best_cfg.lora.r == best["lora.r"]
    model, tokenizer = get_backend("hf").load_for_inference(best_cfg, str(best_dir / "adapter"), torch.device("cpu"))
    predictions = pq.read_table(best_dir / "validation_predictions.parquet").to_pylist()
    temperature = json.loads((best_dir / "adapter" / "calibration.json").read_text())["temperature"]
    scorer = LabelScorer(
        model,
        tokenizer,
        PromptTemplate.from_config(best_cfg.prompt),
        LabelSet(best_cfg.prompt.labels),
        max_length=best_cfg.model.max_seq_length,
        batch_size=8,
        temperature=temperature,
    )
    result = scorer.score([p["sentence"] for p in predictions])
    # The temperature applied: the calibrated probabilities (p_<label> are the model's own).
    expected = np.array([[p[f"calibrated_p_{label}"] for label in result.labels] for p in predictions])
    np.testing.assert_allclose(result.probs, expected, atol=1e-4)


# ============================================================================ one job at a time


@pytest.mark.slow
def test_a_second_job_on_an_experiment_is_refused_and_a_killed_holders_lock_is_taken_over(tiny_cfg, tmp_path):
    cfg = tiny_cfg
    cfg.train.max_steps = 2
    cfg.data.max_validation_rows = 16
    cfg.tune.num_samples = 1
    cfg.tune.max_concurrent_trials = 1
    cfg.tune.scheduler = "fifo"
    cfg.tune.experiment_name = "race"
    cfg.tune.search_space = {"train.learning_rate": {"type": "choice", "values": [1e-3]}}
    config_path = tmp_path / "tune.yaml"
    config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    exp = Path(cfg.run.storage_path) / "race"
    lock = exp / "_lock.json"
    cmd = [sys.executable, str(JOB), "--config", str(config_path), "--num-cpus", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)

    with open(tmp_path / "first.log", "w") as log1:
        first = subprocess.Popen(cmd, stdout=log1, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path), start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (lock.exists() and json.loads(lock.read_text() or "{}").get("pid") == first.pid):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-5000:]
            assert time.time() < deadline, "the first job took no lock"
            time.sleep(0.2)
        # The same command beside it: refused in one line naming the first, before any Ray.
        started = time.time()
        second = _run_to_end(cmd, env=env, cwd=str(tmp_path), timeout=120)
        assert second.returncode == 1
        assert second.stdout == ""
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {exp} is in use by another tune job, pid {first.pid} on host "), second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        assert "Started a local Ray instance" not in second.stderr
        assert time.time() - started < 60
        assert json.loads(lock.read_text())["pid"] == first.pid  # the refused job left the lock alone
    finally:
        _kill_tree(first)  # a crash: the lock stays behind, naming a process that is gone

    rerun = _run_to_end(cmd, env=env, cwd=str(tmp_path), timeout=500)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-6000:]
    assert f"taking over a stale lock (process {first.pid} no longer runs)" in rerun.stderr
    summary = _json_line(rerun.stdout)
    assert summary["trials"] == 1
    assert summary["outcomes"]["completed"] == 1
    assert not lock.exists()  # released at the end
