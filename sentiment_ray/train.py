"""Fine-tuning on Ray Train: the driver (`run_training`, `build_trainer`) and the worker
function (`train_worker`) that runs TRL's SFTTrainer on a LoRA model in each Ray worker.

    result = run_training(load_config("demo"))      # connects to / starts Ray, trains, returns a summary

A run lives in `<run.storage_path>/<run.name>/` (a local path or a URI): Ray Train's
checkpoints and snapshot, plus what rank 0 writes at the end:

    adapter/                        LoRA adapter + tokenizer (backend.save_adapter)
    metrics.json                    zero-shot and fine-tuned validation metrics, training stats
    manifest.json                   config, package versions, data fingerprint, backend, device, commit
    validation_predictions.parquet  per-row label probabilities of the fine-tuned model
    quarantine*.jsonl               rows skipped by data.on_bad_rows=skip

Rerunning with the same run name and storage path resumes from the run's latest checkpoint
(Ray Train v2 restores its checkpoint list from the run folder; the worker hands the
checkpoint to the HF Trainer as `resume_from_checkpoint`).

Reporting cadence (what Ray Train, and a Tune scheduler behind it, sees): one
`ray.train.report` per checkpoint (every `train.save_steps`, or every `train.eval_steps` when
save_steps is 0, and always at the last step), plus one per evaluation step that is not a
checkpoint step. Reports at evaluation steps and at the last step carry `val_accuracy`,
`val_macro_f1` and `val_ece` (label-token scoring of the validation split).

Light at import time: ray, torch, transformers and trl are imported inside functions.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from sentiment_ray import tracking
from sentiment_ray.config import ExperimentConfig, validate
from sentiment_ray.storage import filesystem, is_uri

log = logging.getLogger(__name__)

# Test hook: the worker raises after this optimizer step on a run that did not resume from a
# checkpoint (tests/test_train.py uses it to interrupt a run, then resume it).
FAIL_AT_STEP_ENV = "SENTIMENT_RAY_TEST_FAIL_AT_STEP"
# Written into every checkpoint: what a resumed attempt needs besides the HF trainer state.
RUN_STATE_FILE = "sentiment_ray_state.json"
ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.json"
MANIFEST_FILE = "manifest.json"
PREDICTIONS_FILE = "validation_predictions.parquet"
# Ray Train v2 turns every print() in a worker into a log record, even prints that a
# library captures by swapping sys.stdout (dill's bytecode dumps while `datasets` hashes
# TRL's map functions would flood the log); plain stdout still reaches the driver.
_TRAIN_WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# Optimizers that need bitsandbytes / CUDA; on CPU they become plain AdamW.
_CUDA_ONLY_OPTIMIZER_MARKERS = ("8bit", "paged", "bnb")


class TrainingError(RuntimeError):
    pass


# ============================================================================ run folder


def absolute_storage_path(storage_path: str) -> str:
    """Ray Train needs an absolute path or a URI; relative paths are taken from the cwd."""
    return storage_path if is_uri(storage_path) else os.path.abspath(os.path.expanduser(storage_path))


def run_dir_of(cfg: ExperimentConfig) -> str:
    """`<storage_path>/<name>`: where Ray Train keeps the run and where the outputs go."""
    return absolute_storage_path(cfg.run.storage_path).rstrip("/") + "/" + cfg.run.name


def publish(local_dir: str, run_dir: str) -> None:
    """Copy everything under `local_dir` into `run_dir` (local folder or URI)."""
    import pyarrow.fs

    fs, target = filesystem(run_dir)
    fs.create_dir(target, recursive=True)
    pyarrow.fs.copy_files(local_dir, target, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


def read_run_json(run_dir: str, name: str) -> dict:
    fs, base = filesystem(run_dir)
    try:
        with fs.open_input_stream(base.rstrip("/") + "/" + name) as stream:
            return json.loads(stream.read().decode("utf-8"))
    except FileNotFoundError:
        raise TrainingError(f"{run_dir}/{name} is missing: the training worker did not finish writing its outputs") from None


# ============================================================================ driver


def build_trainer(
    cfg: ExperimentConfig,
    *,
    run_name: str | None = None,
    storage_path: str | None = None,
    callbacks: list | None = None,
):
    """A Ray Train `TorchTrainer` for one training run (Ray must be connected: the GPU
    count decides `use_gpu: auto`). Tune trials call this with their own run name /
    storage path and pass `ray.tune.integration.ray_train.TuneReportCallback()` in
    `callbacks`, so every worker report (see the module docstring) reaches Tune."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from sentiment_ray import manifest, ray_cluster

    cfg = cfg.model_copy(deep=True)
    if run_name is not None:
        cfg.run.name = run_name
    cfg.run.storage_path = absolute_storage_path(storage_path or cfg.run.storage_path)
    cfg = tracking.for_workers(cfg)  # the driver's MLFLOW_TRACKING_URI reaches every node
    use_gpu = ray_cluster.resolve_use_gpu(cfg.run.use_gpu)
    if cfg.model.backend == "unsloth" and not use_gpu:
        raise TrainingError(
            "model.backend=unsloth needs GPU workers, but run.use_gpu resolved to false "
            f"(run.use_gpu={cfg.run.use_gpu}, cluster GPUs: {ray_cluster.cluster_gpu_count()})"
        )
    resources = {"CPU": cfg.run.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    payload = {
        "config": cfg.model_dump(mode="json"),
        "git_commit": manifest.git_commit(),
        "fail_at_step": int(os.environ[FAIL_AT_STEP_ENV]) if os.environ.get(FAIL_AT_STEP_ENV) else None,
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
            worker_runtime_env={"env_vars": {**ray_cluster.worker_env_vars(), **_TRAIN_WORKER_ENV}},
            callbacks=callbacks,
        ),
    )


