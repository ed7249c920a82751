"""medops.calibration: expected calibration error and temperature scaling."""

from __future__ import annotations

import numpy as np

from medops.calibration import apply_temperature, expected_calibration_error, fit_temperature, nll


def sample_labels(P: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (rng.random(len(P))[:, None] > np.cumsum(P, axis=1)).sum(axis=1)


def random_probs(n: int, k: int, rng: np.random.Generator, scale: float = 1.5) -> np.ndarray:
    z = rng.normal(0, scale, (n, k))
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_ece_near_zero_for_calibrated_and_large_for_overconfident():
    rng = np.random.default_rng(0)
    P = random_probs(40000, 3, rng)
    y = sample_labels(P, rng)  # labels drawn from the probabilities: calibrated by construction
    assert expected_calibration_error(P, y) < 0.02
    sharp = apply_temperature(P, 0.3)  # same labels, far more confident
    assert expected_calibration_error(sharp, y) > 0.15


def test_temperature_scaling_fixes_overconfidence():
    rng = np.random.default_rng(1)
    P = random_probs(5000, 2, rng)
    y = sample_labels(P, rng)
    over = apply_temperature(P, 0.4)
    T = fit_temperature(over, y)
    assert T > 1
    assert abs(T - 1 / 0.4) < 0.4  # recovers the sharpening it has to undo
    assert nll(apply_temperature(over, T), y) < nll(over, y)
    assert expected_calibration_error(apply_temperature(over, T), y) < expected_calibration_error(over, y)
