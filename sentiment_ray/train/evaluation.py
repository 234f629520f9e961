"""Validation during and after training: label-token scoring of the validation split, judged by
the one evaluation (`metrics.evaluate_predictions`)."""

from __future__ import annotations

from typing import Any

from sentiment_ray.metrics import evaluate_predictions
from sentiment_ray.scoring import LabelScorer, ScoreResult


def evaluate_split(scorer: LabelScorer, table) -> tuple[dict, ScoreResult]:
    """(the evaluation report: accuracy, macro-F1, per language, ECE, truncated and prompt
    token counts; the per-row scores) of a validation table."""
    scores = scorer.score(table.column("sentence").to_pylist())
    langs = table.column("lang").to_pylist() if "lang" in table.column_names else None
    report = evaluate_predictions(
        table.column("label").to_pylist(), scores.predicted(), scorer.labels,
        confidence=scores.confidence().tolist(), langs=langs,
    )
    report["truncated"] = int(scores.truncated.sum())
    report["prompt_tokens"] = scores.prompt_tokens
    return report, scores


def predictions_table(table, scores: ScoreResult):
    """The validation rows with the predicted label and one probability column per label."""
    import pyarrow as pa

    columns = {c: table.column(c) for c in ("ID", "sentence", "label", "lang") if c in table.column_names}
    columns["predicted"] = pa.array(scores.predicted(), type=pa.string())
    for i, label in enumerate(scores.labels):
        columns[f"p_{label}"] = pa.array(scores.probs[:, i])
    return pa.table(columns)


def flat_validation_metrics(report: dict | None) -> dict[str, Any]:
    """The scalars Ray Train / a Tune scheduler compares (report keys prefixed `val_`)."""
    if not report:
        return {}
    return {"val_accuracy": report["accuracy"], "val_macro_f1": report["macro_f1"], "val_ece": report["ece"]}
