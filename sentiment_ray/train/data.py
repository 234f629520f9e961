"""Training data: labelled rows read and validated through the I/O layer, the stratified
validation split, row limits, and the records TRL trains on.

    splits = load_splits(cfg, labels, quarantine_root=run_dir)
    splits.train, splits.validation                  # pyarrow tables: sentence, label, [lang], [ID], source_*
    dataset = build_train_dataset(cfg, splits.train, tokenizer, template, labels)

Bad rows are never dropped silently: `data.on_bad_rows=error` stops at the first one, naming
its file, row and line; `skip` quarantines each with its reason and counts them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from sentiment_ray.config import DataConfig, ExperimentConfig, HFDatasetConfig
from sentiment_ray.io.files import expand_paths, fingerprint
from sentiment_ray.io.ids import IdIndex
from sentiment_ray.io.quarantine import QuarantineWriter
from sentiment_ray.io.readers import read_chunks, read_dataset_chunks
from sentiment_ray.io.rows import RowRules, RowValidator
from sentiment_ray.io.values import DataError, as_key, where
from sentiment_ray.labels import LabelSet
from sentiment_ray.scoring import fit_prompts
from sentiment_ray.train import layout

log = logging.getLogger(__name__)

SKIP_HINT = "set data.on_bad_rows=skip to quarantine bad rows instead of stopping"


@dataclass(frozen=True)
class BadRows:
    count: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    quarantine_path: str | None = None


@dataclass(frozen=True)
class LabelledData:
    """Validated rows: `sentence`, `label` (canonical spelling), `lang` and `ID` when the
    input has them (ID as string), `source_file`, `source_row` (1-based data row)."""

    table: pa.Table
    bad_rows: BadRows
    files: list[str]  # the files read, or a Hugging Face dataset's name (`hf:imdb:train`)
    content_digest: str | None = None  # a Hugging Face dataset's sha256 (files: see fingerprint)

    def __len__(self) -> int:
        return self.table.num_rows

    def fingerprint(self) -> str:
        """For manifests: `io.files.fingerprint(files)`, or for a Hugging Face dataset the
        sha256 of the columns read from it."""
        return self.content_digest or fingerprint(self.files)


def load_labelled(
    path: str | HFDatasetConfig,
    data_cfg: DataConfig,
    labels: LabelSet,
    *,
    quarantine_path: str | None = None,
    max_rows_per_file: int | None = None,
) -> LabelledData:
    """Read every file `path` names (or the Hugging Face dataset split it describes),
    validate each row and normalise labels. `max_rows_per_file`: only the first rows of
    each file (the driver's check of a large input: header and a sample).

    `on_bad_rows=error` raises DataError at the first bad row; `skip` quarantines bad rows
    to `quarantine_path` (or `data_cfg.quarantine_path`) and counts them. An empty file,
    or input where no row is good, is a DataError in both modes."""
    dataset = path if isinstance(path, HFDatasetConfig) else None
    name = dataset.describe() if dataset is not None else path
    files = [name] if dataset is not None else expand_paths(path)
    digest = hashlib.sha256() if dataset is not None else None
    d = data_cfg
    sink = None
    if d.on_bad_rows == "skip":
        target = quarantine_path or d.quarantine_path
        if not target:
            raise DataError(f"{name}: data.on_bad_rows=skip needs a quarantine path (data.quarantine_path)")
        sink = QuarantineWriter(target)
    wanted = [d.text_column, d.label_column, d.id_column, d.lang_column]
    validator = RowValidator(
        RowRules(
            text_column=d.text_column, id_column=d.id_column, label_column=d.label_column, labels=labels, label_map=d.label_map
        ),
        id_index=IdIndex(),
    )
    out: dict[str, list[Any]] = {k: [] for k in ("sentence", "label", "ID", "lang", "source_file", "source_row")}
    has_id = has_lang = False
    total = 0
    try:
        for file in files:
            if dataset is not None:
                chunks = read_dataset_chunks(dataset, columns=wanted)
            elif max_rows_per_file:
                chunks = read_chunks(file, columns=wanted, chunk_rows=max_rows_per_file, stop_row=max_rows_per_file + 1)
            else:
                chunks = read_chunks(file, columns=wanted)
            first = True
            for chunk in chunks:
                if first:  # the header, schema, or (JSON lines) the keys of the first chunk
                    _check_columns(file, chunk.columns, d)
                    file_has_id, file_has_lang = d.id_column in chunk.columns, d.lang_column in chunk.columns
                    has_id, has_lang = has_id or file_has_id, has_lang or file_has_lang
                    first = False
                if digest is not None:
                    digest.update(
                        json.dumps(
                            {c: chunk.column_values(c) for c in wanted if c in chunk.columns}, sort_keys=True, default=str
                        ).encode()
                    )
                checked = validator.validate(chunk, has_ids=file_has_id)
                total += len(chunk)
                if checked.quarantined:
                    if sink is None:
                        bad = checked.quarantined[0]
                        raise DataError(f"{where(bad['file'], bad['row'], bad['line'])}: {bad['reason']}; {SKIP_HINT}")
                    sink.write(checked.quarantined)
                langs = chunk.column_values(d.lang_column) if file_has_lang else None
                out["sentence"] += checked.sentences
                out["label"] += checked.labels
                out["ID"] += checked.ids if file_has_id else [None] * len(checked.good)
                out["lang"] += [as_key(langs[i]) for i in checked.good] if langs is not None else [None] * len(checked.good)
                out["source_file"] += [file] * len(checked.good)
                out["source_row"] += [chunk.first_row + i for i in checked.good]
                if max_rows_per_file and total >= max_rows_per_file:
                    break  # a sample: this file's first rows
            if first:
                raise DataError(f"{file}: no data rows")
    finally:
        validator.id_index.close()
        if sink is not None:
            sink.close()
    bad = BadRows(
        count=sink.count if sink else 0,
        by_reason=dict(sink.by_kind) if sink else {},
        quarantine_path=sink.path if sink else None,
    )
    if not out["sentence"]:
        raise DataError(
            f"{name}: none of the {total} rows is usable; {bad.count} quarantined to {bad.quarantine_path} "
            f"(reasons: {bad.by_reason})"
        )
    columns = {"sentence": pa.string(), "label": pa.string()}
    if has_lang:
        columns["lang"] = pa.string()
    if has_id:
        columns["ID"] = pa.string()
    columns.update(source_file=pa.string(), source_row=pa.int64())
    table = pa.table({column: pa.array(out[column], type=typ) for column, typ in columns.items()})
    return LabelledData(table=table, bad_rows=bad, files=files, content_digest=digest.hexdigest() if digest else None)


def _check_columns(file: str, columns: list[str], d: DataConfig) -> None:
    missing = [c for c in (d.text_column, d.label_column) if c not in columns]
    if missing:
        raise DataError(
            f"{file}: missing column(s) {missing}; columns found: {columns} (set data.text_column / data.label_column)"
        )


# ----------------------------------------------------------------------------- splits


def _strata(table: pa.Table, stratify: Sequence[str]) -> dict[tuple, np.ndarray]:
    """Row indices (ascending) per stratum key, for the stratify columns the table has."""
    keys = [table.column(c).to_pylist() for c in stratify if c in table.column_names]
    groups: dict[tuple, list[int]] = {}
    for i in range(table.num_rows):
        groups.setdefault(tuple(k[i] for k in keys), []).append(i)
    # Sorted keys (None first) so the random draws do not depend on row order of strata.
    ordered = sorted(groups, key=lambda key: tuple((v is not None, str(v)) for v in key))
    return {key: np.asarray(groups[key], dtype=np.int64) for key in ordered}


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def split_train_validation(
    table: pa.Table, fraction: float, seed: int, *, stratify: Sequence[str] = ("label", "lang")
) -> tuple[pa.Table, pa.Table]:
    """(train, validation), deterministic for a given table and seed, stratified by the
    `stratify` columns present. Each stratum of n rows gives round(fraction * n) rows to
    validation, at least 1 when n >= 2 and at most n - 1 (training sees every stratum);
    a single-row stratum stays in training. Both keep the input's row order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or table.num_rows == 0:
        return table, table.slice(0, 0)
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for indices in _strata(table, stratify).values():
        n = len(indices)
        take = 0 if n < 2 else min(n - 1, max(1, _round_half_up(fraction * n)))
        chosen.append(rng.permutation(indices)[:take])
    val_mask = np.zeros(table.num_rows, dtype=bool)
    if chosen:
        val_mask[np.concatenate(chosen)] = True
    return table.filter(pa.array(~val_mask)), table.filter(pa.array(val_mask))


def stratified_subsample(
    table: pa.Table, max_rows: int | None, seed: int, *, stratify: Sequence[str] = ("label", "lang")
) -> pa.Table:
    """At most `max_rows` rows, deterministically, keeping the strata's proportions
    (largest-remainder allocation, so exactly `max_rows` come back). Row order is kept."""
    if max_rows is None or table.num_rows <= max_rows:
        return table
    if max_rows <= 0:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    strata = list(_strata(table, stratify).values())
    quotas = np.array([max_rows * len(s) / table.num_rows for s in strata])
    counts = np.floor(quotas).astype(int)
    # Hand out the remaining rows to the largest fractional parts (stable: stratum order).
    order = np.argsort(-(quotas - counts), kind="stable")
    counts[order[: max_rows - counts.sum()]] += 1
    rng = np.random.default_rng(seed)
    keep = np.zeros(table.num_rows, dtype=bool)
    for indices, count in zip(strata, counts):
        keep[rng.permutation(indices)[:count]] = True
    return table.filter(pa.array(keep))


def balance_rows(table: pa.Table, by: Sequence[str], seed: int) -> pa.Table:
    """As many rows as `table`, drawn so that every group of the `by` columns it has is
    equally represented (with replacement inside a group, shuffled, seeded). The groups'
    shares differ by at most one row."""
    strata = list(_strata(table, by).values())
    if len(strata) < 2:
        return table
    rng = np.random.default_rng(seed)
    n, k = table.num_rows, len(strata)
    counts = [n // k + (1 if i < n % k else 0) for i in range(k)]
    picked = [rng.choice(indices, size=count, replace=count > len(indices)) for indices, count in zip(strata, counts)]
    return table.take(pa.array(rng.permutation(np.concatenate(picked))))


BALANCE_COLUMNS = {"none": (), "label": ("label",), "label_lang": ("label", "lang")}


def apply_row_limits(train: pa.Table, validation: pa.Table, data_cfg: DataConfig) -> tuple[pa.Table, pa.Table]:
    """Honour data.max_train_rows / data.max_validation_rows (stratified, seeded by split_seed)."""
    return (
        stratified_subsample(train, data_cfg.max_train_rows, data_cfg.split_seed),
        stratified_subsample(validation, data_cfg.max_validation_rows, data_cfg.split_seed + 1),
    )


# ----------------------------------------------------------------------------- the run's splits


@dataclass
class Splits:
    train: pa.Table
    validation: pa.Table
    files: dict[str, list[str]]
    fingerprints: dict[str, str]
    bad_rows: dict[str, int]


def load_splits(cfg: ExperimentConfig, labels: LabelSet, quarantine_root: str, use_configured_quarantine: bool = True) -> Splits:
    """The training and validation tables of a run. Sources are data.train_path /
    data.train_dataset; validation comes from data.validation_path / validation_dataset,
    else a stratified split of the training source. Skipped rows (data.on_bad_rows=skip)
    go to data.quarantine_path (validation rows to `<that>.validation`), or to the run's
    quarantine files under `quarantine_root`."""
    d = cfg.data
    if not d.train_path and d.train_dataset is None:
        raise DataError("data.train_path is empty: set it (or data.train_dataset) in the config or as data.train_path=...")

    def quarantine(name: str, suffix: str) -> str:
        if d.quarantine_path and use_configured_quarantine:
            return d.quarantine_path + suffix
        return quarantine_root.rstrip("/") + "/" + name

    train_data = load_labelled(d.train_dataset or d.train_path, d, labels, quarantine_path=quarantine(layout.QUARANTINE_FILE, ""))
    files = {"train": train_data.files}
    fingerprints = {"train": train_data.fingerprint()}
    bad = {"train": train_data.bad_rows.count}
    if d.validation_path or d.validation_dataset:
        val_q = quarantine(layout.VALIDATION_QUARANTINE_FILE, ".validation")
        val_data = load_labelled(d.validation_dataset or d.validation_path, d, labels, quarantine_path=val_q)
        train, validation = train_data.table, val_data.table
        files["validation"] = val_data.files
        fingerprints["validation"] = val_data.fingerprint()
        bad["validation"] = val_data.bad_rows.count
    else:
        train, validation = split_train_validation(train_data.table, d.validation_fraction, d.split_seed)
    train, validation = apply_row_limits(train, validation, d)
    if d.balance != "none":
        train = balance_rows(train, BALANCE_COLUMNS[d.balance], d.split_seed)
    if train.num_rows == 0:
        raise DataError(f"{train_data.files[0]}: no training rows left after the validation split and row limits")
    return Splits(train, validation, files, fingerprints, bad)


# ----------------------------------------------------------------------------- TRL records


def completion_token_budget(tokenizer, template, labels) -> int:
    """Tokens the longest label + EOS adds after a prompt (how TRL tokenises a completion)."""
    prompt = template.prompt("An example sentence.")
    base = len(tokenizer(prompt)["input_ids"])
    return max(len(tokenizer(prompt + template.completion(label, tokenizer.eos_token))["input_ids"]) - base for label in labels)


def build_train_dataset(cfg: ExperimentConfig, table, tokenizer, template, labels):
    """A `datasets.Dataset` for TRL: prompt-completion records (`loss_on: completion`: loss
    on the label tokens only) or full-text `text` records (`full_text`).

    Over-long sentences are cut (scoring.fit_prompts, the way validation/labelling cut them)
    so that every record, label included, fits model.max_seq_length: TRL truncates from the
    end, which would drop the label and leave a record with nothing to learn."""
    import datasets

    datasets.disable_progress_bars()
    budget = cfg.model.max_seq_length - completion_token_budget(tokenizer, template, labels)
    prompts, _, truncated = fit_prompts(tokenizer, template, table.column("sentence").to_pylist(), budget)
    if truncated.any():
        log.warning(
            "%d of %d training sentences were cut to fit model.max_seq_length=%d",
            int(truncated.sum()),
            len(prompts),
            cfg.model.max_seq_length,
        )
    eos = tokenizer.eos_token
    completions = [template.completion(label, eos) for label in table.column("label").to_pylist()]
    if cfg.train.loss_on == "completion":
        return datasets.Dataset.from_dict({"prompt": prompts, "completion": completions})
    return datasets.Dataset.from_dict({"text": [p + c for p, c in zip(prompts, completions)]})
