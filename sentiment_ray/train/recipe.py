"""Fine-tuning on Ray Train: the driver (`run_training`, `build_trainer`) and the worker
function (`train_worker`), each read top to bottom as its steps.

    summary = run_training(load_config("demo"))      # connects to / starts Ray, trains, returns a summary

A run lives in `<run.storage_path>/<run.name>/` (train/layout.py names its files).
Rerunning with the same run name and storage path resumes from the run's latest checkpoint
(Ray Train restores its checkpoint list from the run folder; the worker hands the checkpoint
to the HF Trainer as `resume_from_checkpoint`), if what defines the run did not change
(train/fingerprint.py); `new_run` starts over. One job at a time writes a run folder
(io/lease.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from sentiment_ray import backends, base_identity, cluster, compat, languages, provenance, risk, tracking
from sentiment_ray.backends.base import gradient_checkpointing_for
from sentiment_ray.calibration import CALIBRATION_FILE
from sentiment_ray.config import ExperimentConfig, validate
from sentiment_ray.errors import UserError
from sentiment_ray.io.lease import Lease
from sentiment_ray.io.storage import Storage
from sentiment_ray.labels import LabelSet
from sentiment_ray.prompts import PromptTemplate
from sentiment_ray.report import html
from sentiment_ray.scoring import LabelScorer
from sentiment_ray.terminal import faults
from sentiment_ray.terminal.console import WorkerEvents
from sentiment_ray.train import layout, preflight
from sentiment_ray.train.batching import BatchPlan
from sentiment_ray.train.data import Splits, build_train_dataset, load_splits
from sentiment_ray.train.evaluation import (
    calibrate_scores,
    data_profile,
    evaluate_split,
    language_changes,
    language_drop_likelihoods,
    predictions_table,
    risk_scores,
    worse_languages_line,
)
from sentiment_ray.train.fingerprint import RunChanged, check_or_record
from sentiment_ray.train.observer import LoggedTraining, TrainingObserver
from sentiment_ray.train.progress import progress_callback
from sentiment_ray.train.trainer import (
    FAIL_AT_STEP_ENV,
    build_sft_config,
    build_sft_trainer,
    checkpoint_every,
    plan_batches,
    report_callback_class,
    restore_checkpoint,
)
from sentiment_ray.weights import UnsafeWeightsError, check_model_source

log = logging.getLogger(__name__)

# Ray Train turns every print() in a worker into a log record, even prints that a library
# captures by swapping sys.stdout (dill's bytecode dumps while `datasets` hashes TRL's map
# functions would flood the log); plain stdout still reaches the driver.
_TRAIN_WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


class TrainingError(UserError, RuntimeError):
    pass


class RunDefinitionChanged(TrainingError, RunChanged):
    """A rerun would resume a run trained with other settings (train/fingerprint.py)."""


def run_dir_of(cfg: ExperimentConfig) -> str:
    return layout.run_dir(cfg.run.storage_path, cfg.run.name)


# ============================================================================ driver


def run_training(cfg: ExperimentConfig, *, observer: TrainingObserver | None = None, new_run: bool = False) -> dict:
    """Train one run on Ray and return its summary: run dir, adapter path, backend, device,
    zero-shot and fine-tuned validation accuracy / macro-F1, train loss, steps, wall time.

    The model and data are checked before anything is written or started (DataError /
    ModelNotFoundError / TrainingError). The run folder is locked while this job trains it.
    The run's latest checkpoint is resumed unless `new_run` (which discards the folder's
    checkpoints and outputs first); a resume whose settings changed is refused
    (RunDefinitionChanged). Raises ray.train.TrainingFailedError when the workers fail more
    than run.max_failures times. `observer` (train/observer.py) is told the run's moments:
    a terminal shows them to a person; by default they are logged."""
    started = time.time()
    observer = observer or LoggedTraining()
    checked = check_model_and_data(cfg)
    run = Storage(run_dir_of(cfg))
    with Lease(run, purpose="train") as lease:
        claim_run_folder(cfg, run, new_run=new_run)
        observer.run_started(cfg, run_dir_of(cfg), checked)
        connect_cluster(cfg, observer)
        result = fit(cfg, observer)
        lease.check()
    return finished_summary(cfg, result, started)


def check_model_and_data(cfg: ExperimentConfig) -> preflight.Checked:
    """The driver's checks, before anything is written or started."""
    try:
        check_model_source(cfg.model.name, allow_unsafe=cfg.model.allow_unsafe_weights)
    except UnsafeWeightsError as err:
        raise TrainingError(f"model.name {err}") from None
    return preflight.check_run(cfg)


