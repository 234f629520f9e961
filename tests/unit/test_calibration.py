"""Temperature scaling (sentiment_ray/calibration.py), the per-language comparison and the
balanced sampling of training rows: what makes the probabilities honest and the user told."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from sentiment_ray.calibration import calibrate, fit_temperature, nll
from sentiment_ray.scoring import softmax
from sentiment_ray.train.data import balance_rows
from sentiment_ray.train.evaluation import language_changes, worse_languages_line


def overconfident(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Label logits of a classifier right 75% of the time that says ~99%."""
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 2, n)
    right = rng.random(n) < 0.75
    predicted = np.where(right, gold, 1 - gold)
    logits = np.zeros((n, 2))
    logits[np.arange(n), predicted] = 5.0 + rng.normal(0, 0.5, n)
    return logits, gold


def test_the_temperature_lowers_the_nll_of_an_overconfident_model_and_keeps_every_label():
    logits, gold = overconfident()
    t = fit_temperature(logits, gold)
    assert t > 2.0  # an overconfident model is cooled down
    assert nll(logits, gold, t) < nll(logits, gold) - 0.3
    assert (softmax(logits / t).argmax(axis=1) == softmax(logits).argmax(axis=1)).all()
    fit = calibrate(logits, gold)
    assert fit["temperature"] == pytest.approx(t, rel=1e-3)
    assert fit["rows"] == 2000
    assert fit["applied"]
    assert fit["ece_before"] > 0.2
    assert fit["ece_after"] < 0.03  # out-of-fold
    assert fit["nll_after"] < fit["nll_before"]
    assert sum(b["count"] for b in fit["bins_after"]) == 2000


def test_a_calibrated_model_keeps_a_temperature_near_one_and_noise_is_not_applied():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (4000, 2))
    gold = np.array([rng.random() < p for p in softmax(logits)[:, 1]], dtype=np.int64)  # drawn from its own probabilities
    assert fit_temperature(logits, gold) == pytest.approx(1.0, abs=0.1)
    small = calibrate(logits[:60], gold[:60])  # a few rows: a fitted temperature is noise
    if not small["applied"]:
        assert small["temperature"] == 1.0
        assert small["ece_after"] == small["ece_before"]
    else:
        assert small["nll_after"] < small["nll_before"]


def test_a_language_fine_tuning_made_worse_is_flagged_in_one_line_and_a_drop_within_noise_is_named_as_such():
    zero = {
        "per_language": {
            "de": {"n": 50, "macro_f1": 0.401},
            "en": {"n": 90, "macro_f1": 0.30},
            "fr": {"n": 40, "macro_f1": 0.5},
            "id": {"n": 7, "macro_f1": 0.364},
        }
    }
    tuned = {
        "per_language": {
            "de": {"n": 50, "macro_f1": 0.284},
            "en": {"n": 90, "macro_f1": 0.90},
            "fr": {"n": 40, "macro_f1": 0.498},
            "id": {"n": 7, "macro_f1": 0.300},
        }
    }
    sure = {"de": 0.991, "en": 0.0, "fr": 0.52, "id": 0.64}
    changes = {c["lang"]: c for c in language_changes(zero, tuned, sure)}
    assert {lang: c["verdict"] for lang, c in changes.items()} == {
        "de": "worse",
        "en": "not worse",
        "fr": "not worse",
        "id": "lower, within noise",
    }  # fr: 0.002 lower
    assert [lang for lang, c in changes.items() if c["worse"]] == ["de"]
    assert changes["de"]["change"] == pytest.approx(-0.117)
    assert worse_languages_line(list(changes.values())) == (
        "fine-tuning lowered the validation macro-F1 of 1 language(s): de 0.401 -> 0.284 (50 rows, lower in 99% of resamples); "
        "lower, but within what the validation rows can tell: id 0.364 -> 0.300 (7 rows, lower in 64% of resamples); "
        "hold out more rows of it (data.validation_fraction, data.max_validation_rows) to know"
    )
    assert worse_languages_line(language_changes(zero, zero)) is None
    assert language_changes(None, tuned) == []
    assert language_changes(zero, tuned)[0]["verdict"] == "worse"  # without the zero-shot predictions: by the change alone


@pytest.mark.parametrize("by", [("label",), ("label", "lang")])
def test_balanced_sampling_draws_each_group_equally_often(by):
    labels = ["Positive"] * 700 + ["Negative"] * 300
    langs = (["en"] * 600 + ["de"] * 100) + (["en"] * 250 + ["de"] * 50)
    table = pa.table({"sentence": [f"s{i}" for i in range(1000)], "label": labels, "lang": langs})
    balanced = balance_rows(table, by, seed=3)
    assert balanced.num_rows == 1000
    groups = {}
    for row in balanced.to_pylist():
        key = tuple(row[c] for c in by)
        groups[key] = groups.get(key, 0) + 1
    assert len(groups) == (2 if by == ("label",) else 4)
    assert max(groups.values()) - min(groups.values()) <= 1
    assert balance_rows(table, by, seed=3).equals(balanced)  # seeded
    assert set(balanced.column("sentence").to_pylist()) <= set(table.column("sentence").to_pylist())


def test_one_ece_the_fine_tuned_report_shows_the_models_own_and_the_out_of_fold_calibrated_one():
    from sentiment_ray.labels import LabelSet
    from sentiment_ray.scoring import ScoreResult
    from sentiment_ray.train.evaluation import calibrate_scores, evaluate_scores, predictions_table

    logits, gold = overconfident(400)
    labels = LabelSet(["Positive", "Negative"])
    table = pa.table({"sentence": ["s"] * 400, "label": [list(labels)[i] for i in gold]})
    scores = ScoreResult(softmax(logits), np.zeros(400, bool), 0, tuple(labels), logits=logits)
    own = evaluate_scores(table, scores, labels)
    fit, report, calibrated = calibrate_scores(table, scores, labels, own)
    assert report["ece"] == pytest.approx(fit["ece_before"]) == pytest.approx(own["ece"])
    assert report["ece_calibrated"] == fit["ece_after"] < report["ece"]
    assert calibrated.predicted() == scores.predicted()
    # The predictions file: p_ columns as the model gives them (what `eval` reads), the
    # calibrated ones beside them (what labelling with the adapter gives).
    written = predictions_table(table, scores, calibrated)
    assert np.allclose(written.column("p_Positive").to_numpy(), scores.probs[:, 0])
    assert np.allclose(written.column("calibrated_p_Positive").to_numpy(), calibrated.probs[:, 0])
