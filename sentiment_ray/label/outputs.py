"""What the driver makes of committed units: the markers' totals, the merged submission and
quarantine files in input order, the evaluation against the input's gold labels, and the
job's summary."""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

from sentiment_ray import languages, risk
from sentiment_ray.config import ExperimentConfig
from sentiment_ray.io.storage import Storage
from sentiment_ray.label import layout
from sentiment_ray.label.labeler import submission_csv
from sentiment_ray.label.plan import LabelRunError, WorkUnit
from sentiment_ray.label.run import LabelRun, UnitPlan
from sentiment_ray.labels import LabelSet
from sentiment_ray.metrics import EvaluationCounts, unknown_labels_line
from sentiment_ray.report import html, plots


def done_unit_ids(out: Storage, plan_id: str | None = None) -> set[str]:
    """Units with a commit marker (of plan `plan_id`, when given: a marker another plan of
    this folder left is not this plan's commit)."""
    units = {u for u in map(layout.unit_id_of_marker, out.list_names(layout.DONE_DIR)) if u}
    if plan_id is None:
        return units
    done = set()
    for unit_id in units:
        marker = out.read_json_or_none(layout.unit_files(unit_id).done)
        if marker is not None and marker.get("plan_id") == plan_id:
            done.add(unit_id)
    return done


def first_failure(out: Storage) -> dict[str, Any] | None:
    names = out.list_names(layout.FAILED_DIR)
    return out.read_json(f"{layout.FAILED_DIR}/{names[0]}") if names else None


def read_markers(out: Storage, units: list[WorkUnit], plan_id: str | None = None) -> dict[str, dict[str, Any]]:
    """Every unit's commit marker; LabelRunError when one is missing or belongs to another plan."""
    markers, missing = {}, []
    for unit in units:
        name = layout.unit_files(unit.unit_id).done
        marker = out.read_json_or_none(name)
        if marker is None:
            missing.append(unit.unit_id)
            continue
        if plan_id is not None and marker.get("plan_id") != plan_id:
            raise LabelRunError(
                f"{out.path(name)} was written for another plan of this folder ({marker.get('plan_id')}, this one "
                f"is {plan_id}): another job wrote here; rerun with --overwrite"
            )
        if marker["labelled"] + marker["bad_rows"] != unit.num_rows:
            raise LabelRunError(
                f"{out.path(name)}: {marker['labelled']} + {marker['bad_rows']} rows, but the unit has {unit.num_rows}"
            )
        markers[unit.unit_id] = marker
    if missing:
        raise LabelRunError(f"{len(missing)} units have no commit marker after the run (first: {missing[:3]}); rerun the command")
    return markers


def totals(markers) -> dict[str, Any]:
    markers = list(markers)
    bad, langs = Counter(), Counter()
    for m in markers:
        bad.update(m["bad_by_kind"])
        langs.update(m.get("languages") or {})
    return {
        "rows": sum(m["rows"] for m in markers),
        "labelled": sum(m["labelled"] for m in markers),
        "bad_rows": sum(m["bad_rows"] for m in markers),
        "bad_by_kind": dict(bad),
        "truncated": sum(m["truncated"] for m in markers),
        "parse_failed": sum(m["parse_failed"] for m in markers),
        "text_cut": sum(m.get("text_cut", 0) for m in markers),
        "prompt_markers": sum(m.get("prompt_markers", 0) for m in markers),
        "prompt_tokens": sum(m["prompt_tokens"] for m in markers),
        "language_rows": dict(langs.most_common()),
        "accepted_rows": sum(m.get("accepted", 0) for m in markers),
        "predict_seconds": round(sum(m["predict_seconds"] for m in markers), 3),
    }


def labelling_window(markers: list[dict]) -> dict[str, Any]:
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


def actor_startup(markers: list[dict]) -> dict[str, Any]:
    """How long the actors took to start (import, model load, warm-up batch): the slowest
    and the mean over the actors that labelled units now."""
    loads = {(m.get("host"), m.get("pid")): m["actor_load_s"] for m in markers if "actor_load_s" in m}
    if not loads:
        return {}
    return {
        "actor_startup_s_max": round(max(loads.values()), 2),
        "actor_startup_s_mean": round(sum(loads.values()) / len(loads), 2),
    }