def claim_run_folder(cfg: ExperimentConfig, run: Storage, *, new_run: bool) -> None:
    """Under the run folder's lock: start over if asked, then record what defines the run
    or refuse a resume whose definition changed."""
    if new_run:
        start_over(run)
    try:
        check_or_record(cfg, run)
    except RunChanged as err:
        raise RunDefinitionChanged(str(err)) from None


def connect_cluster(cfg: ExperimentConfig, observer: TrainingObserver) -> None:
    observer.cluster_starting(cfg)
    cluster.connect(cfg.run.ray_address)
    observer.cluster_started()


def fit(cfg: ExperimentConfig, observer: TrainingObserver):
    """Ray Train's fit of the run: its Result (the latest checkpoint)."""
    trainer = build_trainer(cfg, progress_events=observer.wants_events)
    observer.training_started(run_dir_of(cfg))
    result = trainer.fit()
    if faults.interrupted():
        # Ray Train's own SIGINT handler aborts the run gracefully: not a finished run.
        raise KeyboardInterrupt
    return result


def finished_summary(cfg: ExperimentConfig, result, started: float) -> dict:
    """The run's summary (run_summary) with the driver's wall time and the checkpoint Ray
    Train registered last."""
    summary = run_summary(run_dir_of(cfg))
    if summary["languages_warning"]:
        log.warning("%s", summary["languages_warning"])
    summary["driver_wall_time_s"] = round(time.time() - started, 1)
    summary["latest_checkpoint"] = getattr(result.checkpoint, "path", None)
    return summary


def start_over(run: Storage) -> None:
    """Remove what earlier attempts left in the run folder (checkpoints, Ray Train's state,
    the outputs, the recorded definition); the lock and MLflow's history stay."""
    for name in run.list_dirs():
        if name not in layout.KEPT_BY_NEW_RUN:
            run.delete_dir(name)
    for name in run.list_names():
        if name not in layout.KEPT_BY_NEW_RUN:
            run.delete(name, missing_ok=True)