def run_training(cfg: ExperimentConfig) -> dict:
    """Train one run on Ray (connecting first, see ray_cluster.connect) and return its
    summary: run dir, adapter path, backend, device, zero-shot and fine-tuned validation
    accuracy / macro-F1, train loss, steps, wall time. Raises ray.train.TrainingFailedError
    when the workers fail more than run.max_failures times."""
    from sentiment_ray import ray_cluster

    start = time.time()
    ray_cluster.connect(cfg.run.ray_address)
    trainer = build_trainer(cfg)
    result = trainer.fit()
    summary = run_summary(run_dir_of(cfg))
    summary["driver_wall_time_s"] = round(time.time() - start, 1)
    summary["latest_checkpoint"] = getattr(result.checkpoint, "path", None)
    return summary


def run_summary(run_dir: str) -> dict:
    """The short view of a finished run's metrics.json (what jobs/train.py prints)."""
    metrics = read_run_json(run_dir, METRICS_FILE)

    def brief(report: dict | None) -> dict | None:
        if not report:
            return None
        return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "n": report["n"]}

    train = metrics.get("train", {})
    return {
        "run_dir": run_dir,
        "adapter": run_dir.rstrip("/") + "/" + ADAPTER_DIR,
        "backend": metrics.get("backend"),
        "device": metrics.get("device"),
        "zero_shot": brief(metrics.get("zero_shot")),
        "fine_tuned": brief(metrics.get("fine_tuned")),
        "train_loss": train.get("loss_last"),
        "steps": train.get("global_step"),
        "resumed_from_step": train.get("resumed_from_step"),
        "train_tokens_per_s": train.get("tokens_per_second"),
        "worker_wall_time_s": metrics.get("wall_time_s"),
    }


# ============================================================================ worker


