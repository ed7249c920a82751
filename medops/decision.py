"""The decision a model version serves at its operating point, as one rule for every check that compares two
engines (export's parity gate, the INT8 gate): torch-free, numpy only.

* binary with an operating point: P(positive class) >= the threshold chosen on validation;
* multi-label: each label at or above its own threshold (0.5 for a label without one);
* multi-class and ordinal: the arg-max class, plus P(abnormal) >= its threshold when the data declared an abnormal
  set (:mod:`medops.abnormal`);
* anything else: the arg-max class.

:meth:`DecisionRule.decide` gives one row per image (one column per decision), so two engines give the same
decision on an image when its rows are equal (:meth:`DecisionRule.same`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DecisionRule:
    """How probabilities [N, K] become the served decision; build it with :func:`decision_rule`."""

    kind: str  # "threshold" (binary), "labels" (multi-label) or "argmax" (multi-class, ordinal, no operating point)
    threshold: float | None = None
    positive_index: int = 1
    positive_class: str | None = None
    label_thresholds: tuple[float, ...] = ()
    abnormal_indices: tuple[int, ...] = ()
    abnormal_threshold: float | None = None

    def decide(self, probs: Any) -> np.ndarray:
        """The decisions of probabilities ``probs`` [N, K]: [N, 1] bool for a threshold, [N, labels] bool for
        multi-label, [N, 1] int (arg-max) or [N, 2] int (arg-max, abnormal call) otherwise."""
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 2:
            raise ValueError(f"probabilities must be [N, K], got shape {p.shape}")
        if self.kind == "threshold":
            return (p[:, self.positive_index] >= self.threshold)[:, None]
        if self.kind == "labels":
            if p.shape[1] != len(self.label_thresholds):
                raise ValueError(f"{p.shape[1]} label probabilities for {len(self.label_thresholds)} thresholds")
            return p >= np.asarray(self.label_thresholds)[None, :]
        top = p.argmax(1)[:, None]
        if self.abnormal_indices and self.abnormal_threshold is not None:
            called = p[:, list(self.abnormal_indices)].sum(1) >= self.abnormal_threshold
            return np.concatenate([top, called[:, None].astype(top.dtype)], axis=1)
        return top

    def same(self, a: Any, b: Any) -> np.ndarray:
        """Per image, whether probabilities ``a`` and ``b`` (both [N, K]) give the same decision."""
        return (self.decide(a) == self.decide(b)).all(axis=1)

    def agreement(self, a: Any, b: Any) -> float:
        """The share of images on which ``a`` and ``b`` give the same decision (1.0 for no image)."""
        same = self.same(a, b)
        return float(same.mean()) if same.size else 1.0

    def describe(self) -> str:
        """The rule in words, for reports and model cards."""
        if self.kind == "threshold":
            return f"P({self.positive_class}) >= {self.threshold:.4f}"
        if self.kind == "labels":
            return "each label >= its threshold (" + ", ".join(f"{t:.4f}" for t in self.label_thresholds) + ")"
        if self.abnormal_indices and self.abnormal_threshold is not None:
            return f"arg-max class and P(abnormal) >= {self.abnormal_threshold:.4f}"
        return "arg-max class"


def decision_rule(operating_point: Mapping[str, Any] | None, class_names: Sequence[str] | None = None,
                  task: str | None = None, label_thresholds: Mapping[str, float | None] | None = None) -> DecisionRule:
    """The rule of a version's operating point (``metadata.json`` ``operating_point``, or the run's
    ``operating_point.json``). ``task`` ``multilabel`` uses ``operating_point["label_thresholds"]``, else
    ``label_thresholds`` (the training run's), by ``class_names`` order; a binary task with a threshold compares
    P(positive class); the rest take the arg-max (and the declared abnormal set's threshold, if any)."""
    op = dict(operating_point or {})
    names = [str(n) for n in class_names or []]
    if task == "multilabel":
        chosen = dict(op.get("label_thresholds") or label_thresholds or {})
        return DecisionRule("labels", label_thresholds=tuple(
            0.5 if chosen.get(n) is None else float(chosen[n]) for n in names))
    if op.get("threshold") is not None and (not names or len(names) == 2):
        positive = op.get("positive_index")
        if positive is None:
            positive = names.index(op["positive_class"]) if op.get("positive_class") in names else 1
        positive_class = op.get("positive_class") or (names[int(positive)] if names else str(positive))
        return DecisionRule("threshold", threshold=float(op["threshold"]), positive_index=int(positive),
                            positive_class=str(positive_class))
    abnormal = op.get("abnormal") or {}
    if abnormal.get("value") is not None and (abnormal.get("indices") or abnormal.get("classes")):
        indices = abnormal.get("indices") or [names.index(str(c)) for c in abnormal["classes"]]
        return DecisionRule("argmax", abnormal_indices=tuple(int(i) for i in indices),
                            abnormal_threshold=float(abnormal["value"]))
    return DecisionRule("argmax")


def metadata_rule(meta: Mapping[str, Any]) -> DecisionRule:
    """The decision rule of a model version from its metadata: operating point, class names, task and the
    training run's per-label thresholds."""
    metrics = meta.get("metrics") or {}
    task = (meta.get("input") or {}).get("task") or metrics.get("task") or (meta.get("data") or {}).get("task")
    return decision_rule(meta.get("operating_point"), meta.get("class_names"), task,
                         (metrics.get("labels") or {}).get("thresholds"))


__all__ = ["DecisionRule", "decision_rule", "metadata_rule"]
