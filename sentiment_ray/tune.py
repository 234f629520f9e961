"""Hyperparameter search on Ray Tune: one trial = one Ray Train run of the training worker.

    summary = run_tune(load_config("llama31_8b_tune"))   # connects to / starts Ray

The shape follows Ray's Train/Tune interop (`doc/source/train/doc_code/train_tune_interop.py`):
the Tune function trainable (`trial_driver`, a light process that never imports unsloth,
transformers or trl; Ray's TorchTrainer brings torch) builds the foundation's `TorchTrainer` (`train.build_trainer`) with
its own run name, and `TuneReportCallback` forwards every worker report to Tune. The GPU
worker is `train.train_worker` unchanged: it imports unsloth first, with its own compile
cache (backends.early_import).

The experiment folder `<run.storage_path>/<tune.experiment_name>/`:

    experiment_state-*.json, tuner.pkl, trial_<id>/   Ray Tune's state and per-trial logs
    train_runs/trial_<id>/                             each trial's Ray Train run (checkpoints,
                                                       adapter/, metrics.json, manifest.json)
    trial_histories/<id>.jsonl                         every report of each trial, all attempts
    scheduler_state.json                               ASHA's rungs (restored on resume)
    sentiment_ray_tune.json                            the experiment's config (resume check)
    trials.csv, trials.parquet                         one row per trial (tune_report)
    metric_vs_step.png                                 the metric of every trial by step
    report.html                                        trial curves + table (report_html)
    mlflow/                                            MLflow store, when tracking (tracking.py)
    best/                                              the best trial's adapter/, metrics.json,
                                                       manifest.json, config.yaml, trial.json

Reporting cadence: every trial evaluates every `train.eval_steps` steps and checkpoints at
the same steps (`train.save_steps` is set to `train.eval_steps`; eval_steps 0 means a quarter
of the shortest `train.max_steps`), so each report carries the metric and ASHA compares
trials at the same steps. ASHA's time unit is the training step:
rungs at `grace_period * eval_steps * reduction_factor**k` steps, up to the largest
`train.max_steps` in the search space. A trial's final report never stops it (it would be
killed while writing its adapter); the result still counts for the rung. The rungs are
saved in the experiment folder and restored with it (Tune restores schedulers empty).

Resume: rerunning with the same storage path and experiment name restores the experiment
(`Tuner.restore`): finished trials are kept as they are; unfinished and errored ones run
again, and their Train run (same name, same storage) resumes from its latest checkpoint (a
run that had already finished is not trained again: its final metrics are reported).
Trial failures are retried `run.max_failures` times by Tune (FailureConfig); inside a trial
Ray Train retries worker failures `run.max_failures` times as well, from the last checkpoint.

Resources: a trial driver takes `TRIAL_DRIVER_CPUS` (a token fraction of a CPU) and its
Train worker(s) what `run` asks for (one GPU each on a GPU cluster). `tune.max_concurrent_trials`
(0 = one trial per `run.num_workers` GPUs; on a CPU-only cluster CPUs // 2) is capped by
what the cluster can hold at once, so admitted trials never wait on each other for workers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from typing import Any

from sentiment_ray import search_space as ss
from sentiment_ray import report_html, tracking, tune_report
from sentiment_ray.config import ConfigError, ExperimentConfig
from sentiment_ray.storage import filesystem

log = logging.getLogger(__name__)

TRAIN_RUNS_DIR = "train_runs"
BEST_DIR = "best"
HISTORY_DIR = "trial_histories"
SCHEDULER_STATE_FILE = "scheduler_state.json"
STATE_FILE = "sentiment_ray_tune.json"
# The Tune trial actor only drives a TorchTrainer; it needs no real CPU. A small non-zero
# amount because Tune's placement group needs a non-empty bundle.
TRIAL_DRIVER_CPUS = 0.01
# Sections whose change makes an existing experiment a different experiment.
_EXPERIMENT_SECTIONS = ("model", "lora", "prompt", "data", "train", "tune")
# Reports per trial (of the shortest max_steps) when train.eval_steps is 0.
DEFAULT_REPORTS_PER_TRIAL = 4
# Metrics every report of the training worker carries (train.py's report callback).
REPORTED_METRICS = {"val_macro_f1": "max", "val_accuracy": "max", "val_ece": "min", "train_loss": "min"}


class TuneError(RuntimeError):
    pass


# ============================================================================ paths


def experiment_path(cfg: ExperimentConfig) -> str:
    from sentiment_ray.train import absolute_storage_path

    return absolute_storage_path(cfg.run.storage_path).rstrip("/") + "/" + cfg.tune.experiment_name


def trial_run_name(trial_id: str) -> str:
    """The Ray Train run name of a trial: stable across restarts (no time, no randomness),
    so a restarted trial finds its run and resumes from its checkpoint."""
    return f"trial_{trial_id}"


def trial_dirname(trial) -> str:
    """Tune's folder of a trial (`trial_dirname_creator`)."""
    return f"trial_{trial.trial_id}"


