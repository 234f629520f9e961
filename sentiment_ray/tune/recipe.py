"""Hyperparameter search on Ray Tune: one trial = one Ray Train run of the training worker.

    summary = run_tune(load_config("llama31_8b_tune"))   # connects to / starts Ray

The shape follows Ray's Train/Tune interop (`doc/source/train/doc_code/train_tune_interop.py`):
the Tune function trainable (`trial_driver`, a light process that never imports unsloth,
transformers or trl; Ray's TorchTrainer brings torch) builds the training run's `TorchTrainer` (`train.recipe.build_trainer`) with
its own run name, and `TuneReportCallback` forwards every worker report to Tune. The GPU
worker is `train.recipe.train_worker` unchanged: it imports unsloth first, with its own compile
cache (backends.early_import).

The experiment folder `<run.storage_path>/<tune.experiment_name>/` is named in tune/layout.py.

Reporting cadence: every trial evaluates every `train.eval_steps` steps and checkpoints at
the same steps (`train.save_steps` is set to `train.eval_steps`; eval_steps 0 means a quarter
of the shortest `train.max_steps`), so each report carries the metric and ASHA compares
trials at the same steps. ASHA's time unit is the training step:
rungs at `grace_period * eval_steps * reduction_factor**k` steps, up to the largest
`train.max_steps` in the search space. A trial's final report never stops it (it would be
killed while writing its adapter); the result still counts for the rung. The rungs are
saved in the experiment folder and restored with it (Tune restores schedulers empty).

One job at a time: the experiment folder's lock (io/lease.py, as for train and label runs)
is taken before Ray starts and held to the summary; a second job on the same experiment is
refused in one line naming the first, and the lock of a killed job is taken over.

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
import time

from sentiment_ray import cluster, rerun, tracking
from sentiment_ray.config import ConfigError, ExperimentConfig
from sentiment_ray.errors import UserError
from sentiment_ray.io.lease import Lease
from sentiment_ray.io.storage import Storage
from sentiment_ray.report import html, plots
from sentiment_ray.train import layout as train_layout
from sentiment_ray.train.evaluation import flat_validation_metrics
from sentiment_ray.train.recipe import TrainingError, build_trainer, read_run_json
from sentiment_ray.tune import layout, results
from sentiment_ray.tune import search_space as ss
from sentiment_ray.tune.scheduler import build_scheduler, history_callback, read_history

log = logging.getLogger(__name__)

# The Tune trial actor only drives a TorchTrainer; it needs no real CPU. A small non-zero
# amount because Tune's placement group needs a non-empty bundle.
TRIAL_DRIVER_CPUS = 0.01
# Sections whose change makes an existing experiment a different experiment.
_EXPERIMENT_SECTIONS = ("model", "lora", "prompt", "data", "train", "tune")
# Reports per trial (of the shortest max_steps) when train.eval_steps is 0.
DEFAULT_REPORTS_PER_TRIAL = 4


class TuneError(UserError, RuntimeError):
    pass


# ============================================================================ paths


def experiment_path(cfg: ExperimentConfig) -> str:
    return layout.experiment_path(cfg.run.storage_path, cfg.tune.experiment_name)


def trial_dirname(trial) -> str:
    """Tune's folder of a trial (`trial_dirname_creator`)."""
    return f"trial_{trial.trial_id}"


# ============================================================================ config


def prepare(cfg: ExperimentConfig) -> tuple[ExperimentConfig, dict[str, dict]]:
    """Validate a config for tuning; return (the config trials start from, the search space).

    The config's own validation (TuneConfig) checked the search space's shape and the
    metric; here: a search space to tune, a validation split (every report must carry the
    metric), and every value the space can produce (search_space.validate_search_space).
    Sets the reporting cadence: `train.eval_steps`, or (0) the shortest possible
    `train.max_steps` // DEFAULT_REPORTS_PER_TRIAL; and `train.save_steps` to it
    (checkpoints at the reporting cadence)."""
    if not cfg.tune.search_space:
        raise ConfigError("tune.search_space is empty: add at least one field to search")
    d = cfg.data
    if not d.validation_path and d.validation_dataset is None and d.validation_fraction <= 0:
        raise ConfigError(
            "tuning needs a validation split: set data.validation_path, data.validation_dataset or data.validation_fraction > 0"
        )
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
    experiment = Storage(exp_path)
    current = _experiment_fingerprint(cfg)
    previous = experiment.read_json_or_none(layout.STATE_FILE)
    if previous is not None:
        recorded = {section: previous["config"].get(section, {}) for section in _EXPERIMENT_SECTIONS}
        changed = rerun.changes(recorded, current)
        if changed:
            raise TuneError(
                f"{exp_path} holds an experiment started with a different config: {'; '.join(changed)}. "
                "Rerun with the original config to resume it, or choose another tune.experiment_name"
            )
        return True
    experiment.write_json(layout.STATE_FILE, {"config": current, "created": time.time()})
    return False


# ============================================================================ trial


