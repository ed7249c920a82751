"""A Lightning callback for ``python -m bench training``: the test split's AUROC and accuracy after every epoch.

Added to a real ``python -m train`` run as ``+callbacks.accuracy_probe._target_=bench.accuracy_probe.AccuracyProbe``
(with ``data=`` and ``out=``). At each validation (after the EMA callback has swapped the averaged weights in, so
it scores the weights the run would select) it predicts the test split in the trainer's precision and appends one
JSON line: epoch, optimiser step, the fit's wall time so far *without* the probe's own time, and the test figures.
The test split is read here for the benchmark's curve only; it plays no part in the run's model selection.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from medops.datasets import load_medmnist_npz
from train.datamodules.base import ArrayDataset


class AccuracyProbe(L.Callback):
    """Test AUROC/accuracy of a binary or multi-class run after every validation, timed apart from the fit."""

    def __init__(self, data: str, out: str, batch_size: int = 256) -> None:
        split = load_medmnist_npz(data)
        self.dataset = ArrayDataset(split.images["test"], split.labels["test"])
        self.labels = split.labels["test"].reshape(-1)
        self.out = Path(out)
        self.batch_size = batch_size
        self.fit_start = 0.0
        self.probe_seconds = 0.0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text("")
        self.fit_start = time.perf_counter()
        self.probe_seconds = 0.0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        started = time.perf_counter()
        probs = self._predict(trainer, pl_module)
        auroc = (roc_auc_score(self.labels, probs[:, 1]) if probs.shape[1] == 2
                 else roc_auc_score(self.labels, probs, multi_class="ovr"))
        row = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step,
               "seconds": started - self.fit_start - self.probe_seconds,
               "test_auroc": float(auroc), "test_acc": float((probs.argmax(1) == self.labels).mean())}
        with self.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.probe_seconds += time.perf_counter() - started

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with self.out.open("a") as f:  # the closing row: what the reader subtracts from the run's fit time
            f.write(json.dumps({"probe_seconds": self.probe_seconds}) + "\n")

    def _predict(self, trainer: L.Trainer, pl_module: L.LightningModule) -> np.ndarray:
        was_training = pl_module.training
        pl_module.eval()
        chunks = []
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for i in range(0, len(self.dataset), self.batch_size):
                x = torch.stack([self.dataset[j][0] for j in range(i, min(i + self.batch_size, len(self.dataset)))])
                chunks.append(torch.softmax(pl_module(x.to(pl_module.device)).float(), -1).cpu().numpy())
        pl_module.train(was_training)
        return np.concatenate(chunks)


def read_curve(path: Path) -> list[dict[str, Any]]:
    """The probe's rows, in epoch order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