def build_trainer(
    cfg: ExperimentConfig,
    *,
    run_name: str | None = None,
    storage_path: str | None = None,
    callbacks: list | None = None,
    progress_events: bool = False,
):
    """A Ray Train `TorchTrainer` for one training run (Ray must be connected: the GPU
    count decides `use_gpu: auto`). Tune trials call this with their own run name /
    storage path and pass `ray.tune.integration.ray_train.TuneReportCallback()` in
    `callbacks`, so every worker report (train/trainer.py) reaches Tune. With
    `progress_events` rank 0 prints phase and step events for the driver's terminal."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = cfg.model_copy(deep=True)
    if run_name is not None:
        cfg.run.name = run_name
    cfg.run.storage_path = layout.absolute_storage_path(storage_path or cfg.run.storage_path)
    cfg = tracking.for_workers(cfg)  # the driver's MLFLOW_TRACKING_URI reaches every node
    use_gpu = cluster.resolve_use_gpu(cfg.run.use_gpu)
    if cfg.model.backend == "unsloth" and not use_gpu:
        raise TrainingError(
            "model.backend=unsloth needs GPU workers, but run.use_gpu resolved to false "
            f"(run.use_gpu={cfg.run.use_gpu}, cluster GPUs: {cluster.cluster_gpu_count()})"
        )
    resources = {"CPU": cfg.run.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    payload = {
        "config": cfg.model_dump(mode="json"),
        "git_commit": provenance.git_commit(),
        "fail_at_step": int(os.environ[FAIL_AT_STEP_ENV]) if os.environ.get(FAIL_AT_STEP_ENV) else None,
        "progress_events": progress_events,
    }
    return TorchTrainer(
        train_worker,
        train_loop_config=payload,
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            worker_runtime_env={"env_vars": dict(_TRAIN_WORKER_ENV)},
            callbacks=callbacks,
        ),
    )


def read_run_json(run_dir: str, name: str) -> dict:
    data = Storage(run_dir).read_json_or_none(name)
    if data is None:
        raise TrainingError(f"{run_dir}/{name} is missing: the training worker did not finish writing its outputs")
    return data


def run_summary(run_dir: str) -> dict:
    """The short view of a finished run's metrics.json (what jobs/train.py prints)."""
    metrics = read_run_json(run_dir, layout.METRICS_FILE)

    def brief(report: dict | None) -> dict | None:
        if not report:
            return None
        return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "n": report["n"]}

    train = metrics.get("train", {})
    calibration = metrics.get("calibration") or {}
    return {
        "run_dir": run_dir,
        "adapter": run_dir.rstrip("/") + "/" + layout.ADAPTER_DIR,
        "backend": metrics.get("backend"),
        "device": metrics.get("device"),
        "zero_shot": brief(metrics.get("zero_shot")),
        "fine_tuned": brief(metrics.get("fine_tuned")),
        "train_loss": train.get("loss_last"),
        "steps": train.get("global_step"),
        "resumed_from_step": train.get("resumed_from_step"),
        "train_tokens_per_s": train.get("tokens_per_second"),
        "worker_wall_time_s": metrics.get("wall_time_s"),
        "calibration": {k: calibration.get(k) for k in ("temperature", "ece_before", "ece_after")} if calibration else None,
        "languages_made_worse": [c["lang"] for c in metrics.get("languages", []) if c["worse"]],
        "languages_warning": worse_languages_line(metrics.get("languages", [])),
    }


# ============================================================================ worker


@dataclass
class Attempt:
    """One worker's view of one attempt at a run (Ray Train retries and reruns are new attempts)."""

    cfg: ExperimentConfig
    payload: dict
    backend_name: str
    device: Any
    rank: int
    world_size: int
    started: float
    scratch: str  # worker-local; removed at the end
    resumed_from: int = 0
    tracker: Any = None  # rank 0's MLflow run (sentiment_ray.tracking), or None
    events: WorkerEvents = field(default_factory=lambda: WorkerEvents(False))  # for the driver's terminal (rank 0)
    labels: LabelSet = field(init=False)
    template: PromptTemplate = field(init=False)

    def __post_init__(self) -> None:
        self.labels = LabelSet(self.cfg.prompt.labels)
        self.template = PromptTemplate.from_config(self.cfg.prompt)

    @property
    def run_dir(self) -> str:
        return run_dir_of(self.cfg)

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    def local(self, *parts: str) -> str:
        return os.path.join(self.scratch, *parts)


@dataclass
class LoadedModel:
    """The model with fresh LoRA adapters, the backend that loaded it (and saves its
    adapter) and how this worker cuts its share of the global batch to fit the device."""

    backend: Any
    model: Any
    tokenizer: Any
    batches: BatchPlan


@dataclass
class Resume:
    """Where this attempt starts: the HF checkpoint folder restored into the trainer's
    output folder (None: from step 0) and the run state saved with it."""

    output_dir: str
    checkpoint_path: str | None
    state: dict


@dataclass
class ZeroShot:
    """The base model's validation report and predictions (None: not scored)."""

    report: dict | None = None
    predicted: list | None = None


