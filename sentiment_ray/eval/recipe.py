"""The `eval` command: predictions judged by the one evaluation (`metrics.evaluate_predictions`)
and written as a self-contained HTML report beside them.

    sentiment-ray eval --predictions runs/label-demo          # -> runs/label-demo/eval-report.html
    sentiment-ray eval --predictions preds.csv --labels Positive,Negative
    sentiment-ray eval --experiment runs/tune                  # -> runs/tune/eval-report.html

Sources: a label job's output folder (its manifest says how its gold labels are read: the
label set, the label column and `data.label_map`, so `eval` agrees with the job's own
metrics), a training run folder (`validation_predictions.parquet`), or prediction files
(Parquet / CSV / JSON lines, a path, glob or URI) with a gold label column, `pred_label` or
`predicted`, and optionally `p_<label>` or `confidence` columns. The report is written under
its own names so it never replaces the label job's report.html.
"""

from __future__ import annotations

import json
from typing import Any

from sentiment_ray.errors import UserError
from sentiment_ray.eval.layout import METRICS_FILE, REPORT_FILE
from sentiment_ray.io.files import expand_paths
from sentiment_ray.io.readers import read_chunks
from sentiment_ray.io.storage import Storage
from sentiment_ray.io.values import DataError
from sentiment_ray.label import layout as label_layout
from sentiment_ray.label import outputs as label_outputs
from sentiment_ray.label.plan import WorkUnit
from sentiment_ray.labels import LabelSet, LabelSetError
from sentiment_ray.metrics import evaluate_predictions
from sentiment_ray.report import html
from sentiment_ray.train import layout as train_layout
from sentiment_ray.tune import layout as tune_layout

PREDICTED_COLUMNS = ("pred_label", "predicted")


class ReportError(UserError, ValueError):
    """The predictions or experiment folder cannot be read into a report."""


def evaluate_to_report(
    *,
    predictions: str | None = None,
    experiment: str | None = None,
    output: str | None = None,
    labels: list[str] | None = None,
    label_map: dict[str, str] | None = None,
    label_column: str | None = None,
    lang_column: str | None = None,
    title: str | None = None,
) -> dict[str, Any]:
    """Metrics of `predictions` and/or the trials of `experiment` into `<output>/eval-report.html`
    (+ eval-metrics.json). Returns a summary."""
    if not predictions and not experiment:
        raise ReportError("give predictions, an experiment folder, or both")
    out = Storage(output or _default_output(experiment or predictions))
    report = None
    if predictions:
        data = read_predictions(
            predictions, labels=labels, label_map=label_map, label_column=label_column, lang_column=lang_column
        )
        report = evaluate_predictions(
            data["gold"],
            data["predicted"],
            data["labels"],
            label_map=data["label_map"],
            confidence=data["confidence"],
            langs=data["langs"],
        )
        if report is None:
            mapping = f" through label_map {data['label_map']}" if data["label_map"] else ""
            raise ReportError(
                f"{predictions}: no row has a gold label ({data['label_column']!r}) in the label set "
                f"{list(data['labels'])}{mapping}; see --labels / --label-map / --label-column"
            )
    if experiment:
        records, rows, info = experiment_records(experiment)
        if report is None:
            best = Storage(experiment).read_json_or_none(f"{tune_layout.BEST_DIR}/{train_layout.METRICS_FILE}")
            report = (best or {}).get("fine_tuned")
        page = html.tune_report_html(
            records,
            rows,
            metric=info["metric"],
            mode=info["mode"],
            best=info["best"],
            title=title or f"Tune experiment {info['name']}",
            best_report=report,
        )
    else:
        name = predictions.rstrip("/").rsplit("/", 1)[-1]
        page = html.prediction_report_html(
            report,
            title=title or f"Evaluation of {name}",
            subtitle=f"{report['n']} labelled rows from {predictions}",
            details=report_details(predictions),
        )
    out.write_text(REPORT_FILE, page)
    summary: dict[str, Any] = {"report": out.path(REPORT_FILE)}
    if report is not None:
        out.write_json(METRICS_FILE, report)
        summary["metrics"] = out.path(METRICS_FILE)
        summary.update({k: report.get(k) for k in ("n", "accuracy", "macro_f1", "ece")})
    return summary