def model_form(markers: list[dict]) -> dict[str, Any]:
    """How the actors held the model: the adapter's form (merged, fused, unmerged, none),
    whether the scoring forward was compiled and how long that took, the weights' and the
    peak GPU memory (the largest over the actors)."""
    forms = sorted({m["adapter_form"] for m in markers if m.get("adapter_form")})
    if not forms:
        return {}
    largest = lambda key: max((m[key] for m in markers if m.get(key) is not None), default=None)  # noqa: E731
    return {
        "adapter_form": forms[0] if len(forms) == 1 else forms,
        "compiled": any(m.get("compiled") for m in markers),
        "compile_s_max": largest("compile_s"),
        "weights_gib": largest("weights_gib"),
        "peak_gpu_gib": largest("peak_gpu_gib"),
    }


def merge_submission(out: Storage, units: list[WorkUnit]) -> str:
    """One `ID,label` file in input order (unit order, then row order), streamed."""
    with out.atomic_writer(layout.SUBMISSION_FILE) as f:
        f.write(submission_csv([], []))
        for unit in units:
            shard = out.read_bytes(layout.unit_files(unit.unit_id).csv)
            f.write(shard.split(b"\n", 1)[1] if b"\n" in shard else b"")
    return out.path(layout.SUBMISSION_FILE)


def merge_quarantine(out: Storage, units: list[WorkUnit], markers: dict[str, dict]) -> str:
    """All quarantined rows in input order (an empty file when there are none)."""
    with out.atomic_writer(layout.QUARANTINE_FILE) as f:
        for unit in units:
            if markers[unit.unit_id]["bad_rows"]:
                f.write(out.read_bytes(layout.unit_files(unit.unit_id).quarantine))
    return out.path(layout.QUARANTINE_FILE)


# ----------------------------------------------------------------------------- languages and acceptance


def acceptance(cfg: ExperimentConfig, adapter_path: str | None) -> dict[str, Any] | None:
    """With label.max_error: the confidence threshold certified on the adapter's calibration
    rows (risk.py) and the languages it was calibrated on, for the actors (`accepted`) and the
    summary; None without label.max_error. LabelRunError when the adapter cannot support it."""
    max_error = cfg.label.max_error
    if max_error is None:
        return None
    if cfg.label.mode != "scoring":
        raise LabelRunError("label.max_error needs label.mode=scoring (a confidence per row)")
    record = risk.read_scores(adapter_path)
    if record is None:
        raise LabelRunError(
            f"label.max_error needs an adapter that saved its calibration scores ({risk.RISK_FILE}): "
            f"{adapter_path or 'no --adapter was given'}; train it again with validation rows"
        )
    found = risk.certify_record(record, max_error, cfg.label.max_error_delta)
    calibrated = languages.calibrated_languages(languages.read_profile(adapter_path))
    return {"threshold": found.threshold, "languages": calibrated, "certified": found.to_dict()}


def language_summary(totals: dict[str, Any], calibrated: list[str] | None) -> dict[str, Any]:
    """The share of rows per language and, against the adapter's calibration languages
    (None: no adapter, or one that did not record them), the share outside them."""
    shares = languages.count_shares(totals.get("language_rows", {}))
    out: dict[str, Any] = {"shares": shares, "calibrated_languages": calibrated}
    if calibrated is not None:
        out["not_calibrated_share"], out["not_calibrated"] = languages.uncalibrated_share(shares, calibrated)
    return out


def accepted_summary(totals: dict[str, Any], accept: dict[str, Any] | None) -> dict[str, Any] | None:
    """How many rows were accepted and at what guaranteed error (None without label.max_error)."""
    if accept is None:
        return None
    certified = accept["certified"]
    labelled = totals["labelled"]
    return {
        "rows": totals["accepted_rows"],
        "share": round(totals["accepted_rows"] / labelled, 4) if labelled else 0.0,
        "max_error": certified["max_error"],
        "failure_probability": certified["delta"],
        "threshold": accept["threshold"],
        "calibrated_languages": accept["languages"],
        "calibration_rows": certified["calibration_rows"],
        "calibration_coverage": certified["coverage"],
        "calibration_error": certified["observed_error"],
    }


def terminal_lines(summary: dict[str, Any]) -> list[str]:
    """What the label job's terminal says after its progress: the languages of the rows, and
    the rows accepted with a guaranteed error."""
    lines = []
    langs = summary.get("languages") or {}
    if langs.get("shares"):
        lines.append(f"languages  {languages.shares_text(langs['shares'])}")
    accepted = summary.get("accepted")
    if accepted:
        if accepted["threshold"] is None:
            lines.append(
                f"accepted   none: an error rate of at most {accepted['max_error']:g} cannot be certified on the adapter's "
                f"{accepted['calibration_rows']:,} calibration rows"
            )
        else:
            lines.append(
                f"accepted   {accepted['rows']:,} of {summary['labelled']:,} rows ({accepted['share']:.1%}): confidence >= "
                f"{accepted['threshold']:.4g} in {', '.join(accepted['calibrated_languages'])}; error at most "
                f"{accepted['max_error']:g} with probability {1 - accepted['failure_probability']:g}"
            )
    return lines


