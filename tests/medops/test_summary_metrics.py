"""medops.metrics.summary_metrics: the run record's figures, equal to torchmetrics' (which logs them per epoch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from medops.metrics import summary_metrics


def _torchmetrics(P: np.ndarray, y: np.ndarray) -> dict[str, float]:
    k = P.shape[1]
    p, t = torch.from_numpy(P).float(), torch.from_numpy(y)
    metrics = {"acc": MulticlassAccuracy(k, average="micro"), "auroc": MulticlassAUROC(k, average="macro"),
               "precision": MulticlassPrecision(k, average="macro"), "recall": MulticlassRecall(k, average="macro"),
               "f1": MulticlassF1Score(k, average="macro")}
    return {name: float(m(p, t)) for name, m in metrics.items()}


@pytest.mark.parametrize(("k", "n", "seed"), [(2, 200, 0), (2, 31, 1), (4, 150, 2), (5, 60, 3)])
def test_summary_metrics_equal_torchmetrics(k: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y] * rng.random((n, 1))
    P = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ours, theirs = summary_metrics(P, y), _torchmetrics(P, y)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-6), name


def test_a_class_never_seen_nor_predicted_is_left_out_of_the_macro_average() -> None:
    y = np.array([0, 0, 1, 1, 1, 0])
    P = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1],
                  [0.3, 0.6, 0.1]])  # class 2 is neither a label nor a prediction
    ours = summary_metrics(P, y)
    assert ours["recall"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert ours["precision"] == pytest.approx(_torchmetrics(P, y)["precision"], abs=1e-6)
