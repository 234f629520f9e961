"""The files of a tune experiment: the one place that names them.

<run.storage_path>/<tune.experiment_name>/
    experiment_state-*.json, tuner.pkl, trial_<id>/   Ray Tune's state and per-trial logs
    train_runs/trial_<id>/                             each trial's Ray Train run (train/layout.py)
    trial_histories/<id>.jsonl                         every report of each trial, all attempts
    scheduler_state.json                               ASHA's rungs (restored on resume)
    sentiment_ray_tune.json                            the experiment's config (resume check)
    _lock.json                                         the running job's lock (io/lease.py)
    trials.csv, trials.parquet                         one row per trial
    metric_vs_step.png                                 the metric of every trial by step
    report.html                                        trial curves + table
    mlflow/                                            MLflow store, when tracking
    best/                                              the best trial's adapter/, metrics.json,
                                                       manifest.json, config.yaml, trial.json
"""

from __future__ import annotations

from sentiment_ray.train.layout import absolute_storage_path

TRAIN_RUNS_DIR = "train_runs"
BEST_DIR = "best"
BEST_STAGING_DIR = "best.partial"
HISTORY_DIR = "trial_histories"
SCHEDULER_STATE_FILE = "scheduler_state.json"
STATE_FILE = "sentiment_ray_tune.json"
TABLE_BASENAME = "trials"
TABLE_CSV = "trials.csv"
TABLE_PARQUET = "trials.parquet"
PLOT_FILE = "metric_vs_step.png"
REPORT_FILE = "report.html"
BEST_CONFIG_FILE = "config.yaml"
BEST_TRIAL_FILE = "trial.json"
TUNE_RESULT_FILE = "result.json"  # Ray Tune's per-trial report log


def experiment_path(storage_path: str, experiment_name: str) -> str:
    return absolute_storage_path(storage_path).rstrip("/") + "/" + experiment_name


def trial_run_name(trial_id: str) -> str:
    """The Ray Train run name of a trial: stable across restarts (no time, no randomness),
    so a restarted trial finds its run and resumes from its checkpoint."""
    return f"trial_{trial_id}"


def trial_run_dir(trial_id: str) -> str:
    """A trial's Train run folder, relative to the experiment folder."""
    return f"{TRAIN_RUNS_DIR}/{trial_run_name(trial_id)}"


def history_file(trial_id: str) -> str:
    return f"{HISTORY_DIR}/{trial_id}.jsonl"