def trial_driver(config: dict, base: dict, space: dict, train_runs_path: str) -> None:
    """The Tune function trainable: one Ray Train run of the trial's config. Runs in a
    light Tune actor: no unsloth/transformers import here (the Train worker does those)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = ss.trial_experiment_config(base, space, config)
    finished = finished_run_report(train_runs_path + "/" + layout.trial_run_name(trial_id), cfg.train.max_steps)
    if finished is not None:
        # The run finished before the last driver died, but Tune had not recorded the
        # trial as done: report its final metrics instead of resuming it.
        ray.tune.report(finished)
        return
    trainer = build_trainer(
        cfg,
        run_name=layout.trial_run_name(trial_id),
        storage_path=train_runs_path,
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def finished_run_report(run_dir: str, max_steps: int) -> dict | None:
    """The final report of a Train run that finished (metrics.json with global_step >=
    max_steps), in the shape the worker reports; None if it did not finish."""
    try:
        metrics = read_run_json(run_dir, train_layout.METRICS_FILE)
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
    best adapter. Returns the summary of `finalize` (the tune job prints `json_summary` of it).
    `num_cpus`: logical CPUs of a local cluster this call starts (ignored when joining one)."""
    import ray

    started = time.time()
    cfg, space = prepare(cfg)
    exp_path = experiment_path(cfg)
    # Held from before Ray starts to the summary: two jobs on one experiment would run the
    # same trial ids into the same folders (one refused here, naming the other).
    with experiment_lease(exp_path) as lease:
        cluster.connect(cfg.run.ray_address, num_cpus=num_cpus)
        use_gpu = cluster.resolve_use_gpu(cfg.run.use_gpu)
        if cfg.model.backend == "unsloth" and not use_gpu:
            raise TuneError("model.backend=unsloth needs GPU workers, but run.use_gpu resolved to false")
        concurrency = max_concurrent_trials(cfg, ray.cluster_resources(), use_gpu)
        cfg = _fit(cfg, space, exp_path, concurrency)
        lease.check()
        return finalize(cfg, space, exp_path, started=started)


def experiment_lease(exp_path: str) -> Lease:
    """The experiment folder's lock (io/lease.py, as for train and label runs): one job at a
    time runs, resumes or reports an experiment; a killed job's lock is taken over."""
    return Lease(Storage(exp_path), purpose="tune")


def report_only(cfg: ExperimentConfig) -> dict:
    """`finalize` of an existing experiment (`--report-only`), under its lock."""
    cfg, space = prepare(cfg)
    exp_path = experiment_path(cfg)
    with experiment_lease(exp_path) as lease:
        summary = finalize(cfg, space, exp_path)
        lease.check()
        return summary


