"""Validation during and after training: label-token scoring of the validation split, judged by
the one evaluation (`metrics.evaluate_predictions`), the temperature that calibrates the
fine-tuned model's probabilities, and the languages fine-tuning made worse (a drop the
validation rows support, told apart from one they cannot)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sentiment_ray import languages, risk
from sentiment_ray.calibration import calibrate
from sentiment_ray.labels import LabelSet
from sentiment_ray.metrics import evaluate_predictions, macro_f1_drop_likelihood
from sentiment_ray.scoring import LabelScorer, ScoreResult, softmax

# A language counts as made worse when fine-tuning lowered its macro-F1 by more than this and
# the drop holds in at least SURE_DROP of paired bootstrap resamples of its validation rows: a
# handful of rows moving in a small validation split is noise, not a regression.
WORSE_BY_MORE_THAN = 0.005
SURE_DROP = 0.95


def evaluate_scores(table, scores: ScoreResult, labels: LabelSet) -> dict:
    """The evaluation report (accuracy, macro-F1, per language, ECE, truncated and prompt
    token counts) of scores of a validation table."""
    langs = table.column("lang").to_pylist() if "lang" in table.column_names else None
    report = evaluate_predictions(
        table.column("label").to_pylist(),
        scores.predicted(),
        labels,
        confidence=scores.confidence().tolist(),
        langs=langs,
    )
    report["truncated"] = int(scores.truncated.sum())
    report["prompt_tokens"] = scores.prompt_tokens
    return report


def evaluate_split(scorer: LabelScorer, table) -> tuple[dict, ScoreResult]:
    """(the evaluation report, the per-row scores) of a validation table."""
    scores = scorer.score(table.column("sentence").to_pylist())
    return evaluate_scores(table, scores, scorer.labels), scores


def calibrate_scores(table, scores: ScoreResult, labels: LabelSet, fine_tuned: dict) -> tuple[dict, dict, ScoreResult]:
    """Fit the temperature on the validation rows' label logits: (the calibration record,
    the fine-tuned report with the calibrated ECE beside the model's own, the calibrated
    scores: what labelling with the adapter gives).

    One ECE, defined once: `fine_tuned["ece"]` is the model's own (before the temperature,
    equal to the record's `ece_before`); `fine_tuned["ece_calibrated"]` is the record's
    `ece_after`, measured out of fold (each half of the rows scaled by the temperature fitted
    on the other). The in-sample ECE of the calibrated probabilities (the temperature judged on
    the rows it was fitted to) is shown nowhere."""
    gold = np.array([labels.index(g) for g in table.column("label").to_pylist()], dtype=np.int64)
    fit = calibrate(scores.logits, gold)
    calibrated = dataclasses.replace(scores, probs=softmax(scores.logits / fit["temperature"]))
    report = {**fine_tuned, "ece_calibrated": fit["ece_after"], "ece_calibrated_is": fit["ece_after_is"]}
    return fit, report, calibrated


def risk_scores(table, scores: ScoreResult, temperature: float) -> dict:
    """The validation rows' confidences (after the temperature) and whether each prediction
    was right, saved with the adapter (risk.RISK_FILE) so a label job can certify its own
    label.max_error."""
    correct = np.array(scores.predicted(), dtype=object) == np.array(table.column("label").to_pylist(), dtype=object)
    return risk.scores_record(scores.confidence(), correct, temperature=temperature)


def data_profile(train, validation) -> dict:
    """What the adapter knows (languages.PROFILE_FILE): the languages and label shares of its
    training and calibration (validation) rows, from the lang column, else detected."""
    has_lang = "lang" in train.column_names and any(x is not None for x in train.column("lang").to_pylist())

    def langs(table) -> list:
        if has_lang and "lang" in table.column_names:
            return table.column("lang").to_pylist()
        return languages.detect(table.column("sentence").to_pylist())

    return languages.data_profile(
        langs(train),
        train.column("label").to_pylist(),
        langs(validation),
        validation.column("label").to_pylist(),
        detected=not has_lang,
    )


def predictions_table(table, scores: ScoreResult, calibrated: ScoreResult | None = None):
    """The validation rows with the predicted label, one probability column per label as the
    model gives them (`p_<label>`: what `eval` reads, so its ECE is the model's own), the
    probabilities after the temperature (`calibrated_p_<label>`: what labelling with the adapter
    gives) and the label logits (before the temperature)."""
    import pyarrow as pa

    columns = {c: table.column(c) for c in ("ID", "sentence", "label", "lang") if c in table.column_names}
    columns["predicted"] = pa.array(scores.predicted(), type=pa.string())
    for i, label in enumerate(scores.labels):
        columns[f"p_{label}"] = pa.array(scores.probs[:, i])
    if calibrated is not None:
        for i, label in enumerate(scores.labels):
            columns[f"calibrated_p_{label}"] = pa.array(calibrated.probs[:, i])
    if scores.logits is not None:
        for i, label in enumerate(scores.labels):
            columns[f"logit_{label}"] = pa.array(scores.logits[:, i])
    return pa.table(columns)


def language_drop_likelihoods(table, before: list, after: list, labels: LabelSet) -> dict[str, float]:
    """Per language of a validation table: how sure the drop in macro-F1 from the `before`
    predictions (zero-shot) to the `after` ones (fine-tuned) is
    (`metrics.macro_f1_drop_likelihood`); empty without a lang column."""
    if "lang" not in table.column_names or len(before) != table.num_rows:
        return {}
    by_lang: dict[str, list[int]] = {}
    for i, lang in enumerate(table.column("lang").to_pylist()):
        if lang is not None:
            by_lang.setdefault(str(lang), []).append(i)
    gold = [labels.resolve(g)[0] for g in table.column("label").to_pylist()]
    out = {}
    for lang, rows in by_lang.items():
        rows = [i for i in rows if gold[i] is not None]
        out[lang] = macro_f1_drop_likelihood(
            [gold[i] for i in rows], [before[i] for i in rows], [after[i] for i in rows], list(labels)
        )
    return out


def language_changes(
    zero_shot: dict | None, fine_tuned: dict | None, drop_likelihood: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """Per language: zero-shot and fine-tuned macro-F1, the change, how sure a drop is
    (`drop_likelihood`, when the zero-shot predictions were kept), and the verdict: `worse`
    (lower, and the rows support it), `lower, within noise`, or `not worse`. Empty without both
    reports or without languages."""
    before = (zero_shot or {}).get("per_language") or {}
    after = (fine_tuned or {}).get("per_language") or {}
    rows = []
    for lang in sorted(set(before) & set(after)):
        z, f = before[lang]["macro_f1"], after[lang]["macro_f1"]
        sure = (drop_likelihood or {}).get(lang)
        lower = f < z - WORSE_BY_MORE_THAN
        worse = lower and (sure is None or sure >= SURE_DROP)
        rows.append(
            {
                "lang": lang,
                "n": after[lang]["n"],
                "zero_shot_macro_f1": z,
                "fine_tuned_macro_f1": f,
                "change": round(f - z, 6),
                "drop_likelihood": None if sure is None else round(sure, 3),
                "worse": worse,
                "verdict": "worse" if worse else "lower, within noise" if lower else "not worse",
            }
        )
    return rows


def worse_languages_line(changes: list[dict[str, Any]]) -> str | None:
    """One line naming the languages fine-tuning made worse, and those lower by an amount
    their validation rows cannot tell from noise; None when there are neither."""

    def shown(c: dict) -> str:
        sure = f", lower in {c['drop_likelihood']:.0%} of resamples" if c.get("drop_likelihood") is not None else ""
        return f"{c['lang']} {c['zero_shot_macro_f1']:.3f} -> {c['fine_tuned_macro_f1']:.3f} ({c['n']} rows{sure})"

    worse = [c for c in changes if c["worse"]]
    unsure = [c for c in changes if c.get("verdict") == "lower, within noise"]
    parts = []
    if worse:
        parts.append(f"fine-tuning lowered the validation macro-F1 of {len(worse)} language(s): {', '.join(map(shown, worse))}")
    if unsure:
        parts.append(
            f"lower, but within what the validation rows can tell: {', '.join(map(shown, unsure))}; "
            "hold out more rows of it (data.validation_fraction, data.max_validation_rows) to know"
        )
    return "; ".join(parts) or None


def flat_validation_metrics(report: dict | None) -> dict[str, Any]:
    """The scalars Ray Train / a Tune scheduler compares (report keys prefixed `val_`)."""
    if not report:
        return {}
    return {"val_accuracy": report["accuracy"], "val_macro_f1": report["macro_f1"], "val_ece": report["ece"]}