@dataclass
class Trained:
    """What training left: the HF trainer (its state), its output, its wall time and the
    report callback (its evaluations, the best step, the scores of the last one)."""

    trainer: Any
    output: Any
    seconds: float
    reporter: Any


@dataclass
class Evaluated:
    """The kept adapter's validation scores, the temperature that calibrates them, the
    calibration rows' confidences for risk control, and the per-language drop likelihoods.
    All empty without validation rows."""

    fine_tuned: dict | None = None
    scores: Any = None
    calibrated: Any = None
    calibration: dict | None = None
    risk_record: dict | None = None
    drop_likelihood: dict[str, float] = field(default_factory=dict)


def train_worker(payload: dict) -> None:
    """The Ray Train worker function. `payload`: {"config": cfg dict, "git_commit": str |
    None, "fail_at_step": int | None, "progress_events": bool}, as build_trainer makes it."""
    cfg = validate(payload["config"], source="train_worker payload")
    backend_name = backends.resolve_backend_name(cfg.model.backend)
    backends.early_import(backend_name)  # before anything below imports transformers/trl/peft

    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    attempt = Attempt(
        cfg=cfg,
        payload=payload,
        backend_name=backend_name,
        device=ray.train.torch.get_device(),
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        started=time.time(),
        scratch=tempfile.mkdtemp(prefix=f"sentiment-ray-{cfg.run.name}-rank{context.get_world_rank()}-"),
        events=WorkerEvents(bool(payload.get("progress_events")) and context.get_world_rank() == 0),
    )
    attempt.events.forward_warnings()
    try:
        train_attempt(attempt)
    except BaseException:
        tracking.end_failed(attempt.tracker)
        raise
    finally:
        shutil.rmtree(attempt.scratch, ignore_errors=True)


def train_attempt(attempt: Attempt) -> None:
    """One worker's attempt. Every rank trains (DDP); rank 0 alone scores the validation
    split and writes, then publishes, the outputs."""
    splits = load_data(attempt)
    loaded = load_model(attempt)
    resume = restore_if_resuming(attempt)
    scorer = validation_scorer(attempt, loaded, splits)
    zero_shot = score_zero_shot(attempt, scorer, splits, resume)
    trained = train(attempt, loaded, splits, scorer, zero_shot, resume)
    if not attempt.is_rank_zero:
        return
    outputs = attempt.local("outputs")
    os.makedirs(outputs)
    evaluated = evaluate_and_calibrate(attempt, loaded, trained, scorer, splits, zero_shot)
    profile = save_adapter_and_records(attempt, loaded, splits, evaluated, outputs)
    training = training_stats(attempt, trained, loaded.batches)
    write_reports(
        Storage(outputs),
        attempt,
        splits,
        zero_shot.report,
        evaluated.fine_tuned,
        training,
        evaluated.calibration,
        evaluated.drop_likelihood,
        profile=profile,
        risk_control=risk.summary(evaluated.risk_record) if evaluated.risk_record else None,
    )
    tracking.finish_training(attempt.tracker, outputs, zero_shot.report, evaluated.fine_tuned, training)
    publish(attempt, outputs)


def load_data(attempt: Attempt) -> Splits:
    """The training and validation splits. Only rank 0 writes quarantine files where the
    config / run folder says; other ranks (reading the same rows) keep theirs in their
    scratch folder."""
    where = attempt.run_dir if attempt.is_rank_zero else attempt.scratch
    return load_splits(attempt.cfg, attempt.labels, where, attempt.is_rank_zero)


def load_model(attempt: Attempt) -> LoadedModel:
    """The model with fresh LoRA adapters, and the global batch cut to fit this device."""
    import torch

    cfg, device = attempt.cfg, attempt.device
    if device.type == "cpu":
        log.info("training on CPU with %d torch threads (run.cpus_per_worker sets them)", torch.get_num_threads())
    attempt.events.phase(f"loading {cfg.model.name} ({attempt.backend_name} backend, {device})")
    backend = backends.get_backend(attempt.backend_name)
    model, tokenizer = backend.load_for_training(cfg, device)
    return LoadedModel(backend, model, tokenizer, plan_batches(cfg, model, device, attempt.backend_name))


