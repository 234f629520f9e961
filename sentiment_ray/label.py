"""Offline labelling on Ray Data: exactly once per input row, resumable, sharded outputs.

    summary = label_dataset(cfg, "s3://bucket/unlabelled/*.parquet", "runs/label-x",
                            adapter_path="runs/demo/adapter")

How it works (see `label_units` for the unit/commit layout):

1. The driver expands the input (path, glob, directory or URI), plans *work units* (row
   ranges of files) in one streaming pass that also checks IDs for duplicates in an
   on-disk table, and writes `_manifest.json` (inputs with sizes/mtimes, config
   fingerprint, adapter identity, the plan). A rerun against the same output checks the
   manifest (refusing changed inputs/config unless `overwrite`) and reuses the plan.
2. Units without a commit marker go through Ray Data: `from_items(units)` ->
   `map_batches(Labeler, batch_size=1 unit, concurrency=N actors, num_gpus=1 each)`.
   Ray Data restarts a killed actor and retries its units; a killed driver is handled by
   rerunning the same command. Either way each unit's files are replaced whole and its
   marker is written last, so the output ends up exactly as after an uninterrupted run.
3. Each `Labeler` actor loads the model (+ adapter) once in `__init__` and, per unit,
   streams the unit's rows (a reader thread validates the next chunk while the model
   works), quarantines bad rows, scores or generates in micro-batches of
   `label.batch_size`, and writes the unit's Parquet/CSV/quarantine shards and marker.
4. The driver merges `submission.csv` (when asked) and `quarantine.jsonl` in input order,
   evaluates against the input's labels when it has them (`metrics.json`, `report.png`),
   and returns the summary (also written to `summary.json`).

`Labeler(cfg).predict(sentences)` is the scoring core without Ray, for benchmarks.

Notes: bad rows are always quarantined here (`data.on_bad_rows` governs training only: one
bad row must not stop a million-row labelling run). The evaluation holds the labelled rows'
gold/predicted labels in driver memory (fine for evaluation-sized sets, not for 100M rows).
Outputs may live on a shared disk or an object store (`s3://...`); actors write them
directly, so on a multi-node cluster a node-local path does not work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import socket
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sentiment_ray.config import ExperimentConfig
from sentiment_ray.data import DataError, expand_paths
from sentiment_ray.label_units import (
    CSV_DIR,
    DEFAULT_ROWS_PER_UNIT,
    DONE_DIR,
    FAILED_DIR,
    MANIFEST_NAME,
    OUTPUT_DIRS,
    IDENTITY_COLUMNS,
    IdRegistry,
    Storage,
    WorkUnit,
    describe_inputs,
    done_unit_ids,
    duplicate_id_error,
    plan_units,
    quarantine_jsonl,
    submission_csv,
    unit_paths,
)
from sentiment_ray.label_rows import ValidChunk, iter_unit_chunks, validate_chunk
from sentiment_ray.labels import LabelSet

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
SUMMARY_NAME = "summary.json"
METRICS_NAME = "metrics.json"
REPORT_PNG_NAME = "report.png"
SUBMISSION_NAME = "submission.csv"
QUARANTINE_NAME = "quarantine.jsonl"
# Rows handed to the scorer at once: it sorts them by length into micro-batches of
# label.batch_size, so a wider window means less padding.
CHUNK_BATCHES = 16


class LabelError(RuntimeError):
    """The labelling run cannot proceed (changed inputs, a failed unit, ...)."""


# ----------------------------------------------------------------------------- identity


def adapter_identity(adapter_path: str | None) -> dict[str, Any] | None:
    """Path and sha256 of the adapter's files (adapter_config.json + weights), or None
    for zero-shot. The hash, not the path, decides whether outputs are comparable."""
    if not adapter_path:
        return None
    if "://" in adapter_path:  # s3://, gs://: hash a local copy
        from sentiment_ray.storage import StorageError, local_folder

        try:
            with local_folder(adapter_path) as local:
                if not os.path.isfile(os.path.join(local, "adapter_config.json")):
                    raise LabelError(f"--adapter {adapter_path}: no adapter_config.json there (not a saved LoRA adapter)")
                sha = adapter_identity(local)["sha256"]
            return {"path": adapter_path, "sha256": sha, "id": f"{adapter_path.rstrip('/').rsplit('/', 1)[-1]}@{sha[:12]}"}
        except StorageError as err:
            raise LabelError(f"--adapter {err}") from None
    path = os.path.abspath(os.path.expanduser(adapter_path))
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise LabelError(f"--adapter {adapter_path}: no adapter_config.json there (not a saved LoRA adapter)")
    digest = hashlib.sha256()
    names = sorted(n for n in os.listdir(path) if n.startswith("adapter_"))
    for name in names:
        digest.update(name.encode() + b"\0")
        with open(os.path.join(path, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    sha = digest.hexdigest()
    return {"path": path, "sha256": sha, "id": f"{os.path.basename(path.rstrip('/')) or path}@{sha[:12]}"}


def prediction_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config fields that decide what the predictions are (not batch size or actor
    count, which may change between a crash and its rerun)."""
    return {
        "model": cfg.model.model_dump(),
        "prompt": cfg.prompt.model_dump(),
        "label": cfg.label.model_dump(include={"mode", "max_new_tokens", "default_label_on_parse_failure", "generate_ids"}),
        "data": cfg.data.model_dump(include={"text_column", "id_column"}),
    }


