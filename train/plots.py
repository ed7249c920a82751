"""Result plots: ROC curves and the confusion matrix, written as PNG files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.classification import binary_auroc, binary_roc  # noqa: E402


def plot_roc(probs: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str], path: Path, title: str) -> Path:
    """ROC curve of the positive class (binary) or one-vs-rest curves of every class (multi-class)."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    classes = [1] if len(class_names) == 2 else range(len(class_names))
    for c in classes:
        is_c = (targets == c).long()
        if is_c.sum() == 0 or is_c.sum() == len(is_c):
            continue
        fpr, tpr, _ = binary_roc(probs[:, c], is_c)
        auc = binary_auroc(probs[:, c], is_c).item()
        ax.plot(fpr.numpy(), tpr.numpy(), lw=2, label=f"{class_names[c]} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: Path, title: str) -> Path:
    """Confusion matrix with counts and row-normalised shares (rows: true class)."""
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
