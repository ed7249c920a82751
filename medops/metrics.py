"""Point metrics with stratified-bootstrap confidence intervals, and the operating point (numpy only).

``P`` is an ``N x K`` array of class probabilities and ``y`` the ``N`` integer labels. Binary tasks
(``K == 2``) threshold ``P[:, positive_class]``; multi-class tasks take the arg-max and average the
per-class figures (macro, one-vs-rest for AUROC and average precision). Ordinal (graded) tasks add the
quadratic-weighted kappa (:func:`ordinal_metrics`); multi-label tasks (``Y`` N x K of 0/1, ``P`` one sigmoid
probability per label) have their own per-label figures and thresholds (:func:`label_figures`,
:func:`label_thresholds`, :func:`multilabel_summary`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

MIN_PER_CLASS = 5  # fewer samples of a class than this: no bootstrap interval (it would be meaningless)


def _as_arrays(P: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    P = np.asarray(P, dtype=np.float64)
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if P.ndim != 2 or len(P) != len(y):
        raise ValueError(f"probabilities of shape {P.shape} do not fit {len(y)} labels")
    return P, y


def predict_labels(P: np.ndarray, threshold: float | None = None, positive_class: int = 1) -> np.ndarray:
    """Arg-max, or for a binary task with ``threshold``: positive when ``P[:, positive_class] >= threshold``."""
    P = np.asarray(P, dtype=np.float64)
    if P.shape[1] == 2 and threshold is not None:
        return np.where(P[:, positive_class] >= threshold, positive_class, 1 - positive_class)
    return P.argmax(axis=1)


def confusion_matrix(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    y, pred = np.asarray(y, dtype=np.int64).reshape(-1), np.asarray(pred, dtype=np.int64).reshape(-1)
    if len(y) and (min(y.min(), pred.min()) < 0 or max(y.max(), pred.max()) >= num_classes):
        raise IndexError(f"labels and predictions must lie in 0..{num_classes - 1}")
    cells = np.bincount(y * num_classes + pred, minlength=num_classes * num_classes)  # linear, unlike np.add.at
    return cells.reshape(num_classes, num_classes).astype(np.int64)


def binary_auroc(scores: np.ndarray, is_pos: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN without both classes."""
    is_pos = np.asarray(is_pos, dtype=bool)
    n_pos, n_neg = int(is_pos.sum()), int((~is_pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    mid = first + (counts + 1) / 2.0  # 1-based mid-rank of each tie block
    ranks[order] = np.repeat(mid, counts)
    return float((ranks[is_pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_average_precision(scores: np.ndarray, is_pos: np.ndarray) -> float:
    """Sum over thresholds of (recall step) x precision, tied scores taken together; NaN without positives."""
    is_pos = np.asarray(is_pos, dtype=bool)
    n_pos = int(is_pos.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    s, t = np.asarray(scores)[order], is_pos[order]
    tp, fp = np.cumsum(t), np.cumsum(~t)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # end of each tie block
    tp, fp = tp[last], fp[last]
    precision, recall = tp / (tp + fp), tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_curve(scores: np.ndarray, is_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for predictions ``score >= threshold``, thresholds descending (first is +inf).

    One threshold per distinct score (tied scores share one point). Sorted once, then every threshold's counts of
    positives and negatives at or above it come from a binary search: O(n log n) time, O(n) memory (a million
    predictions take well under a second and a few tens of MB). A NaN score is never at or above a threshold.
    """
    scores = np.asarray(scores).reshape(-1)
    is_pos = np.asarray(is_pos, dtype=bool).reshape(-1)
    thresholds = np.r_[np.inf, np.unique(scores)[::-1]]
    valid = ~np.isnan(scores) if scores.dtype.kind in "fc" else np.ones(len(scores), dtype=bool)
    pos, neg = np.sort(scores[is_pos & valid]), np.sort(scores[~is_pos & valid])
    tp = len(pos) - np.searchsorted(pos, thresholds, side="left")  # positives with score >= threshold
    fp = len(neg) - np.searchsorted(neg, thresholds, side="left")
    tpr = tp / max(int(is_pos.sum()), 1)
    fpr = fp / max(int((~is_pos).sum()), 1)
    return fpr, tpr, thresholds


def _macro(values: list[float]) -> float:
    vals = [v for v in values if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def auroc(P: np.ndarray, y: np.ndarray, positive_class: int = 1) -> float:
    P, y = _as_arrays(P, y)
    if P.shape[1] == 2:
        return binary_auroc(P[:, positive_class], y == positive_class)
    return _macro([binary_auroc(P[:, k], y == k) for k in range(P.shape[1]) if (y == k).any()])


def average_precision(P: np.ndarray, y: np.ndarray, positive_class: int = 1) -> float:
    P, y = _as_arrays(P, y)
    if P.shape[1] == 2:
        return binary_average_precision(P[:, positive_class], y == positive_class)
    return _macro([binary_average_precision(P[:, k], y == k) for k in range(P.shape[1]) if (y == k).any()])


def class_figures(cm: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall (sensitivity), specificity, F1 and support from a confusion matrix."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support, predicted, total = cm.sum(1), cm.sum(0), cm.sum()
    fp, fn = predicted - tp, support - tp
    tn = total - tp - fp - fn
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), np.nan)
        recall = np.where(support > 0, tp / np.maximum(support, 1), np.nan)
        specificity = np.where(tn + fp > 0, tn / np.maximum(tn + fp, 1), np.nan)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan)
    return {"precision": precision, "recall": recall, "specificity": specificity, "f1": f1, "support": support}


def metric_functions(num_classes: int, threshold: float | None = None,
                     positive_class: int = 1) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    """``name -> metric_fn(P, y)`` for every headline metric (binary: at ``threshold`` on the positive class)."""
    binary = num_classes == 2

    def figures(P: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        pred = predict_labels(P, threshold, positive_class)
        return class_figures(confusion_matrix(y, pred, num_classes))

    def pick(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
        def fn(P: np.ndarray, y: np.ndarray) -> float:
            f = figures(P, y)
            if binary:
                return float(f[name][positive_class])
            return _macro(list(f[name][f["support"] > 0]))  # classes absent from y are left out of the mean

        return fn

    def accuracy(P: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(predict_labels(P, threshold, positive_class) == y)) if len(y) else float("nan")

    def balanced_accuracy(P: np.ndarray, y: np.ndarray) -> float:
        f = figures(P, y)
        return _macro(list(f["recall"][f["support"] > 0])) if len(np.unique(y)) > 1 else float("nan")

    def specificity(P: np.ndarray, y: np.ndarray) -> float:
        f = figures(P, y)
        if binary:
            return float(f["specificity"][positive_class])
        return _macro(list(f["specificity"]))

    return {
        "accuracy": accuracy,
        "balanced_accuracy": balanced_accuracy,
        "auroc": lambda P, y: auroc(P, y, positive_class),
        "average_precision": lambda P, y: average_precision(P, y, positive_class),
        "sensitivity": pick("recall"),
        "specificity": specificity,
        "precision": pick("precision"),
        "recall": pick("recall"),
        "f1": pick("f1"),
    }


def interval_obstacle(y: np.ndarray, num_classes: int, positive_class: int = 1,
                      min_per_class: int = MIN_PER_CLASS) -> str | None:
    """Why a bootstrap interval would be meaningless for these labels, or None."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=num_classes)
    if num_classes == 2:
        if counts[positive_class] < min_per_class:
            return f"too few positives for an interval ({int(counts[positive_class])} < {min_per_class})"
        if counts[1 - positive_class] < min_per_class:
            return f"too few negatives for an interval ({int(counts[1 - positive_class])} < {min_per_class})"
        return None
    small = [k for k in range(num_classes) if counts[k] < min_per_class]
    if small:
        return f"too few samples of class {small} for an interval (< {min_per_class} each)"
    return None


def bootstrap_ci(
    P: Any, y: Any, metric_fn: Callable[[np.ndarray, np.ndarray], float], n_resamples: int = 1000, seed: int = 0,
    alpha: float = 0.05, stratified: bool = True, positive_class: int = 1, min_per_class: int = MIN_PER_CLASS,
    return_reason: bool = False,
) -> Any:
    """Percentile interval ``(low, high)`` of ``metric_fn`` over bootstrap resamples of (P, y).

    Stratified resampling draws with replacement within each class, so every resample keeps the class
    counts. With fewer than ``min_per_class`` samples of a class there is no meaningful interval: the
    result is None (``return_reason=True`` returns ``(interval_or_None, reason_or_None)`` instead).
    """
    P, y = _as_arrays(P, y)
    reason = interval_obstacle(y, P.shape[1], positive_class, min_per_class)
    result: tuple[float, float] | None = None
    if reason is None and n_resamples > 0:
        rng = np.random.default_rng(seed)
        groups = [np.flatnonzero(y == k) for k in np.unique(y)] if stratified else [np.arange(len(y))]
        values = np.empty(n_resamples, dtype=np.float64)
        for i in range(n_resamples):
            idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups])
            values[i] = metric_fn(P[idx], y[idx])
        values = values[~np.isnan(values)]
        if len(values) < max(10, n_resamples // 2):
            reason = "metric undefined on most bootstrap resamples"
        else:
            low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            result = (float(low), float(high))
    elif reason is None:
        reason = "no bootstrap resamples requested"
    return (result, reason) if return_reason else result


def choose_threshold(P_val: Any, y_val: Any, method: str = "youden", target: float = 0.95,
                     positive_class: int = 1) -> float:
    """Operating point on ``P[:, positive_class]`` chosen on validation data (binary tasks).

    ``youden``: maximises sensitivity + specificity - 1. ``sensitivity``: the highest threshold whose
    sensitivity is at least ``target`` (so the best specificity at that sensitivity).
    """
    P, y = _as_arrays(P_val, y_val)
    if P.shape[1] != 2:
        raise ValueError("an operating-point threshold needs a binary task; multi-class uses the arg-max")
    is_pos = y == positive_class
    if not is_pos.any() or is_pos.all():
        raise ValueError("choosing a threshold needs both classes in the validation data")
    fpr, tpr, thresholds = roc_curve(P[:, positive_class], is_pos)
    finite = np.isfinite(thresholds)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if method == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])  # first maximum: the highest such threshold
    if method == "sensitivity":
        if not 0 < target <= 1:
            raise ValueError(f"threshold.target must be in (0, 1], got {target}")
        ok = np.flatnonzero(tpr >= target - 1e-12)
        return float(thresholds[ok[0]])
    raise ValueError(f"unknown threshold method {method!r}; use youden or sensitivity")


def _clean(v: float) -> float | None:
    return None if v is None or np.isnan(v) else float(v)


def evaluate_predictions(
    P: Any, y: Any, class_names: Sequence[str], threshold: float | None = None, positive_class: int = 1,
    n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05,
) -> dict[str, Any]:
    """Every metric as ``{value, ci_low, ci_high, note}``, plus per-class figures and the confusion matrix.

    Binary tasks: ``threshold`` on P(positive class) (None: arg-max, i.e. 0.5). A metric that is undefined
    on these labels (AUROC with one class...) has value None and a note saying why.
    """
    P, y = _as_arrays(P, y)
    k = P.shape[1]
    if len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names for {k} probability columns")
    present = sorted(int(c) for c in np.unique(y))
    out: dict[str, Any] = {"n": int(len(y)), "class_counts": np.bincount(y, minlength=k).tolist()}
    metrics: dict[str, Any] = {}
    for name, fn in metric_functions(k, threshold, positive_class).items():
        value = _clean(fn(P, y)) if len(y) else None
        entry: dict[str, Any] = {"value": value, "ci_low": None, "ci_high": None, "note": None}
        if value is None:
            entry["note"] = ("no samples" if not len(y) else
                             f"undefined: only class(es) {[class_names[c] for c in present]} present")
        else:
            ci, reason = bootstrap_ci(P, y, fn, n_resamples=n_resamples, seed=seed, alpha=alpha,
                                      positive_class=positive_class, return_reason=True)
            if ci is None:
                entry["note"] = reason
            else:
                entry["ci_low"], entry["ci_high"] = ci
        metrics[name] = entry
    out["metrics"] = metrics
    pred = predict_labels(P, threshold, positive_class)
    cm = confusion_matrix(y, pred, k)
    fig = class_figures(cm)
    out["per_class"] = {
        class_names[c]: {
            "support": int(fig["support"][c]),
            "precision": _clean(fig["precision"][c]),
            "recall": _clean(fig["recall"][c]),
            "specificity": _clean(fig["specificity"][c]),
            "f1": _clean(fig["f1"][c]),
            "auroc_ovr": _clean(binary_auroc(P[:, c], y == c)),
        }
        for c in range(k)
    }
    out["confusion_matrix"] = cm.tolist()
    out["threshold"] = threshold
    out["positive_class"] = class_names[positive_class] if k == 2 else None
    return out


SUBGROUP_COLUMNS = ("site", "scanner", "sex", "age_band")
BLANK = "(blank)"


def subgroup_metrics(
    P: Any, y: Any, columns: dict[str, Sequence[str | None]], class_names: Sequence[str],
    threshold: float | None = None, positive_class: int = 1, n_resamples: int = 1000, seed: int = 0,
    overall: dict[str, Any] | None = None, known_values: dict[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Every metric per value of each subgroup column, with its gap to the overall figure.

    ``columns`` maps a column name to one value per sample (blank values form their own ``(blank)``
    group). ``known_values`` may list values that exist in the data source but have no sample here: they
    are reported as empty subgroups. Empty and single-class subgroups carry a note instead of failing.
    """
    P, y = _as_arrays(P, y)
    overall = overall or evaluate_predictions(P, y, class_names, threshold, positive_class, 0, seed)
    out: dict[str, Any] = {}
    for column, raw in columns.items():
        values = np.array([(v or "").strip() or BLANK for v in raw], dtype=object)
        if len(values) != len(y):
            raise ValueError(f"subgroup column {column!r} has {len(values)} values for {len(y)} samples")
        known = {(v or "").strip() or BLANK for v in (known_values or {}).get(column, [])}
        names = sorted(set(values.tolist()) | known)
        groups: dict[str, Any] = {}
        for value in names:
            mask = values == value
            n = int(mask.sum())
            notes = []
            if value == BLANK:
                notes.append(f"{column} is blank for these samples")
            if n == 0:
                groups[value] = {"n": 0, "metrics": {}, "note": "; ".join([*notes, "empty subgroup: no samples"])}
                continue
            present = np.unique(y[mask])
            if len(present) < 2:
                notes.append(f"single class ({class_names[int(present[0])]}): metrics needing both classes "
                             "are undefined")
            result = evaluate_predictions(P[mask], y[mask], class_names, threshold, positive_class,
                                          n_resamples, seed)
            for name, entry in result["metrics"].items():
                ref = overall["metrics"][name]["value"]
                entry["gap"] = None if entry["value"] is None or ref is None else entry["value"] - ref
            groups[value] = {"n": n, "class_counts": result["class_counts"], "metrics": result["metrics"],
                             "note": "; ".join(notes) or None}
        out[column] = groups
    return out


def auroc_or_none(labels: Any, probs: Any) -> float | None:
    """:func:`auroc` (binary: of the positive class 1; more classes: macro one-vs-rest over the classes present),
    or ``None`` where it is undefined: fewer than two classes present, or probabilities of the wrong shape."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) != len(y) or p.shape[1] < 2 or len(np.unique(y)) < 2:
        return None
    value = auroc(p, y)
    return None if np.isnan(value) else value


def operating_point_figures(P: Any, y: Any, threshold: float, positive_class: int = 1) -> dict[str, float]:
    """Accuracy, sensitivity and specificity of a binary classifier at ``threshold`` on the positive class."""
    P, y = _as_arrays(P, y)
    fns = metric_functions(2, threshold, positive_class)
    return {"acc": fns["accuracy"](P, y), "sensitivity": fns["sensitivity"](P, y),
            "specificity": fns["specificity"](P, y)}


def summary_metrics(P: Any, y: Any) -> dict[str, float]:
    """The run record's headline figures at the arg-max decision: accuracy, AUROC (binary: of class 1; more classes:
    macro one-vs-rest) and macro precision, recall and F1.

    The macro averages follow torchmetrics' ``average="macro"`` (which logs the per-epoch figures during training):
    a class with neither true nor predicted samples is left out, an undefined ratio counts as 0.
    """
    P, y = _as_arrays(P, y)
    cm = confusion_matrix(y, P.argmax(1), P.shape[1])
    f = class_figures(cm)
    tp = np.diag(cm)
    seen = (cm.sum(0) + cm.sum(1) - tp) > 0  # tp + fp + fn > 0

    def macro(values: np.ndarray) -> float:
        return float(np.nan_to_num(values[seen], nan=0.0).mean()) if seen.any() else float("nan")

    return {"acc": float(tp.sum() / max(cm.sum(), 1)), "auroc": auroc(P, y), "precision": macro(f["precision"]),
            "recall": macro(f["recall"]), "f1": macro(f["f1"])}


def quadratic_weighted_kappa(y: Any, pred: Any, num_classes: int) -> float:
    """Cohen's kappa with quadratic weights (scikit-learn) between true and predicted grades: 1 for perfect
    agreement, 0 for chance; an error of two grades costs four times one of one grade. NaN without samples."""
    from sklearn.metrics import cohen_kappa_score

    y, pred = np.asarray(y, dtype=np.int64).reshape(-1), np.asarray(pred, dtype=np.int64).reshape(-1)
    if not len(y):
        return float("nan")
    if len(np.unique(np.r_[y, pred])) < 2:  # one grade everywhere: kappa is 0/0
        return 1.0 if np.array_equal(y, pred) else float("nan")
    return float(cohen_kappa_score(y, pred, labels=list(range(num_classes)), weights="quadratic"))


def ordinal_metrics(P: Any, y: Any) -> dict[str, float]:
    """Ordinal (graded) tasks at the arg-max grade: quadratic-weighted kappa ``qwk`` and the mean absolute grade
    error ``mae``."""
    P, y = _as_arrays(P, y)
    pred = P.argmax(1)
    return {"qwk": quadratic_weighted_kappa(y, pred, P.shape[1]),
            "mae": float(np.abs(pred - y).mean()) if len(y) else float("nan")}


def _multilabel_arrays(P: Any, Y: Any) -> tuple[np.ndarray, np.ndarray]:
    P, Y = np.asarray(P, dtype=np.float64), np.asarray(Y).astype(np.int64)
    if P.ndim != 2 or P.shape != Y.shape:
        raise ValueError(f"multi-label probabilities of shape {P.shape} do not fit labels of shape {Y.shape}")
    return P, Y


def label_figures(P: Any, Y: Any, thresholds: Sequence[float] | float = 0.5) -> dict[str, np.ndarray]:
    """Per label of a multi-label task: AUROC (NaN for a label without both values), and at ``thresholds`` (one per
    label, or one for all) accuracy, sensitivity (recall), specificity, precision, F1, and the positive count."""
    P, Y = _multilabel_arrays(P, Y)
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (P.shape[1],))
    pred, pos = P >= thr[None, :], Y == 1
    tp, fp = (pred & pos).sum(0).astype(float), (pred & ~pos).sum(0).astype(float)
    fn, tn = (~pred & pos).sum(0).astype(float), (~pred & ~pos).sum(0).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "auroc": np.array([binary_auroc(P[:, k], pos[:, k]) for k in range(P.shape[1])]),
            "acc": (tp + tn) / np.maximum(len(P), 1),
            "sensitivity": np.where(tp + fn > 0, tp / (tp + fn), np.nan),
            "specificity": np.where(tn + fp > 0, tn / (tn + fp), np.nan),
            "precision": np.where(tp + fp > 0, tp / (tp + fp), np.nan),
            "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan),
            "positives": pos.sum(0).astype(float),
        }


def multilabel_summary(P: Any, Y: Any) -> dict[str, float]:
    """The run record's headline figures of a multi-label task, each the macro mean over the labels at 0.5 (as
    torchmetrics' ``Multilabel*`` with ``average="macro"``): ``acc``, ``auroc`` (labels with both values only),
    ``precision``, ``recall`` and ``f1`` (an undefined ratio counts as 0)."""
    f = label_figures(P, Y, 0.5)
    return {"acc": _macro(list(f["acc"])), "auroc": _macro(list(f["auroc"])),
            "precision": float(np.nan_to_num(f["precision"]).mean()),
            "recall": float(np.nan_to_num(f["sensitivity"]).mean()), "f1": float(np.nan_to_num(f["f1"]).mean())}


def label_thresholds(P_val: Any, Y_val: Any, method: str = "youden", target: float = 0.95) -> list[float | None]:
    """One operating point per label of a multi-label task, chosen on validation with :func:`choose_threshold`
    (``youden``: Youden's J); ``None`` for a label without both values in the validation data (use 0.5)."""
    P, Y = _multilabel_arrays(P_val, Y_val)
    out: list[float | None] = []
    for k in range(P.shape[1]):
        if Y[:, k].min() == Y[:, k].max():
            out.append(None)
            continue
        out.append(choose_threshold(np.c_[1 - P[:, k], P[:, k]], Y[:, k], method, target, positive_class=1))
    return out


def per_label(P: Any, Y: Any, names: Sequence[str], thresholds: Sequence[float | None]) -> dict[str, Any]:
    """``{label: {auroc, sensitivity, specificity, precision, f1, positives, threshold}}`` at each label's
    threshold (0.5 where it has none)."""
    thr = [0.5 if t is None else float(t) for t in thresholds]
    f = label_figures(P, Y, thr)
    return {str(name): {"threshold": thr[k], "positives": int(f["positives"][k]),
                        **{m: _clean(f[m][k]) for m in ("auroc", "sensitivity", "specificity", "precision", "f1")}}
            for k, name in enumerate(names)}


def task_summary(P: Any, y: Any, task: str | None = None) -> dict[str, float]:
    """:func:`summary_metrics` for the task: multi-label :func:`multilabel_summary`; ordinal adds
    :func:`ordinal_metrics` (``qwk``, ``mae``)."""
    if task == "multilabel":
        return multilabel_summary(P, y)
    out = summary_metrics(P, y)
    return out | ordinal_metrics(P, y) if task == "ordinal" else out


def evaluate_multilabel(P: Any, Y: Any, names: Sequence[str], thresholds: Sequence[float | None],
                        n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
    """A multi-label task's figures as :func:`evaluate_predictions` gives them for one label: every headline metric
    (the macro mean over the labels; AUROC over the labels with both values; the others at each label's threshold,
    0.5 where it has none) as ``{value, ci_low, ci_high, note}`` with an image-level bootstrap interval (images
    resampled with replacement; their label sets kept together), plus the per-label figures (:func:`per_label`)."""
    P, Y = _multilabel_arrays(P, Y)
    thr = [0.5 if t is None else float(t) for t in thresholds]
    keys = {"auroc": "auroc", "accuracy": "acc", "sensitivity": "sensitivity", "specificity": "specificity",
            "precision": "precision", "f1": "f1"}

    def macros(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
        f = label_figures(p, y, thr)
        return {name: _macro(list(f[key])) for name, key in keys.items()}

    rng = np.random.default_rng(seed)
    resamples = n_resamples if len(P) >= MIN_PER_CLASS else 0
    draws = [macros(P[i], Y[i]) for i in (rng.integers(0, len(P), len(P)) for _ in range(resamples))]
    point = macros(P, Y) if len(P) else {}
    metrics: dict[str, Any] = {}
    for name in keys:
        value = _clean(point[name]) if point else None
        entry: dict[str, Any] = {"value": value, "ci_low": None, "ci_high": None, "note": None}
        values = np.array([d[name] for d in draws], dtype=np.float64)
        values = values[~np.isnan(values)]
        if value is None:
            entry["note"] = "undefined: no label has both values" if len(P) else "no samples"
        elif len(values) < max(10, n_resamples // 2):
            entry["note"] = "no bootstrap interval (too few images or resamples)"
        else:
            low, high = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            entry["ci_low"], entry["ci_high"] = float(low), float(high)
        metrics[name] = entry
    return {"n": int(len(P)), "label_counts": Y.sum(0).astype(int).tolist(), "metrics": metrics,
            "per_label": per_label(P, Y, names, thresholds), "thresholds": thr}
