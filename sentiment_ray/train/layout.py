"""The files of a training run: the one place that names them.

<run.storage_path>/<run.name>/
    adapter/                        LoRA adapter + tokenizer + calibration.json (the temperature)
    metrics.json                    zero-shot and fine-tuned validation metrics, training stats
    manifest.json                   config, package versions, data fingerprint, backend, device
    validation_predictions.parquet  per-row label probabilities of the fine-tuned model
    report.html                     zero-shot vs fine-tuned, per language, calibration
    quarantine.jsonl                rows skipped by data.on_bad_rows=skip (training source)
    quarantine-validation.jsonl     the same for a separate validation source
    checkpoint_<step>/              Ray Train's checkpoints (each an HF Trainer checkpoint
                                    plus sentiment_ray_state.json)
    run_definition.json             what defines the run (train/fingerprint.py), checked on resume
    _lock.json                      the lock of the job writing the folder (io/lease.py)
    logs/train-<date>.log           one per `jobs/train.py` run: everything Ray and the
                                    workers printed (the terminal shows a summary)
"""

from __future__ import annotations

import os

from sentiment_ray.io.uris import is_uri

ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.json"
MANIFEST_FILE = "manifest.json"
PREDICTIONS_FILE = "validation_predictions.parquet"
REPORT_FILE = "report.html"
QUARANTINE_FILE = "quarantine.jsonl"
VALIDATION_QUARANTINE_FILE = "quarantine-validation.jsonl"
LOGS_DIR = "logs"
# Written into every checkpoint: what a resumed attempt needs besides the HF trainer state.
RUN_STATE_FILE = "sentiment_ray_state.json"
DEFINITION_FILE = "run_definition.json"
LOCK_FILE = "_lock.json"
CHECKPOINT_PREFIX = "checkpoint-"
# Kept by --new-run: the lock of the job starting over, and the MLflow history of earlier runs.
KEPT_BY_NEW_RUN = (LOCK_FILE, "mlflow")
# The outputs rank 0 writes at the end; a tune experiment promotes them to best/.
RESULT_FILES = (METRICS_FILE, MANIFEST_FILE, PREDICTIONS_FILE)


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def absolute_storage_path(storage_path: str) -> str:
    """Ray Train needs an absolute path or a URI; relative paths are taken from the cwd."""
    return storage_path if is_uri(storage_path) else os.path.abspath(os.path.expanduser(storage_path))


def run_dir(storage_path: str, name: str) -> str:
    """`<storage_path>/<name>`: where Ray Train keeps the run and where the outputs go."""
    return absolute_storage_path(storage_path).rstrip("/") + "/" + name