def train_worker(payload: dict) -> None:
    """The Ray Train worker function. `payload`: {"config": cfg dict, "git_commit": str |
    None, "fail_at_step": int | None}, as build_trainer makes it."""
    from sentiment_ray import backends

    cfg = validate(payload["config"], source="train_worker payload")
    backend_name = backends.resolve_backend_name(cfg.model.backend)
    backends.early_import(backend_name)  # before anything below imports transformers/trl/peft

    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    attempt = _Attempt(
        cfg=cfg,
        payload=payload,
        backend_name=backend_name,
        device=ray.train.torch.get_device(),
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        started=time.time(),
        scratch=tempfile.mkdtemp(prefix=f"sentiment-ray-{cfg.run.name}-rank{context.get_world_rank()}-"),
    )
    try:
        _train(attempt)
    except BaseException:
        tracking.end_failed(attempt.tracker)
        raise
    finally:
        shutil.rmtree(attempt.scratch, ignore_errors=True)


@dataclass
class _Attempt:
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

    @property
    def run_dir(self) -> str:
        return run_dir_of(self.cfg)

    def local(self, *parts: str) -> str:
        return os.path.join(self.scratch, *parts)


def _train(attempt: _Attempt) -> None:
    import ray.train
    import torch

    from sentiment_ray import backends
    from sentiment_ray.backends.base import gradient_checkpointing_for
    from sentiment_ray.labels import LabelSet
    from sentiment_ray.prompts import PromptTemplate

    cfg, device = attempt.cfg, attempt.device
    labels = LabelSet(cfg.prompt.labels)
    template = PromptTemplate.from_config(cfg.prompt)
    # Only rank 0 writes quarantine files where the config / run folder says; other ranks
    # (reading the same rows) keep theirs in their scratch folder.
    splits = load_splits(cfg, labels, attempt.run_dir if attempt.rank == 0 else attempt.scratch, attempt.rank == 0)
    if device.type == "cpu":
        log.info("training on CPU with %d torch threads (run.cpus_per_worker sets them)", torch.get_num_threads())
    backend = backends.get_backend(attempt.backend_name)
    model, tokenizer = backend.load_for_training(cfg, device)

    # A checkpoint exists when this run resumes (same name and storage) or Ray retried it.
    checkpoint = ray.train.get_checkpoint()
    output_dir = attempt.local("hf")
    resume_path, run_state = restore_checkpoint(checkpoint, output_dir) if checkpoint else (None, {})
    attempt.resumed_from = run_state.get("global_step", 0)
    attempt.tracker = tracking.start_training(cfg, attempt.run_dir) if attempt.rank == 0 else None

    scorer = None
    if attempt.rank == 0 and splits["validation"].num_rows:
        from sentiment_ray.scoring import LabelScorer

        scorer = LabelScorer(model, tokenizer, template, labels, cfg.model.max_seq_length, cfg.train.eval_batch_size)
    zero_shot = run_state.get("zero_shot")  # carried by the checkpoint on resume
    if zero_shot is None and scorer is not None and cfg.train.zero_shot_eval and not resume_path:
        # The adapter is freshly initialised (LoRA B = 0): the model still computes the base model.
        zero_shot, _ = evaluate_split(scorer, splits["validation"])

    args = build_sft_config(cfg, device, output_dir, attempt.world_size)
    reporter = report_callback_class()(
        cfg,
        scorer=scorer,
        validation=splits["validation"],
        is_rank_zero=attempt.rank == 0,
        run_state={"zero_shot": zero_shot},
        fail_at_step=attempt.payload.get("fail_at_step") if not resume_path else None,
    )
    trainer = sft_trainer_class()(
        model=model,
        args=args,
        train_dataset=build_train_dataset(cfg, splits["train"], tokenizer, template, labels),
        processing_class=tokenizer,
        callbacks=[reporter, *tracking.training_callbacks(attempt.tracker, reporter)],
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_started = time.time()
    train_output = trainer.train(resume_from_checkpoint=resume_path)
    train_wall = time.time() - train_started
    if attempt.rank != 0:
        return

    os.makedirs(attempt.local("outputs"))
    fine_tuned = None
    if scorer is not None:
        # The callback evaluated at the last step unless this attempt trained no step.
        if reporter.last_eval_step == trainer.state.global_step:
            fine_tuned, scores = reporter.last_eval, reporter.last_scores
        else:
            fine_tuned, scores = evaluate_split(scorer, splits["validation"])
        import pyarrow.parquet as pq

        pq.write_table(predictions_table(splits["validation"], scores), attempt.local("outputs", PREDICTIONS_FILE))
    backend.save_adapter(model, tokenizer, attempt.local("outputs", ADAPTER_DIR))
    training = training_stats(attempt, trainer, train_output, train_wall, reporter.eval_seconds)
    training["gradient_checkpointing"] = gradient_checkpointing_for(cfg, device)
    _write_reports(attempt, splits, zero_shot, fine_tuned, training)
    tracking.finish_training(attempt.tracker, attempt.local("outputs"), zero_shot, fine_tuned, training)
    publish(attempt.local("outputs"), attempt.run_dir)


def training_stats(attempt: _Attempt, trainer, train_output, train_wall: float, eval_seconds: float) -> dict:
    """metrics.json's `train` section: steps, losses, throughput, the HF log history."""
    state = trainer.state
    tokens = state.num_input_tokens_seen - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    step_wall = max(train_wall - eval_seconds, 1e-9)  # optimizer steps + checkpoints
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
        "train_runtime_s": round(train_wall, 2),
        "eval_in_training_s": round(eval_seconds, 2),
        "tokens_this_attempt": int(tokens),
        # Non-padding tokens per second of training (validation scoring excluded).
        "tokens_per_second": round(tokens / step_wall, 1) if tokens else None,
        "hf_train_metrics": train_output.metrics,
        "log_history": state.log_history,
    }


