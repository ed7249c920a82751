"""The LightningModule for image classification: network, loss, optimiser, schedule and metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import ConfusionMatrix, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from train.augment import AugmentConfig, BatchAugment
from train.models import build_network


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Accuracy (micro), and macro AUROC (one-vs-rest), precision, recall and F1 over all classes."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "auroc": MulticlassAUROC(num_classes, average="macro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        },
        prefix=prefix,
    )


class ClassificationModule(L.LightningModule):
    """Image classifier whose network includes its input normalisation (see :func:`train.models.build_network`).

    Everything needed to rebuild it (geometry, classes, normalisation statistics) is stored in the
    checkpoint's hyper-parameters, so ``ClassificationModule.load_from_checkpoint(path)`` needs no data.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        class_names: Sequence[str] | None = None,
        net: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        loss: dict[str, Any] | None = None,
        augment: dict[str, Any] | None = None,
        class_counts: Sequence[int] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        net_cfg = {"arch": "resnet18", **(net or {})}
        self.net = build_network(
            net_cfg.pop("arch"), in_channels, num_classes, image_size, list(mean), list(std), **net_cfg
        )
        self.optimizer_cfg = {"lr": 1e-3, "weight_decay": 1e-4, "betas": (0.9, 0.999), **(optimizer or {})}
        self.scheduler_cfg = {"name": "onecycle", "pct_start": 0.15, **(scheduler or {})}
        loss_cfg = {"class_weights": None, "label_smoothing": 0.0, **(loss or {})}
        self.label_smoothing = float(loss_cfg["label_smoothing"])
        self.register_buffer("class_weights", self._class_weights(loss_cfg["class_weights"], class_counts))
        self.augment = BatchAugment(AugmentConfig(**(augment or {})))
        self.channels_last = channels_last
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")
        self.test_confusion = ConfusionMatrix(task="multiclass", num_classes=num_classes)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    def _class_weights(self, spec: Any, counts: Sequence[int] | None) -> torch.Tensor | None:
        num_classes = self.hparams.num_classes
        if spec is None:
            return None
        if spec == "balanced":
            if not counts:
                raise ValueError("loss.class_weights=balanced needs the training class counts")
            c = torch.tensor(counts, dtype=torch.float32).clamp(min=1)
            return c.sum() / (num_classes * c)
        weights = torch.tensor(list(spec), dtype=torch.float32)
        if weights.numel() != num_classes:
            raise ValueError(f"loss.class_weights has {weights.numel()} values for {num_classes} classes")
        return weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            x, y = batch
            return self.augment(x), y
        return batch

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y, weight=self.class_weights, label_smoothing=self.label_smoothing)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self._loss(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x).float()
        self.log("val/loss", self._loss(logits, y), prog_bar=True, batch_size=len(y), sync_dist=True)
        self.val_metrics.update(logits.softmax(-1), y)

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute()
        self.log("val/auroc", metrics.pop("val/auroc"), prog_bar=True, sync_dist=True)
        self.log_dict(metrics, sync_dist=True)
        self.val_metrics.reset()

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x).float()
        self.log("test/loss", self._loss(logits, y), batch_size=len(y), sync_dist=True)
        probs = logits.softmax(-1)
        self.test_metrics.update(probs, y)
        self.test_confusion.update(probs, y)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=True)
        self.test_metrics.reset()

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self(x).float().softmax(-1)

    def configure_optimizers(self) -> Any:
        cfg = self.optimizer_cfg
        decay, no_decay = [], []
        for name, p in self.net.named_parameters():
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg["lr"],
            betas=tuple(cfg["betas"]),
        )
        name = self.scheduler_cfg["name"]
        if name in (None, "none"):
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        if name == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=cfg["lr"], total_steps=total, pct_start=self.scheduler_cfg["pct_start"]
            )
        elif name == "cosine":
            warmup = max(1, int(total * self.scheduler_cfg["pct_start"]))
            sched = torch.optim.lr_scheduler.SequentialLR(
                optimizer,
                [
                    torch.optim.lr_scheduler.LinearLR(optimizer, 0.01, 1.0, total_iters=warmup),
                    torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup)),
                ],
                milestones=[warmup],
            )
        else:
            raise ValueError(f"unknown scheduler {name!r}; choose onecycle, cosine or none")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