# ============================================================================ config


def prepare(cfg: ExperimentConfig) -> tuple[ExperimentConfig, dict[str, dict]]:
    """Validate a config for tuning; return (the config trials start from, the search space).

    Checks: the search space (search_space.validate_search_space), a validation split
    (every report must carry the metric), a metric the worker reports with a matching mode.
    Sets the reporting cadence: `train.eval_steps`, or (0) the shortest possible
    `train.max_steps` // DEFAULT_REPORTS_PER_TRIAL; and `train.save_steps` to it
    (checkpoints at the reporting cadence)."""
    t = cfg.tune
    if not t.search_space:
        raise ConfigError("tune.search_space is empty: add at least one field to search")
    if t.metric not in REPORTED_METRICS:
        raise ConfigError(f"tune.metric={t.metric!r}: the training worker reports {', '.join(REPORTED_METRICS)}")
    if t.mode != REPORTED_METRICS[t.metric]:
        raise ConfigError(f"tune.metric={t.metric} is {'higher' if REPORTED_METRICS[t.metric] == 'max' else 'lower'}-is-better: set tune.mode={REPORTED_METRICS[t.metric]}")
    if not cfg.data.validation_path and cfg.data.validation_fraction <= 0:
        raise ConfigError("tuning needs a validation split: set data.validation_path or data.validation_fraction > 0")
    space = ss.validate_search_space(cfg)
    cfg = cfg.model_copy(deep=True)
    if cfg.train.eval_steps <= 0:
        shortest = ss.min_value(space, "train.max_steps", cfg.model_dump(mode="json"))
        cfg.train.eval_steps = max(1, int(shortest) // DEFAULT_REPORTS_PER_TRIAL)
        log.info("train.eval_steps is 0: trials report (and checkpoint) every %d steps", cfg.train.eval_steps)
    cfg.train.save_steps = cfg.train.eval_steps
    return cfg, space


def max_concurrent_trials(cfg: ExperimentConfig, cluster: dict[str, float], use_gpu: bool) -> int:
    """`tune.max_concurrent_trials`, or (0) one trial per `run.num_workers` GPUs of the
    cluster (CPUs // 2 on a CPU-only cluster); at least 1 and at most what the cluster holds
    at once (so an admitted trial never waits for another's workers)."""
    per_trial_cpus = cfg.run.num_workers * cfg.run.cpus_per_worker + TRIAL_DRIVER_CPUS
    capacity = int(cluster.get("CPU", 0) // per_trial_cpus)
    if use_gpu:
        capacity = min(capacity, int(cluster.get("GPU", 0)) // cfg.run.num_workers)
    wanted = cfg.tune.max_concurrent_trials
    if wanted == 0:
        wanted = int(cluster.get("GPU", 0)) // cfg.run.num_workers if use_gpu else int(cluster.get("CPU", 0)) // 2
    if capacity < 1:
        raise TuneError(
            f"the cluster ({cluster.get('CPU', 0)} CPUs, {cluster.get('GPU', 0)} GPUs) cannot hold one trial "
            f"({cfg.run.num_workers} worker(s) x {cfg.run.cpus_per_worker} CPU{' + 1 GPU' if use_gpu else ''})"
        )
    if wanted > capacity:
        log.warning("tune.max_concurrent_trials=%d is more than the cluster holds at once; using %d", wanted, capacity)
    return max(1, min(wanted, capacity))


def _experiment_fingerprint(cfg: ExperimentConfig) -> dict:
    dump = cfg.model_dump(mode="json")
    return {k: dump[k] for k in _EXPERIMENT_SECTIONS}


def check_experiment_state(exp_path: str, cfg: ExperimentConfig) -> bool:
    """Record the experiment's config in `<exp>/sentiment_ray_tune.json`, or check that an
    existing experiment was started with the same model/lora/prompt/data/train/tune
    sections (Tune would otherwise silently continue the old search). Returns whether the
    file existed."""
    fs, base = filesystem(exp_path)
    path = base.rstrip("/") + "/" + STATE_FILE
    current = _experiment_fingerprint(cfg)
    try:
        with fs.open_input_stream(path) as stream:
            previous = json.loads(stream.read().decode("utf-8"))
    except FileNotFoundError:
        previous = None
    if previous is not None:
        changed = sorted(
            f"{section}.{key}"
            for section in _EXPERIMENT_SECTIONS
            for key in set(previous["config"].get(section, {})) | set(current.get(section, {}))
            if previous["config"].get(section, {}).get(key) != current.get(section, {}).get(key)
        )
        if changed:
            raise TuneError(
                f"{exp_path} holds an experiment started with a different config ({', '.join(changed)} differ); "
                "rerun with the original config to resume it, or choose another tune.experiment_name"
            )
        return True
    fs.create_dir(base, recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(json.dumps({"config": current, "created": time.time()}, indent=2, sort_keys=True).encode("utf-8"))
    return False


# ============================================================================ scheduler


def _make_asha_class():
    from ray.tune.schedulers import AsyncHyperBandScheduler

    class FinalStepAwareASHA(AsyncHyperBandScheduler):
        """ASHA (time unit: the training step) with two additions:

        - A STOP on a trial's final report becomes CONTINUE: at its last step a trial has
          finished training and is writing its adapter; stopping it then would lose the
          adapter and gain nothing. The result still counts for the rungs.
        - The rungs' records are saved to `state_path` after every change and loaded again
          when the experiment is restored (Tune itself restores schedulers empty, so trials
          resumed or started after a restart would be compared with nothing)."""

        def __init__(self, *args, default_max_steps: int, state_path: str | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self._default_max_steps = int(default_max_steps)
            self._state_path = state_path
            self._state_loaded = False

        def __setstate__(self, state):
            # Unpickled from tuner.pkl on restore: read the saved rungs before the next decision.
            self.__dict__.update(state)
            self._state_loaded = False

        # -- final step

        def _is_final(self, trial, result: dict) -> bool:
            max_steps = (trial.config or {}).get("train.max_steps", self._default_max_steps)
            step = result.get("step")
            return isinstance(step, (int, float)) and step >= max_steps

        def on_trial_result(self, tune_controller, trial, result):
            self._load_state()
            decision = super().on_trial_result(tune_controller, trial, result)
            self._save_state()
            if decision == self.STOP and self._is_final(trial, result):
                return self.CONTINUE
            return decision

        def on_trial_complete(self, tune_controller, trial, result):
            self._load_state()
            super().on_trial_complete(tune_controller, trial, result)
            self._save_state()

        def on_trial_add(self, tune_controller, trial):
            self._load_state()
            super().on_trial_add(tune_controller, trial)

        # -- persistence

        def rung_records(self) -> list[list[list]]:
            """Per bracket: [[milestone, {trial id: recorded reward}], ...]."""
            return [[[milestone, dict(recorded)] for milestone, recorded in b._rungs] for b in self._brackets]

        def _save_state(self) -> None:
            if not self._state_path:
                return
            try:
                fs, path = filesystem(self._state_path)
                data = json.dumps({"rungs": self.rung_records()}).encode("utf-8")
                with fs.open_output_stream(path + ".tmp") as stream:
                    stream.write(data)
                fs.move(path + ".tmp", path)
            except Exception:  # the experiment goes on; a restart would forget the rungs
                log.exception("could not save the scheduler state to %s", self._state_path)

        def _load_state(self) -> None:
            if self._state_loaded:
                return
            self._state_loaded = True
            if not self._state_path:
                return
            fs, path = filesystem(self._state_path)
            try:
                with fs.open_input_stream(path) as stream:
                    saved = json.loads(stream.read().decode("utf-8"))["rungs"]
            except (FileNotFoundError, OSError, ValueError, KeyError):
                return
            for bracket, rungs in zip(self._brackets, saved):
                milestones = {m: recorded for m, recorded in bracket._rungs}
                for milestone, recorded in rungs:
                    if milestone in milestones:
                        milestones[milestone].update(recorded)
            log.info("scheduler rungs restored from %s", self._state_path)

    return FinalStepAwareASHA


# Classes that subclass Ray Tune's are built on first use (ray.tune is imported lazily) and
# published as attributes of this module (module __getattr__), so the scheduler and the
# callback pickled in tuner.pkl unpickle to the same classes on restore.
_LAZY_CLASSES: dict[str, type] = {}


def _lazy_class(name: str) -> type:
    if name not in _LAZY_CLASSES:
        if name == "FinalStepAwareASHA":
            cls = _make_asha_class()
        elif name == "HistoryCallback":
            cls = _make_history_callback_class()
        else:
            raise AttributeError(name)
        cls.__name__ = cls.__qualname__ = name
        cls.__module__ = __name__
        _LAZY_CLASSES[name] = cls
    return _LAZY_CLASSES[name]


def __getattr__(name: str):
    if name in ("FinalStepAwareASHA", "HistoryCallback"):
        return _lazy_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _asha_class():
    return _lazy_class("FinalStepAwareASHA")


def build_scheduler(cfg: ExperimentConfig, space: dict[str, dict], state_path: str | None = None):
    """FIFO, or ASHA in training steps (see FinalStepAwareASHA; `state_path`: where its
    rungs are kept for a restart)."""
    from ray.tune.schedulers import FIFOScheduler

    t = cfg.tune
    if t.scheduler == "fifo":
        return FIFOScheduler()
    base = cfg.model_dump(mode="json")
    max_t = int(ss.max_value(space, "train.max_steps", base))
    grace = min(t.grace_period * cfg.train.eval_steps, max_t)
    return _asha_class()(
        time_attr="step",
        max_t=max_t,
        grace_period=grace,
        reduction_factor=t.reduction_factor,
        default_max_steps=cfg.train.max_steps,
        state_path=state_path,
    )


# ============================================================================ history


def history_path(exp_path: str, trial_id: str) -> str:
    return exp_path.rstrip("/") + "/" + HISTORY_DIR + "/" + trial_id + ".jsonl"


def read_history(exp_path: str, trial_id: str) -> list[dict] | None:
    """The reports of a trial recorded by HistoryCallback, or None if there is no record."""
    fs, path = filesystem(history_path(exp_path, trial_id))
    try:
        with fs.open_input_stream(path) as stream:
            text = stream.read().decode("utf-8")
    except (FileNotFoundError, OSError):
        return None
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by a crash
            continue
    return rows


def _make_history_callback_class():
    from ray.tune import Callback

    class HistoryCallback(Callback):
        """Keeps every report of every trial in `<exp>/trial_histories/<trial id>.jsonl`,
        across driver restarts. (Tune's own result.json of a resumed trial starts again from
        the resumed attempt's reports.) Runs on the Tune driver."""

        def __init__(self, exp_path: str):
            self.exp_path = exp_path
            self._rows: dict[str, list[dict]] = {}

        def __getstate__(self):
            return {"exp_path": self.exp_path}

        def __setstate__(self, state):
            self.exp_path = state["exp_path"]
            self._rows = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            try:
                self._record(trial.trial_id, result)
            except Exception:  # a full disk must not stop the experiment
                log.exception("could not record the history of trial %s", trial.trial_id)

        def _record(self, trial_id: str, result: dict) -> None:
            rows = self._rows.get(trial_id)
            if rows is None:
                rows = self._rows[trial_id] = read_history(self.exp_path, trial_id) or []
            rows.append({k: v for k, v in result.items() if k != "config" and _jsonable(v)})
            fs, path = filesystem(history_path(self.exp_path, trial_id))
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            data = "".join(json.dumps(r, default=str) + "\n" for r in rows).encode("utf-8")
            tmp = path + ".tmp"
            with fs.open_output_stream(tmp) as stream:
                stream.write(data)
            fs.move(tmp, path)

    return HistoryCallback


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


# ============================================================================ trial


def trial_driver(config: dict, base: dict, space: dict, train_runs_path: str) -> None:
    """The Tune function trainable: one Ray Train run of the trial's config. Runs in a
    light Tune actor: no unsloth/transformers import here (the Train worker does those)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from sentiment_ray.train import build_trainer

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = ss.trial_experiment_config(base, space, config)
    finished = finished_run_report(train_runs_path + "/" + trial_run_name(trial_id), cfg.train.max_steps)
    if finished is not None:
        # The run finished before the last driver died, but Tune had not recorded the
        # trial as done: report its final metrics instead of resuming it.
        ray.tune.report(finished)
        return
    trainer = build_trainer(
        cfg,
        run_name=trial_run_name(trial_id),
        storage_path=train_runs_path,
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def finished_run_report(run_dir: str, max_steps: int) -> dict | None:
    """The final report of a Train run that finished (metrics.json with global_step >=
    max_steps), in the shape the worker reports; None if it did not finish."""
    from sentiment_ray.train import METRICS_FILE, TrainingError, flat_validation_metrics, read_run_json

    try:
        metrics = read_run_json(run_dir, METRICS_FILE)
    except TrainingError:
        return None
    train = metrics.get("train") or {}
    step = train.get("global_step")
    if not isinstance(step, int) or step < max_steps:
        return None
    report = {"step": step, "train_loss": train.get("loss_last"), "finished_before_restart": True}
    report.update(flat_validation_metrics(metrics.get("fine_tuned")))
    return report


# ============================================================================ driver


def run_tune(cfg: ExperimentConfig, *, num_cpus: int | None = None) -> dict:
    """Run (or resume) the experiment of `cfg.tune`, then write its report and promote the
    best adapter. Returns the summary of `finalize` (jobs/tune.py prints `summary_line`).
    `num_cpus`: logical CPUs of a local cluster this call starts (ignored when joining one)."""
    import ray
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from sentiment_ray import ray_cluster

    started = time.time()
    cfg, space = prepare(cfg)
    ray_cluster.connect(cfg.run.ray_address, num_cpus=num_cpus)
    use_gpu = ray_cluster.resolve_use_gpu(cfg.run.use_gpu)
    if cfg.model.backend == "unsloth" and not use_gpu:
        raise TuneError("model.backend=unsloth needs GPU workers, but run.use_gpu resolved to false")
    concurrency = max_concurrent_trials(cfg, ray.cluster_resources(), use_gpu)
    exp_path = experiment_path(cfg)
    existed = check_experiment_state(exp_path, cfg)
    cfg = tracking.start_tune(cfg, exp_path, space)  # MLflow parent run; trials nest under it
    train_runs = exp_path + "/" + TRAIN_RUNS_DIR
    scheduler_state = exp_path + "/" + SCHEDULER_STATE_FILE
    base = cfg.model_dump(mode="json")

    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, base=base, space=space, train_runs_path=train_runs),
        {"CPU": TRIAL_DRIVER_CPUS},
    )
    param_space = ss.to_param_space(space)
    restoring = tune.Tuner.can_restore(exp_path)
    log.info("%s experiment %s (%d concurrent trials)", "resuming" if restoring else "starting", exp_path, concurrency)
    if restoring:
        tuner = tune.Tuner.restore(
            exp_path, trainable, resume_unfinished=True, resume_errored=True, param_space=param_space
        )
    else:
        if existed:
            log.info("%s has no Tune state yet (the driver died before Tune saved any); starting it", exp_path)
        _remove_file(scheduler_state)  # rungs of trials that no longer exist
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=cfg.tune.metric,
                mode=cfg.tune.mode,
                num_samples=cfg.tune.num_samples,
                scheduler=build_scheduler(cfg, space, state_path=scheduler_state),
                # The searcher itself limits concurrency (Tune ignores max_concurrent_trials
                # when a search_alg is given).
                search_alg=BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=concurrency),
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=cfg.tune.experiment_name,
                storage_path=exp_path.rsplit("/", 1)[0],
                failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures),
                # Sync the experiment state to storage at every Tune snapshot (~10 s), not
                # every 5 minutes: a rerun after a crash sees finished trials as finished.
                sync_config=tune.SyncConfig(sync_period=1),
                callbacks=[_lazy_class("HistoryCallback")(exp_path)],
                verbose=1,
            ),
        )
    tuner.fit()
    return finalize(cfg, space, exp_path, started=started)


def _remove_file(path: str) -> None:
    fs, target = filesystem(path)
    try:
        fs.delete_file(target)
    except (FileNotFoundError, OSError):
        pass


def finalize(cfg: ExperimentConfig, space: dict[str, dict], exp_path: str, *, started: float | None = None) -> dict:
    """Read the experiment folder, write the table, the plot and `best/`; return the summary."""
    from sentiment_ray.train import publish

    records = collect_trials(exp_path, space, cfg)
    metric, mode = cfg.tune.metric, cfg.tune.mode
    fields = list(space)
    rows = tune_report.trial_rows(records, metric, mode, fields)
    best = tune_report.best_row(rows, metric, mode)
    with tempfile.TemporaryDirectory(prefix="sentiment-ray-tune-") as tmp:
        tune_report.write_table(rows, tmp)
        png = tune_report.render_metric_plot(
            records, metric, title=f"{cfg.tune.experiment_name}: {metric} by step", best_id=best["trial_id"] if best else None
        )
        with open(os.path.join(tmp, tune_report.PLOT_FILE), "wb") as f:
            f.write(png)
        report_html.write_tune_report(tmp, cfg, records, rows, best)  # report.html: curves, table
        publish(tmp, exp_path)
        tracking.finish_tune(cfg, exp_path, tmp, metric=metric, best=best, trials=len(rows))
    print(tune_report.format_table(rows, best_id=best["trial_id"] if best else None), flush=True)
    best_dir = None
    if best is not None:
        record = next(r for r in records if r["trial_id"] == best["trial_id"])
        best_dir = promote_best(exp_path, record, best, metric)
    else:
        log.warning("no trial completed: nothing to promote to %s/%s", exp_path, BEST_DIR)
    counts = {o: sum(1 for r in rows if r["outcome"] == o) for o in tune_report.OUTCOMES}
    return {
        "experiment": exp_path,
        "metric": metric,
        "mode": mode,
        "best_trial": best["trial_id"] if best else None,
        "best_config": next((r["values"] for r in records if best and r["trial_id"] == best["trial_id"]), None),
        "best_metric": best[f"final_{metric}"] if best else None,
        "best_dir": best_dir,
        "trials": len(rows),
        "outcomes": counts,
        "table": exp_path + "/" + tune_report.TABLE_BASENAME + ".csv",
        "plot": exp_path + "/" + tune_report.PLOT_FILE,
        "report": exp_path + "/" + report_html.REPORT_FILE,
        "driver_wall_time_s": round(time.time() - started, 1) if started else None,
    }


def _last_error_line(trial) -> str | None:
    try:
        err = trial.get_error()
    except Exception:  # an unreadable error file must not hide the table
        return "error (details unreadable)" if trial.status == "ERROR" else None
    if err is None:
        return None
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "error"


def _read_history(trial) -> list[dict]:
    fs = trial.storage.storage_filesystem
    path = trial.storage.trial_fs_path.rstrip("/") + "/result.json"
    try:
        with fs.open_input_stream(path) as stream:
            text = stream.read().decode("utf-8")
    except (FileNotFoundError, OSError):
        return [trial.last_result] if trial.last_result else []
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut by a crash
                continue
    return rows


def _history_of(exp_path: str, trial) -> list[dict]:
    """A trial's reports: HistoryCallback's record (every attempt), else Tune's result.json."""
    rows = read_history(exp_path, trial.trial_id)
    return rows if rows is not None else _read_history(trial)


def collect_trials(exp_path: str, space: dict[str, dict], cfg: ExperimentConfig) -> list[dict]:
    """Trial records (see tune_report) from an experiment folder."""
    from ray.tune import ExperimentAnalysis

    from sentiment_ray.train import ADAPTER_DIR, METRICS_FILE

    analysis = ExperimentAnalysis(exp_path, default_metric=cfg.tune.metric, default_mode=cfg.tune.mode)
    base = cfg.model_dump(mode="json")
    fs, fs_base = filesystem(exp_path)
    records = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        values = ss.resolve_trial_values(space, trial.config, base)
        max_steps = values.get("train.max_steps", cfg.train.max_steps)
        run_dir = exp_path + "/" + TRAIN_RUNS_DIR + "/" + trial_run_name(trial.trial_id)
        info = fs.get_file_info(fs_base.rstrip("/") + "/" + TRAIN_RUNS_DIR + "/" + trial_run_name(trial.trial_id) + "/" + METRICS_FILE)
        records.append(
            {
                "trial_id": trial.trial_id,
                "status": trial.status,
                "values": values,
                "sampled": dict(trial.config),
                "max_steps": max_steps,
                "history": _history_of(exp_path, trial),
                "error": _last_error_line(trial) if trial.status == "ERROR" else None,
                "run_dir": run_dir,
                "adapter": run_dir + "/" + ADAPTER_DIR,
                "finished": info.type.name == "File",
            }
        )
    return records


def promote_best(exp_path: str, record: dict, row: dict, metric: str) -> str:
    """Copy the best trial's adapter, metrics.json, manifest.json and validation predictions
    into `<exp>/best/`, with `trial.json` (trial id, values, metric) and `config.yaml` (the
    trial's full config). Replaces an earlier `best/`."""
    import pyarrow.fs

    import yaml

    from sentiment_ray.storage import move_dir
    from sentiment_ray.train import ADAPTER_DIR, MANIFEST_FILE, METRICS_FILE, PREDICTIONS_FILE

    fs, base = filesystem(exp_path)
    run_dir = base.rstrip("/") + "/" + TRAIN_RUNS_DIR + "/" + trial_run_name(record["trial_id"])
    best = base.rstrip("/") + "/" + BEST_DIR
    staging = best + ".partial"
    for path in (staging,):
        if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            fs.delete_dir(path)
    fs.create_dir(staging + "/" + ADAPTER_DIR, recursive=True)
    pyarrow.fs.copy_files(run_dir + "/" + ADAPTER_DIR, staging + "/" + ADAPTER_DIR, source_filesystem=fs, destination_filesystem=fs)
    for name in (METRICS_FILE, MANIFEST_FILE, PREDICTIONS_FILE):
        if fs.get_file_info(run_dir + "/" + name).type == pyarrow.fs.FileType.File:
            fs.copy_file(run_dir + "/" + name, staging + "/" + name)
    config = None
    if fs.get_file_info(run_dir + "/" + MANIFEST_FILE).type == pyarrow.fs.FileType.File:
        with fs.open_input_stream(run_dir + "/" + MANIFEST_FILE) as stream:
            config = json.loads(stream.read().decode("utf-8")).get("config")
    if config is not None:
        with fs.open_output_stream(staging + "/config.yaml") as stream:
            stream.write(yaml.safe_dump(config, sort_keys=False).encode("utf-8"))
    trial_info = {
        "trial_id": record["trial_id"],
        "metric": metric,
        "final": row[f"final_{metric}"],
        "best": row[f"best_{metric}"],
        "best_step": row["best_step"],
        "steps": row["steps"],
        "values": record["values"],
        "run_dir": record["run_dir"],
    }
    with fs.open_output_stream(staging + "/trial.json") as stream:
        stream.write(json.dumps(trial_info, indent=2, sort_keys=True, default=str).encode("utf-8"))
    if fs.get_file_info(best).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(best)
    move_dir(fs, staging, best)  # object stores cannot rename a folder
    return exp_path + "/" + BEST_DIR


def summary_line(summary: dict) -> str:
    """The one JSON line jobs/tune.py ends with."""
    keep = ("experiment", "best_trial", "best_config", "metric", "best_metric", "best_dir", "trials", "outcomes", "table", "plot")
    return json.dumps({k: summary.get(k) for k in keep}, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