def _write_reports(attempt: _Attempt, splits: dict, zero_shot, fine_tuned, training: dict) -> None:
    """metrics.json and manifest.json into the attempt's outputs folder."""
    import torch

    from sentiment_ray import manifest, ray_cluster

    cfg, device = attempt.cfg, attempt.device
    cuda = device.type == "cuda"
    metrics = {
        "run_name": cfg.run.name,
        "backend": attempt.backend_name,
        "device": str(device),
        "world_size": attempt.world_size,
        "rows": {"train": splits["train"].num_rows, "validation": splits["validation"].num_rows, "bad_rows": splits["bad_rows"]},
        "zero_shot": zero_shot,
        "fine_tuned": fine_tuned,
        "train": training,
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if cuda else None,
        "wall_time_s": round(time.time() - attempt.started, 1),
    }
    manifest.write_json(attempt.local("outputs", METRICS_FILE), metrics)
    record = manifest.build_manifest(
        cfg.model_dump(mode="json"),
        data_fingerprint=splits["fingerprints"],
        backend=attempt.backend_name,
        device=str(device),
        code_version=attempt.payload.get("git_commit"),
        extra={
            "run_dir": attempt.run_dir,
            "world_size": attempt.world_size,
            "resumed_from_step": attempt.resumed_from,
            "data_files": splits["files"],
            "torch_threads": None if cuda else torch.get_num_threads(),
            "worker_env": {k: os.environ.get(k) for k in ray_cluster.NVLINK_MULTICAST_OFF},
        },
    )
    manifest.write_json(attempt.local("outputs", MANIFEST_FILE), record)


# ---------------------------------------------------------------------------- data


