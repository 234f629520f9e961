"""Validation during and after training: label-token scoring of the validation split, judged by
the one evaluation (`metrics.evaluate_predictions`), the temperature that calibrates the
fine-tuned model's probabilities, and the languages fine-tuning made worse."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sentiment_ray.calibration import calibrate
from sentiment_ray.labels import LabelSet
from sentiment_ray.metrics import evaluate_predictions
from sentiment_ray.scoring import LabelScorer, ScoreResult, softmax

# A language counts as made worse when fine-tuning lowered its macro-F1 by more than this
# (a handful of rows moving in a small validation split is noise, not a regression).
WORSE_BY_MORE_THAN = 0.005


def evaluate_scores(table, scores: ScoreResult, labels: LabelSet) -> dict:
    """The evaluation report (accuracy, macro-F1, per language, ECE, truncated and prompt
    token counts) of scores of a validation table."""
    langs = table.column("lang").to_pylist() if "lang" in table.column_names else None
    report = evaluate_predictions(
        table.column("label").to_pylist(), scores.predicted(), labels,
        confidence=scores.confidence().tolist(), langs=langs,
    )
    report["truncated"] = int(scores.truncated.sum())
    report["prompt_tokens"] = scores.prompt_tokens
    return report


def evaluate_split(scorer: LabelScorer, table) -> tuple[dict, ScoreResult]:
    """(the evaluation report, the per-row scores) of a validation table."""
    scores = scorer.score(table.column("sentence").to_pylist())
    return evaluate_scores(table, scores, scorer.labels), scores


def calibrate_scores(table, scores: ScoreResult, labels: LabelSet) -> tuple[dict, dict, ScoreResult]:
    """Fit the temperature on the validation rows' label logits: (the calibration record,
    the evaluation report of the calibrated probabilities, the calibrated scores)."""
    gold = np.array([labels.index(g) for g in table.column("label").to_pylist()], dtype=np.int64)
    fit = calibrate(scores.logits, gold)
    calibrated = dataclasses.replace(scores, probs=softmax(scores.logits / fit["temperature"]))
    return fit, evaluate_scores(table, calibrated, labels), calibrated


def predictions_table(table, scores: ScoreResult):
    """The validation rows with the predicted label, one probability column per label (what
    labelling with the adapter gives) and the label logits (before the temperature)."""
    import pyarrow as pa

    columns = {c: table.column(c) for c in ("ID", "sentence", "label", "lang") if c in table.column_names}
    columns["predicted"] = pa.array(scores.predicted(), type=pa.string())
    for i, label in enumerate(scores.labels):
        columns[f"p_{label}"] = pa.array(scores.probs[:, i])
    if scores.logits is not None:
        for i, label in enumerate(scores.labels):
            columns[f"logit_{label}"] = pa.array(scores.logits[:, i])
    return pa.table(columns)


def language_changes(zero_shot: dict | None, fine_tuned: dict | None) -> list[dict[str, Any]]:
    """Per language: zero-shot and fine-tuned macro-F1, the change, and whether fine-tuning
    made it worse. Empty without both reports or without languages."""
    before = (zero_shot or {}).get("per_language") or {}
    after = (fine_tuned or {}).get("per_language") or {}
    rows = []
    for lang in sorted(set(before) & set(after)):
        z, f = before[lang]["macro_f1"], after[lang]["macro_f1"]
        rows.append({
            "lang": lang, "n": after[lang]["n"], "zero_shot_macro_f1": z, "fine_tuned_macro_f1": f,
            "change": round(f - z, 6), "worse": f < z - WORSE_BY_MORE_THAN,
        })
    return rows


def worse_languages_line(changes: list[dict[str, Any]]) -> str | None:
    """One line naming the languages fine-tuning made worse, or None."""
    worse = [c for c in changes if c["worse"]]
    if not worse:
        return None
    shown = ", ".join(f"{c['lang']} {c['zero_shot_macro_f1']:.3f} -> {c['fine_tuned_macro_f1']:.3f}" for c in worse)
    return f"fine-tuning lowered the validation macro-F1 of {len(worse)} language(s): {shown}"


def flat_validation_metrics(report: dict | None) -> dict[str, Any]:
    """The scalars Ray Train / a Tune scheduler compares (report keys prefixed `val_`)."""
    if not report:
        return {}
    return {"val_accuracy": report["accuracy"], "val_macro_f1": report["macro_f1"], "val_ece": report["ece"]}
