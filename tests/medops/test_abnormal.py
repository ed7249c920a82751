"""The declared abnormal set of a multi-class task: by names or an ordinal cut-off, P(abnormal), its decision."""

from __future__ import annotations

import numpy as np
import pytest

from medops.abnormal import (
    abnormal_indices,
    abnormal_operating_point,
    binary_labels,
    binary_view,
    decision_figures,
)

GRADES = ["none", "mild", "moderate", "severe", "proliferative"]


def test_set_by_names_or_by_ordinal_cutoff() -> None:
    assert abnormal_indices(GRADES, ["severe", "mild"]) == [1, 3]
    assert abnormal_indices(GRADES, ordinal_cutoff="moderate") == [2, 3, 4]
    assert abnormal_indices(GRADES, ordinal_cutoff=2) == [2, 3, 4]
    assert abnormal_indices(GRADES) is None  # not declared
    assert abnormal_indices(["benign", "malignant"], ["malignant"]) is None  # binary: the positive class does it
    for bad, match in (({"abnormal_classes": ["grade9"]}, "unknown class"),
                       ({"ordinal_cutoff": "none"}, "at least one normal class"),
                       ({"abnormal_classes": ["mild"], "ordinal_cutoff": "mild"}, "not both")):
        with pytest.raises(ValueError, match=match):
            abnormal_indices(GRADES, **bad)


def test_binary_view_sums_the_abnormal_probabilities() -> None:
    P = np.array([[0.7, 0.1, 0.1, 0.05, 0.05], [0.1, 0.1, 0.2, 0.3, 0.3]])
    view = binary_view(P, [2, 3, 4])
    np.testing.assert_allclose(view, [[0.8, 0.2], [0.2, 0.8]])
    np.testing.assert_array_equal(binary_labels([0, 1, 2, 4], [2, 3, 4]), [0, 0, 1, 1])


def test_decision_figures_count_abnormal_calls() -> None:
    called = np.array([1, 1, 0, 0, 1], bool)
    truth = np.array([1, 0, 1, 0, 1], bool)
    f = decision_figures(called, truth)
    assert f == {"acc": 3 / 5, "sensitivity": 2 / 3, "specificity": 1 / 2, "ppv": 2 / 3, "npv": 1 / 2}
    assert decision_figures(np.zeros(3, bool), np.zeros(3, bool))["ppv"] is None  # no abnormal call: undefined


def test_operating_point_is_chosen_on_validation_and_reported_on_test() -> None:
    rng = np.random.default_rng(0)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 5, n)
        logits = rng.normal(size=(n, 5)) + 2.5 * np.eye(5)[y]
        return np.exp(logits) / np.exp(logits).sum(1, keepdims=True), y

    (Pv, yv), (Pt, yt) = split(400), split(400)
    op = abnormal_operating_point(Pv, yv, Pt, yt, GRADES, [2, 3, 4])
    assert op["classes"] == ["moderate", "severe", "proliferative"] and op["normal_classes"] == ["none", "mild"]
    assert 0 < op["value"] < 1 and op["test"]["auroc"] > 0.85
    expected = decision_figures(binary_view(Pt, [2, 3, 4])[:, 1] >= op["value"], binary_labels(yt, [2, 3, 4]))
    assert {k: op["test"][k] for k in expected} == expected
