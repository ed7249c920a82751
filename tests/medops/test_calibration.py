"""medops.calibration: expected calibration error and temperature scaling."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_ece_consistency_separates_sampling_noise_from_miscalibration() -> None:
    from medops.calibration import ece_consistency

    rng = np.random.default_rng(3)
    p = rng.uniform(0.05, 0.95, 150)
    P = np.stack([1 - p, p], axis=1)
    calibrated = (rng.random(150) < p).astype(int)  # labels drawn from the probabilities themselves
    fair = ece_consistency(P, calibrated, n_draws=400)
    assert fair["null_median"] > 0.02  # 150 images: even a perfect model shows several points of ECE
    assert fair["p_value"] > 0.05
    overconfident = np.stack([1 - p.round(), p.round()], axis=1).clip(0.001, 0.999)  # said 0/1, true rate p
    bad = ece_consistency(overconfident, calibrated, n_draws=400)
    assert bad["p_value"] < 0.01 and bad["ece"] > bad["null_p95"]


def test_positive_class_bins_by_hand_and_on_calibrated_draws():
    from medops.calibration import positive_class_bins

    p = np.array([0.05, 0.05, 0.05, 0.05, 0.92, 0.98])
    b = positive_class_bins(p, np.array([1, 0, 0, 0, 1, 0]), n_bins=10)
    assert b["count"][0] == 4 and b["count"][9] == 2 and b["count"].sum() == 6
    assert b["observed"][0] == 0.25 and b["predicted"][0] == 0.05
    assert b["observed"][9] == 0.5 and b["predicted"][9] == 0.95
    assert b["error"] == pytest.approx(4 / 6 * 0.20 + 2 / 6 * 0.45)
    rng = np.random.default_rng(3)
    risk = rng.beta(0.6, 1.4, 40000)  # skewed towards low risk, as a screening population is
    assert positive_class_bins(risk, rng.random(40000) < risk)["error"] < 0.02
    assert positive_class_bins(risk ** 0.3, rng.random(40000) < risk)["error"] > 0.2  # overstated risk


def test_a_temperature_is_not_trusted_from_a_handful_of_images():
    from medops.calibration import label_columns, trusted_temperature

    rng = np.random.default_rng(4)
    P = random_probs(400, 2, rng)
    y = sample_labels(P, rng)
    over = apply_temperature(P, 0.5)  # over-confident: a temperature near 2 undoes it
    T, reason = trusted_temperature(over, y)
    assert reason is None and 1.5 < T < 2.6
    T, reason = trusted_temperature(over[:29], y[:29])
    assert T is None and reason.startswith("not calibrated: 29 validation images are too few")
    assert trusted_temperature(over[:30], y[:30])[0] > 0
    labels = np.tile(y[:10, None], (1, 10))  # 10 images x 10 labels: 100 pairs, still 10 images
    T, reason = trusted_temperature(*label_columns(over[:10, 1:].repeat(10, 1), labels), n_images=10)
    assert T is None and reason.startswith("not calibrated: 10 validation images")


def test_a_temperature_that_raises_the_validation_ece_is_not_applied():
    """A weak model's probabilities sit near 0.5; the NLL-optimal temperature sharpens them a lot (T ~ 0.06) and
    the validation ECE rises: such a temperature is refused, a sound one on the same data kind is kept."""
    from medops.calibration import trusted_temperature

    rng = np.random.default_rng(0)
    refused = kept = 0
    for _ in range(40):
        y = rng.integers(0, 2, 40)
        p = 1 / (1 + np.exp(-0.05 * (rng.normal(0, 1, 40) + (y * 2 - 1) * 0.8)))
        P = np.c_[1 - p, p]
        T, reason = trusted_temperature(P, y)
        fitted = fit_temperature(P, y)
        rise = expected_calibration_error(apply_temperature(P, fitted), y) - expected_calibration_error(P, y)
        if rise > 0.05:
            refused += 1
            assert T is None and reason.startswith(f"not calibrated: the fitted temperature {fitted:.3g} raises")
        else:
            kept += 1
            assert T == fitted and reason is None
    assert refused >= 1 and kept >= 1