def load_splits(cfg: ExperimentConfig, labels, quarantine_root: str, use_configured_quarantine: bool = True) -> dict:
    """{"train", "validation": pyarrow tables, "files": {split: [files]}, "fingerprints":
    {split: sha256}, "bad_rows": {...}}. Sources are data.train_path / data.train_dataset
    (a Hugging Face dataset). Validation comes from data.validation_path or
    data.validation_dataset, else a stratified split of the training source.
    Skipped rows (data.on_bad_rows=skip) go to data.quarantine_path (validation file rows
    to `<that>.validation`), or to quarantine.jsonl / quarantine-validation.jsonl under
    `quarantine_root`."""
    from sentiment_ray import data

    d = cfg.data
    if not d.train_path and d.train_dataset is None:
        raise TrainingError("data.train_path is empty: set it (or data.train_dataset) in the config or as data.train_path=...")

    def quarantine(name: str, suffix: str) -> str:
        if d.quarantine_path and use_configured_quarantine:
            return d.quarantine_path + suffix
        return quarantine_root.rstrip("/") + "/" + name

    train_data = data.load_labelled(d.train_dataset or d.train_path, d, labels, quarantine_path=quarantine("quarantine.jsonl", ""))
    files = {"train": train_data.files}
    fingerprints = {"train": train_data.fingerprint()}
    bad = {"train": train_data.bad_rows.count}
    if d.validation_path or d.validation_dataset:
        val_q = quarantine("quarantine-validation.jsonl", ".validation")
        val_data = data.load_labelled(d.validation_dataset or d.validation_path, d, labels, quarantine_path=val_q)
        train, validation = train_data.table, val_data.table
        files["validation"] = val_data.files
        fingerprints["validation"] = val_data.fingerprint()
        bad["validation"] = val_data.bad_rows.count
    else:
        train, validation = data.split_train_validation(train_data.table, d.validation_fraction, d.split_seed)
    train, validation = data.apply_row_limits(train, validation, d)
    if train.num_rows == 0:
        raise TrainingError(f"{train_data.files[0]}: no training rows left after the validation split and row limits")
    return {"train": train, "validation": validation, "files": files, "fingerprints": fingerprints, "bad_rows": bad}


def completion_token_budget(tokenizer, template, labels) -> int:
    """Tokens the longest label + EOS adds after a prompt (how TRL tokenises a completion)."""
    prompt = template.prompt("An example sentence.")
    base = len(tokenizer(prompt)["input_ids"])
    return max(len(tokenizer(prompt + template.completion(label, tokenizer.eos_token))["input_ids"]) - base for label in labels)


def build_train_dataset(cfg: ExperimentConfig, table, tokenizer, template, labels):
    """A `datasets.Dataset` for TRL: prompt-completion records (`loss_on: completion`: loss
    on the label tokens only) or the seed's full-text `text` records (`full_text`).

    Over-long sentences are cut (scoring.fit_prompts, the way validation/labelling cut them)
    so that every record, label included, fits model.max_seq_length: TRL truncates from the
    end, which would drop the label and leave a record with nothing to learn."""
    import datasets

    from sentiment_ray.scoring import fit_prompts

    datasets.disable_progress_bars()
    budget = cfg.model.max_seq_length - completion_token_budget(tokenizer, template, labels)
    prompts, _, truncated = fit_prompts(tokenizer, template, table.column("sentence").to_pylist(), budget)
    if truncated.any():
        log.warning("%d of %d training sentences were cut to fit model.max_seq_length=%d",
                    int(truncated.sum()), len(prompts), cfg.model.max_seq_length)
    eos = tokenizer.eos_token
    completions = [template.completion(label, eos) for label in table.column("label").to_pylist()]
    if cfg.train.loss_on == "completion":
        return datasets.Dataset.from_dict({"prompt": prompts, "completion": completions})
    return datasets.Dataset.from_dict({"text": [p + c for p, c in zip(prompts, completions)]})


# ---------------------------------------------------------------------------- trainer config


def resolve_optimizer(name: str, device_type: str) -> str:
    if device_type != "cuda" and any(marker in name for marker in _CUDA_ONLY_OPTIMIZER_MARKERS):
        log.info("optimizer %s needs bitsandbytes on CUDA; using adamw_torch on %s", name, device_type)
        return "adamw_torch"
    return name


def checkpoint_every(cfg: ExperimentConfig) -> int:
    """Checkpoint cadence in steps: train.save_steps, else train.eval_steps, else the end."""
    return cfg.train.save_steps or cfg.train.eval_steps or cfg.train.max_steps


