"""The result figures every stage draws the same way: ROC curves (with the operating point), confusion matrices
and reliability diagrams.

Training (its end-of-run test evaluation) and the clinical evaluation report both call these, so a figure in
``roc_test.png`` and one in ``report.html`` always mean the same thing. Inputs are numpy arrays; torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medops.calibration import expected_calibration_error, positive_class_bins, reliability_bins
from medops.metrics import binary_auroc, roc_curve


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(P: np.ndarray, y: np.ndarray, class_names: Sequence[str], path: Path, title: str = "ROC",
             threshold: float | None = None, positive_class: int = 1) -> Path:
    """ROC curve of the positive class (binary) or one-vs-rest curves (multi-class), AUROC in the legend;
    with ``threshold`` (binary) the operating point is marked. Multi-label (``y`` N x K of 0/1): one curve per
    label."""
    P, y = np.asarray(P, dtype=np.float64), np.asarray(y)
    multilabel = y.ndim == 2
    y = y if multilabel else y.reshape(-1)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    classes = [positive_class] if P.shape[1] == 2 and not multilabel else range(P.shape[1])
    for c in classes:
        is_c = y[:, c] == 1 if multilabel else y == c
        if not is_c.any() or is_c.all():
            continue
        fpr, tpr, _ = roc_curve(P[:, c], is_c)
        ax.plot(fpr, tpr, lw=2, label=f"{class_names[c]} (AUC {binary_auroc(P[:, c], is_c):.3f})")
    if threshold is not None and P.shape[1] == 2 and not multilabel:
        pos = y == positive_class
        pred = P[:, positive_class] >= threshold
        if pos.any() and (~pos).any():
            ax.plot([pred[~pos].mean()], [pred[pos].mean()], "ro", label=f"operating point (t={threshold:.3f})")
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: Path, title: str = "Confusion") -> Path:
    """Confusion matrix with counts and row-normalised shares (rows: true class)."""
    plt = _plt()
    matrix = np.asarray(matrix)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(4.5, 0.6 * len(class_names) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    labels = [n if len(n) <= 20 else n[:19] + "…" for n in class_names]
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            color = "white" if shares[i, j] > 0.5 else "black"
            ax.text(j, i, f"{matrix[i, j]}\n{shares[i, j]:.0%}", ha="center", va="center", color=color, fontsize=9)
    ax.set(xlabel="Predicted", ylabel="True", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_reliability(curves: dict[str, tuple[Any, Any]], path: str | Path, n_bins: int | None = None,
                     title: str = "Reliability diagram", positive: tuple[int, str] | None = None) -> Path:
    """Reliability diagram of each ``label -> (P, y)`` with the diagonal, and below it the images per bin, so a bin
    of two images is not read as a finding; saves a PNG (:func:`reliability_figure` draws it)."""
    fig = reliability_figure(curves, n_bins, title, positive)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def reliability_figure(curves: dict[str, tuple[Any, Any]], n_bins: int | None = None,
                       title: str = "Reliability diagram", positive: tuple[int, str] | None = None) -> Any:
    """The figure of :func:`plot_reliability`. With ``positive = (index, name)`` (binary tasks) it is the
    calibration plot clinicians read: the observed share of the positive class against the predicted P(positive)
    in 10 bins, each curve's legend giving the ECE of that probability. Otherwise accuracy against top-label
    confidence in 15 bins, with the ECE of the reports' tables."""
    fig, (ax, hist) = _plt().subplots(2, 1, figsize=(4.8, 6.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for k, (label, (P, y)) in enumerate(curves.items()):
        x, observed, count, edges, legend = _reliability_curve(P, y, n_bins, positive)
        filled = count > 0
        ax.plot(x[filled], observed[filled], "o-", color=f"C{k}", label=f"{label} ({legend})")
        hist.stairs(count, edges, color=f"C{k}", lw=1.5, label=label)
    if positive is not None:
        xlabel, ylabel = f"predicted P({positive[1]})", f"observed share {positive[1]}"
    else:
        xlabel, ylabel = "confidence (top-label probability)", "accuracy (share correct)"
    ax.set(xlim=(0, 1), ylim=(-0.03, 1.03), ylabel=ylabel, title=title)
    ax.legend(loc="best", fontsize=8)
    hist.set(xlabel=xlabel, ylabel="images per bin")
    return fig


def _reliability_curve(P: Any, y: Any, n_bins: int | None,
                       positive: tuple[int, str] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """One curve of :func:`plot_reliability`: x, observed, count and bin edges per bin, and its legend figure."""
    if positive is None:
        b = reliability_bins(P, y, n_bins or 15)
        ece = expected_calibration_error(P, y, n_bins or 15)
        return b["confidence"], b["accuracy"], b["count"], b["edges"], f"ECE {ece:.3f}"
    index, name = positive
    b = positive_class_bins(np.asarray(P)[:, index], np.asarray(y).reshape(-1) == index, n_bins or 10)
    return b["predicted"], b["observed"], b["count"], b["edges"], f"ECE of P({name}) {b['error']:.3f}"
