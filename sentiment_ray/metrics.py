"""Classification metrics: accuracy, macro-F1, confusion matrix, per-language, ECE. Pure (numpy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]) -> list[list[int]]:
    """Rows = true label, columns = predicted label, in `labels` order. A None prediction
    (unparseable generation) counts in no column but still counts as wrong elsewhere."""
    index = {label: i for i, label in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(y_true, y_pred, strict=True):
        if p is not None and p in index:
            m[index[t], index[p]] += 1
    return m.tolist()


def per_class_f1(y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]) -> dict[str, float]:
    out = {}
    for label in labels:
        tp = sum(1 for t, p in zip(y_true, y_pred) if t == label and p == label)
        fp = sum(1 for t, p in zip(y_true, y_pred) if t != label and p == label)
        fn = sum(1 for t, p in zip(y_true, y_pred) if t == label and p != label)
        denom = 2 * tp + fp + fn
        out[label] = 0.0 if denom == 0 else 2 * tp / denom
    return out


def classification_report(
    y_true: Sequence[str],
    y_pred: Sequence[str | None],
    labels: Sequence[str],
    langs: Sequence[str | None] | None = None,
) -> dict:
    """Accuracy, macro-F1 (over the label set, absent classes scoring 0 only if predicted),
    per-class F1, confusion matrix, and the same per language when `langs` is given."""
    y_true, y_pred = list(y_true), list(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    n = len(y_true)
    f1 = per_class_f1(y_true, y_pred, labels)
    present = [label for label in labels if label in set(y_true) or label in set(y_pred)]
    report = {
        "n": n,
        "accuracy": (sum(t == p for t, p in zip(y_true, y_pred)) / n) if n else 0.0,
        "macro_f1": float(np.mean([f1[label] for label in present])) if present else 0.0,
        "f1": f1,
        "confusion_matrix": {"labels": list(labels), "matrix": confusion_matrix(y_true, y_pred, labels)},
        "unparsed": sum(p is None for p in y_pred),
    }
    if langs is not None:
        langs = list(langs)
        by_lang = {}
        for lang in sorted({str(x) for x in langs if x is not None}):
            idx = [i for i, x in enumerate(langs) if x is not None and str(x) == lang]
            sub_t = [y_true[i] for i in idx]
            sub_p = [y_pred[i] for i in idx]
            sub_f1 = per_class_f1(sub_t, sub_p, labels)
            sub_present = [label for label in labels if label in set(sub_t) or label in set(sub_p)]
            by_lang[lang] = {
                "n": len(idx),
                "accuracy": sum(t == p for t, p in zip(sub_t, sub_p)) / len(idx),
                "macro_f1": float(np.mean([sub_f1[label] for label in sub_present])) if sub_present else 0.0,
            }
        report["per_language"] = by_lang
    return report


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> dict:
    """ECE over equal-width confidence bins, with the bins for a reliability diagram."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if conf.shape != ok.shape:
        raise ValueError("confidence and correct differ in length")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        mask = which == b
        count = int(mask.sum())
        if count:
            acc, avg = float(ok[mask].mean()), float(conf[mask].mean())
            ece += count / len(conf) * abs(acc - avg)
        else:
            acc = avg = None
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count, "accuracy": acc, "confidence": avg})
    return {"ece": float(ece) if len(conf) else 0.0, "bins": bins}
