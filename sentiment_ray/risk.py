"""Labels with a guaranteed error rate: which confidence threshold to accept rows above.

Given held-out calibration rows (the confidence of each prediction, and whether it was
right), `certify` picks the lowest confidence threshold whose error rate among the rows it
accepts is at most `max_error`, with probability at least 1 - `delta` over the draw of the
calibration rows (rows exchangeable with the rows labelled later):

    found = certify(confidence, correct, max_error=0.05, delta=0.05)
    found.threshold        # None: no threshold can be certified on these rows (accept nothing)

The method is Learn then Test (Angelopoulos, Bates, Candès, Jordan and Lei, "Learn then Test:
Calibrating Predictive Algorithms to Achieve Risk Control", 2021) with fixed-sequence testing:

- The candidate thresholds are a fixed grid (`THRESHOLDS`, chosen before any data: fine near
  1, where a fine-tuned model puts most of its rows), tested from high to low.
- For one threshold t, the rows with confidence >= t are, given their number n, independent
  draws of rows the model is that confident on, so their errors k are Binomial(n, R(t)), R(t)
  the error rate among accepted rows. The null hypothesis "R(t) > max_error" gets the exact
  binomial p-value P(Binomial(n, max_error) <= k) (the tail that the Hoeffding-Bentkus
  p-value of the paper bounds from above; exact, so never weaker).
- Fixed-sequence testing rejects while p <= delta and stops at the first threshold that
  fails; the lowest rejected threshold is returned. Testing in an order fixed in advance
  keeps the chance of certifying any threshold whose error rate exceeds the target at most
  delta (family-wise), with no correction for the number of thresholds.
- A threshold accepting fewer than `min_rows(max_error, delta)` rows can never pass (even with
  no error), and one error among the first rows that can would end a single sequence. So three
  sequences run, each at delta / 3 (a union bound keeps the total at delta), starting at the
  first thresholds accepting 1, 4 and 16 times `min_rows(max_error, delta / 3)`; the lowest
  threshold any of them certifies is returned. Where they start depends on the confidences
  only, never on whether a row was right.

Conformal risk control (Angelopoulos et al., "Conformal Risk Control", 2022) was the other
candidate: it bounds an expected loss that is monotone in the threshold, but the error rate
among accepted rows is a ratio that is neither, and its guarantee holds in expectation only;
Learn then Test gives the high-probability statement a user acts on.

The calibration scores themselves are saved with the adapter (`RISK_FILE`: confidences after
the temperature, sorted, and whether each was right), so the label job certifies the user's
own `label.max_error` and `label.max_error_delta` at label time. The temperature is one number
fitted on the same rows; with two labels it never reorders rows by confidence.

Pure: numpy. `certify` on 100,000 rows takes milliseconds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sentiment_ray.io.storage import Storage

RISK_FILE = "risk_control.json"
DEFAULT_DELTA = 0.05
# Thresholds tested, high to low: every 0.01 below 0.99, then 1 - 10^-x for x from 2 to 6 in
# steps of 0.1 (a fine-tuned model gives many rows a confidence above 0.999).
THRESHOLDS = np.unique(np.concatenate([np.round(np.arange(0, 100) / 100, 2), 1 - np.logspace(-2, -6, 41)]))[::-1]
# Targets certified after training for metrics.json, the report and the export's metadata
# (the label job certifies the user's own label.max_error from the saved scores).
SHOWN_TARGETS = (0.01, 0.02, 0.05, 0.1)
# The risk-coverage curve shown in reports: these coverages (share of rows accepted).
# Fixed sequences start at the first thresholds accepting at least these multiples of the
# fewest rows that can pass (each sequence tests at delta / their number): one unlucky error
# among the few most confident rows does not end the search.
START_ROWS_TIMES = (1, 4, 16)
CURVE_COVERAGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


@dataclass(frozen=True)
class Certified:
    """What `certify` found: the threshold (None: nothing can be certified), and on the
    calibration rows the rows it accepts, their errors and the share accepted."""

    max_error: float
    delta: float
    threshold: float | None
    calibration_rows: int
    accepted: int
    errors: int
    coverage: float
    p_value: float | None

    @property
    def observed_error(self) -> float | None:
        return self.errors / self.accepted if self.accepted else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "observed_error": self.observed_error}


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (exact; numpy only)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    i = np.arange(1, k + 1, dtype=np.float64)
    log_choose = np.concatenate([[0.0], np.cumsum(np.log(n - i + 1) - np.log(i))])
    terms = log_choose + np.arange(k + 1) * math.log(p) + (n - np.arange(k + 1)) * math.log1p(-p)
    top = terms.max()
    return float(min(1.0, math.exp(top) * np.exp(terms - top).sum()))


def min_rows(max_error: float, delta: float) -> int:
    """The fewest accepted rows with which `max_error` can be certified at all (no error
    among them): the smallest n with (1 - max_error)^n <= delta."""
    if max_error <= 0:
        return math.inf  # type: ignore[return-value]
    if max_error >= 1:
        return 1
    return max(1, math.ceil(math.log(delta) / math.log1p(-max_error)))


def _as_arrays(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidence, dtype=np.float64).ravel()
    ok = np.asarray(correct, dtype=bool).ravel()
    if conf.shape != ok.shape:
        raise ValueError(f"{conf.size} confidences but {ok.size} correctness values")
    return conf, ok


def _accepted_and_errors(conf: np.ndarray, ok: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per threshold: rows with confidence >= it, and the wrong ones among them."""
    order = np.argsort(-conf, kind="stable")
    desc, wrong = conf[order], np.concatenate([[0], np.cumsum(~ok[order])])
    accepted = np.searchsorted(-desc, -np.asarray(thresholds), side="right")  # rows with conf >= t
    return accepted, wrong[accepted]