def report_details(source: str) -> dict[str, Any]:
    """Model, adapter, input and date for the report of `source`: from a label job's
    manifest, a training run's manifest.json, or just the file's name."""
    folder = Storage(source) if "*" not in source else None
    is_dir = folder is not None and folder.is_dir()
    label_manifest = folder.read_json_or_none(label_layout.MANIFEST_FILE) if is_dir else None
    if label_manifest is not None:
        return label_outputs.report_details(label_manifest, predictions=source)
    run_manifest = folder.read_json_or_none(train_layout.MANIFEST_FILE) if is_dir else None
    if run_manifest is not None:
        config = run_manifest.get("config") or {}
        files = (run_manifest.get("data_files") or {}).get("validation") or (run_manifest.get("data_files") or {}).get("train")
        return label_outputs.report_details(
            None,
            model=(config.get("model") or {}).get("name"),
            adapter=folder.path(train_layout.ADAPTER_DIR),
            input=", ".join(files) if files else None,
            predictions=folder.path(train_layout.PREDICTIONS_FILE),
        )
    return label_outputs.report_details(None, predictions=source)


def _default_output(source: str) -> str:
    """The folder read, or the folder of the file read."""
    if "*" in source or "?" in source or "[" in source:
        source = source.rsplit("/", 1)[0] if "/" in source else "."
    try:
        if Storage(source).is_dir():
            return source
    except (OSError, ValueError):
        pass
    return source.rsplit("/", 1)[0] if "/" in source.rstrip("/") else "."


# ----------------------------------------------------------------------------- predictions


def read_predictions(
    source: str,
    *,
    labels: list[str] | None = None,
    label_map: dict[str, str] | None = None,
    label_column: str | None = None,
    lang_column: str | None = None,
) -> dict[str, Any]:
    """{"gold", "predicted", "confidence" (or None), "langs", "labels" (LabelSet),
    "label_map", "label_column"} from a label job's output folder, a training run folder,
    or prediction files. Explicit arguments win over what a label job's manifest says."""
    folder = Storage(source) if "*" not in source else None
    manifest = folder.read_json_or_none(label_layout.MANIFEST_FILE) if folder is not None and folder.is_dir() else None
    judged = (manifest or {}).get("evaluation", {})
    label_column = label_column or judged.get("label_column") or "label"
    lang_column = lang_column or judged.get("lang_column") or "lang"
    label_map = label_map if label_map is not None else judged.get("label_map") or {}
    if manifest is not None:
        units = [WorkUnit.from_dict(u) for u in manifest["units"]]
        data = label_outputs.read_gold_and_predictions(folder, units, label_column, lang_column)
        label_set = LabelSet(labels or judged.get("labels") or manifest["prediction_config"]["prompt"]["labels"])
        confidence = data["confidence"] if all(c is not None for c in data["confidence"]) else None
        return {**data, "confidence": confidence, "labels": label_set, "label_map": label_map, "label_column": label_column}
    return _read_prediction_files(_prediction_files(source), source, labels, label_map, label_column, lang_column)


def _prediction_files(source: str) -> list[str]:
    folder = Storage(source) if "*" not in source else None
    if folder is not None and folder.is_dir():
        if folder.list_names(label_layout.PREDICTIONS_DIR):
            return expand_paths(folder.path(label_layout.PREDICTIONS_DIR))
        if folder.is_file(train_layout.PREDICTIONS_FILE):
            return [folder.path(train_layout.PREDICTIONS_FILE)]
        raise ReportError(
            f"{source} holds neither {label_layout.PREDICTIONS_DIR}/*.parquet (a label job's output) "
            f"nor {train_layout.PREDICTIONS_FILE} (a training run)"
        )
    try:
        return expand_paths(source)
    except DataError as err:
        raise ReportError(f"no predictions at {source}: {err}") from None


