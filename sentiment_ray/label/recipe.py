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

from sentiment_ray import base_identity, cluster
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
from sentiment_ray.label.run import LabelRun, UnitPlan
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
    check_output_folder(cfg, output_dir, out)
    inputs = expand_inputs(input_path)
    if inputs.not_read:
        log.warning("%s", not_read_warning(input_path, inputs.not_read))
    adapter = check_adapter_and_model(cfg, adapter_path)
    run = LabelRun(
        cfg,
        input_path,
        inputs,
        out,
        adapter,
        adapter_path,
        overwrite=overwrite,
        rows_per_unit=rows_per_unit or cfg.label.rows_per_unit,
        started=started,
    )
    # Held from before planning to the summary: --overwrite never deletes another job's
    # units, and the manifest, markers and summary all come from this one job.
    with Lease(out, purpose="label") as lease:
        return label_locked(run, lease)


def label_locked(run: LabelRun, lease: Lease) -> dict[str, Any]:
    """The steps under the output folder's lock."""
    plan = plan_units(run)
    label_seconds = label_pending(run, plan)
    lease.check()
    summary = outputs.summary(run, plan, label_seconds)
    for line in summary["warnings"]:
        log.warning("%s", line)
    lease.check()
    run.out.write_json(layout.SUMMARY_FILE, summary)
    return summary


def plan_units(run: LabelRun) -> UnitPlan:
    """Plan the input into work units, or reuse the plan of an interrupted run (refusing one
    whose committed units no longer describe the input)."""
    cfg, out = run.cfg, run.out
    if run.overwrite:
        clear_outputs(out)
    manifest = load_or_plan(
        out,
        cfg,
        run.input_path,
        run.files,
        run.adapter,
        run.rows_per_unit,
        sorted(output_columns(cfg)),
        actors=lambda: actor_count(cfg),
    )
    # label.max_error: the threshold certified on the adapter's calibration rows, for the actors.
    accept = outputs.acceptance(cfg, run.adapter_path)
    identity = {
        "model_name": cfg.model.name,
        "adapter_id": run.adapter["id"] if run.adapter else None,
        "plan_id": manifest["plan_id"],
        "acceptance": accept,
    }
    units = [WorkUnit.from_dict(d) for d in manifest["units"]]
    stale = out.remove_stale_temporaries(("", *layout.UNIT_DIRS))
    out.delete_dir(layout.FAILED_DIR)  # failures of an earlier attempt
    plan = UnitPlan(manifest, units, outputs.done_unit_ids(out, manifest["plan_id"]), identity, accept)
    # Units done earlier must still describe the input (an in-place edit keeps size and
    # may keep the modification time); pending ones are checked by the actor labelling them.
    changed = changed_units([u for u in units if u.unit_id in plan.done])
    if changed:
        raise LabelRunError(f"{out.root}: {changed_message(changed)}")
    log.info(
        "%d units, %d done earlier, %d to label (%d stale temp files removed)",
        len(units),
        len(plan.done),
        len(plan.pending),
        stale,
    )
    return plan


def label_pending(run: LabelRun, plan: UnitPlan) -> float:
    """Label the units without a commit marker on Ray; the seconds it took, actor start-up
    (model load) included, cluster start-up not (0 when none was pending)."""
    pending = plan.pending
    if not pending:
        return 0.0
    cluster.connect(run.cfg.run.ray_address)
    started = time.perf_counter()
    run_on_ray(
        run.cfg,
        pending,
        run.adapter_path,
        run.out,
        plan.identity,
        total_rows=plan.manifest["total_rows"],
        done_rows=plan.done_rows,
    )
    return time.perf_counter() - started


def check_output_folder(cfg: ExperimentConfig, output_dir: str, out: Storage) -> None:
    if "://" not in output_dir and os.path.isfile(out.root):
        raise LabelRunError(f"--output {output_dir} is a file; give a folder")
    check_every_node_reaches(cfg, output_dir)


def check_adapter_and_model(cfg: ExperimentConfig, adapter_path: str | None) -> dict[str, Any] | None:
    """The adapter's identity (None: the base model) once the adapter and the model passed
    their checks: before Ray starts, an adapter on another base or unsafe weights cost nothing."""
    adapter = adapter_identity(adapter_path, allow_unsafe=cfg.model.allow_unsafe_weights)
    if adapter_path and "://" not in adapter_path:
        try:
            base_identity.check(adapter_path, cfg.model.name, cfg.model.allow_base_mismatch)
        except base_identity.BaseMismatch as err:
            raise LabelRunError(str(err)) from None
    try:
        check_model_source(cfg.model.name, allow_unsafe=cfg.model.allow_unsafe_weights)
    except UnsafeWeightsError as err:
        raise LabelRunError(f"model.name {err}") from None
    return adapter


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
    cfg: ExperimentConfig,
    pending: list[WorkUnit],
    adapter_path: str | None,
    out: Storage,
    identity,
    *,
    total_rows: int,
    done_rows: int,
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
        err.add_note(
            f"in the actor labelling {failure['where']} ({failure.get('host')}, pid {failure.get('pid')}):\n{failure['traceback']}"
        )
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
    return (
        f"Labelling interrupted by {sig.name}: {len(done)} of {len(units)} units ({rows:,} of "
        f"{manifest['total_rows']:,} rows) are committed in {out.root}; rerun the same command to label the rest: {command}"
    )
