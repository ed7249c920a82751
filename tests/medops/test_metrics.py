"""medops.metrics: bootstrap intervals, the operating point and subgroup figures (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from medops.metrics import (
    auroc,
    bootstrap_ci,
    choose_threshold,
    evaluate_predictions,
    metric_functions,
    subgroup_metrics,
)


def binary_scores(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + 1.5 * (2 * y - 1))))
    return np.c_[1 - s, s], y


def test_bootstrap_interval_contains_estimate_and_narrows_with_more_data():
    widths = []
    for n in (80, 2000):
        P, y = binary_scores(n, seed=n)
        value = auroc(P, y)
        low, high = bootstrap_ci(P, y, auroc, n_resamples=400, seed=0)
        assert low <= value <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2
    fn = metric_functions(2, threshold=0.5)["sensitivity"]
    P, y = binary_scores(300)
    low, high = bootstrap_ci(P, y, fn, n_resamples=300)
    assert low <= fn(P, y) <= high


def test_too_few_positives_gives_a_note_instead_of_an_interval():
    P, y = binary_scores(200)
    y = np.zeros_like(y)
    y[:3] = 1
    assert bootstrap_ci(P, y, auroc, n_resamples=100) is None
    ci, reason = bootstrap_ci(P, y, auroc, n_resamples=100, return_reason=True)
    assert ci is None and "too few positives" in reason
    result = evaluate_predictions(P, y, ["neg", "pos"], threshold=0.5, n_resamples=100)
    for entry in result["metrics"].values():
        assert entry["ci_low"] is None and entry["ci_high"] is None
        assert "too few positives" in entry["note"]
    assert result["metrics"]["auroc"]["value"] is not None  # the point estimate is still reported


def test_choose_threshold_methods():
    P, y = binary_scores(500)
    t = choose_threshold(P, y, "sensitivity", target=0.95)
    pred = P[:, 1] >= t
    assert pred[y == 1].mean() >= 0.95
    assert (P[:, 1] >= np.nextafter(t, 1))[y == 1].mean() < 0.95  # the highest such threshold
    ty = choose_threshold(P, y, "youden")
    j = lambda t: (P[:, 1] >= t)[y == 1].mean() - (P[:, 1] >= t)[y == 0].mean()  # noqa: E731
    assert j(ty) >= max(j(v) for v in np.unique(P[:, 1])) - 1e-12
    with pytest.raises(ValueError):
        choose_threshold(P, y, "nonsense")


def test_subgroups_empty_and_single_class_are_notes():
    P, y = binary_scores(120)
    site = np.array(["A"] * 60 + ["B"] * 40 + [""] * 20, dtype=object)
    y[60:100] = 1  # site B has positives only
    result = subgroup_metrics(P, y, {"site": list(site)}, ["neg", "pos"], threshold=0.5, n_resamples=100,
                              known_values={"site": ["A", "B", "C", ""]})
    groups = result["site"]
    assert set(groups) == {"A", "B", "C", "(blank)"}
    assert groups["C"]["n"] == 0 and "empty" in groups["C"]["note"]
    assert "single class" in groups["B"]["note"] and groups["B"]["metrics"]["auroc"]["value"] is None
    assert groups["B"]["metrics"]["sensitivity"]["value"] is not None
    assert "blank" in groups["(blank)"]["note"] and groups["(blank)"]["n"] == 20
    overall = evaluate_predictions(P, y, ["neg", "pos"], threshold=0.5, n_resamples=0)
    a = groups["A"]["metrics"]["accuracy"]
    assert a["gap"] == pytest.approx(a["value"] - overall["metrics"]["accuracy"]["value"])
