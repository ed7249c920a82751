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


def positive_class_bins(p: Any, is_positive: Any, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Equal-width bins of the predicted probability of the positive class ``p``: count, mean predicted
    probability and the observed share of positives per bin (the calibration plot of clinical prediction models);
    ``error`` is their count-weighted mean gap, the ECE of ``p`` itself rather than of the top label."""
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    positive = np.asarray(is_positive, dtype=np.float64).reshape(-1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = np.bincount(idx, weights=p, minlength=n_bins) / count
        observed = np.bincount(idx, weights=positive, minlength=n_bins) / count
    filled = count > 0
    error = float(np.sum(np.abs(observed - predicted)[filled] * count[filled]) / count.sum()) if len(p) else np.nan
    return {"edges": edges, "count": count, "predicted": predicted, "observed": observed, "error": error}


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




MIN_CALIBRATION_IMAGES = 30
MAX_ECE_RISE = 0.05  # a temperature that raises the validation ECE by more is not applied


def trusted_temperature(P_val: Any, y_val: Any, logits: Any = None,
                        n_images: int | None = None) -> tuple[float | None, str | None]:
    """:func:`fit_temperature`, or ``(None, reason)`` when there are fewer than ``MIN_CALIBRATION_IMAGES``
    validation images (``n_images``; by default one per row of ``y_val``, which for a multi-label task's
    :func:`label_columns` are (image, label) pairs, so pass the image count): one parameter fitted to a handful
    chases them (T = 0.07 fitted on 9 images took a test ECE from 0.01 to 0.46), and the probabilities are better
    left as they are; or when the fitted temperature raises the validation ECE by more than ``MAX_ECE_RISE`` (the
    NLL it minimises can fall a little while the binned error rises a lot: T = 0.22 on 40 images took it from 0.003
    to 0.30). Our own rules: no library has them."""
    n = len(np.asarray(y_val).reshape(-1)) if n_images is None else int(n_images)
    if n < MIN_CALIBRATION_IMAGES:
        return None, f"not calibrated: {n} validation images are too few to fit a temperature on (at least " \
                     f"{MIN_CALIBRATION_IMAGES})"
    temperature = fit_temperature(P_val, y_val, logits)
    before = expected_calibration_error(P_val, y_val)
    after = expected_calibration_error(apply_temperature(P_val, temperature), y_val)
    if after > before + MAX_ECE_RISE:  # NLL fell a little while the binned error rose a lot: not a calibration
        return None, f"not calibrated: the fitted temperature {temperature:.3g} raises the validation ECE from " \
                     f"{before:.3f} to {after:.3f}"
    return temperature, None


def ece_consistency(P: Any, y: Any, n_bins: int = 15, n_draws: int = 1000, seed: int = 0) -> dict[str, float]:
    """How large the ECE of ``P`` would be if ``P`` were perfectly calibrated (consistency resampling, Bröcker &
    Smith, Weather and Forecasting 2007): labels are drawn from ``P`` itself ``n_draws`` times and the ECE of each
    draw computed. With a few hundred images a perfectly calibrated model still shows an ECE of several points;
    ``p_value`` is the share of draws whose ECE reaches the observed one (small: miscalibrated beyond sampling
    noise), ``null_median``/``null_p95`` the ECE such a model shows typically / at most in 95 % of test sets."""
    P = np.asarray(P, dtype=np.float64)
    observed = expected_calibration_error(P, y, n_bins)
    n_draws = n_draws if len(P) <= 20000 else min(n_draws, 100)  # each draw is O(n)
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(P / P.sum(axis=1, keepdims=True), axis=1)
    null = np.empty(n_draws)
    for i in range(n_draws):
        draws = (rng.random((len(P), 1)) > cumulative).sum(axis=1).clip(0, P.shape[1] - 1)
        null[i] = expected_calibration_error(P, draws, n_bins)
    return {"ece": observed, "null_median": float(np.median(null)), "null_p95": float(np.quantile(null, 0.95)),
            "p_value": float((np.sum(null >= observed) + 1) / (n_draws + 1)), "n": int(len(P)), "n_draws": n_draws}


def label_columns(P: Any, Y: Any) -> tuple[np.ndarray, np.ndarray]:
    """A multi-label task (``P`` [N, K] one sigmoid probability per label, ``Y`` [N, K] of 0/1) as N*K binary
    predictions ``[1 - p, p]`` with 0/1 labels, so that every function here applies to it unchanged: ECE and NLL
    over all (image, label) pairs, and :func:`fit_temperature` fits one temperature shared by all labels'
    sigmoid logits (``softmax(log [1 - p, p] / T)[1] == sigmoid(logit(p) / T)``)."""
    p = np.asarray(P, dtype=np.float64).reshape(-1)
    return np.c_[1.0 - p, p], np.asarray(Y).astype(np.int64).reshape(-1)


def sigmoid_temperature(P: Any, T: float) -> np.ndarray:
    """``sigmoid(logit(P) / T)`` element-wise: a multi-label task's probabilities [N, K] at temperature ``T``."""
    P = np.asarray(P, dtype=np.float64)
    return apply_temperature(np.c_[1.0 - P.reshape(-1), P.reshape(-1)], T)[:, 1].reshape(P.shape)
