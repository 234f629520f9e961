"""Offline labelling on Ray Data: exactly once per input row, resumable, sharded outputs.

    summary = label_dataset(cfg, "s3://bucket/unlabelled/*.parquet", "runs/label-x",
                            adapter_path="runs/demo/adapter")

The steps, all under the output folder's lock (io/lease.py: one job per output folder; a
second one is refused naming the first, a dead one's lock is taken over):

1. Plan: expand the input (path, glob, directory or URI), cut it into work units in one
   streaming pass that also checks IDs for duplicates, and write the manifest (label/plan.py).
   A rerun into the same output reuses the plan, refusing changed inputs or settings unless
   `overwrite`, and checks the content of every unit done earlier (label/plan.py).
2. Label the units without a commit marker on Ray Data: `from_items(units)` ->
   `map_batches(Labeler, batch_size=1 unit, concurrency=N actors, num_gpus=1 each)`
   (label/labeler.py). Ray Data restarts a killed actor and retries its units; a killed
   driver is handled by rerunning the same command. Either way each unit's files are
   replaced whole and its marker written last, so the output ends up exactly as after an
   uninterrupted run.
3. Merge `submission.csv` (when asked) and `quarantine.jsonl` in input order, evaluate
   against the input's labels when it has them, and write the summary (label/outputs.py).

Bad rows are always quarantined here (`data.on_bad_rows` governs training only: one bad row
must not stop a million-row labelling run). The driver's end runs in memory that does not
grow with the rows: the evaluation sums counts one unit at a time, and submission.csv and
quarantine.jsonl are copied shard by shard in input order.
Outputs may live on a shared disk or an object store (`s3://...`); actors write them
directly, so on a multi-node cluster a node-local path does not work.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from sentiment_ray import base_identity, cluster, languages, risk
from sentiment_ray.config import ExperimentConfig
from sentiment_ray.io.files import expand_inputs, not_read_warning
from sentiment_ray.io.lease import Lease
from sentiment_ray.io.storage import Storage
from sentiment_ray.io.uris import StorageIOError
from sentiment_ray.io.values import DataError
from sentiment_ray.label import layout, outputs
from sentiment_ray.label.labeler import Labeler, output_columns
from sentiment_ray.label.plan import (
    LabelRunError,
    WorkUnit,
    adapter_identity,
    changed_message,
    changed_units,
    load_or_plan,
)
from sentiment_ray.label.progress import ProgressView, start_board
from sentiment_ray.weights import UnsafeWeightsError, check_model_source

log = logging.getLogger(__name__)


def label_dataset(
    cfg: ExperimentConfig,
    input_path: str,
    output_dir: str,
    adapter_path: str | None = None,
    *,
    overwrite: bool = False,
    rows_per_unit: int | None = None,
) -> dict[str, Any]:
    """Label every row `input_path` names into `output_dir`; resumes a previous run into
    the same folder. Returns the summary (what `jobs/label.py` prints)."""
    started = time.perf_counter()
    out = Storage(output_dir)
    if "://" not in output_dir and os.path.isfile(out.root):
        raise LabelRunError(f"--output {output_dir} is a file; give a folder")
    check_every_node_reaches(cfg, output_dir)

    inputs = expand_inputs(input_path)
    if inputs.not_read:
        log.warning("%s", not_read_warning(input_path, inputs.not_read))
    adapter = adapter_identity(adapter_path, allow_unsafe=cfg.model.allow_unsafe_weights)
    if adapter_path and "://" not in adapter_path:
        # Before Ray starts: an adapter on another base costs nothing.
        try:
            base_identity.check(adapter_path, cfg.model.name, cfg.model.allow_base_mismatch)
        except base_identity.BaseMismatch as err:
            raise LabelRunError(str(err)) from None
    try:
        check_model_source(cfg.model.name, allow_unsafe=cfg.model.allow_unsafe_weights)
    except UnsafeWeightsError as err:
        raise LabelRunError(f"model.name {err}") from None
    # Held from before planning to the summary: --overwrite never deletes another job's
    # units, and the manifest, markers and summary all come from this one job.
    with Lease(out, purpose="label") as lease:
        return _label_locked(cfg, input_path, inputs, out, adapter, adapter_path, lease, started, overwrite, rows_per_unit)


def _label_locked(cfg, input_path, inputs, out, adapter, adapter_path, lease, started, overwrite, rows_per_unit):
    files = inputs.files
    # 1. Plan (or reuse the plan of an interrupted run).
    if overwrite:
        clear_outputs(out)
    rows_per_unit = rows_per_unit or cfg.label.rows_per_unit
    manifest = load_or_plan(
        out, cfg, input_path, files, adapter, rows_per_unit, sorted(output_columns(cfg)), actors=lambda: actor_count(cfg)
    )
    plan_id = manifest["plan_id"]
    # label.max_error: the threshold certified on the adapter's calibration rows, for the actors.
    accept = outputs.acceptance(cfg, adapter_path)
    identity = {"model_name": cfg.model.name, "adapter_id": adapter["id"] if adapter else None, "plan_id": plan_id,
                "acceptance": accept}
    units = [WorkUnit.from_dict(d) for d in manifest["units"]]
    stale = out.remove_stale_temporaries(("", *layout.UNIT_DIRS))
    out.delete_dir(layout.FAILED_DIR)  # failures of an earlier attempt
    done = outputs.done_unit_ids(out, plan_id)
    # Units done earlier must still describe the input (an in-place edit keeps size and
    # may keep the modification time); pending ones are checked by the actor labelling them.
    changed = changed_units([u for u in units if u.unit_id in done])
    if changed:
        raise LabelRunError(f"{out.root}: {changed_message(changed)}")
    pending = [u for u in units if u.unit_id not in done]
    log.info("%d units, %d done earlier, %d to label (%d stale temp files removed)", len(units), len(done), len(pending), stale)

    # 2. Label the pending units.
    label_seconds = 0.0
    if pending:
        cluster.connect(cfg.run.ray_address)
        label_started = time.perf_counter()  # actor start-up (model load) counts, cluster start-up not
        done_rows = sum(u.num_rows for u in units if u.unit_id in done)
        run_on_ray(cfg, pending, adapter_path, out, identity, total_rows=manifest["total_rows"], done_rows=done_rows)
        label_seconds = time.perf_counter() - label_started

    # 3. Merge, evaluate, summarise.
    lease.check()
    markers = outputs.read_markers(out, units, plan_id)
    ran_now = [markers[u.unit_id] for u in pending]
    totals = outputs.totals(markers.values())
    rows_now = sum(m["rows"] for m in ran_now)
    summary: dict[str, Any] = {
        "output": out.root,
        "predictions": out.path(layout.PREDICTIONS_DIR),
        "csv": out.path(layout.CSV_DIR),
        "input": manifest["input"],
        "plan_id": plan_id,
        "files": len(files),
        "files_not_read": inputs.not_read,
        "model": cfg.model.name,
        "adapter": adapter["id"] if adapter else None,
        "mode": cfg.label.mode,
        **totals,
        "units": {"total": len(units), "labelled_now": len(pending), "done_before": len(units) - len(pending)},
        "rows_labelled_now": rows_now,
        "label_seconds": round(label_seconds, 3),
        "rows_per_s": round(rows_now / label_seconds, 2) if ran_now and label_seconds else None,
        "prompt_tokens_per_s": (
            round(sum(m["prompt_tokens"] for m in ran_now) / label_seconds, 1) if ran_now and label_seconds else None
        ),
        "prompt_tokens_per_predict_s": (
            round(totals["prompt_tokens"] / totals["predict_seconds"], 1) if totals["predict_seconds"] else None
        ),
        **outputs.labelling_window(ran_now),
        **outputs.actor_startup(ran_now),
        **outputs.model_form(ran_now),
    }
    profile = languages.read_profile(adapter_path)
    summary["languages"] = outputs.language_summary(totals, languages.calibrated_languages(profile) if profile else None)
    summary["accepted"] = outputs.accepted_summary(totals, accept)
    summary["submission"] = outputs.merge_submission(out, units) if cfg.label.write_submission else None
    summary["quarantine"] = outputs.merge_quarantine(out, units, markers)
    risk_record = risk.read_scores(adapter_path)
    extra = {"languages": summary["languages"], "accepted": summary["accepted"],
             "risk_control": risk.summary(risk_record, cfg.label.max_error_delta) if risk_record else None}
    report = outputs.evaluate(out, units, cfg, title=f"Labelling with {cfg.model.name}", extra=extra,
                                held_as=outputs.describe_form(summary))
    summary["warnings"] = outputs.warning_lines(summary, report)
    for line in summary["warnings"]:
        log.warning("%s", line)
    summary["metrics_path"] = out.path(layout.METRICS_FILE) if report else None
    summary["report_png"] = out.path(layout.REPORT_PNG_FILE) if report else None
    summary["metrics"] = outputs.headline(report) if report else None
    summary["seconds"] = round(time.perf_counter() - started, 3)
    lease.check()
    out.write_json(layout.SUMMARY_FILE, summary)
    return summary


def check_every_node_reaches(cfg: ExperimentConfig, output_dir: str) -> None:
    """A local --output path on a cluster of several nodes: refused (actors on the other
    nodes would write where the driver never reads) unless label.output_is_shared says every
    node mounts it."""
    if "://" in output_dir or cfg.label.output_is_shared or not cluster.joins_existing_cluster(cfg.run.ray_address):
        return  # a URI, a declared shared mount, or the private one-node cluster this job starts
    cluster.connect(cfg.run.ray_address)
    nodes = cluster.alive_node_count()
    if nodes > 1:
        raise LabelRunError(
            f"--output {output_dir} is a local path but the Ray cluster has {nodes} nodes: actors on the other nodes "
            "cannot write there. Give an s3:// or gs:// URI, or set label.output_is_shared=true if every node mounts it"
        )


def clear_outputs(out: Storage) -> None:
    """Remove what a previous run wrote (only the names this stage writes)."""
    for sub in layout.UNIT_DIRS:
        out.delete_dir(sub)
    for name in layout.RUN_FILES:
        out.delete(name, missing_ok=True)


def actor_count(cfg: ExperimentConfig) -> int:
    """Labelling actors: label.num_actors, else one per GPU of the cluster (one CPU actor
    on a CPU-only cluster). Connects to Ray."""
    cluster.connect(cfg.run.ray_address)
    use_gpu = cluster.resolve_use_gpu(cfg.run.use_gpu)
    actors = cfg.label.num_actors or (cluster.cluster_gpu_count() if use_gpu else 1)
    if use_gpu and actors == 0:
        raise LabelRunError(
            "run.use_gpu=true but the cluster has no GPU now; set label.num_actors to the GPU actors an "
            "autoscaler will provide, or run.use_gpu=auto for CPU actors"
        )
    return actors


def run_on_ray(
    cfg: ExperimentConfig, pending: list[WorkUnit], adapter_path: str | None, out: Storage, identity,
    *, total_rows: int, done_rows: int,
) -> None:
    import ray

    use_gpu = cluster.resolve_use_gpu(cfg.run.use_gpu)
    actors = max(1, min(actor_count(cfg), len(pending)))
    # Ray Data's own bars count blocks (one per unit), not rows: ours count rows.
    ray.data.DataContext.get_current().enable_progress_bars = False
    board = start_board()
    items = [{"unit": json.dumps(u.to_dict())} for u in pending]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        Labeler,
        fn_constructor_kwargs={
            "cfg": cfg.model_dump(),
            "adapter_path": adapter_path if not adapter_path or "://" in adapter_path else os.path.abspath(adapter_path),
            "output_dir": out.root,
            "identity": identity,
            "progress": board,
        },
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )
    try:
        with ProgressView(board, total_rows, done_rows):
            for row in dataset.iter_rows():
                if row.get("error"):
                    raise unit_error(json.loads(row["error"]))
    except (DataError, LabelRunError, StorageIOError):
        raise
    except Exception as err:  # noqa: BLE001 - re-raised as the actor's own error where it left one
        failure = outputs.first_failure(out)
        if failure is None:
            raise
        # Ray hands over only the traceback text; the actor recorded type and message.
        raise unit_error(failure) from err


def unit_error(failure: dict) -> Exception:
    """The driver's exception for a unit an actor could not label (its error record): the
    same kind and message, the actor's traceback attached as a note (it reaches the log)."""
    message = failure["message"]
    if failure["type"] == "DataError":
        err: Exception = DataError(message)
    elif failure.get("storage"):
        err = StorageIOError(message, failure.get("errno"))
    else:
        err = LabelRunError(f"{failure['where']}: {failure['type']}: {message}")
    if failure.get("traceback"):
        err.add_note(f"in the actor labelling {failure['where']} ({failure.get('host')}, pid {failure.get('pid')}):\n{failure['traceback']}")
    return err


def interrupted_line(sig, output_dir: str, command: str) -> str:
    """One line for a label job a signal stopped: the units (and rows) committed in the
    output folder, which stay, and the command that labels the rest. Read after Ray
    stopped, from the commit markers of the folder's plan (a unit whose marker is missing
    is labelled again by the rerun)."""
    out = Storage(output_dir)
    try:
        manifest = out.read_json_or_none(layout.MANIFEST_FILE)
        done = outputs.done_unit_ids(out, manifest["plan_id"]) if manifest else set()
    except (OSError, ValueError, KeyError, TypeError):
        manifest, done = None, set()
    if not manifest:
        return f"Labelling interrupted by {sig.name} before any unit was planned: nothing was written; rerun the same command: {command}"
    units = [WorkUnit.from_dict(d) for d in manifest["units"]]
    rows = sum(u.num_rows for u in units if u.unit_id in done)
    return (f"Labelling interrupted by {sig.name}: {len(done)} of {len(units)} units ({rows:,} of "
            f"{manifest['total_rows']:,} rows) are committed in {out.root}; rerun the same command to label the rest: {command}")