def warning_lines(summary: dict[str, Any], report: dict[str, Any] | None) -> list[str]:
    """The label job's warnings: rows in languages the adapter was not calibrated on, gold
    labels outside the label set."""
    langs = summary.get("languages") or {}
    lines = []
    if langs.get("calibrated_languages") is not None:
        lines.append(languages.uncalibrated_line(langs["shares"], langs["calibrated_languages"]))
    lines.append(unknown_labels_line(report))
    return [line for line in lines if line]


# ----------------------------------------------------------------------------- evaluation


def read_gold_and_predictions(out: Storage, units: list[WorkUnit], label_column: str, lang_column: str) -> dict[str, list]:
    """The gold label, prediction, confidence and language of every labelled row, reading
    only those columns of the shards (a unit whose rows were all quarantined has none)."""
    import pyarrow.parquet as pq

    data: dict[str, list] = {"gold": [], "predicted": [], "confidence": [], "langs": []}
    lang_columns = (lang_column, "lang_detected")
    for unit in units:
        with out.open_input(layout.unit_files(unit.unit_id).predictions) as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            if "pred_label" not in names:
                continue
            table = parquet.read(columns=[c for c in (label_column, "pred_label", "confidence", *lang_columns) if c in names])
        n = table.num_rows

        def column(name: str) -> list:
            return table.column(name).to_pylist() if name in table.column_names else [None] * n

        data["gold"] += column(label_column)
        data["predicted"] += column("pred_label")
        data["confidence"] += column("confidence")
        data["langs"] += column(lang_column if lang_column in table.column_names else "lang_detected")
    return data


def evaluation_counts(out: Storage, units: list[WorkUnit], cfg: ExperimentConfig) -> EvaluationCounts:
    """The evaluation's counts, summed one unit at a time (only the gold, prediction,
    confidence and language columns of one shard in memory at once), so the driver's end
    of a 100M-row job needs what a 1,000-row one needs."""
    counts = EvaluationCounts(LabelSet(cfg.prompt.labels), label_map=cfg.data.label_map)
    scoring = cfg.label.mode == "scoring"
    for unit in units:
        data = read_gold_and_predictions(out, [unit], cfg.data.label_column, cfg.data.lang_column)
        counts.add(data["gold"], data["predicted"], confidence=data["confidence"] if scoring else None, langs=data["langs"])
    return counts


def report_details(manifest: dict[str, Any] | None, **known: Any) -> dict[str, Any]:
    """The report's "what is this" rows from a label run's manifest: model, adapter, input,
    and the date the report was written (UTC). `known` fills or overrides them."""
    manifest = manifest or {}
    adapter = manifest.get("adapter") or {}
    model = (manifest.get("prediction_config") or {}).get("model", {}).get("name")
    details = {
        "model": model,
        "adapter": f"{adapter['path']} (sha256 {adapter['sha256'][:12]})"
        if adapter.get("path")
        else ("none (zero-shot)" if manifest else None),
        "input": manifest.get("input"),
        "rows": manifest.get("total_rows"),
        "labelled": manifest.get("created_utc"),
    }
    details.update(known)
    return html.dated(details)


def describe_form(summary: dict[str, Any]) -> str | None:
    """The model's form for a person: 'adapter merged into 16-bit weights, eager, <w> GiB of
    weights, <p> GiB peak' (None when no actor ran now)."""
    form = summary.get("adapter_form")
    if not form:
        return None
    words = {
        "merged": "adapter merged into 16-bit weights",
        "fused": "4-bit base, adapter in fused LoRA forwards",
        "unmerged": "adapter as peft LoRA layers",
        "none": "no adapter",
    }
    parts = [words.get(form, str(form)) if isinstance(form, str) else "actors differ: " + ", ".join(form)]
    parts.append("compiled" if summary.get("compiled") else "eager")
    if summary.get("weights_gib") is not None:
        parts.append(f"{summary['weights_gib']:.1f} GiB of weights")
    if summary.get("peak_gpu_gib") is not None:
        parts.append(f"{summary['peak_gpu_gib']:.1f} GiB peak")
    return ", ".join(parts)


