"""Classification metrics: accuracy, macro-F1, confusion matrix, per-language, ECE, and the
one evaluation of predictions against gold labels (`evaluate_predictions`). Pure (numpy)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from sentiment_ray.io.values import as_key
from sentiment_ray.labels import LabelSet


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
            # fsum: the exactly rounded sum, whatever the order, so `EvaluationCounts`
            # (summed unit by unit) gives the same bins and ECE to the last bit.
            acc, avg = float(ok[mask].mean()), math.fsum(conf[mask].tolist()) / count
            ece += count / len(conf) * abs(acc - avg)
        else:
            acc = avg = None
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count, "accuracy": acc, "confidence": avg})
    return {"ece": float(ece) if len(conf) else 0.0, "bins": bins}


def evaluate_predictions(
    gold: Sequence[Any],
    predicted: Sequence[str | None],
    labels: LabelSet,
    *,
    label_map: dict[str, str] | None = None,
    confidence: Sequence[float | None] | None = None,
    langs: Sequence[Any] | None = None,
) -> dict | None:
    """The one evaluation, used by training, labelling and `eval`.

    `gold` holds raw gold labels, resolved as training resolves them (`label_map` first,
    then the label set case-insensitively); rows whose gold label is missing or does not
    resolve are counted in `rows_without_label`, not scored. `predicted` holds label names
    (None: an unparsed generation, always wrong). With `confidence` (the probability of the
    predicted label) the report adds `ece` and `calibration_bins`. None when no row has a
    usable gold label."""
    gold, predicted = list(gold), list(predicted)
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    keep, truth, unknown = [], [], Counter()
    for i, value in enumerate(gold):
        label, _ = labels.resolve(value, label_map)
        if label is not None:
            keep.append(i)
            truth.append(label)
        elif as_key(value) is not None:
            unknown[str(value)] += 1
    if not keep:
        return None
    pred = [predicted[i] for i in keep]
    lang_keys = None
    if langs is not None and any(x is not None for x in langs):
        lang_keys = [None if langs[i] is None else as_key(langs[i]) for i in keep]
    report = classification_report(truth, pred, list(labels), lang_keys)
    report["rows_without_label"] = len(gold) - len(keep)
    # Gold labels present but outside the label set (and label_map): named, never dropped silently.
    report["unknown_labels"] = dict(unknown.most_common())
    if confidence is not None and all(confidence[i] is not None for i in keep):
        right = [t == p for t, p in zip(truth, pred)]
        calibration = expected_calibration_error([confidence[i] for i in keep], right)
        report["ece"], report["calibration_bins"] = calibration["ece"], calibration["bins"]
        if lang_keys is not None:  # calibration per language: where the confidence can be trusted
            for lang, row in report["per_language"].items():
                rows = [j for j, x in enumerate(lang_keys) if x == lang]
                row["ece"] = expected_calibration_error([confidence[keep[j]] for j in rows], [right[j] for j in rows])["ece"]
    return report


def unknown_labels_line(report: dict | None) -> str | None:
    """One warning line naming the gold labels outside the label set that were not scored;
    None when there are none."""
    unknown = (report or {}).get("unknown_labels") or {}
    if not unknown:
        return None
    named = ", ".join(f"{value!r} ({n:,})" for value, n in list(unknown.items())[:5])
    more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
    rows = sum(unknown.values())
    return (
        f"{rows:,} row(s) have a gold label outside the label set, not scored: {named}{more}; "
        "map them with data.label_map or fix the labels"
    )


def macro_f1_drop_likelihood(
    gold: Sequence[str],
    before: Sequence[str | None],
    after: Sequence[str | None],
    labels: Sequence[str],
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> float:
    """How sure a drop in macro-F1 from `before` to `after` (two models' predictions of the
    same rows) is: the share of paired bootstrap resamples of the rows in which `after` scores
    the lower macro-F1 (ties count half). About 0.5 when the rows cannot tell them apart; a
    drop seen in 95% or more of the resamples is one the rows support."""
    n = len(gold)
    if n == 0:
        return 0.5
    index = {label: i for i, label in enumerate(labels)}
    k = len(labels)
    truth = np.array([index[g] for g in gold])
    rows = np.random.default_rng(seed).integers(0, n, size=(resamples, n))

    def macro_f1(pred: Sequence[str | None]) -> np.ndarray:
        guess = np.array([index.get(p, k) for p in pred])  # k: no label (always wrong)
        t, g = truth[rows], guess[rows]
        total, present = np.zeros(resamples), np.zeros(resamples)
        for c in range(k):  # as classification_report: over the labels a resample holds or predicts
            tp = ((t == c) & (g == c)).sum(axis=1)
            denominator = tp + (t == c).sum(axis=1) + (g == c).sum(axis=1)  # 2tp + fp + fn
            total += np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)
            present += denominator > 0
        return total / np.maximum(present, 1)

    a, b = macro_f1(before), macro_f1(after)
    return float(np.mean((b < a) + 0.5 * (b == a)))


# ----------------------------------------------------------------------------- in pieces


class EvaluationCounts:
    """`evaluate_predictions` summed piece by piece (a label job's units), in memory that
    does not grow with the rows: one count per (gold, predicted, language) cell and, per
    confidence bin, its rows, correct rows and the exact sum of its confidences.
    `report()` is what `evaluate_predictions` of all the pieces at once returns.

        counts = EvaluationCounts(labels, label_map=label_map)
        for unit in units:
            counts.add(gold, predicted, confidence=confidence, langs=langs)
        report = counts.report()
    """

    def __init__(self, labels: LabelSet, *, label_map: dict[str, str] | None = None, n_bins: int = 10):
        self.labels, self.label_map, self.n_bins = labels, label_map, n_bins
        self.cells: Counter = Counter()
        """(gold label, prediction, language key) -> rows, over rows whose gold resolves."""
        self.rows = 0
        self.any_lang = False
        self.with_confidence = True
        """Every scored row so far came with a confidence (else no ECE, as evaluate_predictions)."""
        self.unknown: Counter = Counter()
        """Gold values present but outside the label set (and label_map), by value."""
        self.bins = _Bins(n_bins)
        self.lang_bins: dict[str, _Bins] = {}
        """The same confidence bins per language: ECE per language."""

    def add(
        self,
        gold: Sequence[Any],
        predicted: Sequence[str | None],
        *,
        confidence: Sequence[float | None] | None = None,
        langs: Sequence[Any] | None = None,
    ) -> None:
        if len(gold) != len(predicted):
            raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
        self.rows += len(gold)
        if langs is not None and any(x is not None for x in langs):
            self.any_lang = True
        kept, truths, kept_langs = [], [], []
        for i, value in enumerate(gold):
            truth, _ = self.labels.resolve(value, self.label_map)
            if truth is not None:
                lang = None if langs is None or langs[i] is None else as_key(langs[i])
                self.cells[(truth, predicted[i], lang)] += 1
                kept.append(i)
                truths.append(truth)
                kept_langs.append(lang)
            elif as_key(value) is not None:
                self.unknown[str(value)] += 1
        if confidence is None or any(confidence[i] is None for i in kept):
            self.with_confidence = self.with_confidence and not kept
            return
        if not self.with_confidence or not kept:
            return
        conf = np.asarray([confidence[i] for i in kept], dtype=np.float64)
        edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, self.n_bins - 1)
        for b, value, truth, i, lang in zip(which.tolist(), conf.tolist(), truths, kept, kept_langs):
            right = truth == predicted[i]
            self.bins.add(b, value, right)
            if lang is not None:
                self.lang_bins.setdefault(str(lang), _Bins(self.n_bins)).add(b, value, right)

    def report(self) -> dict | None:
        """The report `evaluate_predictions` gives for every row added; None when no row has
        a usable gold label."""
        n = sum(self.cells.values())
        if n == 0:
            return None
        labels = list(self.labels)
        report = _report_of_cells(self.cells, labels)
        report["confusion_matrix"] = {
            "labels": labels,
            "matrix": [[sum(c for (t, p, _), c in self.cells.items() if t == a and p == b) for b in labels] for a in labels],
        }
        report["unparsed"] = sum(c for (_, p, _), c in self.cells.items() if p is None)
        if self.any_lang:
            by_lang = {}
            for lang in sorted({str(x) for (_, _, x) in self.cells if x is not None}):
                part = _report_of_cells(
                    Counter({k: c for k, c in self.cells.items() if k[2] is not None and str(k[2]) == lang}), labels
                )
                by_lang[lang] = {"n": part["n"], "accuracy": part["accuracy"], "macro_f1": part["macro_f1"]}
            report["per_language"] = by_lang
        report["rows_without_label"] = self.rows - n
        report["unknown_labels"] = dict(self.unknown.most_common())
        if self.with_confidence:
            report["ece"], report["calibration_bins"] = self.bins.ece()
            for lang, row in report.get("per_language", {}).items():
                row["ece"] = self.lang_bins[lang].ece()[0] if lang in self.lang_bins else 0.0
        return report


class _Bins:
    """Equal-width confidence bins: rows, correct rows and the exact partial sums of the
    confidences per bin (Shewchuk; math.fsum rounds them once), as expected_calibration_error
    computes them from rows."""

    def __init__(self, n_bins: int):
        self.n_bins = n_bins
        self.rows = [0] * n_bins
        self.correct = [0] * n_bins
        self.confidence: list[list[float]] = [[] for _ in range(n_bins)]

    def add(self, b: int, confidence: float, right: bool) -> None:
        self.rows[b] += 1
        self.correct[b] += right
        _add_exactly(self.confidence[b], confidence)

    def ece(self) -> tuple[float, list[dict]]:
        n = sum(self.rows)
        edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        bins, ece = [], 0.0
        for b in range(self.n_bins):
            count = self.rows[b]
            if count:
                acc, avg = self.correct[b] / count, math.fsum(self.confidence[b]) / count
                ece += count / n * abs(acc - avg)
            else:
                acc = avg = None
            bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count, "accuracy": acc, "confidence": avg})
        return (float(ece) if n else 0.0), bins


def _report_of_cells(cells: Counter, labels: list[str]) -> dict:
    """n, accuracy, macro-F1 and per-class F1 of (gold, prediction, _) counts, as
    `classification_report` computes them from rows."""
    n = sum(cells.values())
    f1 = {}
    for label in labels:
        tp = sum(c for (t, p, _), c in cells.items() if t == label and p == label)
        fp = sum(c for (t, p, _), c in cells.items() if t != label and p == label)
        fn = sum(c for (t, p, _), c in cells.items() if t == label and p != label)
        denom = 2 * tp + fp + fn
        f1[label] = 0.0 if denom == 0 else 2 * tp / denom
    seen = {t for (t, _, _) in cells} | {p for (_, p, _) in cells}
    present = [label for label in labels if label in seen]
    return {
        "n": n,
        "accuracy": (sum(c for (t, p, _), c in cells.items() if t == p) / n) if n else 0.0,
        "macro_f1": float(np.mean([f1[label] for label in present])) if present else 0.0,
        "f1": f1,
    }


def _add_exactly(partials: list[float], x: float) -> None:
    """Add x to a list of non-overlapping partial sums whose exact total is the sum of all
    values added (Shewchuk's algorithm, as math.fsum keeps them)."""
    i = 0
    for y in partials:
        if abs(x) < abs(y):
            x, y = y, x
        hi = x + y
        lo = y - (hi - x)
        if lo:
            partials[i] = lo
            i += 1
        x = hi
    partials[i:] = [x]
