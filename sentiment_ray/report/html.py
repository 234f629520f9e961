"""One self-contained HTML page per run: metrics table, per-language table, confusion matrix
and reliability diagram (matplotlib SVGs inlined as data URIs), and for a tune experiment the
trial curves and the trials table. No external files, scripts or fonts: the page opens from
disk, from an artifact store or attached to an email.

Rendering only: `prediction_report_html` (the label job and `eval`), `tune_report_html`
(a tune experiment and `eval --experiment`). Element ids are stable (the report test renders
the page in headless Chromium and looks for them): `run-details`, `metrics`, `per-language`,
`confusion-matrix`, `reliability-diagram`, `trial-curves`, `trials`.

Pure module: matplotlib inside functions; no ray, no torch.
"""

from __future__ import annotations

import base64
import html
import math
import time
from typing import Any

from sentiment_ray.report import plots

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1f2933; padding: 0 1rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #d9e2ec; }
.sub { color: #627d98; margin-top: 0; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-variant-numeric: tabular-nums; }
th, td { padding: .3rem .8rem; border-bottom: 1px solid #e4e7eb; text-align: right; }
th:first-child, td:first-child { text-align: left; }
#run-details th, #run-details td { text-align: left; border: 0; padding: .1rem .8rem .1rem 0; }
#run-details th { color: #627d98; font-weight: normal; }
thead th { background: #f0f4f8; }
tr.best td { font-weight: 600; background: #fffbea; }
tr.worse td { color: #b42318; font-weight: 600; }
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
    rows = [("n", report.get("n")), ("accuracy", report.get("accuracy")), ("macro_f1", report.get("macro_f1"))]
    if report.get("ece") is not None:
        rows.append(("ece", report["ece"]))
    rows += [(f"f1_{label}", value) for label, value in (report.get("f1") or {}).items()]
    rows += [(k, report[k]) for k in ("unparsed", "rows_without_label") if report.get(k) is not None]
    sections = ["<h2>Metrics</h2>", _table("metrics", ["metric", "value"], [({"data-metric": k}, [k, v]) for k, v in rows])]
    unknown = report.get("unknown_labels") or {}
    if unknown:
        named = ", ".join(f"{html.escape(repr(k))} ({v})" for k, v in unknown.items())
        sections.append(
            f'<p id="unknown-labels" class=warning>{sum(unknown.values())} row(s) have a gold label outside '
            f"the label set and were not scored: {named}.</p>"
        )

    per_language = report.get("per_language") or {}
    sections.append("<h2>Per language</h2>")
    if per_language:
        with_ece = any("ece" in v for v in per_language.values())
        lang_rows = [
            ({"data-lang": lang}, [lang, v.get("n"), v.get("accuracy"), v.get("macro_f1"), *([v.get("ece")] if with_ece else [])])
            for lang, v in sorted(per_language.items(), key=lambda kv: -kv[1].get("n", 0))
        ]
        sections.append(
            _table("per-language", ["language", "n", "accuracy", "macro-F1", *(["ECE"] if with_ece else [])], lang_rows)
        )
    else:
        sections.append('<p id="per-language">No language column in the data.</p>')

    figures = []
    confusion = report["confusion_matrix"]
    figures.append(
        _image(
            "confusion-matrix",
            f"Confusion matrix over {', '.join(confusion['labels'])} (rows true, columns predicted)",
            plots.render_confusion(confusion, fmt="svg"),
            "image/svg+xml",
            "Confusion matrix: counts and share of each true label's row.",
        )
    )
    if report.get("calibration_bins"):
        figures.append(
            _image(
                "reliability-diagram",
                f"Reliability diagram (ECE {report['ece']:.3f})",
                plots.render_reliability(report["calibration_bins"], ece=report.get("ece"), fmt="svg"),
                "image/svg+xml",
                "Reliability: accuracy per confidence bin against the diagonal (bin row counts on the bars).",
            )
        )
    sections += ["<h2>Errors and calibration</h2>", f"<div class=figures>{''.join(figures)}</div>"]
    return sections


def dated(details: dict[str, Any]) -> dict[str, Any]:
    """A report's "what is this" rows without the unknown ones, and the date it was written (UTC)."""
    return {**{k: v for k, v in details.items() if v is not None}, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def details_section(details: dict[str, Any]) -> str:
    """What the page is about (model, adapter, input, date): one row per item."""
    body = "".join(
        f'<tr data-detail="{html.escape(str(key))}"><th>{html.escape(str(key))}</th><td>{_fmt(value)}</td></tr>'
        for key, value in details.items()
    )
    return f'<div class=scroll><table id="run-details"><tbody>{body}</tbody></table></div>'


def prediction_report_html(
    report: dict[str, Any], *, title: str, subtitle: str = "", details: dict[str, Any] | None = None
) -> str:
    """The page of one set of predictions (a label run, a training run's validation split).
    `details`: what it is about (model, adapter, input, date), shown first."""
    sections = ([details_section(details)] if details else []) + metrics_sections(report)
    if report.get("languages"):
        sections += language_sections(report["languages"])
    if report.get("accepted"):
        sections += accepted_sections(report["accepted"])
    if report.get("risk_control"):
        sections += risk_control_sections(report["risk_control"])
    return page(title, subtitle or f"{report.get('n')} labelled rows", sections)


def language_sections(langs: dict[str, Any]) -> list[str]:
    """The share of rows per language, those outside the adapter's calibration languages marked."""
    calibrated = langs.get("calibrated_languages")
    rows = [
        (
            {"data-lang": k, **({"class": "worse"} if calibrated is not None and k not in calibrated else {})},
            [k, v, "–" if calibrated is None else ("yes" if k in calibrated else "no: confidence not calibrated")],
        )
        for k, v in (langs.get("shares") or {}).items()
    ]
    sections = ["<h2>Languages of the rows</h2>", _table("languages", ["language", "share of rows", "calibrated"], rows)]
    if langs.get("not_calibrated_share"):
        sections.append(
            f'<p id="not-calibrated" class=warning>{langs["not_calibrated_share"]:.1%} of rows are in languages the '
            "adapter was not calibrated on: their confidence is not calibrated.</p>"
        )
    return sections


def accepted_sections(accepted: dict[str, Any]) -> list[str]:
    """How many rows were accepted and at what guaranteed error (label.max_error)."""
    rows = [
        (k, accepted.get(k))
        for k in (
            "rows",
            "share",
            "max_error",
            "failure_probability",
            "threshold",
            "calibrated_languages",
            "calibration_rows",
            "calibration_coverage",
            "calibration_error",
        )
    ]
    return ["<h2>Accepted rows</h2>", _table("accepted", ["", "value"], [({"data-metric": k}, [k, v]) for k, v in rows])]


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
    best_id = best["trial_id"] if best else None
    png = plots.render_metric_plot(records, metric, title=f"{metric} by step", best_id=best_id)
    sections = [
        "<h2>Trials</h2>",
        _image(
            "trial-curves",
            f"Trial curves: {metric} by training step, one line per trial",
            png,
            "image/png",
            "Dashed lines: trials stopped by the scheduler, failed or unfinished; the best trial is drawn thicker.",
            wide=True,
        ),
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
    subtitle = f"{len(rows)} trials, metric {metric} ({mode})" + (
        f", best trial {best_id}" if best_id else ", no trial completed"
    )
    return page(title, subtitle, sections)


def calibration_sections(calibration: dict[str, Any]) -> list[str]:
    """The fitted temperature, ECE and NLL before and after, and both reliability diagrams."""
    rows = [
        ("temperature", calibration.get("temperature")),
        ("applied", "yes" if calibration.get("applied", True) else "no (no out-of-fold gain)"),
        ("validation rows", calibration.get("rows")),
        ("ECE before (the model's own)", calibration.get("ece_before")),
        ("ECE after (out-of-fold)", calibration.get("ece_after")),
        ("NLL before", calibration.get("nll_before")),
        ("NLL after (out-of-fold)", calibration.get("nll_after")),
    ]
    figures = [
        _image(
            f"reliability-{when}",
            f"Reliability diagram {when} calibration (ECE {calibration[f'ece_{when}']:.3f})",
            plots.render_reliability(calibration[f"bins_{when}"], ece=calibration[f"ece_{when}"], fmt="svg"),
            "image/svg+xml",
            f"{when.capitalize()} temperature scaling.",
        )
        for when in ("before", "after")
        if calibration.get(f"bins_{when}")
    ]
    return [
        "<h2>Calibration</h2>",
        _table("calibration", ["", "value"], [({"data-metric": k}, [k, v]) for k, v in rows]),
        f"<div class=figures>{''.join(figures)}</div>",
    ]


def risk_control_sections(risk_control: dict[str, Any]) -> list[str]:
    """The risk-coverage curve observed on the validation rows, and the thresholds certified
    for a few error targets (risk.summary)."""
    curve = [
        ({"data-coverage": str(p["coverage"])}, [p["coverage"], p["error"], p["threshold"], p["rows"]])
        for p in risk_control.get("curve", [])
    ]
    certified = [
        (
            {"data-max-error": str(c["max_error"])},
            [c["max_error"], "none certified" if c["threshold"] is None else c["threshold"], c["coverage"], c["observed_error"]],
        )
        for c in risk_control.get("certified", [])
    ]
    sections = [
        "<h2>Risk and coverage (validation)</h2>",
        "<p>The error rate among the most confident rows at each share of rows accepted, on the rows the adapter was "
        "calibrated on.</p>",
        _table("risk-coverage", ["share accepted", "error among accepted", "confidence at least", "rows"], curve),
    ]
    if certified:
        sections += [
            f"<p>Thresholds certified with failure probability {risk_control.get('delta')} "
            f"({html.escape(str(risk_control.get('method', '')))}):</p>",
            _table("certified", ["max error", "threshold", "share accepted", "observed error"], certified),
        ]
    return sections


def data_profile_sections(profile: dict[str, Any]) -> list[str]:
    """The languages and label shares of the adapter's training and calibration rows."""
    rows = []
    for which in ("train", "calibration"):
        part = profile.get(which) or {}
        for kind in ("languages", "labels"):
            text = ", ".join(f"{k} {v:.1%}" for k, v in (part.get(kind) or {}).items())
            rows.append(({"data-rows": which, "data-kind": kind}, [which, part.get("rows"), kind, text]))
    return [
        f"<h2>What the adapter knows (languages: {html.escape(str(profile.get('languages_from', '')))})</h2>",
        _table("data-profile", ["rows", "n", "", "shares"], rows),
    ]


def training_report_html(
    metrics: dict[str, Any], *, title: str, subtitle: str = "", details: dict[str, Any] | None = None
) -> str:
    """The page of a training run: what it is (`details`: model, data, adapter, date), zero-shot
    against fine-tuned overall and per language (languages fine-tuning made worse marked), the
    calibration, then the fine-tuned model's validation metrics, confusion matrix and
    reliability diagram."""
    zero, tuned = metrics.get("zero_shot") or {}, metrics.get("fine_tuned") or {}
    calibration = metrics.get("calibration") or {}
    overall = [
        ({"data-metric": key}, [name, zero.get(key), tuned.get(key)])
        for key, name in (
            ("n", "n"),
            ("accuracy", "accuracy"),
            ("macro_f1", "macro_f1"),
            ("ece", "ece (the model's own)"),
            ("ece_calibrated", "ece calibrated (out-of-fold)"),
        )
        if key != "ece_calibrated" or tuned.get(key) is not None
    ]
    sections = [details_section(details)] if details else []
    sections += ["<h2>Zero-shot and fine-tuned</h2>", _table("comparison", ["", "zero-shot", "fine-tuned"], overall)]
    languages = metrics.get("languages") or []
    if languages:
        rows = [
            (
                {"data-lang": c["lang"], **({"class": "worse"} if c["worse"] else {})},
                [
                    c["lang"],
                    c["n"],
                    c["zero_shot_macro_f1"],
                    c["fine_tuned_macro_f1"],
                    c["change"],
                    c.get("verdict", "worse" if c["worse"] else ""),
                ],
            )
            for c in languages
        ]
        sections += [
            "<h2>Per language (macro-F1)</h2>",
            _table("languages", ["language", "n", "zero-shot", "fine-tuned", "change", ""], rows),
        ]
    if calibration:
        sections += calibration_sections(calibration)
    if metrics.get("risk_control"):
        sections += risk_control_sections(metrics["risk_control"])
    if metrics.get("data_profile"):
        sections += data_profile_sections(metrics["data_profile"])
    if tuned:
        sections += metrics_sections(tuned)
    return page(title, subtitle or f"{tuned.get('n', 0)} validation rows", sections)
