"""The one row validator: splits a chunk (`readers.Chunk`) into good rows and quarantine
entries, by the same rules for training and labelling.

A row is bad when it is malformed (a short CSV row, an invalid JSON line), its text is
missing / empty / not a string / undecodable, its label does not resolve to the label set
(when a label set is given: training), its ID is missing, undecodable or seen before (when
IDs are checked), or another column's value is undecodable.

    validator = RowValidator(RowRules(text_column="sentence", id_column="ID", labels=labels),
                             id_index=IdIndex())
    checked = validator.validate(chunk, has_ids=True)
    checked.good, checked.sentences, checked.labels, checked.ids, checked.quarantined
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sentiment_ray.io import quarantine
from sentiment_ray.io.ids import IdIndex
from sentiment_ray.io.readers import Chunk
from sentiment_ray.io.values import DataError, as_text, id_key, id_problem, text_problem, value_problem
from sentiment_ray.labels import LabelSet

# Columns added to every good row's table: where it came from.
SOURCE_COLUMNS = ("source_file", "source_row")


@dataclass(frozen=True)
class RowRules:
    text_column: str
    id_column: str
    label_column: str | None = None
    labels: LabelSet | None = None
    """When set, every row's label must resolve to this set (through `label_map`)."""
    label_map: dict[str, str] = field(default_factory=dict)
    max_text_chars: int | None = None
    """When set, `CheckedRows.sentences` holds at most this many characters of each text
    (what is tokenised), and `CheckedRows.cut` says which were cut; the table keeps the
    full text."""


@dataclass
class CheckedRows:
    """The outcome of validating one chunk."""

    chunk: Chunk
    good: list[int]
    """Indices (into the chunk) of the good rows, in order."""
    sentences: list[str]
    ids: list[str | None]
    labels: list[str] | None
    quarantined: list[dict[str, Any]]
    cut: list[bool] = field(default_factory=list)
    """Per good row: its text was longer than `RowRules.max_text_chars` and was cut in
    `sentences` (empty when no bound is set)."""

    def table(self, id_column: str):
        """The good rows as an Arrow table: every column read (Parquet types kept), the ID
        as a string, plus `source_file` and `source_row`."""
        import pyarrow as pa

        chunk = self.chunk
        ids = pa.array(self.ids, type=pa.string())
        if chunk.table is not None:
            table = chunk.table
            if len(self.good) < len(chunk):
                table = table.take(pa.array(self.good, type=pa.int64()))
            table = _set_column(table, id_column, ids)
        else:
            arrays = {}
            for column, values in chunk.values.items():
                if column == id_column:
                    arrays[column] = ids  # where the input has it
                    continue
                try:
                    arrays[column] = pa.array([values[i] for i in self.good])
                except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
                    raise DataError(
                        f"{chunk.file}: rows {chunk.first_row}-{chunk.first_row + len(chunk) - 1}: column {column!r} "
                        f"mixes value types ({err}); make the column one type"
                    ) from None
            arrays.setdefault(id_column, ids)
            table = pa.table(arrays)
        clash = [c for c in SOURCE_COLUMNS if c in table.column_names]
        if clash:
            raise DataError(f"{chunk.file}: input column(s) {clash} clash with columns the labeller adds; rename them")
        table = table.append_column("source_file", pa.array([chunk.file] * len(self.good), type=pa.string()))
        return table.append_column("source_row", pa.array([chunk.first_row + i for i in self.good], type=pa.int64()))


class RowValidator:
    def __init__(self, rules: RowRules, id_index: IdIndex | None = None):
        self.rules = rules
        self.id_index = id_index

    def validate(self, chunk: Chunk, *, has_ids: bool, generated_ids: str | None = None) -> CheckedRows:
        """`has_ids`: the file has the ID column, so every row needs an ID (a JSON line
        without the key is missing it). Otherwise `generated_ids` names the file in
        generated IDs (`<generated_ids>:<row>`), or rows get none (None)."""
        r = self.rules
        n = len(chunk)
        texts = chunk.column_values(r.text_column)
        raw_ids = chunk.column_values(r.id_column) if has_ids else None
        raw_labels = chunk.column_values(r.label_column) if r.labels is not None and r.label_column else None
        # Parquet and datasets hold valid UTF-8 by construction; text formats may not.
        others = (
            []
            if chunk.table is not None
            else [c for c in chunk.values if c not in (r.text_column, r.id_column, r.label_column if r.labels else None)]
        )
        problems: list[str | None] = list(chunk.problems)
        ids: list[str | None] = [None] * n
        labels: list[str | None] = [None] * n
        for i in range(n):
            problem = problems[i] or text_problem(texts[i])
            if problem is None and raw_labels is not None:
                labels[i], problem = r.labels.resolve(raw_labels[i], r.label_map)
            if problem is None:
                if raw_ids is not None:
                    problem = id_problem(raw_ids[i])
                    ids[i] = id_key(raw_ids[i]) if problem is None else None
                elif generated_ids is not None:
                    ids[i] = f"{generated_ids}:{chunk.first_row + i}"
            if problem is None:
                for column in others:
                    problem = value_problem(chunk.values[column][i], column)
                    if problem:
                        break
            problems[i] = problem
        if self.id_index is not None and raw_ids is not None:
            candidates = [(chunk.first_row + i, ids[i]) for i in range(n) if problems[i] is None]
            for dup in self.id_index.add_rows(chunk.file, candidates):
                problems[dup.row - chunk.first_row] = dup.reason()
        good = [i for i in range(n) if problems[i] is None]
        bad = [
            quarantine.entry(
                chunk.file, chunk.first_row + i, chunk.line(i), problems[i], chunk.row_values(i), chunk.raw_rows.get(i)
            )
            for i in range(n)
            if problems[i] is not None
        ]
        sentences = [as_text(texts[i]) for i in good]
        cut: list[bool] = []
        if r.max_text_chars is not None:
            limit = r.max_text_chars
            cut = [len(s) > limit for s in sentences]
            if any(cut):
                sentences = [s[:limit] if c else s for s, c in zip(sentences, cut)]
        return CheckedRows(
            chunk=chunk,
            good=good,
            sentences=sentences,
            ids=[ids[i] for i in good],
            labels=[labels[i] for i in good] if raw_labels is not None else None,
            quarantined=bad,
            cut=cut,
        )


def _set_column(table, name: str, array):
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, array)
    return table.append_column(name, array)
