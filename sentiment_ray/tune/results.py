"""The results of a tune experiment: one row per trial, the best trial, and a metric-vs-step PNG.

Pure module (numpy/pyarrow/matplotlib inside functions; no ray, no torch): it works on plain
trial records that `tune.recipe.collect_trials` reads from the experiment folder, so
the report can be rebuilt from a finished or interrupted experiment at any time.

A trial record is a dict:

    trial_id   Tune's trial id
    status     Tune's status: TERMINATED, ERROR, PENDING, RUNNING, PAUSED
    values     {dotted config field: value} the trial trained with (search space resolved)
    sampled    Tune's sampled config (what the searcher drew; `<field>:ratio` for ratio_of)
    max_steps  the trial's train.max_steps
    history    the reports Tune received, in order (dicts with step, the metric, ...)
    error      first line of the trial's error, or None
    run_dir    the trial's Ray Train run folder
    adapter    the run's adapter folder
    finished   whether the run folder holds the final outputs (metrics.json)

Outcome of a trial (the `outcome` column):

    completed            trained to max_steps (its adapter is in `adapter` once written)
    stopped_by_scheduler ASHA stopped it at `stopped_at_step` (its metric was below the rung's cutoff)
    error                failed (after the retries of FailureConfig)
    unfinished           pending or running when the table was written (interrupted experiment)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from sentiment_ray.io.storage import Storage

OUTCOMES = ("completed", "stopped_by_scheduler", "error", "unfinished")


# ----------------------------------------------------------------------------- history


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def metric_by_step(history: Iterable[dict], metric: str) -> list[tuple[int, float]]:
    """(step, value) of every report carrying the metric, by step; a step reported twice
    (a trial resumed from an earlier checkpoint repeats the steps after it) keeps the
    latest report."""
    by_step: dict[int, float] = {}
    for row in history:
        step, value = row.get("step"), row.get(metric)
        if _finite(step) and _finite(value):
            by_step[int(step)] = float(value)
    return sorted(by_step.items())


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def last_step(record: dict) -> int:
    steps = [int(r["step"]) for r in record.get("history", []) if _finite(r.get("step"))]
    return max(steps) if steps else 0


def outcome_of(record: dict) -> str:
    """What happened to a trial, from Tune's status and the steps Tune saw (a trial the
    scheduler stopped may still have raced to its end before it was killed; Tune's view,
    which the scheduler acted on, decides)."""
    status = record.get("status")
    if status == "ERROR":
        return "error"
    if status != "TERMINATED":
        return "unfinished"
    max_steps = record.get("max_steps")
    if max_steps is not None and last_step(record) < max_steps:
        return "stopped_by_scheduler"
    return "completed"


# ----------------------------------------------------------------------------- table


def _cell(value: Any) -> Any:
    """Scalars stay; lists/dicts become JSON (one column type in CSV and Parquet)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value, sort_keys=True)


def trial_rows(records: list[dict], metric: str, mode: str, fields: list[str]) -> list[dict]:
    """One row per trial: id, outcome, status, the searched fields' values, final and best
    metric (and the step of the best), steps reached, max_steps, number of reports, wall
    time (seconds between reports, summed over attempts), run folder, error."""
    rows = []
    for rec in records:
        series = metric_by_step(rec.get("history", []), metric)
        final = series[-1][1] if series else None
        best_step, best = None, None
        for step, value in series:
            if best is None or _better(value, best, mode):
                best_step, best = step, value
        outcome = outcome_of(rec)
        reached = last_step(rec)
        row = {
            "trial_id": rec["trial_id"],
            "outcome": outcome,
            "status": rec.get("status"),
        }
        for field in fields:
            row[field] = _cell(rec.get("values", {}).get(field))
        row.update(
            {
                f"final_{metric}": final,
                f"best_{metric}": best,
                "best_step": best_step,
                "steps": reached,
                "max_steps": rec.get("max_steps"),
                "stopped_at_step": reached if outcome == "stopped_by_scheduler" else None,
                "reports": len(rec.get("history", [])),
                "wall_time_s": round(
                    sum(float(r["time_this_iter_s"]) for r in rec.get("history", []) if _finite(r.get("time_this_iter_s"))),
                    2,
                ),
                **_time_span(rec.get("history", [])),
                "run_dir": rec.get("run_dir"),
                "adapter": rec.get("adapter") if rec.get("finished") else None,
                "error": rec.get("error"),
            }
        )
        rows.append(row)
    return rows


def _time_span(history: list[dict]) -> dict:
    """Unix start and end of a trial from its reports (Tune's `timestamp` is when a report
    arrived; the first report's `time_this_iter_s` reaches back to the trial's start), so
    concurrent trials show as overlapping intervals."""
    stamps = [(float(r["timestamp"]), float(r.get("time_this_iter_s") or 0)) for r in history if _finite(r.get("timestamp"))]
    if not stamps:
        return {"started_at": None, "finished_at": None}
    return {"started_at": round(stamps[0][0] - stamps[0][1], 1), "finished_at": round(stamps[-1][0], 1)}


def best_row(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The completed trial with the best final metric (only completed trials have a final
    adapter to promote); ties go to the earlier trial id. None if no trial completed."""
    key = f"final_{metric}"
    best = None
    for row in sorted(rows, key=lambda r: r["trial_id"]):
        if row["outcome"] != "completed" or not row.get("adapter") or not _finite(row.get(key)):
            continue
        if best is None or _better(row[key], best[key], mode):
            best = row
    return best


def to_arrow(rows: list[dict]):
    """pyarrow Table of the rows (columns in row order; all-null columns typed string)."""
    import pyarrow as pa

    columns = list(rows[0]) if rows else ["trial_id"]
    arrays = {}
    for col in columns:
        values = [r.get(col) for r in rows]
        if all(v is None for v in values):
            arrays[col] = pa.array(values, type=pa.string())
        elif all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values) and any(
            isinstance(v, float) for v in values
        ):
            arrays[col] = pa.array([None if v is None else float(v) for v in values], type=pa.float64())
        else:
            try:
                arrays[col] = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                arrays[col] = pa.array([None if v is None else str(v) for v in values], type=pa.string())
    return pa.table(arrays)


def write_table(rows: list[dict], folder: Storage, csv_name: str, parquet_name: str) -> None:
    """The trials table as CSV and Parquet in `folder`, each file whole or not at all."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = to_arrow(rows)
    with folder.atomic_writer(csv_name) as out:
        pacsv.write_csv(table, out)
    with folder.atomic_writer(parquet_name) as out:
        pq.write_table(table, out)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict], columns: list[str] | None = None, best_id: str | None = None) -> str:
    """A plain-text table for the terminal (the best trial marked with `*`)."""
    if not rows:
        return "(no trials)"
    columns = columns or [c for c in rows[0] if c not in ("run_dir", "adapter", "error", "status")]
    body = [["*" if r["trial_id"] == best_id else ""] + [_fmt(r.get(c)) for c in columns] for r in rows]
    header = [""] + columns
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    errors = [f"  {r['trial_id']}: {r['error']}" for r in rows if r.get("error")]
    if errors:
        lines += ["errors:"] + errors
    return "\n".join(lines)