def resolve_padding_free(setting: str, packing: bool, device_type: str, packing_strategy: str = "bfd") -> bool:
    """Explicit, never left to the backend: Unsloth switches padding-free on by itself on
    Hopper GPUs, and without flash-attention that runs attention per sequence (0.87 s per
    8-row step of the 135M demo model on an H100, 4% GPU busy; padded: 0.35 s at 64 rows).

    `auto`: padding-free with packing (TRL's BFD packing is padding-free by construction)
    and on CPU, where transformers runs one attention call per layer over the concatenated
    rows with a per-sequence mask built from position_ids: the same loss as a padded batch
    (tests/test_train.py) without computing the padding, which is most of a padded demo
    batch (one long row sets the width): 5.9 s instead of 17.1 s per 8-row step of the
    demo model on this 2-core CPU."""
    if setting == "auto":
        if packing:
            return packing_strategy == "bfd"  # wrapped blocks are full: nothing to pad
        return device_type == "cpu"
    return setting == "true"


def build_sft_config(cfg: ExperimentConfig, device, output_dir: str, world_size: int):
    """TRL SFTConfig from cfg.train (and model.max_seq_length)."""
    import torch
    from trl import SFTConfig

    from sentiment_ray.backends.base import resolve_dtype

    t = cfg.train
    cuda = device.type == "cuda"
    dtype = resolve_dtype(cfg.model.dtype, device)
    padding_free = resolve_padding_free(t.padding_free, t.packing, device.type, t.packing_strategy)
    if padding_free and cfg.model.attn_implementation != "flash_attention_2":
        # Padding-free rows (TRL's BFD packing, or padding_free) are concatenated with
        # restarting position_ids and no attention mask. TRL warns this may cross-contaminate
        # without flash-attention, but transformers' sdpa/eager mask builder derives a
        # per-sequence (block-diagonal) causal mask from such position_ids (masking_utils.
        # find_packed_sequence_indices) when no KV cache is passed, as in training (the
        # trainer forwards with use_cache=False); tests/test_train.py checks packed == padded loss.
        log.info("padding-free rows with %s attention: per-sequence masks come from position_ids",
                 cfg.model.attn_implementation)
    return SFTConfig(
        output_dir=output_dir,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        optim=resolve_optimizer(t.optim, device.type),
        seed=t.seed,
        data_seed=t.seed,
        # Mixed precision following the model's dtype (TRL defaults bf16 on). bf16 autocast
        # also on CPU: 1.5x faster demo steps on an AVX512-BF16 CPU (the LoRA weights and
        # the optimizer stay float32).
        bf16=dtype == torch.bfloat16,
        fp16=cuda and dtype == torch.float16,
        use_cpu=not cuda,
        # The backend owns gradient checkpointing (Unsloth's offloaded variant, or HF's
        # non-reentrant one); TRL would otherwise switch on its own by default.
        gradient_checkpointing=False,
        # TRL refuses max_length for padding-free rows without packing (it would not enforce
        # it); build_train_dataset already fits every record into model.max_seq_length.
        max_length=None if padding_free and not t.packing else cfg.model.max_seq_length,
        packing=t.packing,
        packing_strategy=t.packing_strategy,
        train_sampling_strategy="group_by_length" if t.group_by_length and not t.packing else "random",
        padding_free=padding_free,
        pad_to_multiple_of=None if padding_free else t.pad_to_multiple_of,
        completion_only_loss=True if t.loss_on == "completion" else None,
        dataset_text_field="text",
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=checkpoint_every(cfg),
        # Ray Train keeps run.checkpoints_to_keep in storage; one local copy is enough.
        save_total_limit=1,
        eval_strategy="no",  # validation is label-token scoring, done by RayReportCallback
        report_to=[],
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0 if not cuda else min(4, max(0, int(cfg.run.cpus_per_worker) - 1)),
        dataloader_pin_memory=cuda,
        # Every LoRA parameter takes part in each forward; Ray Train wraps even one worker in DDP.
        ddp_find_unused_parameters=False,
    )


# ---------------------------------------------------------------------------- evaluation


class _RecordingScorer:
    """Passes scoring.evaluate through to a scorer and keeps the per-row result, so one
    scoring pass gives both the report and the predictions table."""

    def __init__(self, scorer):
        self.scorer = scorer
        self.labels = scorer.labels
        self.result = None

    def score(self, sentences):
        self.result = self.scorer.score(sentences)
        return self.result

    def __getattr__(self, name):
        return getattr(self.scorer, name)


