"""Temperature scaling: probabilities a user can act on.

A fine-tuned classifier is usually over- or under-confident. One temperature T, fitted on
the validation split's label logits by minimising the negative log-likelihood, turns
softmax(logits) into softmax(logits / T): the argmax (the label) never changes, only how sure
the model says it is.

    fit = calibrate(logits, gold_index)       # {"temperature", "ece_before", "ece_after", ...}
    probs = softmax(logits / fit["temperature"])

The ECE and NLL reported "after" are out-of-fold: the rows are split in two halves, each half
is scaled with the temperature fitted on the other, so the figures are not measured on the
rows the temperature was fitted to. The temperature kept is fitted on all rows, and kept only
when it lowers the out-of-fold NLL (on a few hundred rows of a model that is calibrated
already, a fitted temperature can be noise; then it stays 1). It is written with the adapter
(`calibration.json`) and applied wherever the adapter scores: labelling, and the export's
metadata.

Pure at import time: numpy; torch (its LBFGS optimiser) inside `fit_temperature`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sentiment_ray.io.storage import Storage
from sentiment_ray.metrics import expected_calibration_error
from sentiment_ray.scoring import softmax

CALIBRATION_FILE = "calibration.json"
SPLIT_SEED = 0


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, gold: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the gold labels under softmax(logits / T)."""
    logp = _log_softmax(np.asarray(logits, dtype=np.float64) / temperature)
    return float(-logp[np.arange(len(gold)), gold].mean())


def fit_temperature(logits: np.ndarray, gold: np.ndarray) -> float:
    """The T > 0 minimising the NLL of `gold` (label indices) under softmax(logits / T),
    by L-BFGS on log T (so T stays positive)."""
    import torch

    z = torch.tensor(np.asarray(logits, dtype=np.float64))
    y = torch.tensor(np.asarray(gold, dtype=np.int64))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimiser.step(closure)
    temperature = float(log_t.detach().exp())
    if not np.isfinite(temperature) or temperature <= 0:
        return 1.0
    return temperature


def _ece(probs: np.ndarray, gold: np.ndarray) -> dict[str, Any]:
    predicted = probs.argmax(axis=1)
    return expected_calibration_error(probs.max(axis=1).tolist(), (predicted == gold).tolist())


def calibrate(logits: np.ndarray, gold: np.ndarray) -> dict[str, Any]:
    """The temperature for these label logits and gold label indices, with ECE and NLL
    before and (out-of-fold) after, and the reliability bins of both."""
    logits = np.asarray(logits, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.int64)
    n = len(gold)
    temperature = fit_temperature(logits, gold) if n else 1.0
    # Out-of-fold: each half scaled by the temperature fitted on the other half.
    after = softmax(logits / temperature, np.float64)
    if n >= 4:
        order = np.random.default_rng(SPLIT_SEED).permutation(n)
        halves = (order[: n // 2], order[n // 2 :])
        for fit_on, apply_to in (halves, halves[::-1]):
            after[apply_to] = softmax(logits[apply_to] / fit_temperature(logits[fit_on], gold[fit_on]), np.float64)
    before = softmax(logits, np.float64)
    nll_before = nll(logits, gold) if n else None
    nll_after = float(-np.log(np.clip(after[np.arange(n), gold], 1e-12, 1)).mean()) if n else None
    applied = bool(n) and nll_after < nll_before
    if not applied:  # no out-of-fold gain: leave the probabilities as the model gives them
        temperature, after, nll_after = 1.0, before, nll_before
    before_ece, after_ece = _ece(before, gold), _ece(after, gold)
    return {
        "temperature": round(temperature, 6),
        "applied": applied,
        "rows": int(n),
        "ece_before": before_ece["ece"],
        "ece_after": after_ece["ece"],
        "nll_before": nll_before,
        "nll_after": nll_after,
        "bins_before": before_ece["bins"],
        "bins_after": after_ece["bins"],
        "ece_after_is": "out-of-fold (2 halves, each scaled by the temperature fitted on the other)",
    }


def adapter_temperature(adapter_dir: str | None) -> float:
    """The temperature fitted for an adapter (its calibration.json), else 1 (no change)."""
    if not adapter_dir:
        return 1.0
    fit = Storage(adapter_dir).read_json_or_none(CALIBRATION_FILE)
    return float(fit["temperature"]) if fit and fit.get("temperature") else 1.0
