"""The labelling plan: the input cut into work units, checked once, and recorded in the
output folder's manifest, so a rerun reuses it and refuses inputs or settings that changed.

A *work unit* is a row range of one input file. Parquet units are consecutive row groups,
from the footer alone. CSV and JSON lines are read once (the only way to count CSV records,
whose quoted fields may span lines) by the one reader, in small chunks of the ID column;
each chunk's end is where the next one starts (byte offset and line), so a unit made of
consecutive chunks starts at a known position and an actor seeks straight to its rows. The
same pass feeds every ID to the duplicate check. Units are sized once the input's length is
known: about four per actor, so progress and resume move in small steps.

Each unit also records the sha256 of the bytes it covers (`span`; with the CSV header or the
Parquet footer its rows depend on): an actor checks it before labelling the unit, and a
rerun checks it for every unit done earlier, so an input edited in place (same size, even
the same modification time) is refused instead of mixing old and new predictions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sentiment_ray import provenance, rerun
from sentiment_ray.calibration import CALIBRATION_FILE
from sentiment_ray.config import ExperimentConfig
from sentiment_ray.errors import UserError
from sentiment_ray.io.files import describe_inputs, file_format, id_names, is_json_array_file, parquet_footer, span_digests
from sentiment_ray.io.ids import IdIndex, duplicates_message
from sentiment_ray.io.readers import Position, csv_header, csv_header_size, parquet_file, read_chunks
from sentiment_ray.io.storage import Storage
from sentiment_ray.io.uris import StorageError, local_folder
from sentiment_ray.io.values import DataError, id_key
from sentiment_ray.label import layout
from sentiment_ray.weights import UnsafeWeightsError, check_adapter_weights

MANIFEST_VERSION = 3
DEFAULT_ROWS_PER_UNIT = 50_000
MIN_AUTO_ROWS = 500
UNITS_PER_ACTOR = 4


class LabelRunError(UserError, RuntimeError):
    """The labelling run cannot proceed (changed inputs, a failed unit, ...)."""


@dataclass(frozen=True)
class WorkUnit:
    """Rows [start, stop) (1-based data rows) of one input file."""

    index: int
    """Position in input order (files in `expand_paths` order, then rows)."""
    file: str
    fmt: str
    start: int
    stop: int
    has_ids: bool
    """The file has the ID column; otherwise IDs are generated as `<id_name>:<row>`."""
    id_name: str
    """The file's name for generated IDs: its path relative to the inputs' common folder."""
    byte_offset: int = 0
    """CSV/JSON lines: where row `start` begins (in the decompressed stream for .gz)."""
    first_line: int = 0
    """CSV/JSON lines: the line row `start` begins on (0: the file's start)."""
    row_groups: tuple[int, ...] = ()
    """Parquet: the row groups this unit covers."""
    span: tuple[int, int | None] = (0, None)
    """The bytes [start, stop) the unit's rows are in (stop None: to the end of the file);
    CSV / JSON lines in the decompressed stream, Parquet in the file as stored."""
    sha256: str = ""
    """sha256 of those bytes after the file's header (CSV) or footer (Parquet): see
    `content_digest`."""

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    @property
    def position(self) -> Position:
        return Position(self.start, self.byte_offset, self.first_line)

    @property
    def unit_id(self) -> str:
        """Stable name: input position (for humans and sorting) + hash of file and range."""
        digest = hashlib.sha256(f"{self.file}\0{self.start}\0{self.stop}".encode()).hexdigest()[:10]
        return f"part-{self.index:06d}-{digest}"

    def describe(self) -> str:
        return f"{self.file}: rows {self.start}-{self.stop - 1}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["row_groups"] = list(self.row_groups)
        d["span"] = list(self.span)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkUnit:
        return cls(**{**d, "row_groups": tuple(d.get("row_groups") or ()), "span": tuple(d.get("span") or (0, None))})


@dataclass
class Plan:
    units: list[WorkUnit]
    total_rows: int
    files_without_ids: list[str]
    rows_per_unit: int


# ----------------------------------------------------------------------------- planning


def auto_rows_per_unit(total_rows: int, actors: int) -> int:
    """Units of about a quarter of each actor's share of the input, so progress, retries and
    resumes move in small steps and the last units end close together; between
    MIN_AUTO_ROWS and DEFAULT_ROWS_PER_UNIT rows."""
    share = math.ceil(total_rows / (UNITS_PER_ACTOR * max(1, actors)))
    return max(MIN_AUTO_ROWS, min(DEFAULT_ROWS_PER_UNIT, share))


def plan_units(
    files: Sequence[str],
    *,
    text_column: str,
    id_column: str,
    generate_ids: bool,
    rows_per_unit: int | None = None,
    actors: int | Callable[[], int] = 1,
    reserved_columns: Sequence[str] = (),
) -> Plan:
    """Split the input files into work units of `rows_per_unit` rows (unset: sized by
    `auto_rows_per_unit` for `actors` actors; a callable is asked only once every file has
    passed its checks, so a bad input fails before it can start a cluster), checking each file has the text column and
    (unless `generate_ids`) the ID column, and that no ID repeats anywhere in the input. An
    input column named like one in `reserved_columns` (what the labeller adds) is an error
    (CSV header, Parquet schema; JSON lines are checked row by row when labelled).

    Files are read once, in granules of `rows_per_unit` rows (or MIN_AUTO_ROWS when it is
    unset) whose start positions are recorded; units are consecutive granules of one file
    (Parquet: consecutive row groups; a larger row group is one unit)."""
    if rows_per_unit is not None and rows_per_unit <= 0:
        raise ValueError(f"rows_per_unit must be positive, got {rows_per_unit}")
    granule = rows_per_unit or MIN_AUTO_ROWS
    names = id_names(files)
    planned: list[tuple[str, str, bool, list[dict]]] = []
    without_ids: list[str] = []
    duplicates, duplicate_count = [], 0
    total = 0
    with IdIndex() as ids:

        def check_ids(chunk) -> None:
            nonlocal duplicate_count
            found = ids.add(chunk.file, chunk.first_row, [id_key(v) for v in chunk.column_values(id_column)])
            duplicate_count += len(found)
            duplicates.extend(found[: max(0, 20 - len(duplicates))])

        for path in files:
            fmt = file_format(path)
            if fmt == "parquet":
                spans, has_ids, n, columns = _plan_parquet(path, text_column, id_column)
                for chunk in read_chunks(path, columns=[id_column]) if has_ids else ():
                    check_ids(chunk)
            else:
                spans, has_ids, n, columns = _plan_text(path, fmt, text_column, id_column, granule, check_ids)
            if n == 0:
                raise DataError(f"{path}: no data rows")
            clash = sorted(set(reserved_columns) & set(columns))
            if clash:
                raise DataError(f"{path}: input column(s) {clash} clash with columns the labeller adds; rename them")
            if not has_ids:
                without_ids.append(path)
            planned.append((path, fmt, has_ids, spans))
            total += n
    if duplicates:
        raise DataError(duplicates_message(duplicates, id_column, duplicate_count))
    if without_ids and not generate_ids:
        shown = ", ".join(without_ids[:5]) + (f" and {len(without_ids) - 5} more" if len(without_ids) > 5 else "")
        raise DataError(
            f"no {id_column!r} column in {shown}: every prediction needs the input's ID. "
            f"Set data.id_column to the ID column, or label.generate_ids=true to number rows as <file>:<row>"
        )
    target = rows_per_unit or auto_rows_per_unit(total, actors() if callable(actors) else actors)
    units: list[WorkUnit] = []
    for path, fmt, has_ids, spans in planned:
        grouped = _group(spans, target)
        digests = content_digests(path, fmt, [span["span"] for span in grouped])
        for span, digest in zip(grouped, digests):
            units.append(
                WorkUnit(index=len(units), file=path, fmt=fmt, id_name=names[path], has_ids=has_ids, sha256=digest, **span)
            )
    return Plan(units=units, total_rows=total, files_without_ids=without_ids, rows_per_unit=target)


def _group(spans: list[dict], target: int) -> list[dict]:
    """Consecutive spans of one file merged into units of at most `target` rows (a single
    larger span stays one unit); a unit starts where its first span starts."""
    units: list[dict] = []
    for span in spans:
        last = units[-1] if units else None
        if last is not None and last["stop"] - last["start"] + span["stop"] - span["start"] <= target:
            last["stop"] = span["stop"]
            if "row_groups" in span:  # Parquet: the union of the row groups' byte ranges
                last["row_groups"] = last["row_groups"] + span["row_groups"]
                last["span"] = (min(last["span"][0], span["span"][0]), max(last["span"][1], span["span"][1]))
            else:  # text: from the first span's start to the last one's end
                last["span"] = (last["span"][0], span["span"][1])
        else:
            units.append(dict(span))
    return units


def _plan_parquet(path, text_column, id_column):
    meta = parquet_file(path)
    names = meta.schema_arrow.names
    if text_column not in names:
        raise DataError(f"{path}: no text column {text_column!r}; columns: {names} (set data.text_column)")
    spans, start = [], 1
    for g in range(meta.num_row_groups):
        row_group = meta.metadata.row_group(g)
        if row_group.num_rows:
            spans.append(dict(start=start, stop=start + row_group.num_rows, row_groups=(g,), span=_row_group_bytes(row_group)))
            start += row_group.num_rows
    return spans, id_column in names, meta.metadata.num_rows, names


def _row_group_bytes(row_group) -> tuple[int, int]:
    """[first, last) byte of a Parquet row group's column chunks (dictionary pages included)."""
    starts, ends = [], []
    for c in range(row_group.num_columns):
        column = row_group.column(c)
        first = (
            column.dictionary_page_offset
            if column.has_dictionary_page and column.dictionary_page_offset
            else column.data_page_offset
        )
        starts.append(first)
        ends.append(first + column.total_compressed_size)
    return min(starts), max(ends)


def _plan_text(path, fmt, text_column, id_column, granule, check_ids):
    columns: list[str] = []
    if fmt == "csv":
        columns = csv_header(path)
        if text_column not in columns:
            raise DataError(f"{path}: no text column {text_column!r}; header: {columns} (set data.text_column)")
    spans, has_ids, total = [], id_column in columns, 0
    whole_file = fmt == "jsonl" and is_json_array_file(path)  # read whole by every unit
    position = Position()
    for chunk in read_chunks(path, columns=[id_column], chunk_rows=granule):
        end = None if whole_file or chunk.next is None else chunk.next.byte_offset
        spans.append(
            dict(
                start=chunk.first_row,
                stop=chunk.first_row + len(chunk),
                byte_offset=position.byte_offset,
                first_line=position.line,
                span=(0 if whole_file else position.byte_offset, end),
            )
        )
        position = chunk.next or position
        if id_column in chunk.columns:
            has_ids = True  # JSON lines: any record with the key
            check_ids(chunk)
        total += len(chunk)
    if spans and not whole_file:
        spans[-1]["span"] = (spans[-1]["span"][0], None)  # the last unit runs to the end of the file
    return spans, has_ids, total, columns


# ----------------------------------------------------------------------------- content


def _content_prefix(path: str, fmt: str) -> bytes:
    """What every unit's rows depend on besides their own bytes: a CSV file's header record,
    a Parquet file's footer (schema and row-group metadata)."""
    if fmt == "csv":
        size = csv_header_size(path)
        return span_digests(path, [(0, size)], decompressed=True)[0].encode()
    if fmt == "parquet":
        return hashlib.sha256(parquet_footer(path)[0]).hexdigest().encode()
    return b""


def content_digests(path: str, fmt: str, spans) -> list[str]:
    """The sha256 of each span of `path` (see WorkUnit.sha256), in one pass over the file."""
    return span_digests(path, [tuple(s) for s in spans], decompressed=fmt != "parquet", prefix=_content_prefix(path, fmt))


def changed_units(units: Sequence[WorkUnit]) -> list[WorkUnit]:
    """The units whose bytes differ from when they were planned (one pass per file)."""
    by_file: dict[str, list[WorkUnit]] = {}
    for unit in units:
        by_file.setdefault(unit.file, []).append(unit)
    changed = []
    for path, group in by_file.items():
        try:
            now = content_digests(path, group[0].fmt, [u.span for u in group])
        except DataError:
            changed.extend(group)  # shorter, unreadable as planned: changed
            continue
        changed.extend(u for u, digest in zip(group, now) if digest != u.sha256)
    return changed


def check_unit_content(unit: WorkUnit) -> None:
    """DataError when the bytes of `unit` changed since it was planned (an actor checks
    before labelling)."""
    if unit.sha256 and changed_units([unit]):
        raise DataError(changed_message([unit]))


def changed_message(units: Sequence[WorkUnit]) -> str:
    shown = "; ".join(u.describe() for u in units[:5]) + (f"; and {len(units) - 5} more units" if len(units) > 5 else "")
    return (
        f"input changed since the run was planned (content differs, whatever its size and modification "
        f"time): {shown}; rerun with --overwrite to label the new content, or restore the file"
    )


# ----------------------------------------------------------------------------- identity


def adapter_identity(adapter_path: str | None, *, allow_unsafe: bool = False) -> dict[str, Any] | None:
    """Path and sha256 of the adapter's files (adapter_config.json + weights), or None
    for zero-shot. The hash, not the path, decides whether outputs are comparable. Pickle
    weights are refused unless `allow_unsafe` (weights.py), before any actor starts."""
    if not adapter_path:
        return None
    try:
        with local_folder(adapter_path) as local:  # s3://, gs://: hash a local copy
            path = os.path.abspath(os.path.expanduser(local))
            if not os.path.isfile(os.path.join(path, "adapter_config.json")):
                raise LabelRunError(f"--adapter {adapter_path}: no adapter_config.json there (not a saved LoRA adapter)")
            try:
                check_adapter_weights(path, allow_unsafe=allow_unsafe)
            except UnsafeWeightsError as err:
                raise LabelRunError(f"--adapter {err}") from None
            digest = hashlib.sha256()
            # The weights, their config, and the temperature (it changes the probabilities).
            for name in sorted(n for n in os.listdir(path) if n.startswith("adapter_") or n == CALIBRATION_FILE):
                digest.update(name.encode() + b"\0")
                with open(os.path.join(path, name), "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
    except StorageError as err:
        raise LabelRunError(f"--adapter {err}") from None
    sha = digest.hexdigest()
    shown = adapter_path if "://" in adapter_path else os.path.abspath(os.path.expanduser(adapter_path))
    return {"path": shown, "sha256": sha, "id": f"{shown.rstrip('/').rsplit('/', 1)[-1] or shown}@{sha[:12]}"}


def prediction_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config fields that decide what the predictions are (not batch size or actor
    count, which may change between a crash and its rerun)."""
    return {
        "model": cfg.model.model_dump(exclude={"allow_unsafe_weights", "allow_base_mismatch"}),
        "prompt": cfg.prompt.model_dump(),
        "label": cfg.label.model_dump(
            include={
                "mode",
                "max_new_tokens",
                "default_label_on_parse_failure",
                "generate_ids",
                "calibrate",
                "max_text_chars",
                "flag_prompt_markers",
                "max_error",
                "max_error_delta",
            }
        ),
        "data": cfg.data.model_dump(include={"text_column", "id_column"}),
    }


def evaluation_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """How the predictions are judged against gold labels (read back by `eval`)."""
    return {
        "labels": list(cfg.prompt.labels),
        "label_column": cfg.data.label_column,
        "lang_column": cfg.data.lang_column,
        "label_map": dict(cfg.data.label_map),
    }


def _fingerprint(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- the manifest


def load_or_plan(
    out: Storage,
    cfg: ExperimentConfig,
    input_path: str,
    files: list[str],
    adapter: dict | None,
    rows_per_unit: int | None,
    reserved_columns: Sequence[str],
    actors: Callable[[], int] = lambda: 1,
) -> dict[str, Any]:
    """The existing manifest when it matches this run (a resume), else a fresh plan written
    as the manifest (units sized for `actors()` actors unless `rows_per_unit` is given).
    Refuses a folder holding a run of other inputs or settings."""
    inputs = [f.identity() for f in describe_inputs(files)]
    wanted = {
        "inputs": inputs,
        "config_fingerprint": _fingerprint(prediction_config(cfg)),
        "adapter_sha256": adapter["sha256"] if adapter else None,
    }
    existing = out.read_json_or_none(layout.MANIFEST_FILE)
    if existing is not None:
        problems = manifest_differences(existing, wanted, cfg, rows_per_unit)
        if problems:
            raise LabelRunError(
                f"{out.root} holds a labelling run of different inputs or settings:\n  "
                + "\n  ".join(problems)
                + "\nRerun with --overwrite to start over there, or choose another --output."
            )
        return existing
    plan = plan_units(
        files,
        text_column=cfg.data.text_column,
        id_column=cfg.data.id_column,
        generate_ids=cfg.label.generate_ids,
        rows_per_unit=rows_per_unit,
        actors=actors if not rows_per_unit else 1,
        reserved_columns=reserved_columns,
    )
    manifest = {
        "version": MANIFEST_VERSION,
        "plan_id": uuid.uuid4().hex,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": input_path,
        **wanted,
        "adapter": adapter,
        "prediction_config": prediction_config(cfg),
        "evaluation": evaluation_config(cfg),
        "rows_per_unit": plan.rows_per_unit,
        "total_rows": plan.total_rows,
        "files_with_generated_ids": plan.files_without_ids,
        "git_commit": provenance.git_commit(),
        "packages": provenance.package_versions(),
        "units": [u.to_dict() for u in plan.units],
    }
    out.write_json(layout.MANIFEST_FILE, manifest)
    return manifest


def manifest_differences(existing: dict, wanted: dict, cfg: ExperimentConfig, rows_per_unit: int | None) -> list[str]:
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
        # A size change is a change; the content of equal-sized files is checked unit by
        # unit (the modification time alone proves nothing either way).
        if before[p]["size"] != now[p]["size"]:
            problems.append(f"input file changed (size {before[p]['size']} -> {now[p]['size']} bytes): {p}")
    if existing.get("config_fingerprint") != wanted["config_fingerprint"]:
        changed = rerun.changes(existing.get("prediction_config", {}), prediction_config(cfg))
        problems.append(f"settings that decide the predictions changed: {'; '.join(changed) or 'unknown'}")
    if existing.get("adapter_sha256") != wanted["adapter_sha256"]:
        problems.append(f"adapter differs (was {(existing.get('adapter') or {}).get('id')})")
    if rows_per_unit and rows_per_unit != existing.get("rows_per_unit"):
        problems.append(f"rows per unit {rows_per_unit} (the run was planned with {existing.get('rows_per_unit')})")
    return problems
