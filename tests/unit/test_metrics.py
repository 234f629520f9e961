"""Metrics against hand-computed values."""

import pytest

from sentiment_ray.labels import LabelSet
from sentiment_ray.metrics import classification_report, confusion_matrix, evaluate_predictions, expected_calibration_error

L = ["Positive", "Negative"]


def test_confusion_matrix_rows_are_truth():
    m = confusion_matrix(["Positive", "Positive", "Negative"], ["Positive", "Negative", "Negative"], L)
    assert m == [[1, 1], [0, 1]]


def test_report_accuracy_macro_f1_and_languages():
    y = ["Positive", "Positive", "Negative", "Negative"]
    p = ["Positive", "Negative", "Negative", "Negative"]
    r = classification_report(y, p, L, langs=["en", "en", "zh", "zh"])
    assert r["accuracy"] == 0.75
    # F1(Positive) = 2*1/(2+0+1) = 2/3; F1(Negative) = 2*2/(4+1+0) = 4/5
    assert r["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert r["per_language"]["en"] == {"n": 2, "accuracy": 0.5, "macro_f1": pytest.approx((2 / 3 + 0) / 2)}
    assert r["per_language"]["zh"]["accuracy"] == 1.0
    assert r["confusion_matrix"]["matrix"] == [[1, 1], [0, 2]]


def test_unparsed_predictions_count_as_wrong_and_are_reported():
    r = classification_report(["Positive", "Negative"], [None, "Negative"], L)
    assert r["accuracy"] == 0.5
    assert r["unparsed"] == 1


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        classification_report(["Positive"], [], L)


def test_ece_of_perfect_calibration_is_zero_and_bins_count_everything():
    conf = [0.9] * 10
    ok = [True] * 9 + [False]
    e = expected_calibration_error(conf, ok, n_bins=10)
    assert e["ece"] == pytest.approx(0.0, abs=1e-12)
    assert sum(b["count"] for b in e["bins"]) == 10


def test_ece_overconfident():
    e = expected_calibration_error([1.0, 1.0], [True, False], n_bins=5)
    assert e["ece"] == pytest.approx(0.5)


def test_a_drop_in_macro_f1_is_sure_only_when_the_rows_support_it():
    from sentiment_ray.metrics import macro_f1_drop_likelihood

    labels = ["Negative", "Positive"]
    gold = ["Positive", "Negative"] * 100
    right = list(gold)
    assert macro_f1_drop_likelihood(gold, right, right, labels) == 0.5  # the same predictions: no drop
    flipped = ["Negative" if i % 4 == 0 else g for i, g in enumerate(gold)]  # 50 of 200 rows now wrong
    assert macro_f1_drop_likelihood(gold, right, flipped, labels) > 0.99
    assert macro_f1_drop_likelihood(gold, flipped, right, labels) < 0.01
    few, one_wrong = gold[:4], ["Negative"] + gold[1:4]  # 4 rows, one flipped: cannot tell
    assert 0.05 < macro_f1_drop_likelihood(few, few, one_wrong, labels) < 0.95 + 1e-9
    assert macro_f1_drop_likelihood(gold, right, [None] * 200, labels) > 0.99  # unparsed answers are wrong


@pytest.mark.parametrize("piece", [1, 7, 50, 1000])
@pytest.mark.parametrize("with_confidence", [True, False])
def test_counts_summed_piece_by_piece_give_the_whole_tables_report_to_the_last_bit(piece, with_confidence):
    import random

    from sentiment_ray.labels import LabelSet
    from sentiment_ray.metrics import EvaluationCounts, evaluate_predictions

    rng = random.Random(0)
    n = 600
    gold = [rng.choice(["Positive", "negative", " NEGATIVE ", "1", "0", None, "maybe"]) for _ in range(n)]
    predicted = [rng.choice(["Positive", "Negative", None]) for _ in range(n)]
    confidence = [rng.random() for _ in range(n)] if with_confidence else None
    langs = [rng.choice(["en", " en", "zh", None, 3]) for _ in range(n)]
    labels, label_map = LabelSet(["Positive", "Negative"]), {"1": "Positive", "0": "Negative"}

    whole = evaluate_predictions(gold, predicted, labels, label_map=label_map, confidence=confidence, langs=langs)
    counts = EvaluationCounts(labels, label_map=label_map)
    for start in range(0, n, piece):
        part = slice(start, start + piece)
        counts.add(gold[part], predicted[part], confidence=confidence[part] if confidence else None, langs=langs[part])
    streamed = counts.report()
    assert ("ece" in whole) is with_confidence
    assert whole["rows_without_label"] > 0
    assert whole["unparsed"] > 0
    assert streamed == whole
    assert list(streamed) == list(whole)  # the same keys in the same order: the same metrics.json


def test_counts_of_rows_without_a_usable_gold_label_report_nothing():
    from sentiment_ray.labels import LabelSet
    from sentiment_ray.metrics import EvaluationCounts

    counts = EvaluationCounts(LabelSet(["Positive", "Negative"]))
    counts.add([None, "maybe"], ["Positive", None], confidence=[0.9, 0.5], langs=[None, "en"])
    assert counts.report() is None


def test_gold_labels_outside_the_label_set_are_counted_and_named_and_ece_is_given_per_language():
    from sentiment_ray.metrics import unknown_labels_line

    labels = LabelSet(["Positive", "Negative"])
    gold = ["Positive", "Negative", "Neutral", None, "Neutral", "positive"]
    predicted = ["Positive", "Positive", "Negative", "Negative", "Positive", "Positive"]
    report = evaluate_predictions(
        gold, predicted, labels, confidence=[0.9, 0.8, 0.7, 0.6, 0.9, 0.95], langs=["en", "fr", "en", "en", "fr", "en"]
    )
    assert report["n"] == 3
    assert report["rows_without_label"] == 3
    assert report["unknown_labels"] == {"Neutral": 2}
    line = unknown_labels_line(report)
    assert line.startswith("2 row(s) have a gold label outside the label set, not scored: 'Neutral' (2)")
    assert unknown_labels_line(evaluate_predictions(["Positive"], ["Positive"], labels)) is None
    assert report["per_language"]["en"]["ece"] == pytest.approx(((1 - 0.9) + (1 - 0.95)) / 2)
    assert report["per_language"]["fr"]["ece"] == pytest.approx(0.8)  # one wrong row at 0.8
