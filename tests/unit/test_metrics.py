"""Metrics against hand-computed values."""

import pytest

from sentiment_ray.metrics import classification_report, confusion_matrix, expected_calibration_error

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
    assert r["accuracy"] == 0.5 and r["unparsed"] == 1


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