def output_columns(cfg: ExperimentConfig) -> set[str]:
    """Columns the labeller adds to every row; an input column with one of these names is an error."""
    from sentiment_ray.label_rows import SOURCE_COLUMNS
    from sentiment_ray.label_units import IDENTITY_COLUMNS, PREDICTION_COLUMNS

    return {*SOURCE_COLUMNS, *IDENTITY_COLUMNS, *PREDICTION_COLUMNS, *LabelSet(cfg.prompt.labels).probability_columns()}


def _fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- the labeller


class Labeler:
    """Holds one model for its whole life and labels work units (a Ray Data callable class).

    Without Ray: `Labeler(cfg).predict(sentences)` for a bare measurement, or
    `Labeler(cfg, output_dir=...).label_unit(unit)` for one unit's files."""

    def __init__(
        self,
        cfg: ExperimentConfig | dict[str, Any],
        adapter_path: str | None = None,
        output_dir: str | None = None,
        identity: dict[str, Any] | None = None,
        device: Any = None,
    ):
        # Unsloth must be imported before anything imports transformers/peft: first thing.
        from sentiment_ray.backends import early_import, get_backend, resolve_backend_name

        cfg = cfg if isinstance(cfg, ExperimentConfig) else ExperimentConfig(**cfg)
        self.backend_name = resolve_backend_name(cfg.model.backend)
        early_import(self.backend_name)

        from sentiment_ray.prompts import PromptTemplate
        from sentiment_ray.scoring import LabelScorer

        self.cfg = cfg
        self.labels = LabelSet(cfg.prompt.labels)
        self.mode = cfg.label.mode
        started = time.perf_counter()
        from sentiment_ray.storage import local_folder

        with local_folder(adapter_path) as local_adapter:  # an s3:// adapter: a local copy while loading
            model, tokenizer = get_backend(self.backend_name).load_for_inference(cfg, local_adapter, device)
        # Generation needs room for the new tokens inside the model's context.
        max_length = cfg.model.max_seq_length - (cfg.label.max_new_tokens if self.mode == "generate" else 0)
        self.scorer = LabelScorer(
            model, tokenizer, PromptTemplate.from_config(cfg.prompt), self.labels, max_length,
            cfg.label.batch_size, cfg.label.max_batch_tokens,
        )
        self.load_seconds = time.perf_counter() - started
        self.storage = Storage(output_dir) if output_dir else None
        identity = identity or {"model_name": cfg.model.name, "adapter_id": (adapter_identity(adapter_path) or {}).get("id")}
        self.model_name, self.adapter_id = identity["model_name"], identity["adapter_id"]
        self.chunk_rows = cfg.label.batch_size * CHUNK_BATCHES

    # -- predictions

    def predict(self, sentences: Sequence[str], encoded=None) -> tuple[dict[str, Any], int]:
        """(prediction columns as Arrow arrays, prompt tokens) for `sentences`, in order.
        `encoded`: `scorer.encode(sentences)` when the caller already has it."""
        import pyarrow as pa

        if self.mode == "scoring":
            result = self.scorer.score_ids(*(encoded or self.scorer.encode(sentences)))
            columns = {"pred_label": pa.array(result.predicted(), type=pa.string())}
            for j, name in enumerate(self.labels.probability_columns()):
                columns[name] = pa.array(result.probs[:, j])
            columns["confidence"] = pa.array(result.confidence().astype("float32"))
            columns["truncated"] = pa.array(result.truncated, type=pa.bool_())
            return columns, result.prompt_tokens
        result = self.scorer.generate(sentences, self.cfg.label.max_new_tokens)
        default = self.cfg.label.default_label_on_parse_failure
        labels = [label if label is not None else default for label in result.labels]
        columns = {
            "pred_label": pa.array(labels, type=pa.string()),
            "parse_failed": pa.array(result.parse_failed, type=pa.bool_()),
            "generated_text": pa.array(result.texts, type=pa.string()),
            "truncated": pa.array(result.truncated, type=pa.bool_()),
        }
        return columns, result.prompt_tokens

    # -- units

    def label_unit(self, unit: WorkUnit) -> dict[str, Any]:
        """Label one unit and commit its files; returns the commit marker's content. A unit
        already committed (a retry after the marker was written) is not redone. A failure
        is recorded under `_failed/` (for the driver's error message) and re-raised."""
        if self.storage is None:
            raise LabelError("Labeler.label_unit needs output_dir")
        try:
            return self._label_unit(unit)
        except Exception as err:
            where = f"{unit.file}: rows {unit.start}-{unit.stop - 1}"
            self.storage.write_json(
                f"{self.storage.root}/{FAILED_DIR}/{unit.unit_id}.json",
                {"unit_id": unit.unit_id, "where": where, "type": type(err).__name__, "message": str(err)},
            )
            raise

    def _label_unit(self, unit: WorkUnit) -> dict[str, Any]:
        import pyarrow as pa

        paths = unit_paths(self.storage.root, unit.unit_id)
        if self.storage.exists(paths.done):
            return self.storage.read_json(paths.done)
        started, started_at = time.perf_counter(), time.time()
        tables, quarantined = [], []
        tokens = 0
        predict_seconds = 0.0
        for valid, encoded in _prefetched(self._valid_chunks(unit)):
            quarantined.extend(valid.quarantined)
            if valid.table.num_rows:
                t = time.perf_counter()
                predictions, n_tokens = self.predict(valid.sentences, encoded)
                predict_seconds += time.perf_counter() - t
                tokens += n_tokens
                table = valid.table
                clash = sorted(({*predictions, *IDENTITY_COLUMNS}) & set(table.column_names))
                if clash:
                    raise DataError(f"{unit.file}: input column(s) {clash} clash with columns the labeller adds; rename them")
                for name, array in predictions.items():
                    table = table.append_column(name, array)
                table = table.append_column("model_name", pa.array([self.model_name] * table.num_rows, pa.string()))
                table = table.append_column("adapter_id", pa.array([self.adapter_id] * table.num_rows, pa.string()))
                tables.append(table)
            elif not tables:
                tables.append(valid.table)  # keeps the schema of an all-bad unit
        table = _concat(tables, unit)
        labelled = table.num_rows if "pred_label" in table.column_names else 0
        if labelled + len(quarantined) != unit.num_rows:
            raise LabelError(f"{unit.unit_id}: {unit.num_rows} rows planned but {labelled} labelled + {len(quarantined)} quarantined")
        self._write_parquet(paths.predictions, table)
        ids = table.column(self.cfg.data.id_column).to_pylist() if labelled else []
        preds = table.column("pred_label").to_pylist() if labelled else []
        self.storage.write_bytes(paths.csv, submission_csv(ids, preds))
        if quarantined:
            self.storage.write_bytes(paths.quarantine, quarantine_jsonl(quarantined))
        marker = {
            "unit_id": unit.unit_id,
            "index": unit.index,
            "file": unit.file,
            "rows": unit.num_rows,
            "labelled": labelled,
            "bad_rows": len(quarantined),
            "bad_by_kind": dict(Counter(e["kind"] for e in quarantined)),
            "truncated": _count_true(table, "truncated"),
            "parse_failed": _count_true(table, "parse_failed"),
            "prompt_tokens": tokens,
            "predict_seconds": round(predict_seconds, 4),
            "seconds": round(time.perf_counter() - started, 4),
            "started_at": round(started_at, 3),
            "finished_at": round(time.time(), 3),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        self.storage.write_json(paths.done, marker)  # the commit: written last
        return marker

    def _valid_chunks(self, unit: WorkUnit):
        text_column, id_column = self.cfg.data.text_column, self.cfg.data.id_column
        chunks = iter_unit_chunks(unit, text_column=text_column, id_column=id_column, chunk_rows=self.chunk_rows)
        for index, chunk in enumerate(chunks):
            valid = validate_chunk(chunk, unit, text_column=text_column, id_column=id_column)
            # The model waits for a unit's first piece (nothing overlaps it), so that piece is
            # one batch; the rest is tokenised while the model scores it.
            pieces = _split_first(valid, self.cfg.label.batch_size) if index == 0 else [valid]
            for piece in pieces:
                # Tokenised here, in the reader thread (the Rust tokenizer releases the GIL),
                # so the model never waits for it.
                encoded = self.scorer.encode(piece.sentences) if self.mode == "scoring" and piece.sentences else None
                yield piece, encoded

    def _write_parquet(self, path: str, table) -> None:
        import pyarrow.parquet as pq

        with self.storage.atomic_writer(path) as out:
            pq.write_table(table, out, compression="zstd")

    def __call__(self, batch):
        """Ray Data entry: a batch of units (a `unit` column of JSON) -> one summary row each."""
        import pyarrow as pa

        markers = [self.label_unit(WorkUnit.from_dict(json.loads(u))) for u in batch.column("unit").to_pylist()]
        return pa.table({"marker": [json.dumps(m) for m in markers]})


def _split_first(valid, rows: int) -> list:
    """[first `rows` good rows (with all quarantine entries), the rest] of a ValidChunk."""
    if len(valid.sentences) <= rows:
        return [valid]
    return [
        ValidChunk(valid.table.slice(0, rows), valid.sentences[:rows], valid.quarantined),
        ValidChunk(valid.table.slice(rows), valid.sentences[rows:], []),
    ]


def _prefetched(iterator, depth: int = 2):
    """Run `iterator` in a thread, `depth` items ahead, so reading and validating the next
    chunk overlaps the model's work on this one. Exceptions re-raise in the consumer; a
    consumer that stops early stops the thread too."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(kind: str, item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put((kind, item), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterator:
                if not hand_over("item", item):
                    return
            hand_over("end", None)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            hand_over("error", err)

    threading.Thread(target=produce, name="label-prefetch", daemon=True).start()
    try:
        while True:
            kind, item = items.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()


def _concat(tables, unit: WorkUnit):
    import pyarrow as pa

    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise DataError(
            f"{unit.file}: rows {unit.start}-{unit.stop - 1}: a column changes type between rows ({err}); "
            "make each column one type"
        ) from None


def _labelling_window(markers: list[dict]) -> dict[str, Any]:
    """Throughput between the first unit's start and the last unit's end (actor start-up
    and model loading excluded): the rate a long run settles at."""
    timed = [m for m in markers if "started_at" in m and "finished_at" in m]
    if not timed:
        return {}
    window = max(m["finished_at"] for m in timed) - min(m["started_at"] for m in timed)
    return {
        "labelling_window_s": round(window, 3),
        "actors_used": len({(m.get("host"), m.get("pid")) for m in timed}),
        "prompt_tokens_per_s_in_window": round(sum(m["prompt_tokens"] for m in timed) / window, 1) if window > 0 else None,
        "rows_per_s_in_window": round(sum(m["rows"] for m in timed) / window, 2) if window > 0 else None,
    }


def _count_true(table, column: str) -> int:
    if column not in table.column_names or table.num_rows == 0:
        return 0
    import pyarrow.compute as pc

    return int(pc.sum(table.column(column)).as_py() or 0)


# ----------------------------------------------------------------------------- driver


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
    storage = Storage(output_dir)
    if "://" not in output_dir and os.path.isfile(storage.root):
        raise LabelError(f"--output {output_dir} is a file; give a folder")
    files = expand_paths(input_path)
    adapter = adapter_identity(adapter_path)
    identity = {"model_name": cfg.model.name, "adapter_id": adapter["id"] if adapter else None}
    manifest = _manifest_for(storage, cfg, input_path, files, adapter, rows_per_unit, overwrite)
    units = [WorkUnit.from_dict(d) for d in manifest["units"]]

    stale = storage.remove_stale_temporaries()
    storage.delete_dir(f"{storage.root}/{FAILED_DIR}")  # failures of an earlier attempt
    done = done_unit_ids(storage)
    pending = [u for u in units if u.unit_id not in done]
    log.info("%d units, %d done earlier, %d to label (%d stale temp files removed)", len(units), len(done), len(pending), stale)
    label_seconds = 0.0
    if pending:
        from sentiment_ray.ray_cluster import connect

        connect(cfg.run.ray_address)
        label_started = time.perf_counter()  # actor start-up (model load) counts, cluster start-up not
        _run_on_ray(cfg, pending, adapter_path, storage.root, identity)
        label_seconds = time.perf_counter() - label_started

    markers = _read_markers(storage, units)
    ran_now = [markers[u.unit_id] for u in pending]
    totals = _totals(markers.values())
    summary: dict[str, Any] = {
        "output": storage.root,
        "predictions": f"{storage.root}/predictions",
        "csv": f"{storage.root}/{CSV_DIR}",
        "input": input_path,
        "files": len(files),
        "model": cfg.model.name,
        "adapter": adapter["id"] if adapter else None,
        "mode": cfg.label.mode,
        **totals,
        "units": {"total": len(units), "labelled_now": len(pending), "done_before": len(units) - len(pending)},
        "rows_labelled_now": sum(m["rows"] for m in ran_now),
        "label_seconds": round(label_seconds, 3),
        "rows_per_s": round(sum(m["rows"] for m in ran_now) / label_seconds, 2) if ran_now and label_seconds else None,
        "prompt_tokens_per_s": (
            round(sum(m["prompt_tokens"] for m in ran_now) / label_seconds, 1) if ran_now and label_seconds else None
        ),
        "prompt_tokens_per_predict_s": (
            round(totals["prompt_tokens"] / totals["predict_seconds"], 1) if totals["predict_seconds"] else None
        ),
        **_labelling_window(ran_now),
    }
    summary["submission"] = _merge_submission(storage, units) if cfg.label.write_submission else None
    summary["quarantine"] = _merge_quarantine(storage, units, markers)
    metrics = _evaluate(storage, units, cfg)
    summary["metrics_path"] = f"{storage.root}/{METRICS_NAME}" if metrics else None
    summary["report_png"] = f"{storage.root}/{REPORT_PNG_NAME}" if metrics else None
    summary["metrics"] = _headline(metrics) if metrics else None
    summary["seconds"] = round(time.perf_counter() - started, 3)
    storage.write_json(f"{storage.root}/{SUMMARY_NAME}", summary)
    return summary


def _manifest_for(storage, cfg, input_path, files, adapter, rows_per_unit, overwrite) -> dict[str, Any]:
    """The existing manifest when it matches this run, else a fresh plan (after clearing
    the old outputs when `overwrite`)."""
    inputs = [f.identity() for f in describe_inputs(files)]
    wanted = {
        "inputs": inputs,
        "config_fingerprint": _fingerprint(prediction_config(cfg)),
        "adapter_sha256": adapter["sha256"] if adapter else None,
    }
    path = f"{storage.root}/{MANIFEST_NAME}"
    if storage.exists(path) and not overwrite:
        existing = storage.read_json(path)
        problems = _manifest_differences(existing, wanted, cfg, rows_per_unit)
        if problems:
            raise LabelError(
                f"{storage.root} holds a labelling run of different inputs or settings:\n  "
                + "\n  ".join(problems)
                + "\nRerun with --overwrite to start over there, or choose another --output."
            )
        return existing
    if overwrite:
        _clear_outputs(storage)
    rows_per_unit = rows_per_unit or DEFAULT_ROWS_PER_UNIT
    registry = IdRegistry(files)
    try:
        plan = plan_units(
            files,
            text_column=cfg.data.text_column,
            id_column=cfg.data.id_column,
            generate_ids=cfg.label.generate_ids,
            rows_per_unit=rows_per_unit,
            registry=registry,
            reserved_columns=output_columns(cfg),
        )
        duplicates = registry.duplicates()
    finally:
        registry.close()
    if duplicates:
        raise duplicate_id_error(duplicates, cfg.data.id_column)
    from sentiment_ray.manifest import git_commit, package_versions

    manifest = {
        "version": MANIFEST_VERSION,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": input_path,
        **wanted,
        "adapter": adapter,
        "prediction_config": prediction_config(cfg),
        "rows_per_unit": rows_per_unit,
        "total_rows": plan.total_rows,
        "files_with_generated_ids": plan.files_without_ids,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "units": [u.to_dict() for u in plan.units],
    }
    storage.write_json(path, manifest)
    return manifest


def _manifest_differences(existing: dict, wanted: dict, cfg: ExperimentConfig, rows_per_unit: int | None) -> list[str]:
    problems = []
    if existing.get("version") != MANIFEST_VERSION:
        problems.append(f"manifest version {existing.get('version')} (this code writes {MANIFEST_VERSION})")
    before = {i["path"]: i for i in existing.get("inputs", [])}
    now = {i["path"]: i for i in wanted["inputs"]}
    for p in sorted(set(before) - set(now)):
        problems.append(f"input file no longer given: {p}")
    for p in sorted(set(now) - set(before)):
        problems.append(f"new input file: {p}")
    for p in sorted(set(now) & set(before)):
        if (before[p]["size"], before[p]["mtime_ns"]) != (now[p]["size"], now[p]["mtime_ns"]):
            problems.append(f"input file changed (size/mtime): {p}")
    if existing.get("config_fingerprint") != wanted["config_fingerprint"]:
        old, new = existing.get("prediction_config", {}), prediction_config(cfg)
        changed = [
            f"{section}.{key}"
            for section in sorted(set(old) | set(new))
            for key in sorted(set(old.get(section, {})) | set(new.get(section, {})))
            if old.get(section, {}).get(key) != new.get(section, {}).get(key)
        ]
        problems.append(f"settings that decide the predictions changed: {', '.join(changed) or 'unknown'}")
    if existing.get("adapter_sha256") != wanted["adapter_sha256"]:
        problems.append(f"adapter differs (was {(existing.get('adapter') or {}).get('id')})")
    if rows_per_unit and rows_per_unit != existing.get("rows_per_unit"):
        problems.append(f"rows per unit {rows_per_unit} (the run was planned with {existing.get('rows_per_unit')})")
    return problems


def _clear_outputs(storage: Storage) -> None:
    """Remove what a previous run wrote (only the names this module writes)."""
    for sub in OUTPUT_DIRS:
        storage.delete_dir(f"{storage.root}/{sub}")
    for name in (MANIFEST_NAME, SUMMARY_NAME, METRICS_NAME, REPORT_PNG_NAME, SUBMISSION_NAME, QUARANTINE_NAME):
        storage.delete(f"{storage.root}/{name}", missing_ok=True)


def _run_on_ray(cfg: ExperimentConfig, pending: list[WorkUnit], adapter_path, output_root: str, identity) -> None:
    import ray

    from sentiment_ray.ray_cluster import cluster_gpu_count, resolve_use_gpu

    use_gpu = resolve_use_gpu(cfg.run.use_gpu)
    actors = cfg.label.num_actors or (cluster_gpu_count() if use_gpu else 1)
    if use_gpu and actors == 0:
        raise LabelError(
            "run.use_gpu=true but the cluster has no GPU now; set label.num_actors to the GPU actors an "
            "autoscaler will provide, or run.use_gpu=auto for CPU actors"
        )
    actors = max(1, min(actors, len(pending)))
    items = [{"unit": json.dumps(u.to_dict())} for u in pending]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        Labeler,
        fn_constructor_kwargs={
            "cfg": cfg.model_dump(),
            "adapter_path": adapter_path if not adapter_path or "://" in adapter_path else os.path.abspath(adapter_path),
            "output_dir": output_root,
            "identity": identity,
        },
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )
    try:
        for _ in dataset.iter_rows():
            pass  # progress shows in Ray Data's bars; the markers are the record
    except Exception as err:  # noqa: BLE001 - re-raised as the actor's own error
        failure = _first_failure(Storage(output_root))
        if failure is None:
            raise
        # Ray hands over only the traceback text; the actor recorded type and message.
        error_type = DataError if failure["type"] == "DataError" else LabelError
        message = failure["message"] if failure["type"] == "DataError" else f"{failure['where']}: {failure['type']}: {failure['message']}"
        raise error_type(message) from err


def _first_failure(storage: Storage) -> dict[str, Any] | None:
    names = storage.list_names(f"{storage.root}/{FAILED_DIR}")
    return storage.read_json(f"{storage.root}/{FAILED_DIR}/{names[0]}") if names else None


def _read_markers(storage: Storage, units: list[WorkUnit]) -> dict[str, dict[str, Any]]:
    markers, missing = {}, []
    for unit in units:
        path = f"{storage.root}/{DONE_DIR}/{unit.unit_id}.json"
        if not storage.exists(path):
            missing.append(unit.unit_id)
            continue
        marker = storage.read_json(path)
        if marker["labelled"] + marker["bad_rows"] != unit.num_rows:
            raise LabelError(f"{path}: {marker['labelled']} + {marker['bad_rows']} rows, but the unit has {unit.num_rows}")
        markers[unit.unit_id] = marker
    if missing:
        raise LabelError(f"{len(missing)} units have no commit marker after the run (first: {missing[:3]}); rerun the command")
    return markers


def _totals(markers) -> dict[str, Any]:
    markers = list(markers)
    bad = Counter()
    for m in markers:
        bad.update(m["bad_by_kind"])
    return {
        "rows": sum(m["rows"] for m in markers),
        "labelled": sum(m["labelled"] for m in markers),
        "bad_rows": sum(m["bad_rows"] for m in markers),
        "bad_by_kind": dict(bad),
        "truncated": sum(m["truncated"] for m in markers),
        "parse_failed": sum(m["parse_failed"] for m in markers),
        "prompt_tokens": sum(m["prompt_tokens"] for m in markers),
        "predict_seconds": round(sum(m["predict_seconds"] for m in markers), 3),
    }


def _merge_submission(storage: Storage, units: list[WorkUnit]) -> str:
    """One `ID,label` file in input order (unit order, then row order), streamed."""
    path = f"{storage.root}/{SUBMISSION_NAME}"
    with storage.atomic_writer(path) as out:
        out.write(submission_csv([], []))
        for unit in units:
            shard = storage.read_bytes(unit_paths(storage.root, unit.unit_id).csv)
            out.write(shard.split(b"\n", 1)[1] if b"\n" in shard else b"")
    return path


def _merge_quarantine(storage: Storage, units: list[WorkUnit], markers: dict[str, dict]) -> str:
    """All quarantined rows in input order (an empty file when there are none)."""
    path = f"{storage.root}/{QUARANTINE_NAME}"
    with storage.atomic_writer(path) as out:
        for unit in units:
            if markers[unit.unit_id]["bad_rows"]:
                out.write(storage.read_bytes(unit_paths(storage.root, unit.unit_id).quarantine))
    return path


# ----------------------------------------------------------------------------- evaluation


def _evaluate(storage: Storage, units: list[WorkUnit], cfg: ExperimentConfig) -> dict[str, Any] | None:
    """Metrics against the input's labels (rows whose label is missing or unknown are
    counted, not scored); None when no row has a usable label. Reads only the label,
    prediction, confidence and language columns of the shards."""
    import pyarrow.parquet as pq

    from sentiment_ray.data import as_key, resolve_label
    from sentiment_ray.metrics import classification_report, expected_calibration_error

    labels = LabelSet(cfg.prompt.labels)
    label_col, lang_col = cfg.data.label_column, cfg.data.lang_column
    truth, predicted, confidence, langs = [], [], [], []
    unlabelled = 0
    for unit in units:
        path = unit_paths(storage.root, unit.unit_id).predictions
        with storage.open_input(path) as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            if "pred_label" not in names:
                continue  # every row of the unit was quarantined
            wanted = [c for c in (label_col, "pred_label", "confidence", lang_col) if c in names]
            table = parquet.read(columns=wanted)
        if label_col not in names:
            unlabelled += table.num_rows
            continue
        gold = table.column(label_col).to_pylist()
        pred = table.column("pred_label").to_pylist()
        conf = table.column("confidence").to_pylist() if "confidence" in names else [None] * len(gold)
        lang = table.column(lang_col).to_pylist() if lang_col in names else [None] * len(gold)
        for g, p, c, la in zip(gold, pred, conf, lang):
            resolved, _ = resolve_label(g, labels, cfg.data.label_map)
            if resolved is None:
                unlabelled += 1
                continue
            truth.append(resolved)
            predicted.append(p)
            confidence.append(c)
            langs.append(as_key(la))
    if not truth:
        return None
    has_lang = any(x is not None for x in langs)
    report = classification_report(truth, predicted, list(labels), langs if has_lang else None)
    report["rows_without_label"] = unlabelled
    calibration = None
    if cfg.label.mode == "scoring":
        calibration = expected_calibration_error(confidence, [t == p for t, p in zip(truth, predicted)])
        report["ece"] = calibration["ece"]
        report["calibration_bins"] = calibration["bins"]
    storage.write_json(f"{storage.root}/{METRICS_NAME}", report)

    from sentiment_ray.report_plots import render_report_png

    png = render_report_png(
        report["confusion_matrix"],
        calibration["bins"] if calibration else None,
        title=f"{os.path.basename(cfg.model.name.rstrip('/'))} ({cfg.label.mode}, n={report['n']})",
        ece=report.get("ece"),
    )
    storage.write_bytes(f"{storage.root}/{REPORT_PNG_NAME}", png)
    from sentiment_ray.report_html import REPORT_FILE, prediction_report_html  # one HTML page beside metrics.json
    storage.write_bytes(f"{storage.root}/{REPORT_FILE}", prediction_report_html(report, title=f"Labelling with {cfg.model.name}").encode())
    return report


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    """The metrics for the one-line summary (the full report is in metrics.json)."""
    return {
        "n": report["n"],
        "accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"],
        "ece": report.get("ece"),
        "unparsed": report["unparsed"],
        "rows_without_label": report["rows_without_label"],
        "per_language": report.get("per_language"),
    }