def evaluate_split(scorer, table) -> tuple[dict, Any]:
    """Label-token scoring of a validation table: (scoring.evaluate's report: accuracy,
    macro-F1, per language, ECE; the per-row scoring.ScoreResult)."""
    from sentiment_ray.scoring import evaluate

    sentences = table.column("sentence").to_pylist()
    truth = table.column("label").to_pylist()
    langs = table.column("lang").to_pylist() if "lang" in table.column_names else None
    recorder = _RecordingScorer(scorer)
    report = evaluate(recorder, sentences, truth, langs)
    return report, recorder.result


def predictions_table(table, scores):
    """The validation rows with the predicted label and one probability column per label."""
    import pyarrow as pa

    columns = {c: table.column(c) for c in ("ID", "sentence", "label", "lang") if c in table.column_names}
    columns["predicted"] = pa.array(scores.predicted(), type=pa.string())
    for i, label in enumerate(scores.labels):
        columns[f"p_{label}"] = pa.array(scores.probs[:, i])
    return pa.table(columns)


def flat_validation_metrics(report: dict | None) -> dict:
    """The scalars a Tune scheduler compares (report keys prefixed `val_`)."""
    if not report:
        return {}
    return {"val_accuracy": report["accuracy"], "val_macro_f1": report["macro_f1"], "val_ece": report["ece"]}


# ---------------------------------------------------------------------------- checkpoints


def restore_checkpoint(checkpoint, output_dir: str) -> tuple[str, dict]:
    """Download a Ray checkpoint (an HF Trainer checkpoint folder) into the trainer's
    output dir as `checkpoint-<step>`; return (its path, the run state saved with it)."""
    tmp = os.path.join(output_dir, "restoring")
    checkpoint.to_directory(tmp)
    trainer_state = os.path.join(tmp, "trainer_state.json")
    if not os.path.isfile(trainer_state):
        raise TrainingError(f"checkpoint {checkpoint.path} has no trainer_state.json: not an HF Trainer checkpoint")
    with open(trainer_state, encoding="utf-8") as f:
        step = int(json.load(f)["global_step"])
    target = os.path.join(output_dir, f"checkpoint-{step}")
    os.replace(tmp, target)
    state = {}
    state_file = os.path.join(target, RUN_STATE_FILE)
    if os.path.isfile(state_file):
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
    state["global_step"] = step
    log.info("resuming from checkpoint %s (step %d)", checkpoint.path, step)
    return target, state


def _make_report_callback_class():
    from transformers import TrainerCallback

    class _RayReportCallback(TrainerCallback):
        """Reports to Ray Train at each checkpoint (with the checkpoint; only rank 0
        uploads it) and at each evaluation step; evaluates the validation split by
        label-token scoring on rank 0 at train.eval_steps and at the last step."""

        def __init__(self, cfg, *, scorer, validation, is_rank_zero, run_state, fail_at_step=None):
            self.cfg = cfg
            self.scorer = scorer
            self.validation = validation
            self.is_rank_zero = is_rank_zero
            self.run_state = run_state
            self.fail_at_step = fail_at_step
            self.last_eval = None
            self.last_scores = None
            self.last_eval_step = -1
            self.eval_seconds = 0.0  # spent scoring inside trainer.train(), kept out of tokens/s

        def _eval_due(self, state) -> bool:
            every = self.cfg.train.eval_steps
            return state.global_step >= state.max_steps or bool(every and state.global_step % every == 0)

        def _metrics(self, state) -> dict:
            metrics = {"step": state.global_step, "epoch": state.epoch}
            for entry in reversed(state.log_history):
                if "loss" in entry:
                    metrics["train_loss"] = entry["loss"]
                    metrics["learning_rate"] = entry.get("learning_rate")
                    break
            if self._eval_due(state) and self.scorer is not None:
                eval_started = time.time()
                self.last_eval, self.last_scores = evaluate_split(self.scorer, self.validation)
                self.eval_seconds += time.time() - eval_started
                self.last_eval_step = state.global_step
                metrics.update(flat_validation_metrics(self.last_eval))
            return metrics

        def on_step_end(self, args, state, control, **kwargs):
            if self.fail_at_step is not None and state.global_step == self.fail_at_step:
                raise RuntimeError(f"{FAIL_AT_STEP_ENV}={self.fail_at_step}: test-injected failure after step {state.global_step}")
            # Evaluation-only report, unless the checkpoint at this step reports it (on_save).
            if self._eval_due(state) and not control.should_save:
                import ray.train

                ray.train.report(self._metrics(state))
            return control

        def on_save(self, args, state, control, **kwargs):
            import ray.train

            metrics = self._metrics(state)
            checkpoint = None
            if self.is_rank_zero:
                folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                with open(os.path.join(folder, RUN_STATE_FILE), "w", encoding="utf-8") as f:
                    json.dump(self.run_state, f)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint-{state.global_step:06d}")
            return control

    return _RayReportCallback


