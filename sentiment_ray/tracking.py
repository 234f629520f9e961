"""MLflow tracking of training runs and tune experiments (the `tracking:` config section).

What is logged:

- a training run (`jobs/train.py`): one MLflow run, named `run.name`, tagged with its run
  folder: params = the flattened config (`train.learning_rate`, `lora.r`, ...), metrics per
  logging step (the HF Trainer's `loss`, `learning_rate`, `grad_norm`, ...), the validation
  metrics at each evaluation step (`val_accuracy`, `val_macro_f1`, `val_ece`), the final
  metrics (`zero_shot_*`, `fine_tuned_*`, `tokens_per_second`, ...) and as artifacts the
  run's outputs: `adapter/`, `metrics.json`, `manifest.json`, `validation_predictions.parquet`.
  Logged from rank 0 of the Ray Train worker. A resumed run (same name and storage) continues
  the same MLflow run.
- a tune experiment (`jobs/tune.py`): a parent run named `tune.experiment_name` (params =
  the base config and the search space; at the end the best trial's metric and id, and the
  trials table, plot and report.html as artifacts) and one nested run per trial, logged by
  the trial's training worker as above (tag `mlflow.parentRunId`).

Where (`tracking.mlflow_tracking_uri`, else MLFLOW_TRACKING_URI, else a local store):
MLflow 3.7+ defaults to a SQLite backend (the file store is in maintenance mode), so the
local store is `<run dir>/mlflow/mlflow.db` with artifacts in `<run dir>/mlflow/artifacts/`
— no server needed; `mlflow ui --backend-store-uri sqlite:///<run dir>/mlflow/mlflow.db`
shows it. A tune experiment has one store in its folder that every trial writes to. A run
folder on object storage falls back to `~/.cache/sentiment-ray/mlflow/` (with a warning).

Tracking never fails a run: an MLflow error is logged as a warning and tracking stops.
Light at import time: mlflow is imported inside functions.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sentiment_ray.config import ExperimentConfig
from sentiment_ray.errors import UserError
from sentiment_ray.io.storage import Storage
from sentiment_ray.train.evaluation import flat_validation_metrics

log = logging.getLogger(__name__)

STORE_DIR = "mlflow"
DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "artifacts"
RUN_DIR_TAG = "sentiment_ray.run_dir"
KIND_TAG = "sentiment_ray.kind"
PARENT_TAG = "mlflow.parentRunId"
FALLBACK_DIR = Path("~/.cache/sentiment-ray/mlflow")
# MLflow's limit on a param value's length.
MAX_PARAM_CHARS = 6000


class TrackingError(UserError, RuntimeError):
    """MLflow cannot be used as the config asks (the message says why and what to set)."""


# ============================================================================ settings


def enabled(cfg: ExperimentConfig) -> bool:
    """Whether to log to MLflow: `tracking.mlflow` true, or auto with mlflow installed."""
    mode = cfg.tracking.mlflow
    if mode == "false":
        return False
    installed = importlib.util.find_spec("mlflow") is not None
    if mode == "true" and not installed:
        raise TrackingError("tracking.mlflow=true but mlflow is not installed: pip install 'sentiment-ray[mlflow]'")
    return installed


def local_store(folder: str) -> str:
    """The local store's folder for a run or experiment folder (a fallback for URIs)."""
    if "://" in folder:
        fallback = str(FALLBACK_DIR.expanduser())
        log.warning(
            "the run folder %s is not local: MLflow logs to a local store in %s instead "
            "(set tracking.mlflow_tracking_uri or MLFLOW_TRACKING_URI to a server)",
            folder,
            fallback,
        )
        return fallback
    return os.path.join(os.path.abspath(folder), STORE_DIR)


def resolve_store(cfg: ExperimentConfig, folder: str) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None for the store's default)."""
    uri = cfg.tracking.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri, None
    store = local_store(folder)
    os.makedirs(store, exist_ok=True)
    return f"sqlite:///{os.path.join(store, DB_FILE)}", Path(store, ARTIFACTS_DIR).as_uri()


