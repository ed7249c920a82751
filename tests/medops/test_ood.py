"""The out-of-distribution score: Mahalanobis distance to the nearest class, threshold set on validation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis
from sklearn.covariance import LedoitWolf

from medops.ood import fit_gaussians, fit_profile, mahalanobis_scores, threshold_at


def two_classes(n: int, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    mix = np.random.default_rng(99).normal(size=(d, d))  # one distribution; seed: which sample of it
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    emb = rng.normal(size=(n, d)) @ mix + np.where(labels[:, None] == 1, 3.0, -3.0)
    return emb, labels


def test_scores_are_the_mahalanobis_distance_to_the_nearest_class_mean() -> None:
    emb, labels = two_classes(400)
    means, factor = fit_gaussians(emb, labels)
    centred = emb - means[labels]
    precision = LedoitWolf(assume_centered=True).fit(centred).precision_
    queries = emb[:5] + 0.5
    expected = [min(mahalanobis(q, means[k], precision) for k in (0, 1)) for q in queries]
    np.testing.assert_allclose(mahalanobis_scores(queries, means, factor), expected, rtol=1e-6)


def test_fit_is_well_conditioned_with_fewer_images_than_dimensions() -> None:
    emb, labels = two_classes(40, d=64)
    means, factor = fit_gaussians(emb, labels)
    scores = mahalanobis_scores(emb, means, factor)
    assert means.shape == (2, 64) and np.isfinite(scores).all()


def test_threshold_passes_the_requested_share_of_validation_images() -> None:
    scores = np.arange(1, 201, dtype=float)
    t = threshold_at(scores, 0.975)
    assert 0.975 <= np.mean(scores <= t) <= 0.985  # at least the pass rate, not more than one score above it
    with pytest.raises(ValueError, match="pass_rate"):
        threshold_at(scores, 1.5)


def test_profile_flags_far_images_and_passes_held_out_ones() -> None:
    train, train_y = two_classes(600, seed=1)
    val, _ = two_classes(200, seed=2)
    test, _ = two_classes(1000, seed=3)
    profile, summary = fit_profile(train, train_y, val, pass_rate=0.975)
    assert 1 - summary["val_flagged"] >= 0.975
    assert np.mean(~profile.flags(test)) > 0.95  # same distribution: about the pass rate
    far = test[:50] * 3 + 10  # shifted and scaled: another distribution
    assert profile.flags(far).all()
    assert summary["method"] == "mahalanobis" and summary["fitted_on"] == 600 and summary["dimensions"] == 8
