"""Calibration: expected calibration error, reliability bins and temperature scaling (numpy; scipy for the fit).

Training fits the temperature on the validation split at the end of every run; evaluation reports calibration
before and after; export puts the temperature into the graph. The reliability diagram is in :mod:`medops.plots`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-12


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def to_logits(P: Any) -> np.ndarray:
    """log P: logits up to a per-row constant (softmax of them gives P back)."""
    return np.log(np.clip(np.asarray(P, dtype=np.float64), EPS, 1.0))


def reliability_bins(P: Any, y: Any, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Equal-width bins of max-probability confidence: count, mean confidence and accuracy per bin."""
    P = np.asarray(P, dtype=np.float64)
    y = np.asarray(y).reshape(-1)
    conf = P.max(axis=1)
    correct = (P.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)  # (lo, hi], first bin from 0
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(idx, weights=correct, minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": accuracy}


def expected_calibration_error(P: Any, y: Any, n_bins: int = 15) -> float:
    """Sum over bins of |accuracy - confidence| weighted by the bin's share of samples."""
    b = reliability_bins(P, y, n_bins)
    n = b["count"].sum()
    if n == 0:
        return float("nan")
    filled = b["count"] > 0
    gaps = np.abs(b["accuracy"][filled] - b["confidence"][filled])
    return float(np.sum(gaps * b["count"][filled]) / n)


def nll(P: Any, y: Any) -> float:
    """Mean negative log-likelihood of the true labels."""
    P = np.asarray(P, dtype=np.float64)
    y = np.asarray(y).reshape(-1).astype(np.int64)
    return float(-np.mean(np.log(np.clip(P[np.arange(len(y)), y], EPS, 1.0))))


def apply_temperature(P: Any, T: float) -> np.ndarray:
    """softmax(log P / T): T > 1 softens over-confident probabilities, T < 1 sharpens them."""
    if T <= 0:
        raise ValueError(f"temperature must be positive, got {T}")
    return _softmax(to_logits(P) / float(T))


def fit_temperature(P_val: Any, y_val: Any, logits: Any = None) -> float:
    """The temperature minimising validation NLL (bounded 1-D search over log T in [-3, 3])."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y_val).reshape(-1).astype(np.int64)
    z = np.asarray(logits, dtype=np.float64) if logits is not None else to_logits(P_val)
    rows = np.arange(len(y))

    def objective(log_t: float) -> float:
        s = z / np.exp(log_t)
        s = s - s.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(s).sum(axis=1)) - s[rows, y]))

    res = minimize_scalar(objective, bounds=(-3.0, 3.0), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x))