def for_workers(cfg: ExperimentConfig) -> ExperimentConfig:
    """The config with the driver's MLFLOW_TRACKING_URI written in (workers on other nodes
    do not see the driver's environment). Called by train.build_trainer."""
    if cfg.tracking.mlflow_tracking_uri or not os.environ.get("MLFLOW_TRACKING_URI"):
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.tracking.mlflow_tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    return cfg


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """{"train.learning_rate": "0.0003", ...}: nested sections to dotted params (lists and
    dicts below the field level as JSON)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and prefix == "":
            out.update(flatten(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
            out[name] = text[:MAX_PARAM_CHARS]
    return out


# ============================================================================ runs


class RunTracker:
    """One MLflow run, through MlflowClient (no global active run); every call is guarded."""

    def __init__(self, client, run_id: str, experiment_id: str, tracking_uri: str):
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.tracking_uri = tracking_uri
        self.active = True

    @classmethod
    def open(
        cls,
        cfg: ExperimentConfig,
        folder: str,
        *,
        experiment: str,
        run_name: str,
        kind: str,
        parent_run_id: str = "",
    ) -> RunTracker | None:
        """Continue the run tagged with `folder` in `experiment`, or start one; None when
        tracking is off or MLflow fails (warned)."""
        if not enabled(cfg):
            return None
        try:
            return cls._open(cfg, folder, experiment=experiment, run_name=run_name, kind=kind, parent_run_id=parent_run_id)
        except Exception as err:  # tracking must not stop training
            log.warning("MLflow tracking is off for %s: %s", folder, err)
            return None

    @classmethod
    def _open(cls, cfg, folder, *, experiment, run_name, kind, parent_run_id) -> RunTracker:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        uri, artifact_location = resolve_store(cfg, folder)
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            try:
                experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
            except MlflowException:  # created meanwhile by a concurrent trial
                experiment_id = client.get_experiment_by_name(experiment).experiment_id
        else:
            experiment_id = found.experiment_id
        previous = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{RUN_DIR_TAG}` = '{folder}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if previous:
            run_id = previous[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            log.info("MLflow: continuing run %s (%s) at %s", run_id, run_name, uri)
        else:
            tags = {RUN_DIR_TAG: folder, KIND_TAG: kind}
            if parent_run_id:
                tags[PARENT_TAG] = parent_run_id
            run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
            log.info("MLflow: run %s (%s) in experiment %r at %s", run_id, run_name, experiment, uri)
        return cls(client, run_id, experiment_id, uri)

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        if not self.active:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:
            log.warning("MLflow: could not %s (tracking stops for run %s): %s", what, self.run_id, err)
            self.active = False

    def log_params(self, params: dict[str, str]) -> None:
        def log_all():
            from mlflow.entities import Param

            existing = self.client.get_run(self.run_id).data.params
            fresh = [Param(k, v) for k, v in params.items() if k not in existing]
            changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
            for start in range(0, len(fresh), 100):
                self.client.log_batch(self.run_id, params=fresh[start : start + 100])
            if changed:  # params are immutable in MLflow: a rerun with changed settings
                self.client.set_tag(self.run_id, "sentiment_ray.changed_params", ",".join(changed)[:5000])
                log.warning("MLflow: params %s differ from the run's first attempt; kept the first values", changed)

        self._guard("log params", log_all)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self.log_metric_history([(metrics, step, int(time.time() * 1000))])

    def log_metric_history(self, entries: list[tuple[dict[str, Any], int, int]]) -> None:
        """Several steps' metrics, each entry (metrics, step, time in ms), in as few writes
        as MLflow allows (a batch holds at most 1,000 values)."""
        values = [(k, float(v), when, int(step)) for metrics, step, when in entries for k, v in metrics.items() if _finite(v)]
        if not values:
            return

        def log_batches():
            from mlflow.entities import Metric

            rows = [Metric(k, v, when, step) for k, v, when, step in values]
            for start in range(0, len(rows), 1000):
                self.client.log_batch(self.run_id, metrics=rows[start : start + 1000])

        self._guard("log metrics", log_batches)

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        self._guard("log artifacts", self.client.log_artifacts, self.run_id, local_dir, artifact_path)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self._guard("log an artifact", self.client.log_artifact, self.run_id, local_path, artifact_path)

    def set_tag(self, key: str, value: Any) -> None:
        self._guard("set a tag", self.client.set_tag, self.run_id, key, str(value))

    def end(self, status: str = "FINISHED") -> None:
        self._guard("end the run", self.client.set_terminated, self.run_id, status)
        self.active = False


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ============================================================================ training


def start_training(cfg: ExperimentConfig, run_dir: str) -> RunTracker | None:
    """The MLflow run of a training run (rank 0 of the Ray Train worker), params logged."""
    t = cfg.tracking
    tracker = RunTracker.open(
        cfg,
        run_dir,
        experiment=t.mlflow_experiment or cfg.run.name,
        run_name=cfg.run.name,
        kind="tune_trial" if t.mlflow_parent_run_id else "train",
        parent_run_id=t.mlflow_parent_run_id,
    )
    if tracker is not None:
        tracker.log_params(flatten(cfg.model_dump(mode="json")))
    return tracker


# Step metrics wait at most this long before they are written (see training_callbacks).
STEP_METRICS_FLUSH_S = 30.0


def training_callbacks(tracker: RunTracker | None, reporter, flush_every_s: float = STEP_METRICS_FLUSH_S) -> list:
    """[a TrainerCallback logging every HF log entry and each evaluation of `reporter`
    (train.py's report callback, which must run first)], or [] without a tracker.

    Step entries are kept and written together: at every checkpoint and evaluation, at the
    end of training and once `flush_every_s` passed, never one write per step. An MLflow
    write takes tens of milliseconds (a SQLite transaction per batch, more to a server),
    which a GPU step of about a second would wait for at every step. Every step still
    reaches MLflow; a worker that dies loses at most the entries after its last checkpoint,
    whose steps the resumed run trains and logs again."""
    if tracker is None:
        return []
    from transformers import TrainerCallback

    class MlflowStepCallback(TrainerCallback):
        def __init__(self):
            self.logged_eval_step = -1
            self.pending: list[tuple[dict, int, int]] = []
            self.flushed_at = time.monotonic()

        def flush(self):
            if self.pending:
                tracker.log_metric_history(self.pending)
                self.pending = []
            self.flushed_at = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                self.pending.append((dict(logs), state.global_step, int(time.time() * 1000)))
                if time.monotonic() - self.flushed_at >= flush_every_s:
                    self.flush()

        def _log_eval(self, state):
            if reporter.last_eval_step == state.global_step and self.logged_eval_step != state.global_step:
                self.pending.append((flat_validation_metrics(reporter.last_eval), state.global_step, int(time.time() * 1000)))
                self.logged_eval_step = state.global_step
                self.flush()

        def on_step_end(self, args, state, control, **kwargs):
            self._log_eval(state)

        def on_save(self, args, state, control, **kwargs):
            self._log_eval(state)
            self.flush()

        def on_train_end(self, args, state, control, **kwargs):
            self.flush()

    return [MlflowStepCallback()]


def _report_metrics(prefix: str, report: dict | None) -> dict[str, Any]:
    if not report:
        return {}
    out = {f"{prefix}_{k}": report.get(k) for k in ("accuracy", "macro_f1", "ece")}
    for lang, values in (report.get("per_language") or {}).items():
        out[f"{prefix}_accuracy_{lang}"] = values.get("accuracy")
    return out


def finish_training(tracker: RunTracker | None, outputs_dir: str, zero_shot, fine_tuned, training: dict) -> None:
    """Final metrics and the run's outputs (adapter/, metrics.json, ...) as artifacts; ends the run."""
    if tracker is None:
        return
    final = {**_report_metrics("zero_shot", zero_shot), **_report_metrics("fine_tuned", fine_tuned)}
    for key in ("tokens_per_second", "train_runtime_s", "loss_last", "global_step"):
        final[key] = training.get(key)
    tracker.log_metrics(final, training.get("global_step") or 0)
    tracker.log_artifacts(outputs_dir)
    tracker.end("FINISHED")


def end_failed(tracker: RunTracker | None) -> None:
    if tracker is not None:
        tracker.end("FAILED")


# ============================================================================ tuning


def start_tune(cfg: ExperimentConfig, exp_path: str, space: dict) -> ExperimentConfig:
    """Open the experiment's parent run and return the config trials start from, with the
    store, experiment and parent run written into `tracking` (trials log nested runs)."""
    tracker = _tune_parent(cfg, exp_path)
    if tracker is None:
        return cfg
    params = flatten(cfg.model_dump(mode="json"))
    params["tune.search_space"] = json.dumps(space, sort_keys=True, default=str)[:MAX_PARAM_CHARS]
    tracker.log_params({k: v for k, v in params.items() if not k.startswith("tracking.")})
    cfg = cfg.model_copy(deep=True)
    cfg.tracking.mlflow_tracking_uri = tracker.tracking_uri
    cfg.tracking.mlflow_experiment = cfg.tracking.mlflow_experiment or cfg.tune.experiment_name
    cfg.tracking.mlflow_parent_run_id = tracker.run_id
    return cfg


def _tune_parent(cfg: ExperimentConfig, exp_path: str) -> RunTracker | None:
    return RunTracker.open(
        cfg,
        exp_path,
        experiment=cfg.tracking.mlflow_experiment or cfg.tune.experiment_name,
        run_name=cfg.tune.experiment_name,
        kind="tune",
    )


def finish_tune(
    cfg: ExperimentConfig,
    exp_path: str,
    report: Storage,
    report_files: Sequence[str],
    *,
    metric: str,
    best: dict | None,
    trials: int,
) -> None:
    """On the parent run: the best trial's final metric and id, the trial count, and the
    report files (trials table, plot, report.html, written into `report`) as artifacts; ends it."""
    if not enabled(cfg):
        return
    tracker = _tune_parent(cfg, exp_path)
    if tracker is None:
        return
    tracker.log_metrics({"trials": trials, f"best_{metric}": best.get(f"final_{metric}") if best else None}, 0)
    if best is not None:
        tracker.set_tag("sentiment_ray.best_trial", best["trial_id"])
    # MLflow logs artifacts from a local folder; the experiment may be on an object store.
    with tempfile.TemporaryDirectory(prefix="sentiment-ray-tune-report-") as local:
        for name in report_files:
            if report.is_file(name):
                Storage(local).write_bytes(name, report.read_bytes(name))
        tracker.log_artifacts(local)
    tracker.end("FINISHED")
