"""The labelling actor: holds one model for its whole life and labels work units.

    Labeler(cfg).predict(sentences)                        # the scoring core, no Ray (benchmarks)
    Labeler(cfg, output_dir=out).label_unit(unit)          # one unit's files
    ray.data ... .map_batches(Labeler, ...)                # what label/recipe.py runs

Per unit it streams the unit's rows through the one reader and the one validator (a reader
thread validates and tokenises the next chunk while the model works), quarantines bad rows,
scores (or generates) the good ones, and commits the unit's Parquet / CSV / quarantine
shards, then its marker (label/layout.py).
"""

from __future__ import annotations

import json
import os
import queue
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from typing import Any

from sentiment_ray import backends, languages, risk
from sentiment_ray.backends.adapter_forms import prepare_adapter
from sentiment_ray.calibration import adapter_temperature
from sentiment_ray.config import ExperimentConfig
from sentiment_ray.io import quarantine
from sentiment_ray.io.readers import read_chunks
from sentiment_ray.io.rows import SOURCE_COLUMNS, CheckedRows, RowRules, RowValidator
from sentiment_ray.io.storage import Storage
from sentiment_ray.io.uris import StorageIOError, local_folder
from sentiment_ray.io.values import DataError
from sentiment_ray.label import layout
from sentiment_ray.label.plan import LabelRunError, WorkUnit, adapter_identity, check_unit_content
from sentiment_ray.labels import LabelSet
from sentiment_ray.prompts import PromptTemplate
from sentiment_ray.scoring import LabelScorer, compile_scoring, model_device

# Columns the labeller adds to every row besides SOURCE_COLUMNS and one `p_<label>` per
# class; an input column with one of these names is an error.
IDENTITY_COLUMNS = ("model_name", "adapter_id")
PREDICTION_COLUMNS = (
    "pred_label",
    "confidence",
    "truncated",
    "parse_failed",
    "generated_text",
    "prompt_markers",
    "lang_detected",
    "accepted",
)
# Rows read, validated and tokenised together, then handed to the scorer, which sorts them
# by length into token-budget batches: a wider window means less padding.
CHUNK_ROWS = 4096
# A unit's first piece: the model waits for it (nothing overlaps it), so it is small.
FIRST_PIECE_ROWS = 512
WARM_UP_SENTENCES = ["A short sentence to warm the kernels up."] * 8
# A CPU scores small padded batches faster per row (memory-bound); label.max_batch_tokens is
# sized for a GPU, so on a CPU the budget is at most this unless label.batch_size is set.
CPU_MAX_BATCH_TOKENS = 2048
# Inside a piece, rows scored so far reach the driver's progress at most this often.
PROGRESS_EVERY_S = 2.0


def batch_token_budget(cfg: ExperimentConfig, device: Any) -> int:
    """label.max_batch_tokens, bounded by CPU_MAX_BATCH_TOKENS on a CPU unless the user
    bounds batches by rows (label.batch_size)."""
    budget = cfg.label.max_batch_tokens
    if getattr(device, "type", None) == "cpu" and cfg.label.batch_size is None:
        return min(budget, CPU_MAX_BATCH_TOKENS) if budget else CPU_MAX_BATCH_TOKENS
    return budget


def output_columns(cfg: ExperimentConfig) -> set[str]:
    """Columns the labeller adds to every row; an input column with one of these names is an error."""
    return {*SOURCE_COLUMNS, *IDENTITY_COLUMNS, *PREDICTION_COLUMNS, *LabelSet(cfg.prompt.labels).probability_columns()}