def fused_loss_available(device) -> bool:
    """TRL 1.15's SFTTrainer computes the loss with a Triton kernel (a fused LM head); the
    CPU torch build has no Triton, and Triton kernels do not run on CPU tensors anyway."""
    from trl.trainer import utils as trl_utils

    return getattr(trl_utils, "_ChunkedLogProbFunction", None) is not None and device.type in ("cuda", "xpu")


def keep_label_position_logits(inputs: dict) -> dict:
    """Ask the model for logits only where a label token is predicted.

    With loss on the completion, a prompt-completion row has a handful of label positions
    among ~100 tokens; the LM head over the rest (576 x 49k multiply-adds per token for the
    demo model, and a log-softmax over 49k classes) is, by FLOP count, about a sixth of a
    CPU step, wasted. The
    model's own causal-LM loss takes pre-shifted labels (`shift_labels`), so the objective
    is unchanged: the same token NLL summed over label positions / num_items_in_batch
    (tests/test_train.py compares both). Positions are shared across the batch dimension
    (padding-free batches have one row; padded ones keep the union of their rows')."""
    import torch

    labels = inputs.get("labels")
    if labels is None or labels.dim() != 2:
        return inputs
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    positions = (shifted != -100).any(dim=0).nonzero().squeeze(1)
    if positions.numel() == 0 or positions.numel() == labels.shape[1]:
        return inputs
    kept = shifted[:, positions].contiguous()
    return {**inputs, "labels": kept, "shift_labels": kept, "logits_to_keep": positions}


def _make_sft_trainer_class():
    import transformers
    from trl import SFTTrainer

    class _PortableSFTTrainer(SFTTrainer):
        """SFTTrainer that falls back to the model's own loss where TRL's fused kernel
        cannot run (CPU). Same objective: the summed token NLL over the label positions
        (completion tokens, or all tokens for full-text records) divided by the batch's
        label-token count, which transformers' causal-LM loss computes when given
        `num_items_in_batch`. TRL's entropy / token-accuracy logs are skipped there."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if fused_loss_available(self.args.device):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs["use_cache"] = False
            if not return_outputs:
                inputs = keep_label_position_logits(inputs)
            return transformers.Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return _PortableSFTTrainer


_SFT_TRAINER_CLASS = None
_REPORT_CALLBACK_CLASS = None


def sft_trainer_class():
    """The SFTTrainer subclass (built on first use, like report_callback_class)."""
    global _SFT_TRAINER_CLASS
    if _SFT_TRAINER_CLASS is None:
        _SFT_TRAINER_CLASS = _make_sft_trainer_class()
    return _SFT_TRAINER_CLASS


def report_callback_class():
    """The TrainerCallback class (built on first use: transformers must not be imported
    when this module is, since Unsloth has to be imported first in a worker)."""
    global _REPORT_CALLBACK_CLASS
    if _REPORT_CALLBACK_CLASS is None:
        _REPORT_CALLBACK_CLASS = _make_report_callback_class()
    return _REPORT_CALLBACK_CLASS
