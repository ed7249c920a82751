"""The clinical "abnormal" question of a multi-class task: a declared set of classes, or an ordinal cut-off.

A multi-class model (e.g. normal / benign / malignant, or diabetic-retinopathy grades 0-4) is reported one-vs-rest
per class; many tasks also have one clinical decision across classes: "is anything abnormal?" (any finding) or
"is the grade at least moderate?" (refer). The data config declares it:

* ``data.abnormal_classes: [benign, malignant]``: these classes are the positive finding;
* ``data.ordinal_cutoff: moderate``: the classes are ordered (``class_names`` order) and this class and every one
  after it are the positive finding.

P(abnormal) is the sum of the abnormal classes' probabilities; the binary view ``[P(normal), P(abnormal)]`` then
goes through the same operating-point and metric code as a binary task (threshold chosen on validation,
sensitivity/specificity/PPV/NPV with intervals). Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

NAMES = ("normal", "abnormal")  # the binary view's class names, in column order


def abnormal_indices(class_names: Sequence[str], abnormal_classes: Sequence[str | int] | None = None,
                     ordinal_cutoff: str | int | None = None) -> list[int] | None:
    """The abnormal class indices of a multi-class task, or None when none is declared (or the task is binary).

    Raises ValueError for an unknown class, both settings at once, or a set that is empty or every class.
    """
    names = [str(n) for n in class_names]
    if abnormal_classes and ordinal_cutoff not in (None, ""):
        raise ValueError("declare either data.abnormal_classes or data.ordinal_cutoff, not both")
    if len(names) <= 2 or (not abnormal_classes and ordinal_cutoff in (None, "")):
        return None
    if abnormal_classes:
        indices = sorted({_index(names, c) for c in abnormal_classes})
    else:
        indices = list(range(_index(names, ordinal_cutoff), len(names)))  # type: ignore[arg-type]
    if not indices or len(indices) == len(names):
        raise ValueError(f"the abnormal set {[names[i] for i in indices]} must leave at least one normal class")
    return indices


def _index(names: list[str], value: str | int) -> int:
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit() and value not in names):
        index = int(value)
        if not 0 <= index < len(names):
            raise ValueError(f"class index {index} out of range for classes {names}")
        return index
    if value not in names:
        raise ValueError(f"unknown class {value!r}; classes are {names}")
    return names.index(value)


def binary_view(P: Any, indices: Sequence[int]) -> np.ndarray:
    """``[P(normal), P(abnormal)]`` per row of class probabilities ``P`` [N, K]."""
    probs = np.asarray(P, dtype=np.float64)
    abnormal = probs[:, list(indices)].sum(axis=1).clip(0.0, 1.0)
    return np.stack([1.0 - abnormal, abnormal], axis=1)


def binary_labels(y: Any, indices: Sequence[int]) -> np.ndarray:
    """1 where the class is abnormal, else 0."""
    return np.isin(np.asarray(y).reshape(-1), list(indices)).astype(np.int64)


def describe(class_names: Sequence[str], indices: Sequence[int]) -> dict[str, Any]:
    """The declared set as names, for records and reports."""
    return {"classes": [str(class_names[i]) for i in indices], "indices": [int(i) for i in indices],
            "normal_classes": [str(n) for i, n in enumerate(class_names) if i not in indices]}


def abnormal_operating_point(P_val: Any, y_val: Any, P_test: Any, y_test: Any, class_names: Sequence[str],
                             indices: Sequence[int]) -> dict[str, Any]:
    """The abnormal-vs-normal decision of a multi-class model: Youden's J threshold on P(abnormal) chosen on
    validation, with sensitivity/specificity/PPV/NPV and AUROC on validation and test."""
    from medops.metrics import auroc_or_none, choose_threshold

    views = {"val": (binary_view(P_val, indices), binary_labels(y_val, indices)),
             "test": (binary_view(P_test, indices), binary_labels(y_test, indices))}
    threshold = choose_threshold(*views["val"], "youden", positive_class=1)
    out: dict[str, Any] = {**describe(class_names, indices), "method": "youden_j_on_val", "value": threshold}
    for split, (P, y) in views.items():
        out[split] = {**decision_figures(P[:, 1] >= threshold, y), "auroc": auroc_or_none(y, P)}
    return out


def decision_figures(called: np.ndarray, abnormal: np.ndarray) -> dict[str, float | None]:
    """Accuracy, sensitivity, specificity, PPV and NPV of abnormal calls (None where a denominator is 0)."""
    called, abnormal = np.asarray(called, bool), np.asarray(abnormal, bool)
    tp, fn = int((called & abnormal).sum()), int((~called & abnormal).sum())
    fp, tn = int((called & ~abnormal).sum()), int((~called & ~abnormal).sum())

    def ratio(a: int, b: int) -> float | None:
        return a / (a + b) if a + b else None

    return {"acc": ratio(tp + tn, fp + fn), "sensitivity": ratio(tp, fn), "specificity": ratio(tn, fp),
            "ppv": ratio(tp, fp), "npv": ratio(tn, fn)}