class Labeler:
    """A Ray Data callable class: one batch = one work unit (a `unit` column of JSON)."""

    def __init__(
        self,
        cfg: ExperimentConfig | dict[str, Any],
        adapter_path: str | None = None,
        output_dir: str | None = None,
        identity: dict[str, Any] | None = None,
        device: Any = None,
        progress: Any = None,
    ):
        cfg = cfg if isinstance(cfg, ExperimentConfig) else ExperimentConfig(**cfg)
        # Unsloth must be imported before anything imports transformers/peft: first thing.
        self.backend_name = backends.resolve_backend_name(cfg.model.backend)
        backends.early_import(self.backend_name)

        self.cfg = cfg
        self.labels = LabelSet(cfg.prompt.labels)
        self.mode = cfg.label.mode
        started = time.perf_counter()
        backend = backends.get_backend(self.backend_name)
        with local_folder(adapter_path) as local_adapter:  # an s3:// adapter: a local copy while loading
            model, tokenizer = backend.load_for_inference(cfg, local_adapter, device)
            self.temperature = adapter_temperature(local_adapter) if cfg.label.calibrate else 1.0
        budget = batch_token_budget(cfg, model_device(model))
        model, self.adapter_form = prepare_adapter(backend, model, cfg.label.merge_adapter, budget)
        # Generation needs room for the new tokens inside the model's context.
        max_length = cfg.model.max_seq_length - (cfg.label.max_new_tokens if self.mode == "generate" else 0)
        self.scorer = LabelScorer(
            model,
            tokenizer,
            PromptTemplate.from_config(cfg.prompt),
            self.labels,
            max_length,
            cfg.label.batch_size,
            budget,
            reuse_prefix=cfg.label.reuse_prefix,
            temperature=self.temperature,
            compile=self.mode == "scoring" and compile_scoring(cfg.label.compile, model_device(model), self.adapter_form.form),
        )
        if self.mode == "scoring":
            # Kernel selection, allocator growth and compilation happen here rather than in the first unit.
            self.scorer.warm_up(WARM_UP_SENTENCES)
        self.load_seconds = time.perf_counter() - started
        self.progress = progress
        self.out = Storage(output_dir) if output_dir else None
        identity = identity or {"model_name": cfg.model.name, "adapter_id": (adapter_identity(adapter_path) or {}).get("id")}
        self.model_name, self.adapter_id = identity["model_name"], identity["adapter_id"]
        self.plan_id = identity.get("plan_id")
        self.acceptance = identity.get("acceptance")  # label.max_error: threshold and calibrated languages
        self.validator = RowValidator(
            RowRules(text_column=cfg.data.text_column, id_column=cfg.data.id_column, max_text_chars=cfg.label.max_text_chars)
        )
        self.markers = PromptTemplate.from_config(cfg.prompt).markers() if cfg.label.flag_prompt_markers else []
        self.chunk_rows = CHUNK_ROWS
        self.first_piece_rows = min(FIRST_PIECE_ROWS, cfg.label.batch_size or FIRST_PIECE_ROWS)

    def __call__(self, batch):
        """Ray Data entry: a batch of units (a `unit` column of JSON) -> one row each: the
        commit marker, or the error record of a unit that failed (Ray hands the driver only
        an exception's text; this way it gets the kind, the message and the traceback)."""
        import pyarrow as pa

        markers, errors = [], []
        for u in batch.column("unit").to_pylist():
            unit = WorkUnit.from_dict(json.loads(u))
            try:
                markers.append(json.dumps(self.label_unit(unit)))
                errors.append("")
            except Exception as err:  # noqa: BLE001 - handed to the driver, which stops the run
                markers.append("")
                errors.append(json.dumps(self.failure_record(unit, err)))
        return pa.table({"marker": markers, "error": errors})

    # -- predictions

    def predict(self, sentences: Sequence[str], encoded=None, on_batch=None) -> tuple[dict[str, Any], int]:
        """(prediction columns as Arrow arrays, prompt tokens) for `sentences`, in order.
        `encoded`: `scorer.encode(sentences)` when the caller already has it; `on_batch(rows)`
        after each micro-batch (progress)."""
        import pyarrow as pa

        if self.mode == "scoring":
            result = self.scorer.score_ids(*(encoded or self.scorer.encode(sentences)), on_batch=on_batch)
            columns = {"pred_label": pa.array(result.predicted(), type=pa.string())}
            for j, name in enumerate(self.labels.probability_columns()):
                columns[name] = pa.array(result.probs[:, j])
            columns["confidence"] = pa.array(result.confidence().astype("float32"))
            columns["truncated"] = pa.array(result.truncated, type=pa.bool_())
            return columns, result.prompt_tokens
        result = self.scorer.generate(sentences, self.cfg.label.max_new_tokens, on_batch=on_batch)
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
        if self.out is None:
            raise LabelRunError("Labeler.label_unit needs output_dir")
        try:
            return self._label_unit(unit)
        except Exception as err:
            # Best effort: the output folder may be what failed (full, not writable).
            try:
                self.out.write_json(layout.unit_files(unit.unit_id).failed, self.failure_record(unit, err))
            except Exception:  # noqa: BLE001
                pass
            raise

    @staticmethod
    def failure_record(unit: WorkUnit, err: BaseException) -> dict[str, Any]:
        """Why `unit` failed: kind, one-line message, errno, the traceback, where."""
        return {
            "unit_id": unit.unit_id,
            "where": unit.describe(),
            "type": type(err).__name__,
            "message": str(err),
            "storage": isinstance(err, StorageIOError),
            "errno": getattr(err, "errno", None),
            "traceback": "".join(traceback.format_exception(err))[-20000:],
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    def _label_unit(self, unit: WorkUnit) -> dict[str, Any]:
        import pyarrow as pa

        files = layout.unit_files(unit.unit_id)
        if self.out.is_file(files.done):
            marker = self.out.read_json(files.done)
            if marker.get("plan_id") == self.plan_id:
                self._report(unit, marker["rows"], marker["bad_rows"])
                return marker
        check_unit_content(unit)  # the bytes planned, not an edit since
        started, started_at = time.perf_counter(), time.time()
        tables, quarantined = [], []
        tokens, rows_read, predict_seconds = 0, 0, 0.0
        text_cut = 0
        langs_seen: Counter = Counter()
        for checked, encoded, detected in _prefetched(self._checked_pieces(unit)):
            rows_before = rows_read
            rows_read += len(checked.good) + len(checked.quarantined)
            text_cut += sum(checked.cut)
            quarantined.extend(checked.quarantined)
            table = checked.table(self.cfg.data.id_column)
            if table.num_rows:
                t = time.perf_counter()
                on_batch = self._progress_within(unit, rows_before, len(quarantined))
                predictions, n_tokens = self.predict(checked.sentences, encoded, on_batch)
                predict_seconds += time.perf_counter() - t
                tokens += n_tokens
                predictions = self._flag_rows(predictions, checked)
                predictions, row_langs = self._languages_and_acceptance(predictions, table, detected)
                langs_seen.update("unknown" if x is None else x for x in row_langs)
                clash = sorted(({*predictions, *IDENTITY_COLUMNS}) & set(table.column_names))
                if clash:
                    raise DataError(f"{unit.file}: input column(s) {clash} clash with columns the labeller adds; rename them")
                for name, array in predictions.items():
                    table = table.append_column(name, array)
                table = table.append_column("model_name", pa.array([self.model_name] * table.num_rows, pa.string()))
                table = table.append_column("adapter_id", pa.array([self.adapter_id] * table.num_rows, pa.string()))
                tables.append(table)
            elif not tables:
                tables.append(table)  # keeps the schema of an all-bad unit
            self._report(unit, rows_read, len(quarantined))
        if rows_read != unit.num_rows:
            raise DataError(
                f"{unit.describe()} were planned but {rows_read} rows were read; "
                "the file changed since the run was planned (rerun with --overwrite)"
            )
        table = _concat(tables, unit)
        labelled = table.num_rows if "pred_label" in table.column_names else 0
        self._write_parquet(files.predictions, table)
        ids = table.column(self.cfg.data.id_column).to_pylist() if labelled else []
        preds = table.column("pred_label").to_pylist() if labelled else []
        self.out.write_bytes(files.csv, submission_csv(ids, preds))
        if quarantined:
            self.out.write_bytes(files.quarantine, quarantine.to_jsonl(quarantined))
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
            "text_cut": text_cut,
            "prompt_markers": _count_true(table, "prompt_markers"),
            "languages": dict(langs_seen),
            "accepted": _count_true(table, "accepted"),
            "prompt_tokens": tokens,
            "predict_seconds": round(predict_seconds, 4),
            "seconds": round(time.perf_counter() - started, 4),
            "started_at": round(started_at, 3),
            "finished_at": round(time.time(), 3),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "node_id": _ray_node_id(),
            "actor_load_s": round(self.load_seconds, 3),
            "compile_s": round(self.scorer.compile_seconds, 3) if self.scorer.compiled else None,
            "adapter_form": self.adapter_form.form,
            "compiled": self.scorer.compiled,
            "weights_gib": self.adapter_form.weights_gib,
            "peak_gpu_gib": _peak_gpu_gib(),
            "peak_rss_mb": _peak_rss_mb(),
            "plan_id": self.plan_id,
        }
        self.out.write_json(files.done, marker)  # the commit: written last
        return marker

    def _report(self, unit: WorkUnit, rows: int, bad: int) -> None:
        if self.progress is not None:
            self.progress.update.remote(unit.unit_id, rows, bad)  # fire and forget

    def _progress_within(self, unit: WorkUnit, rows_before: int, bad: int):
        """A callback for the scorer: the rows of this piece scored so far, reported at most
        every PROGRESS_EVERY_S (the piece's full count is reported when it is done)."""
        if self.progress is None:
            return None
        done, last = 0, time.monotonic()

        def on_batch(rows: int) -> None:
            nonlocal done, last
            done += rows
            if time.monotonic() - last >= PROGRESS_EVERY_S:
                last = time.monotonic()
                self._report(unit, rows_before + done, bad)

        return on_batch

    def _checked_pieces(self, unit: WorkUnit):
        """(validated rows, their encoded prompts, their detected languages: None when the
        input has a language column) for the unit, chunk by chunk."""
        chunks = read_chunks(
            unit.file, start=unit.position, stop_row=unit.stop, row_groups=unit.row_groups or None, chunk_rows=self.chunk_rows
        )
        for index, chunk in enumerate(chunks):
            checked = self.validator.validate(chunk, has_ids=unit.has_ids, generated_ids=None if unit.has_ids else unit.id_name)
            # The model waits for a unit's first piece (nothing overlaps it), so that piece is
            # one batch; the rest is tokenised while the model scores it.
            pieces = _split_first(checked, self.first_piece_rows) if index == 0 else [checked]
            for piece in pieces:
                # Tokenised here, in the reader thread (the Rust tokenizer releases the GIL),
                # so the model never waits for it.
                encoded = self.scorer.encode(piece.sentences) if self.mode == "scoring" and piece.sentences else None
                # Beside tokenisation: each row's language, when the input does not say it.
                has_lang = self.cfg.data.lang_column in piece.chunk.columns
                detected = None if has_lang or not piece.sentences else languages.detect(piece.sentences)
                yield piece, encoded, detected

    def _flag_rows(self, predictions: dict[str, Any], checked: CheckedRows) -> dict[str, Any]:
        """Rows whose text was cut to label.max_text_chars count as truncated; rows whose
        text holds the prompt's markers get `prompt_markers` (label.flag_prompt_markers)."""
        import pyarrow as pa

        if any(checked.cut):
            before = predictions["truncated"].to_pylist()
            predictions["truncated"] = pa.array([a or b for a, b in zip(before, checked.cut)], type=pa.bool_())
        if self.markers:
            predictions["prompt_markers"] = pa.array(prompt_marker_flags(checked.sentences, self.markers), type=pa.bool_())
        return predictions

    def _languages_and_acceptance(self, predictions: dict[str, Any], table, detected) -> tuple[dict[str, Any], list]:
        """Each row's language (the input's language column, else `lang_detected`) and, with
        label.max_error, `accepted`: confidence at or above the certified threshold and a
        language the adapter was calibrated on (risk.accepted_flags)."""
        import pyarrow as pa

        if detected is not None:
            predictions["lang_detected"] = pa.array(detected, type=pa.string())
            row_langs = detected
        else:
            row_langs = languages.keys(table.column(self.cfg.data.lang_column).to_pylist())
        if self.acceptance is not None:
            confidence = predictions["confidence"].to_pylist()
            flags = risk.accepted_flags(confidence, row_langs, self.acceptance["threshold"], self.acceptance["languages"])
            predictions["accepted"] = pa.array(flags, type=pa.bool_())
        return predictions, row_langs

    def _write_parquet(self, name: str, table) -> None:
        import pyarrow.parquet as pq

        with self.out.atomic_writer(name) as out:
            pq.write_table(table, out, compression="zstd")