def restore_if_resuming(attempt: Attempt) -> Resume:
    """The checkpoint to resume from: one exists when this run resumes (same name and
    storage) or Ray retried it. Rank 0 also starts its MLflow run here, so a resumed run
    records the step it resumed from."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    output_dir = attempt.local("hf")
    path, state = restore_checkpoint(checkpoint, output_dir) if checkpoint else (None, {})
    attempt.resumed_from = state.get("global_step", 0)
    attempt.tracker = tracking.start_training(attempt.cfg, attempt.run_dir) if attempt.is_rank_zero else None
    return Resume(output_dir, path, state)


def validation_scorer(attempt: Attempt, loaded: LoadedModel, splits: Splits) -> LabelScorer | None:
    """Rank 0's scorer of the validation split; None on other ranks or without validation rows."""
    if not attempt.is_rank_zero or not splits.validation.num_rows:
        return None
    cfg = attempt.cfg
    return LabelScorer(
        loaded.model, loaded.tokenizer, attempt.template, attempt.labels, cfg.model.max_seq_length, cfg.train.eval_batch_size
    )


def score_zero_shot(attempt: Attempt, scorer: LabelScorer | None, splits: Splits, resume: Resume) -> ZeroShot:
    """The base model on the validation split, scored before the first step (the adapter is
    freshly initialised, LoRA B = 0: the model still computes the base model). A resumed
    run's checkpoint carries the first attempt's."""
    carried = ZeroShot(resume.state.get("zero_shot"), resume.state.get("zero_shot_predicted"))
    if carried.report is not None or scorer is None or not attempt.cfg.train.zero_shot_eval or resume.checkpoint_path:
        return carried
    attempt.events.phase(f"zero-shot scoring {splits.validation.num_rows} validation rows")
    report, scores = evaluate_split(scorer, splits.validation)
    return ZeroShot(report, scores.predicted())  # the predictions: for the per-language comparison at the end


