"""The files of a labelling run's output folder: the one place that names them.

    <output>/
        _manifest.json                              the plan: inputs, config fingerprint, adapter, units
        predictions/part-000003-1a2b3c4d5e.parquet  every input column + predictions, one per unit
        csv/part-000003-1a2b3c4d5e.csv              ID,label (the submission format), one per unit
        quarantine/part-000003-1a2b3c4d5e.jsonl     bad rows with reasons (units that have any)
        _done/part-000003-1a2b3c4d5e.json           a unit's commit marker (counts, timings), written last
        _failed/part-000003-1a2b3c4d5e.json         why a unit failed (the actor's error), for the driver
        submission.csv                              all units' ID,label in input order (label.write_submission)
        quarantine.jsonl                            all bad rows in input order
        metrics.json, report.png, report.html       when the input has gold labels
        summary.json                                what the job printed

A unit is done exactly when its marker exists, so a rerun after any crash labels only the
units without one, and a half-written file never sits under a final name (io.storage).
"""

from __future__ import annotations

from dataclasses import dataclass

MANIFEST_FILE = "_manifest.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.json"
REPORT_PNG_FILE = "report.png"
REPORT_HTML_FILE = "report.html"
SUBMISSION_FILE = "submission.csv"
QUARANTINE_FILE = "quarantine.jsonl"

PREDICTIONS_DIR = "predictions"
CSV_DIR = "csv"
QUARANTINE_DIR = "quarantine"
DONE_DIR = "_done"
FAILED_DIR = "_failed"
UNIT_DIRS = (PREDICTIONS_DIR, CSV_DIR, QUARANTINE_DIR, DONE_DIR, FAILED_DIR)
RUN_FILES = (MANIFEST_FILE, SUMMARY_FILE, METRICS_FILE, REPORT_PNG_FILE, REPORT_HTML_FILE, SUBMISSION_FILE, QUARANTINE_FILE)


@dataclass(frozen=True)
class UnitFiles:
    """The files of one work unit, relative to the output folder."""

    predictions: str
    csv: str
    quarantine: str
    done: str
    failed: str


def unit_files(unit_id: str) -> UnitFiles:
    return UnitFiles(
        predictions=f"{PREDICTIONS_DIR}/{unit_id}.parquet",
        csv=f"{CSV_DIR}/{unit_id}.csv",
        quarantine=f"{QUARANTINE_DIR}/{unit_id}.jsonl",
        done=f"{DONE_DIR}/{unit_id}.json",
        failed=f"{FAILED_DIR}/{unit_id}.json",
    )


def unit_id_of_marker(name: str) -> str | None:
    """The unit a file in `_done/` commits (`part-...json` -> `part-...`), or None."""
    return name[: -len(".json")] if name.endswith(".json") and not name.startswith(".") else None