def evaluate(
    out: Storage,
    units: list[WorkUnit],
    cfg: ExperimentConfig,
    *,
    title: str,
    subtitle: str = "",
    held_as: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Metrics against the input's gold labels into metrics.json, report.png and report.html
    (rows whose label is missing or unknown are counted, not scored); None when no row has
    a usable gold label."""
    report = evaluation_counts(out, units, cfg).report()  # = evaluate_predictions of every row
    if report is None:
        return None
    report.update(extra or {})  # languages, accepted rows, the adapter's risk-coverage curve
    out.write_json(layout.METRICS_FILE, report)
    png = plots.render_report_png(
        report["confusion_matrix"],
        report.get("calibration_bins"),
        title=f"{os.path.basename(cfg.model.name.rstrip('/'))} ({cfg.label.mode}, n={report['n']})",
        ece=report.get("ece"),
    )
    out.write_bytes(layout.REPORT_PNG_FILE, png)
    details = report_details(out.read_json_or_none(layout.MANIFEST_FILE), mode=cfg.label.mode, **{"model form": held_as})
    out.write_text(layout.REPORT_HTML_FILE, html.prediction_report_html(report, title=title, subtitle=subtitle, details=details))
    return report


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The metrics for the one-line summary (the full report is in metrics.json)."""
    return {
        "n": report["n"],
        "accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"],
        "ece": report.get("ece"),
        "unparsed": report["unparsed"],
        "rows_without_label": report["rows_without_label"],
        "unknown_labels": report.get("unknown_labels") or {},
        "per_language": report.get("per_language"),
    }


# ----------------------------------------------------------------------------- the summary


def summary(run: LabelRun, plan: UnitPlan, label_seconds: float) -> dict[str, Any]:
    """Merge the committed units' submission and quarantine files, evaluate against the
    input's gold labels, and return the job's summary (what `jobs/label.py` prints and
    summary.json holds). `label_seconds`: the labelling of this run's pending units, actor
    start-up included (0 when none was pending)."""
    cfg, out = run.cfg, run.out
    markers = read_markers(out, plan.units, plan.plan_id)
    pending = plan.pending
    ran_now = [markers[u.unit_id] for u in pending]
    counted = totals(markers.values())
    rows_now = sum(m["rows"] for m in ran_now)
    timed = bool(ran_now and label_seconds)
    result: dict[str, Any] = {
        "output": out.root,
        "predictions": out.path(layout.PREDICTIONS_DIR),
        "csv": out.path(layout.CSV_DIR),
        "input": plan.manifest["input"],
        "plan_id": plan.plan_id,
        "files": len(run.files),
        "files_not_read": run.inputs.not_read,
        "model": cfg.model.name,
        "adapter": run.adapter["id"] if run.adapter else None,
        "mode": cfg.label.mode,
        **counted,
        "units": {"total": len(plan.units), "labelled_now": len(pending), "done_before": len(plan.units) - len(pending)},
        "rows_labelled_now": rows_now,
        "label_seconds": round(label_seconds, 3),
        "rows_per_s": round(rows_now / label_seconds, 2) if timed else None,
        "prompt_tokens_per_s": round(sum(m["prompt_tokens"] for m in ran_now) / label_seconds, 1) if timed else None,
        "prompt_tokens_per_predict_s": (
            round(counted["prompt_tokens"] / counted["predict_seconds"], 1) if counted["predict_seconds"] else None
        ),
        **labelling_window(ran_now),
        **actor_startup(ran_now),
        **model_form(ran_now),
    }
    profile = languages.read_profile(run.adapter_path)
    result["languages"] = language_summary(counted, languages.calibrated_languages(profile) if profile else None)
    result["accepted"] = accepted_summary(counted, plan.acceptance)
    result["submission"] = merge_submission(out, plan.units) if cfg.label.write_submission else None
    result["quarantine"] = merge_quarantine(out, plan.units, markers)
    risk_record = risk.read_scores(run.adapter_path)
    extra = {
        "languages": result["languages"],
        "accepted": result["accepted"],
        "risk_control": risk.summary(risk_record, cfg.label.max_error_delta) if risk_record else None,
    }
    report = evaluate(out, plan.units, cfg, title=f"Labelling with {cfg.model.name}", extra=extra, held_as=describe_form(result))
    result["warnings"] = warning_lines(result, report)
    result["metrics_path"] = out.path(layout.METRICS_FILE) if report else None
    result["report_png"] = out.path(layout.REPORT_PNG_FILE) if report else None
    result["metrics"] = headline(report) if report else None
    result["seconds"] = round(time.perf_counter() - run.started, 3)
    return result