def certify(confidence, correct, max_error: float, delta: float = DEFAULT_DELTA) -> Certified:
    """The lowest threshold of THRESHOLDS whose error rate among accepted rows is certified
    at most `max_error` with probability 1 - `delta` (Learn then Test, fixed sequence; the
    module's docstring says why it holds). `confidence`: the probability of each calibration
    row's predicted label; `correct`: whether that label was right."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if not 0 <= max_error <= 1:
        raise ValueError(f"max_error must lie in [0, 1], got {max_error}")
    conf, ok = _as_arrays(confidence, correct)
    accepted, errors = _accepted_and_errors(conf, ok, THRESHOLDS)
    level = delta / len(START_ROWS_TIMES)
    enough = min_rows(max_error, level)
    chosen, p_chosen = None, None
    for times in START_ROWS_TIMES:
        starts = np.flatnonzero(accepted >= enough * times)
        if not starts.size:
            break
        for j in range(int(starts[0]), len(THRESHOLDS)):
            p = binomial_cdf(int(errors[j]), int(accepted[j]), max_error)
            if p > level:
                break
            if chosen is None or j > chosen:
                chosen, p_chosen = j, p
    if chosen is None:
        return Certified(max_error, delta, None, int(conf.size), 0, 0, 0.0, None)
    n, k = int(accepted[chosen]), int(errors[chosen])
    return Certified(max_error, delta, float(THRESHOLDS[chosen]), int(conf.size), n, k, n / conf.size, p_chosen)


def risk_coverage_curve(confidence, correct, coverages=CURVE_COVERAGES) -> list[dict[str, float]]:
    """The error rate among the most confident rows at each share of rows accepted
    (`coverages`): the selective classifier's trade-off, as observed on these rows."""
    conf, ok = _as_arrays(confidence, correct)
    if conf.size == 0:
        return []
    order = np.argsort(-conf, kind="stable")
    wrong = np.cumsum(~ok[order])
    points = []
    for share in coverages:
        n = max(1, int(round(share * conf.size)))
        points.append(
            {
                "coverage": round(n / conf.size, 4),
                "error": round(float(wrong[n - 1]) / n, 4),
                "threshold": float(conf[order][n - 1]),
                "rows": n,
            }
        )
    return points


def scores_record(confidence, correct, *, temperature: float) -> dict[str, Any]:
    """What the adapter keeps (RISK_FILE): the calibration rows' confidences after the
    temperature, most confident first, whether each was right, and the observed
    risk-coverage curve."""
    conf, ok = _as_arrays(confidence, correct)
    order = np.argsort(-conf, kind="stable")
    return {
        "confidence": conf[order].tolist(),
        "correct": ok[order].astype(int).tolist(),
        "rows": int(conf.size),
        "temperature": temperature,
        "curve": risk_coverage_curve(conf, ok),
        "method": "Learn then Test, fixed-sequence over a fixed threshold grid, exact binomial p-values",
    }


def summary(record: dict[str, Any], delta: float = DEFAULT_DELTA, targets=SHOWN_TARGETS) -> dict[str, Any]:
    """metrics.json's and the export's view of saved scores: delta, the certified threshold
    and calibration coverage for a few targets, and the observed risk-coverage curve."""
    return {
        "delta": delta,
        "rows": record["rows"],
        "certified": [certify_record(record, t, delta).to_dict() for t in targets],
        "curve": record["curve"],
        "method": record["method"],
    }


def read_scores(adapter_dir: str | None) -> dict[str, Any] | None:
    """An adapter's saved calibration scores (RISK_FILE), or None."""
    if not adapter_dir:
        return None
    return Storage(adapter_dir).read_json_or_none(RISK_FILE)


def certify_record(record: dict[str, Any], max_error: float, delta: float = DEFAULT_DELTA) -> Certified:
    """`certify` on an adapter's saved scores (`scores_record`)."""
    return certify(record["confidence"], record["correct"], max_error, delta)


def accepted_flags(confidence, langs, threshold: float | None, calibrated_languages) -> list[bool]:
    """Per row: accepted (confidence at or above `threshold`, and a language the adapter was
    calibrated on). No threshold: nothing is accepted. A row without a language, or in a
    language outside `calibrated_languages`, is never accepted: its confidence is not
    calibrated."""
    if threshold is None:
        return [False] * len(confidence)
    known = set(calibrated_languages)
    return [
        c is not None and c >= threshold and lang is not None and lang in known for c, lang in zip(confidence, langs, strict=True)
    ]
