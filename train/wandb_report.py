"""End-of-run W&B content: curves, confusion matrix, sample predictions and the model artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

SAMPLE_PREDICTIONS = 32


def run_name(overrides: list[str], fallback: str) -> str:
    """A run name that says what changed: the command-line overrides, without paths and Hydra internals."""
    ignored = ("hydra.", "paths.", "logger", "data.path", "ckpt_path")
    kept = [o for o in overrides if not o.lstrip("+~").startswith(ignored)]
    return ",".join(kept)[:120] or fallback


def curve_chart(kind: str, probs: torch.Tensor, targets: torch.Tensor, class_names: list[str]) -> Any:
    """One-vs-rest ROC or PR curves per class as W&B's area-under-curve chart (the chart ``wandb.plot.roc_curve``
    draws), computed with torchmetrics instead of scikit-learn and pandas."""
    import wandb
    from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc

    rows = []
    for c, name in enumerate(class_names):
        is_c = (targets == c).long()
        if is_c.sum() in (0, len(is_c)):
            continue
        if kind == "roc":
            x, y, _ = binary_roc(probs[:, c], is_c)
        else:
            y, x, _ = binary_precision_recall_curve(probs[:, c], is_c)
        rows += [[name, round(float(a), 4), round(float(b), 4)] for a, b in zip(x, y, strict=True)]
    x_name, y_name = ("fpr", "tpr") if kind == "roc" else ("recall", "precision")
    table = wandb.Table(columns=["class", x_name, y_name], data=rows[: wandb.Table.MAX_ROWS])
    titles = {"roc": ("ROC", "False positive rate", "True positive rate"),
              "pr": ("Precision-recall", "Recall", "Precision")}[kind]
    return wandb.plot_table(
        "wandb/area-under-curve/v0", table, {"x": x_name, "y": y_name, "class": "class"},
        {"title": f"{titles[0]}, test split", "x-axis-title": titles[1], "y-axis-title": titles[2]},
    )


def log_evaluation(run: Any, probs: torch.Tensor, targets: torch.Tensor, class_names: list[str],
                   images: torch.Tensor) -> None:
    """ROC and PR curves and the confusion matrix (W&B charts) and a table of sample test predictions."""
    import wandb

    y_true = targets.cpu().numpy().astype(int)
    y_probs = probs.cpu().numpy().astype(float)
    preds = y_probs.argmax(1)
    run.log({
        "test/roc_curve": curve_chart("roc", probs.cpu().float(), targets.cpu(), class_names),
        "test/pr_curve": curve_chart("pr", probs.cpu().float(), targets.cpu(), class_names),
        "test/confusion_matrix": wandb.plot.confusion_matrix(y_true=y_true.tolist(), preds=preds.tolist(),
                                                             class_names=class_names),
    })
    table = wandb.Table(columns=["index", "image", "label", "prediction", "correct",
                                 *[f"p({c})" for c in class_names]])
    rng = np.random.default_rng(0)
    chosen = sorted(rng.choice(len(y_true), size=min(SAMPLE_PREDICTIONS, len(y_true)), replace=False).tolist())
    for i in chosen:
        img = (images[i].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        img = img[..., 0] if img.shape[-1] == 1 else img
        table.add_data(i, wandb.Image(img), class_names[y_true[i]], class_names[preds[i]], bool(preds[i] == y_true[i]),
                       *[round(float(p), 4) for p in y_probs[i]])
    run.log({"test/sample_predictions": table})


def log_checkpoint_artifact(run: Any, checkpoint: str | Path, record: dict[str, Any]) -> str:
    """The best checkpoint as a W&B model artifact with its metrics and lineage as metadata.

    Online the file is uploaded; offline the artifact holds a ``file://`` reference to it (nothing copied).
    Returns the artifact name.
    """
    import wandb

    path = Path(checkpoint).resolve()
    name = f"model-{run.id}"
    metadata = {
        "val": record.get("val"), "test": record.get("test"), "run_id": record.get("run_id"),
        "git_commit": (record.get("git") or {}).get("commit"),
        "dataset_fingerprint": (record.get("data") or {}).get("fingerprint"),
        "arch": (record.get("model") or {}).get("arch"),
    }
    artifact = wandb.Artifact(name, type="model", metadata=metadata)
    if getattr(run.settings, "_offline", False) or str(run.settings.mode) in ("offline", "dryrun"):
        artifact.add_reference(path.as_uri(), name=path.name, checksum=True)
    else:
        artifact.add_file(str(path), name=path.name)
    run.log_artifact(artifact, aliases=["best", "latest"])
    return name