def _ray_node_id() -> str | None:
    """The Ray node this actor runs on (None outside Ray)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def submission_csv(ids: Sequence[str], labels: Sequence[str | None], header: bool = True) -> bytes:
    """`ID,label` rows in the submission format (a missing label is an empty field)."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(["ID", "label"])
    writer.writerows(zip(ids, ("" if x is None else x for x in labels)))
    return buffer.getvalue().encode("utf-8")


def prompt_marker_flags(sentences: Sequence[str], markers: Sequence[str]) -> list[bool]:
    """Per text: it contains one of the prompt's markers (case-insensitively)."""
    folded = [m.casefold() for m in markers]
    return [any(m in s.casefold() for m in folded) for s in sentences]


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MiB (Linux/macOS), for the marker."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)
    except (ImportError, OSError, ValueError):
        return None


def _peak_gpu_gib() -> float | None:
    """Peak GPU memory this process allocated so far, in GiB (None without CUDA)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def _split_first(checked: CheckedRows, rows: int) -> list[CheckedRows]:
    """[the first `rows` good rows (with all quarantine entries), the rest] of checked rows."""
    if len(checked.sentences) <= rows:
        return [checked]
    head, tail = checked.good[:rows], checked.good[rows:]
    cut = checked.cut or [False] * len(checked.good)
    return [
        CheckedRows(checked.chunk, head, checked.sentences[:rows], checked.ids[:rows], None, checked.quarantined, cut[:rows]),
        CheckedRows(checked.chunk, tail, checked.sentences[rows:], checked.ids[rows:], None, [], cut[rows:]),
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
        raise DataError(f"{unit.describe()}: a column changes type between rows ({err}); make each column one type") from None


def _count_true(table, column: str) -> int:
    if column not in table.column_names or table.num_rows == 0:
        return 0
    import pyarrow.compute as pc

    return int(pc.sum(table.column(column)).as_py() or 0)