def train(
    attempt: Attempt, loaded: LoadedModel, splits: Splits, scorer: LabelScorer | None, zero_shot: ZeroShot, resume: Resume
) -> Trained:
    """The HF trainer's run from the checkpoint (or step 0) to train.max_steps; the report
    callback evaluates, checkpoints and reports to Ray Train."""
    import torch

    cfg, device = attempt.cfg, attempt.device
    reporter = report_callback_class()(
        cfg,
        scorer=scorer,
        validation=splits.validation,
        is_rank_zero=attempt.is_rank_zero,
        run_state={"zero_shot": zero_shot.report, "zero_shot_predicted": zero_shot.predicted},
        fail_at_step=attempt.payload.get("fail_at_step") if not resume.checkpoint_path else None,
    )
    trainer = build_sft_trainer(
        loaded.model,
        build_sft_config(cfg, device, resume.output_dir, attempt.world_size, loaded.batches),
        build_train_dataset(cfg, splits.train, loaded.tokenizer, attempt.template, attempt.labels),
        loaded.tokenizer,
        callbacks=[
            # First: at the last step it announces the scoring the reporter then does.
            progress_callback(
                attempt.events,
                checkpoint_every=checkpoint_every(cfg),
                validation_rows=splits.validation.num_rows if scorer else 0,
                eval_steps=cfg.train.eval_steps,
            ),
            reporter,
            *tracking.training_callbacks(attempt.tracker, reporter),
        ],
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.time()
    output = trainer.train(resume_from_checkpoint=resume.checkpoint_path)
    return Trained(trainer, output, time.time() - started, reporter)


def evaluate_and_calibrate(
    attempt: Attempt, loaded: LoadedModel, trained: Trained, scorer: LabelScorer | None, splits: Splits, zero_shot: ZeroShot
) -> Evaluated:
    """The adapter to keep (the best evaluation's with train.keep_best), its validation
    scores (the callback scored the last step unless this attempt trained no step), and the
    temperature that calibrates its probabilities."""
    if scorer is None:
        return Evaluated()
    cfg, reporter, labels = attempt.cfg, trained.reporter, attempt.labels
    if cfg.train.keep_best and reporter.restore_best(loaded.model):
        fine_tuned, scores = evaluate_split(scorer, splits.validation)
    elif reporter.last_eval_step == trained.trainer.state.global_step:
        fine_tuned, scores = reporter.last_eval, reporter.last_scores
    else:
        attempt.events.phase(f"fine-tuned scoring {splits.validation.num_rows} validation rows")
        fine_tuned, scores = evaluate_split(scorer, splits.validation)
    evaluated = Evaluated(fine_tuned, scores)
    if cfg.train.calibrate:
        evaluated.calibration, evaluated.fine_tuned, evaluated.calibrated = calibrate_scores(
            splits.validation, scores, labels, fine_tuned
        )
        calibration = evaluated.calibration
        if calibration["applied"]:
            log.info(
                "calibration: temperature %.3f, validation ECE %.3f -> %.3f (out-of-fold)",
                calibration["temperature"],
                calibration["ece_before"],
                calibration["ece_after"],
            )
        else:
            log.info(
                "calibration: no temperature lowers the out-of-fold NLL on %d rows; probabilities kept as they are",
                calibration["rows"],
            )
    # The calibrated confidences and whether each was right: what a label job certifies its
    # label.max_error on.
    temperature = evaluated.calibration["temperature"] if evaluated.calibration else 1.0
    evaluated.risk_record = risk_scores(splits.validation, evaluated.calibrated or scores, temperature)
    if zero_shot.predicted:
        evaluated.drop_likelihood = language_drop_likelihoods(splits.validation, zero_shot.predicted, scores.predicted(), labels)
    return evaluated


def save_adapter_and_records(attempt: Attempt, loaded: LoadedModel, splits: Splits, evaluated: Evaluated, outputs: str) -> dict:
    """Into the attempt's outputs folder: the validation predictions, the adapter and what
    travels with it (its base, calibration, risk-control scores, data profile). Returns the
    data profile."""
    if evaluated.scores is not None:
        import pyarrow.parquet as pq

        pq.write_table(
            predictions_table(splits.validation, evaluated.scores, evaluated.calibrated),
            os.path.join(outputs, layout.PREDICTIONS_FILE),
        )
    attempt.events.phase("saving the adapter, metrics and predictions")
    loaded.backend.save_adapter(loaded.model, loaded.tokenizer, os.path.join(outputs, layout.ADAPTER_DIR))
    adapter_folder = Storage(os.path.join(outputs, layout.ADAPTER_DIR))
    # The base it was trained on: labelling and export refuse the adapter on another.
    adapter_folder.write_json(base_identity.BASE_FILE, base_identity.identify(attempt.cfg.model.name))
    if evaluated.calibration is not None:
        adapter_folder.write_json(CALIBRATION_FILE, evaluated.calibration)
    if evaluated.risk_record is not None:
        adapter_folder.write_json(risk.RISK_FILE, evaluated.risk_record)
    profile = data_profile(splits.train, splits.validation)
    adapter_folder.write_json(languages.PROFILE_FILE, profile)
    return profile


def publish(attempt: Attempt, outputs: str) -> None:
    """The outputs into the run folder (local or URI)."""
    Storage(attempt.run_dir).upload_dir(outputs)


def training_stats(attempt: Attempt, trained: Trained, batches: BatchPlan) -> dict:
    """metrics.json's `train` section: steps, losses, throughput, the best evaluation, the
    HF log history, how the global batch was cut."""
    reporter, trainer = trained.reporter, trained.trainer
    eval_seconds = reporter.eval_seconds
    state = trainer.state
    tokens = state.num_input_tokens_seen - compat.tokens_seen_before_this_attempt(trainer)
    step_wall = max(trained.seconds - eval_seconds, 1e-9)  # optimizer steps + checkpoints
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    return {
        "global_step": state.global_step,
        "max_steps": attempt.cfg.train.max_steps,
        "optimizer": getattr(trainer.args.optim, "value", trainer.args.optim),
        "resumed_from_step": attempt.resumed_from,
        "steps_this_attempt": state.global_step - attempt.resumed_from,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_mean_last_10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "train_runtime_s": round(trained.seconds, 2),
        "eval_in_training_s": round(eval_seconds, 2),
        "tokens_this_attempt": int(tokens),
        # Non-padding tokens per second of training (validation scoring excluded).
        "tokens_per_second": round(tokens / step_wall, 1) if tokens else None,
        "best_step": reporter.best_step,
        "best_val_macro_f1": reporter.best_macro_f1,
        "kept": "best" if attempt.cfg.train.keep_best and reporter.best_step is not None else "last",
        "stopped_early_at_step": reporter.stopped_early_at,
        "hf_train_metrics": trained.output.metrics,
        "log_history": state.log_history,
        "gradient_checkpointing": gradient_checkpointing_for(attempt.cfg, attempt.device),
        "batches": {
            "global_batch_size": attempt.world_size * batches.rows_per_step,
            "micro_batch_size": batches.micro_batch_size,
            "gradient_accumulation_steps": batches.gradient_accumulation_steps,
            "chosen_by": batches.chosen_by,
        },
    }


def write_reports(
    outputs: Storage,
    attempt: Attempt,
    splits: Splits,
    zero_shot,
    fine_tuned,
    training: dict,
    calibration,
    drop_likelihood: dict[str, float],
    *,
    profile: dict | None = None,
    risk_control: dict | None = None,
) -> None:
    """metrics.json, report.html and manifest.json into the attempt's outputs folder."""
    import torch

    cfg, device = attempt.cfg, attempt.device
    cuda = device.type == "cuda"
    metrics = {
        "run_name": cfg.run.name,
        "backend": attempt.backend_name,
        "device": str(device),
        "world_size": attempt.world_size,
        "rows": {"train": splits.train.num_rows, "validation": splits.validation.num_rows, "bad_rows": splits.bad_rows},
        "zero_shot": zero_shot,
        "fine_tuned": fine_tuned,
        "calibration": calibration,
        "risk_control": risk_control,
        "data_profile": profile,
        "languages": language_changes(zero_shot, fine_tuned, drop_likelihood),
        "train": training,
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if cuda else None,
        "wall_time_s": round(time.time() - attempt.started, 1),
    }
    outputs.write_json(layout.METRICS_FILE, metrics)
    d = cfg.data
    details = html.dated(
        {
            "model": f"{cfg.model.name} ({attempt.backend_name} backend, {device})",
            "training data": d.train_path or (d.train_dataset and d.train_dataset.name),
            "adapter": os.path.join(attempt.run_dir, layout.ADAPTER_DIR),
            "steps": training.get("global_step"),
        }
    )
    outputs.write_text(
        layout.REPORT_FILE,
        html.training_report_html(metrics, title=f"Training run {cfg.run.name}", subtitle=attempt.run_dir, details=details),
    )
    record = provenance.build_manifest(
        cfg.model_dump(mode="json"),
        data_fingerprint=splits.fingerprints,
        backend=attempt.backend_name,
        device=str(device),
        code_version=attempt.payload.get("git_commit"),
        extra={
            "run_dir": attempt.run_dir,
            "world_size": attempt.world_size,
            "resumed_from_step": attempt.resumed_from,
            "data_files": splits.files,
            "torch_threads": None if cuda else torch.get_num_threads(),
            "worker_env": {k: os.environ.get(k) for k in cluster.NVLINK_MULTICAST_VARS},
        },
    )
    outputs.write_json(layout.MANIFEST_FILE, record)
