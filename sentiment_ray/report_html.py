"""One self-contained HTML page per run: metrics table, per-language table, confusion matrix
and reliability diagram (matplotlib SVGs inlined as data URIs), and for a tune experiment the
trial curves and the trials table. No external files, scripts or fonts: the page opens from
disk, from an artifact store or attached to an email.

    sentiment-ray eval --predictions runs/label-demo          # -> runs/label-demo/report.html
    sentiment-ray eval --experiment runs/tune                  # -> runs/tune/report.html

Writers: `evaluate_to_report` (the `eval` command), `prediction_report_html` (the label job
writes one next to its metrics.json), `tune_report_html` (tune.finalize writes one into the
experiment folder). Element ids are stable (tests/test_report_html.py renders the page in
headless Chromium and looks for them): `metrics`, `per-language`, `confusion-matrix`,
`reliability-diagram`, `trial-curves`, `trials`.

Pure module: pyarrow, numpy and matplotlib inside functions; no ray, no torch.
"""

from __future__ import annotations

import base64
import glob
import html
import json
import math
import os
from typing import Any

REPORT_FILE = "report.html"
METRICS_FILE = "report_metrics.json"
PREDICTED_COLUMNS = ("pred_label", "predicted")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1f2933; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #d9e2ec; }
.sub { color: #627d98; margin-top: 0; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-variant-numeric: tabular-nums; }
th, td { padding: .3rem .8rem; border-bottom: 1px solid #e4e7eb; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f4f8; }
tr.best td { font-weight: 600; background: #fffbea; }
.figures { display: flex; flex-wrap: wrap; gap: 1.5rem; }
figure { margin: 0; } figure img { max-width: 520px; width: 100%; border: 1px solid #e4e7eb; }
figure.wide img { max-width: 900px; }
figcaption { color: #627d98; font-size: .9rem; }
.scroll { overflow-x: auto; }
"""

# Marks each image with the width it rendered at once the page has loaded (the headless
# browser test reads these back: 0 would mean a broken image).
_SCRIPT = """
window.addEventListener("load", function () {
  document.querySelectorAll("img").forEach(function (img) {
    img.setAttribute("data-rendered-width", String(img.naturalWidth));
  });
});
"""


class ReportError(ValueError):
    """The predictions or experiment folder cannot be read into a report."""


# ============================================================================ html pieces


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.3g}"
    return html.escape(str(value))


def _image(element_id: str, alt: str, data: bytes, mime: str, caption: str, wide: bool = False) -> str:
    src = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return (
        f'<figure id="{element_id}"{" class=wide" if wide else ""}>'
        f'<img id="{element_id}-img" alt="{html.escape(alt)}" src="{src}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _table(element_id: str, header: list[str], rows: list[tuple[dict[str, str], list[Any]]]) -> str:
    """rows: (attributes of the <tr>, cells)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for attrs, cells in rows:
        attr = "".join(f' {k}="{html.escape(str(v))}"' for k, v in attrs.items())
        body.append(f"<tr{attr}>" + "".join(f"<td>{_fmt(c)}</td>" for c in cells) + "</tr>")
    table = f'<table id="{element_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    return f"<div class=scroll>{table}</div>"


def page(title: str, subtitle: str, sections: list[str]) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<meta name=viewport content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class=sub>{html.escape(subtitle)}</p>"
        + "\n".join(sections)
        + f"<script>{_SCRIPT}</script></body></html>\n"
    )


def metrics_sections(report: dict[str, Any]) -> list[str]:
    """Metrics table, per-language table, confusion matrix and reliability diagram of a
    `metrics.classification_report` (with `ece` / `calibration_bins` when scored)."""
    from sentiment_ray.report_plots import render_confusion, render_reliability

    rows = [("n", report.get("n")), ("accuracy", report.get("accuracy")), ("macro_f1", report.get("macro_f1"))]
    if report.get("ece") is not None:
        rows.append(("ece", report["ece"]))
    rows += [(f"f1_{label}", value) for label, value in (report.get("f1") or {}).items()]
    rows += [(k, report[k]) for k in ("unparsed", "rows_without_label") if report.get(k) is not None]
    sections = ["<h2>Metrics</h2>", _table("metrics", ["metric", "value"], [({"data-metric": k}, [k, v]) for k, v in rows])]

    per_language = report.get("per_language") or {}
    sections.append("<h2>Per language</h2>")
    if per_language:
        lang_rows = [
            ({"data-lang": lang}, [lang, v.get("n"), v.get("accuracy"), v.get("macro_f1")])
            for lang, v in sorted(per_language.items(), key=lambda kv: -kv[1].get("n", 0))
        ]
        sections.append(_table("per-language", ["language", "n", "accuracy", "macro-F1"], lang_rows))
    else:
        sections.append('<p id="per-language">No language column in the data.</p>')

    figures = []
    confusion = report["confusion_matrix"]
    figures.append(
        _image(
            "confusion-matrix",
            f"Confusion matrix over {', '.join(confusion['labels'])} (rows true, columns predicted)",
            render_confusion(confusion, fmt="svg"),
            "image/svg+xml",
            "Confusion matrix: counts and share of each true label's row.",
        )
    )
    if report.get("calibration_bins"):
        figures.append(
            _image(
                "reliability-diagram",
                f"Reliability diagram (ECE {report['ece']:.3f})",
                render_reliability(report["calibration_bins"], ece=report.get("ece"), fmt="svg"),
                "image/svg+xml",
                "Reliability: accuracy per confidence bin against the diagonal (bin row counts on the bars).",
            )
        )
    sections += ["<h2>Errors and calibration</h2>", f'<div class=figures>{"".join(figures)}</div>']
    return sections


def prediction_report_html(report: dict[str, Any], *, title: str, subtitle: str = "") -> str:
    """The page of one set of predictions (a label run, a training run's validation split)."""
    return page(title, subtitle or f"{report.get('n')} labelled rows", metrics_sections(report))


def tune_report_html(
    records: list[dict],
    rows: list[dict],
    *,
    metric: str,
    mode: str,
    best: dict | None,
    title: str,
    best_report: dict[str, Any] | None = None,
) -> str:
    """The page of a tune experiment: trial curves, the trials table, and (when given) the
    best trial's validation metrics (`best_report`, its metrics.json `fine_tuned`)."""
    from sentiment_ray import tune_report

    best_id = best["trial_id"] if best else None
    png = tune_report.render_metric_plot(records, metric, title=f"{metric} by step", best_id=best_id)
    sections = [
        "<h2>Trials</h2>",
        _image("trial-curves", f"Trial curves: {metric} by training step, one line per trial", png, "image/png",
               "Dashed lines: trials stopped by the scheduler, failed or unfinished; the best trial is drawn thicker.",
               wide=True),
    ]
    skip = {"run_dir", "adapter", "error", "status"}
    columns = [c for c in (rows[0] if rows else {}) if c not in skip]
    table_rows = [
        ({"data-trial": r["trial_id"], **({"class": "best"} if r["trial_id"] == best_id else {})}, [r.get(c) for c in columns])
        for r in rows
    ]
    sections.append(_table("trials", columns, table_rows))
    if best_report:
        sections += [f"<h2>Best trial {html.escape(str(best_id))}: validation</h2>"] + metrics_sections(best_report)[1:]
    subtitle = f"{len(rows)} trials, metric {metric} ({mode})" + (f", best trial {best_id}" if best_id else ", no trial completed")
    return page(title, subtitle, sections)


def write_tune_report(out_dir: str, cfg, records: list[dict], rows: list[dict], best: dict | None) -> str:
    """report.html of a tune experiment into a local folder (tune.finalize publishes it)."""
    text = tune_report_html(
        records, rows, metric=cfg.tune.metric, mode=cfg.tune.mode, best=best, title=f"Tune experiment {cfg.tune.experiment_name}"
    )
    path = os.path.join(out_dir, REPORT_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


# ============================================================================ eval command


def _read_table(path: str):
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    name = path.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return pq.read_table(path)
    if name.endswith(".csv"):
        return pacsv.read_csv(path)
    if name.endswith((".jsonl", ".json")):
        return pajson.read_json(path)
    raise ReportError(f"{path}: not Parquet, CSV or JSONL")


def prediction_files(path: str) -> list[str]:
    """The prediction files of a label job's output folder (`predictions/`), a training run
    folder (`validation_predictions.parquet`), a file or a glob."""
    if os.path.isdir(path):
        for pattern in (os.path.join(path, "predictions", "**", "*.parquet"), os.path.join(path, "validation_predictions.parquet")):
            files = sorted(glob.glob(pattern, recursive=True))
            if files:
                return files
        raise ReportError(f"{path} holds neither predictions/*.parquet (a label job's output) nor validation_predictions.parquet")
    files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else ([path] if os.path.isfile(path) else [])
    if not files:
        raise ReportError(f"no predictions at {path}")
    return files


def load_predictions(path: str, label_column: str, lang_column: str, labels: list[str] | None = None) -> dict[str, Any]:
    """{"labels", "truth", "predicted", "confidence" (or None), "langs" (or None), "unlabelled"}
    from prediction files: gold label column, `pred_label`/`predicted`, optional `p_<label>`
    and `confidence` columns. Gold labels match the label set case-insensitively; rows whose
    gold label is missing or unknown are counted, not scored."""
    import numpy as np

    tables = []
    for file in prediction_files(path):
        table = _read_table(file)
        if any(c in table.column_names for c in PREDICTED_COLUMNS):
            tables.append(table)  # a label shard whose rows were all quarantined has none
    if not tables:
        raise ReportError(f"{path}: no prediction column ({' or '.join(PREDICTED_COLUMNS)})")
    names = tables[0].column_names
    if label_column not in names:
        raise ReportError(f"{path}: no gold label column {label_column!r} (columns: {', '.join(names)}); see --label-column")
    prob_columns = [c for c in names if c.startswith("p_")]
    labels = labels or [c[2:] for c in prob_columns] or None
    gold_raw, pred, probs, conf, langs = [], [], [], [], []
    for table in tables:
        pred_col = next(c for c in PREDICTED_COLUMNS if c in table.column_names)
        gold_raw += table.column(label_column).to_pylist()
        pred += table.column(pred_col).to_pylist()
        langs += table.column(lang_column).to_pylist() if lang_column in table.column_names else [None] * table.num_rows
        if prob_columns and all(c in table.column_names for c in prob_columns):
            probs.append(np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in prob_columns]))
        if "confidence" in table.column_names:
            conf += table.column("confidence").to_pylist()
    if labels is None:
        labels = sorted({str(x) for x in gold_raw + pred if x is not None})
    by_lower = {label.lower(): label for label in labels}
    if probs and sum(len(p) for p in probs) == len(pred):
        confidence = np.concatenate(probs).max(axis=1).tolist()
    elif len(conf) == len(pred):
        confidence = conf
    else:
        confidence = None
    keep = [i for i, g in enumerate(gold_raw) if g is not None and str(g).strip().lower() in by_lower]
    return {
        "labels": labels,
        "truth": [by_lower[str(gold_raw[i]).strip().lower()] for i in keep],
        "predicted": [pred[i] for i in keep],
        "confidence": [confidence[i] for i in keep] if confidence is not None else None,
        "langs": [None if langs[i] is None else str(langs[i]) for i in keep] if any(x is not None for x in langs) else None,
        "unlabelled": len(gold_raw) - len(keep),
    }


def evaluate_predictions(data: dict[str, Any]) -> dict[str, Any]:
    """classification_report (+ ECE and its bins when there are probabilities)."""
    from sentiment_ray.metrics import classification_report, expected_calibration_error

    if not data["truth"]:
        raise ReportError("no row has a gold label in the label set")
    report = classification_report(data["truth"], data["predicted"], data["labels"], data["langs"])
    report["rows_without_label"] = data["unlabelled"]
    if data["confidence"] is not None and all(c is not None for c in data["confidence"]):
        calibration = expected_calibration_error(data["confidence"], [t == p for t, p in zip(data["truth"], data["predicted"])])
        report["ece"], report["calibration_bins"] = calibration["ece"], calibration["bins"]
    return report


def experiment_records(exp_path: str) -> tuple[list[dict], list[dict], dict]:
    """(trial records for the curves, trial rows, {metric, mode, name, best}) from a tune
    experiment folder: trials.parquet (tune.finalize's table) and trial_histories/*.jsonl."""
    import pyarrow.parquet as pq

    table_path = os.path.join(exp_path, "trials.parquet")
    if not os.path.isfile(table_path):
        raise ReportError(f"{exp_path} has no trials.parquet: not a tune experiment folder, or its report was never written")
    rows = pq.read_table(table_path).to_pylist()
    state_path = os.path.join(exp_path, "sentiment_ray_tune.json")
    tune_cfg = {}
    if os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as f:
            tune_cfg = json.load(f).get("config", {}).get("tune", {})
    metric = tune_cfg.get("metric") or next((c[6:] for c in (rows[0] if rows else {}) if c.startswith("final_")), "val_macro_f1")
    mode = tune_cfg.get("mode", "max")
    records = []
    for row in rows:
        history = []
        path = os.path.join(exp_path, "trial_histories", f"{row['trial_id']}.jsonl")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                history = [json.loads(line) for line in f if line.strip()]
        records.append({"trial_id": row["trial_id"], "status": row.get("status"), "max_steps": row.get("max_steps"), "history": history})
    best = None
    trial_file = os.path.join(exp_path, "best", "trial.json")
    if os.path.isfile(trial_file):
        with open(trial_file, encoding="utf-8") as f:
            best_id = json.load(f).get("trial_id")
        best = next((r for r in rows if r["trial_id"] == best_id), None)
    name = tune_cfg.get("experiment_name") or os.path.basename(os.path.abspath(exp_path))
    return records, rows, {"metric": metric, "mode": mode, "name": name, "best": best}


def evaluate_to_report(
    *,
    predictions: str | None = None,
    experiment: str | None = None,
    output: str | None = None,
    labels: list[str] | None = None,
    label_column: str = "label",
    lang_column: str = "lang",
    title: str | None = None,
) -> dict[str, Any]:
    """The `eval` command: metrics of `predictions` and/or the trials of `experiment` into
    `<output>/report.html` (+ report_metrics.json). Returns a summary."""
    if not predictions and not experiment:
        raise ReportError("give predictions, an experiment folder, or both")
    for path in (predictions, experiment, output):
        if path and "://" in path:
            raise ReportError(f"{path}: eval reads and writes local folders (copy object-store outputs down first)")
    if output is None:
        source = experiment or predictions
        output = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    report = None
    if predictions:
        report = evaluate_predictions(load_predictions(predictions, label_column, lang_column, labels))
    if experiment:
        records, rows, info = experiment_records(experiment)
        if report is None:
            best_metrics = os.path.join(experiment, "best", "metrics.json")
            if os.path.isfile(best_metrics):
                with open(best_metrics, encoding="utf-8") as f:
                    report = json.load(f).get("fine_tuned")
        text = tune_report_html(
            records, rows, metric=info["metric"], mode=info["mode"], best=info["best"],
            title=title or f"Tune experiment {info['name']}", best_report=report,
        )
    else:
        name = os.path.basename(os.path.abspath(predictions).rstrip("/"))
        text = prediction_report_html(report, title=title or f"Evaluation of {name}", subtitle=f"{report['n']} labelled rows from {predictions}")
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, REPORT_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    summary: dict[str, Any] = {"report": path}
    if report is not None:
        with open(os.path.join(output, METRICS_FILE), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)
        summary["metrics"] = os.path.join(output, METRICS_FILE)
        summary.update({k: report.get(k) for k in ("n", "accuracy", "macro_f1", "ece")})
    return summary
