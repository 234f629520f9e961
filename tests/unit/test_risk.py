"""Labels with a guaranteed error rate (risk.py): on exchangeable rows, the threshold
certified on calibration rows keeps the error among accepted rows at most the target in at
least 1 - delta of repeated draws."""

from __future__ import annotations

import time

import numpy as np
import pytest

from sentiment_ray import risk


def draw(rng: np.random.Generator, n: int, overconfident: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Confidences c = 1 - u^3 / 2 (u uniform on [0, 1]: most rows near 1, as a fine-tuned
    model gives them); a row is wrong with probability 1 - c (calibrated) or 2(1 - c)
    (overconfident)."""
    conf = 1 - rng.uniform(size=n) ** 3 / 2
    wrong = rng.uniform(size=n) < (2 if overconfident else 1) * (1 - conf)
    return conf, ~wrong


def true_error(threshold: float, overconfident: bool = False) -> float:
    """The error rate among rows with confidence >= threshold in the population of `draw`."""
    return (1 - max(threshold, 0.5)) * (0.5 if overconfident else 0.25)


@pytest.mark.parametrize("overconfident", [False, True])
@pytest.mark.parametrize("max_error,delta", [(0.05, 0.1), (0.1, 0.05)])
def test_the_error_among_accepted_rows_is_within_the_target_in_1_minus_delta_of_draws(overconfident, max_error, delta):
    rng = np.random.default_rng(0)
    held, accepted_shares = 0, []
    for _ in range(200):
        found = risk.certify(*draw(rng, 3000, overconfident), max_error=max_error, delta=delta)
        held += found.threshold is None or true_error(found.threshold, overconfident) <= max_error
        accepted_shares.append(found.coverage)
    assert held >= (1 - delta) * 200
    assert np.mean(accepted_shares) > 0.3  # it does accept rows, not only refuse


def test_a_fresh_draw_of_rows_above_the_threshold_has_at_most_the_target_error():
    rng = np.random.default_rng(1)
    found = risk.certify(*draw(rng, 2000), max_error=0.05, delta=0.05)
    conf, correct = draw(rng, 200_000)
    assert (~correct[conf >= found.threshold]).mean() <= 0.05


def test_the_threshold_is_monotone_in_the_target():
    rng = np.random.default_rng(2)
    conf, correct = draw(rng, 3000)
    thresholds = [risk.certify(conf, correct, max_error=target).threshold for target in (0.01, 0.03, 0.05, 0.1, 0.2, 0.3)]
    as_numbers = [np.inf if t is None else t for t in thresholds]
    assert as_numbers == sorted(as_numbers, reverse=True)
    assert thresholds[-1] is not None
    assert thresholds[-1] < thresholds[2]


def test_no_threshold_when_the_target_cannot_be_certified():
    rng = np.random.default_rng(3)
    conf, correct = draw(rng, 300)
    found = risk.certify(conf, correct, max_error=0.001, delta=0.05)  # 300 rows cannot show 0.1%
    assert found.threshold is None
    assert found.accepted == 0
    assert found.coverage == 0.0
    assert risk.certify([], [], max_error=0.05).threshold is None
    # A model that is wrong half the time at every confidence: nothing reaches 5%.
    assert risk.certify(rng.uniform(0.5, 1, 5000), rng.uniform(size=5000) < 0.5, max_error=0.05).threshold is None


def test_the_binomial_tail_is_exact():
    from math import comb

    for n, k, p in [(10, 0, 0.1), (50, 3, 0.05), (200, 20, 0.1), (7, 7, 0.3)]:
        exact = sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))
        assert risk.binomial_cdf(k, n, p) == pytest.approx(exact, rel=1e-9)
    assert risk.min_rows(0.05, 0.05) == 59  # 0.95^59 <= 0.05 < 0.95^58


def test_a_row_in_an_uncalibrated_language_is_never_accepted():
    flags = risk.accepted_flags([0.99, 0.99, 0.99, 0.5, 0.99], ["en", "fr", None, "en", "zh"], 0.9, ["en", "zh"])
    assert flags == [True, False, False, False, True]
    assert risk.accepted_flags([0.99], ["en"], None, ["en"]) == [False]


def test_saved_scores_certify_the_same_threshold_and_it_is_fast():
    rng = np.random.default_rng(4)
    conf, correct = draw(rng, 100_000)
    record = risk.scores_record(conf, correct, temperature=1.0)
    assert record["confidence"] == sorted(record["confidence"], reverse=True)
    assert [p["coverage"] for p in record["curve"]][-1] == 1.0
    started = time.perf_counter()
    found = risk.certify_record(record, 0.05)
    assert time.perf_counter() - started < 1.0
    assert found == risk.certify(conf, correct, 0.05)
