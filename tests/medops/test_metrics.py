"""medops.metrics: bootstrap intervals, the operating point and subgroup figures (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from medops.metrics import (
    auroc,
    average_precision,
    bootstrap_ci,
    choose_threshold,
    confusion_matrix,
    evaluate_predictions,
    metric_functions,
    roc_curve,
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


def brute_force_roc(scores: np.ndarray, is_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The definition (and the former, quadratic implementation): every threshold against every score."""
    thresholds = np.r_[np.inf, np.unique(scores)[::-1]]
    pred = scores[None, :] >= thresholds[:, None]
    tpr = (pred & is_pos).sum(1) / max(int(is_pos.sum()), 1)
    fpr = (pred & ~is_pos).sum(1) / max(int((~is_pos).sum()), 1)
    return fpr, tpr, thresholds


@pytest.mark.parametrize("kind", ["continuous", "ties", "integers", "float32", "non-finite", "one class"])
def test_roc_curve_equals_the_definition_ties_included(kind: str) -> None:
    rng = np.random.default_rng(len(kind))
    for n in (1, 2, 7, 150):
        s = rng.random(n)
        s = {"ties": np.round(s, 1), "integers": rng.integers(0, 4, n), "float32": np.round(s, 2).astype(np.float32),
             "non-finite": np.where(rng.random(n) < 0.3, rng.choice([np.nan, np.inf, -np.inf], n), np.round(s, 1))
             }.get(kind, s)
        is_pos = np.ones(n, bool) if kind == "one class" else rng.random(n) < 0.4
        for ours, expected in zip(roc_curve(s, is_pos), brute_force_roc(s, is_pos), strict=True):
            assert ours.dtype == expected.dtype and np.array_equal(ours, expected, equal_nan=True), (kind, n)


def test_curves_and_areas_equal_scikit_learn_with_ties() -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score
    from sklearn.metrics import roc_curve as sk_roc_curve

    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 3000)
    s = np.round(np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1), 2)  # about 100 distinct scores: heavy ties
    fpr, tpr, thresholds = roc_curve(s, y == 1)
    sk_fpr, sk_tpr, sk_thresholds = sk_roc_curve(y, s, drop_intermediate=False)
    assert np.array_equal(thresholds, sk_thresholds)
    assert np.allclose(fpr, sk_fpr, atol=1e-15) and np.allclose(tpr, sk_tpr, atol=1e-15)
    P = np.c_[1 - s, s]
    assert auroc(P, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(P, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    t = choose_threshold(P, y, "youden")
    j = (P[:, 1][:, None] >= thresholds[None, 1:]).T  # every finite threshold, by brute force
    youden = j[:, y == 1].mean(1) - j[:, y == 0].mean(1)
    assert t == thresholds[1 + int(np.argmax(youden))]


def test_roc_curve_and_operating_point_run_in_linear_memory() -> None:
    """20,000 predictions with 20,000 distinct scores: the former threshold x prediction matrices took ~760 MB."""
    import tracemalloc

    P, y = binary_scores(20_000, seed=3)
    tracemalloc.start()
    try:
        roc_curve(P[:, 1], y == 1)
        choose_threshold(P, y, "sensitivity", target=0.9)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_confusion_matrix_counts_and_refuses_labels_out_of_range() -> None:
    cm = confusion_matrix(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]] and cm.dtype == np.int64
    assert confusion_matrix(np.array([], np.int64), np.array([], np.int64), 2).tolist() == [[0, 0], [0, 0]]
    with pytest.raises(IndexError):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(IndexError):
        confusion_matrix(np.array([0, -1]), np.array([0, 1]), 3)