def _read_prediction_files(files, source, labels, label_map, label_column, lang_column) -> dict[str, Any]:
    gold, predicted, probs, confidence, langs = [], [], [], [], []
    prob_columns: list[str] | None = None
    seen_prediction = False
    for file in files:
        for chunk in read_chunks(file):
            pred_column = next((c for c in PREDICTED_COLUMNS if c in chunk.columns), None)
            if pred_column is None:
                continue  # a label shard whose rows were all quarantined has none
            seen_prediction = True
            if label_column not in chunk.columns:
                raise ReportError(
                    f"{file}: no gold label column {label_column!r} (columns: {', '.join(chunk.columns)}); see --label-column"
                )
            if prob_columns is None:
                prob_columns = [c for c in chunk.columns if c.startswith("p_")]
            gold += chunk.column_values(label_column)
            predicted += chunk.column_values(pred_column)
            langs += chunk.column_values(lang_column)
            if prob_columns and all(c in chunk.columns for c in prob_columns):
                rows = zip(*(chunk.column_values(c) for c in prob_columns))
                probs += [max(_number(p) for p in row) for row in rows]
            confidence += [_number(c) for c in chunk.column_values("confidence")]
    if not seen_prediction:
        raise ReportError(f"{source}: no prediction column ({' or '.join(PREDICTED_COLUMNS)})")
    names = labels or [c[2:] for c in prob_columns or []] or sorted({str(x) for x in gold + predicted if x is not None})
    try:
        label_set = LabelSet(names)
    except LabelSetError as err:
        raise ReportError(f"{source}: {err}; give the label set with --labels") from None
    scores = probs if len(probs) == len(predicted) else confidence
    usable = scores if scores and all(c is not None for c in scores) else None
    return {
        "gold": gold,
        "predicted": predicted,
        "confidence": usable,
        "langs": langs,
        "labels": label_set,
        "label_map": label_map,
        "label_column": label_column,
    }


def _number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- experiments


def experiment_records(exp_path: str) -> tuple[list[dict], list[dict], dict]:
    """(trial records for the curves, trial rows, {metric, mode, name, best}) from a tune
    experiment folder: its trials table and trial histories."""
    import pyarrow.parquet as pq

    experiment = Storage(exp_path)
    if not experiment.is_file(tune_layout.TABLE_PARQUET):
        raise ReportError(
            f"{exp_path} has no {tune_layout.TABLE_PARQUET}: not a tune experiment folder, or its report was never written"
        )
    with experiment.open_input(tune_layout.TABLE_PARQUET) as f:
        rows = pq.read_table(f).to_pylist()
    tune_cfg = (experiment.read_json_or_none(tune_layout.STATE_FILE) or {}).get("config", {}).get("tune", {})
    metric = tune_cfg.get("metric") or next((c[6:] for c in (rows[0] if rows else {}) if c.startswith("final_")), "val_macro_f1")
    records = []
    for row in rows:
        history_file = tune_layout.history_file(row["trial_id"])
        history = []
        if experiment.is_file(history_file):
            history = [json.loads(line) for line in experiment.read_text(history_file).splitlines() if line.strip()]
        records.append(
            {"trial_id": row["trial_id"], "status": row.get("status"), "max_steps": row.get("max_steps"), "history": history}
        )
    best_trial = experiment.read_json_or_none(f"{tune_layout.BEST_DIR}/{tune_layout.BEST_TRIAL_FILE}")
    best = next((r for r in rows if best_trial and r["trial_id"] == best_trial.get("trial_id")), None)
    name = tune_cfg.get("experiment_name") or experiment.root.rstrip("/").rsplit("/", 1)[-1]
    return records, rows, {"metric": metric, "mode": tune_cfg.get("mode", "max"), "name": name, "best": best}