def _fit(cfg: ExperimentConfig, space: dict[str, dict], exp_path: str, concurrency: int) -> ExperimentConfig:
    """Run or restore the Tune experiment in `exp_path` until every trial has ended; returns
    the config with its tracking parent run (what `finalize` closes)."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    existed = check_experiment_state(exp_path, cfg)
    cfg = tracking.start_tune(cfg, exp_path, space)  # MLflow parent run; trials nest under it
    train_runs = exp_path + "/" + layout.TRAIN_RUNS_DIR
    base = cfg.model_dump(mode="json")

    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, base=base, space=space, train_runs_path=train_runs),
        {"CPU": TRIAL_DRIVER_CPUS},
    )
    param_space = ss.to_param_space(space)
    restoring = tune.Tuner.can_restore(exp_path)
    log.info("%s experiment %s (%d concurrent trials)", "resuming" if restoring else "starting", exp_path, concurrency)
    if restoring:
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True, param_space=param_space)
    else:
        if existed:
            log.info("%s has no Tune state yet (the driver died before Tune saved any); starting it", exp_path)
        Storage(exp_path).delete(layout.SCHEDULER_STATE_FILE, missing_ok=True)  # rungs of trials that no longer exist
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=cfg.tune.metric,
                mode=cfg.tune.mode,
                num_samples=cfg.tune.num_samples,
                scheduler=build_scheduler(cfg, space, experiment=exp_path),
                # The searcher itself limits concurrency (Tune ignores max_concurrent_trials
                # when a search_alg is given).
                search_alg=BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=concurrency),
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=cfg.tune.experiment_name,
                storage_path=exp_path.rsplit("/", 1)[0],
                failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures),
                # Sync the experiment state to storage at every Tune snapshot, not every 5
                # minutes: a rerun after a crash sees finished trials as finished.
                sync_config=tune.SyncConfig(sync_period=1),
                callbacks=[history_callback(exp_path)],
                verbose=1,
            ),
        )
    tuner.fit()
    return cfg


def finalize(cfg: ExperimentConfig, space: dict[str, dict], exp_path: str, *, started: float | None = None) -> dict:
    """Read the experiment folder, write the table, the plot and `best/`; return the summary."""
    records = collect_trials(exp_path, space, cfg)
    metric, mode = cfg.tune.metric, cfg.tune.mode
    rows = results.trial_rows(records, metric, mode, list(space))
    best = results.best_row(rows, metric, mode)
    best_id = best["trial_id"] if best else None
    experiment = Storage(exp_path)
    results.write_table(rows, experiment, layout.TABLE_CSV, layout.TABLE_PARQUET)
    png = plots.render_metric_plot(records, metric, title=f"{cfg.tune.experiment_name}: {metric} by step", best_id=best_id)
    experiment.write_bytes(layout.PLOT_FILE, png)
    page = html.tune_report_html(
        records, rows, metric=metric, mode=mode, best=best, title=f"Tune experiment {cfg.tune.experiment_name}"
    )
    experiment.write_text(layout.REPORT_FILE, page)
    report_files = (layout.TABLE_CSV, layout.TABLE_PARQUET, layout.PLOT_FILE, layout.REPORT_FILE)
    tracking.finish_tune(cfg, exp_path, experiment, report_files, metric=metric, best=best, trials=len(rows))
    print(results.format_table(rows, best_id=best_id), flush=True)
    best_dir = None
    if best is not None:
        record = next(r for r in records if r["trial_id"] == best_id)
        best_dir = promote_best(exp_path, record, best, metric)
    else:
        log.warning("no trial completed: nothing to promote to %s/%s", exp_path, layout.BEST_DIR)
    counts = {o: sum(1 for r in rows if r["outcome"] == o) for o in results.OUTCOMES}
    return {
        "experiment": exp_path,
        "metric": metric,
        "mode": mode,
        "best_trial": best_id,
        "best_config": next((r["values"] for r in records if best and r["trial_id"] == best_id), None),
        "best_metric": best[f"final_{metric}"] if best else None,
        "best_dir": best_dir,
        "trials": len(rows),
        "outcomes": counts,
        "table": exp_path + "/" + layout.TABLE_CSV,
        "plot": exp_path + "/" + layout.PLOT_FILE,
        "report": exp_path + "/" + layout.REPORT_FILE,
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


def _tune_result_history(trial) -> list[dict]:
    """Tune's own record of a trial's reports (its result.json)."""
    fs = trial.storage.storage_filesystem
    path = trial.storage.trial_fs_path.rstrip("/") + "/" + layout.TUNE_RESULT_FILE
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
    return rows if rows is not None else _tune_result_history(trial)


def collect_trials(exp_path: str, space: dict[str, dict], cfg: ExperimentConfig) -> list[dict]:
    """Trial records (see tune/results.py) from an experiment folder."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(exp_path, default_metric=cfg.tune.metric, default_mode=cfg.tune.mode)
    base = cfg.model_dump(mode="json")
    experiment = Storage(exp_path)
    records = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        values = ss.resolve_trial_values(space, trial.config, base)
        run = layout.trial_run_dir(trial.trial_id)
        records.append(
            {
                "trial_id": trial.trial_id,
                "status": trial.status,
                "values": values,
                "sampled": dict(trial.config),
                "max_steps": values.get("train.max_steps", cfg.train.max_steps),
                "history": _history_of(exp_path, trial),
                "error": _last_error_line(trial) if trial.status == "ERROR" else None,
                "run_dir": experiment.path(run),
                "adapter": experiment.path(run, train_layout.ADAPTER_DIR),
                "finished": experiment.is_file(f"{run}/{train_layout.METRICS_FILE}"),
            }
        )
    return records


def promote_best(exp_path: str, record: dict, row: dict, metric: str) -> str:
    """Copy the best trial's adapter, metrics.json, manifest.json and validation predictions
    into `<exp>/best/`, with `trial.json` (trial id, values, metric) and `config.yaml` (the
    trial's full config). Replaces an earlier `best/` (staged, then moved into place)."""
    import yaml

    experiment = Storage(exp_path)
    run = layout.trial_run_dir(record["trial_id"])
    staging = layout.BEST_STAGING_DIR
    experiment.delete_dir(staging)
    experiment.copy_dir(f"{run}/{train_layout.ADAPTER_DIR}", f"{staging}/{train_layout.ADAPTER_DIR}")
    for name in train_layout.RESULT_FILES:
        if experiment.is_file(f"{run}/{name}"):
            experiment.copy_file(f"{run}/{name}", f"{staging}/{name}")
    manifest = experiment.read_json_or_none(f"{run}/{train_layout.MANIFEST_FILE}")
    if manifest and manifest.get("config") is not None:
        experiment.write_text(f"{staging}/{layout.BEST_CONFIG_FILE}", yaml.safe_dump(manifest["config"], sort_keys=False))
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
    experiment.write_json(f"{staging}/{layout.BEST_TRIAL_FILE}", trial_info)
    experiment.delete_dir(layout.BEST_DIR)
    experiment.move_dir(staging, layout.BEST_DIR)  # object stores cannot rename a folder
    return experiment.path(layout.BEST_DIR)


def json_summary(summary: dict) -> dict:
    """What the tune job's JSON line holds (a metric that is not a finite number: null)."""
    keep = (
        "experiment",
        "best_trial",
        "best_config",
        "metric",
        "best_metric",
        "best_dir",
        "trials",
        "outcomes",
        "table",
        "plot",
        "report",
    )
    shown = {k: summary.get(k) for k in keep}
    if isinstance(shown["best_metric"], float) and not math.isfinite(shown["best_metric"]):
        shown["best_metric"] = None
    return shown
