"""The LightningModule for image classification: network, loss, optimiser, schedule and metrics.

Every task type of MedMNIST 2D (``task``, resolved from the data by :func:`medops.datasets.resolve_task`):

* ``binary`` / ``multiclass``: softmax over the K classes, cross-entropy.
* ``ordinal`` (ordered grades, e.g. RetinaMNIST): the same K-way softmax head trained with the soft ordinal labels
  of SORD (Diaz and Marathe, "Soft Labels for Ordinal Regression", CVPR 2019): the target of grade ``y`` is
  ``softmax(-scale * (k - y)^2)`` over the grades ``k``, so a prediction one grade off costs less than one three
  grades off; class probabilities stay ``[N, K]`` (the exported contract is unchanged). Metrics add the
  quadratic-weighted Cohen's kappa (``qwk``).
* ``multilabel`` (N x K 0/1 labels, e.g. ChestMNIST): one sigmoid per label, ``BCEWithLogits``; metrics are
  per-label figures averaged over the labels (``auroc``: the macro mean of the per-label AUROCs).
"""

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
    MulticlassCohenKappa,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelRecall,
)

from train.augment import AugmentConfig, BatchAugment
from train.models import Ensemble, build_network

TASKS = ("binary", "multiclass", "ordinal", "multilabel")


def default_task(num_classes: int) -> str:
    """The task of a checkpoint that does not record one (trained before tasks existed): binary or multi-class."""
    return "binary" if num_classes == 2 else "multiclass"


def classification_metrics(num_classes: int, prefix: str, task: str = "multiclass") -> MetricCollection:
    """Accuracy (micro), and macro AUROC (one-vs-rest), precision, recall and F1 over all classes; ordinal tasks
    add the quadratic-weighted kappa ``qwk``; multi-label tasks: the per-label figures at 0.5, macro-averaged."""
    if task == "multilabel":
        return MetricCollection(
            {
                "acc": MultilabelAccuracy(num_classes, average="macro"),
                "auroc": MultilabelAUROC(num_classes, average="macro"),
                "precision": MultilabelPrecision(num_classes, average="macro"),
                "recall": MultilabelRecall(num_classes, average="macro"),
                "f1": MultilabelF1Score(num_classes, average="macro"),
            },
            prefix=prefix,
        )
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "auroc": MulticlassAUROC(num_classes, average="macro"),
        "precision": MulticlassPrecision(num_classes, average="macro"),
        "recall": MulticlassRecall(num_classes, average="macro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
    }
    if task == "ordinal":
        metrics["qwk"] = MulticlassCohenKappa(num_classes, weights="quadratic")
    return MetricCollection(metrics, prefix=prefix)


def ordinal_soft_targets(y: torch.Tensor, num_classes: int, scale: float = 1.0) -> torch.Tensor:
    """SORD soft labels (Diaz and Marathe, CVPR 2019): ``softmax(-scale * (k - y)^2)`` over the grades ``k``."""
    grades = torch.arange(num_classes, device=y.device, dtype=torch.float32)
    return torch.softmax(-float(scale) * (grades[None, :] - y[:, None].float()) ** 2, dim=-1)


def ensemble_of(net: nn.Module) -> Ensemble | None:
    """The :class:`train.models.Ensemble` right after the normalisation layer of ``net``, if it is one."""
    if isinstance(net, nn.Sequential) and len(net) == 2 and isinstance(net[1], Ensemble):
        return net[1]
    return None


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Class probabilities of the network's logits: one sigmoid per label (multi-label), else the softmax."""
    return logits.float().sigmoid() if task == "multilabel" else logits.float().softmax(-1)


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
        task: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if task is not None and task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        self._task_declared = task is not None
        net_cfg = {"arch": "resnet18", **(net or {})}
        self.net = build_network(
            net_cfg.pop("arch"), in_channels, num_classes, image_size, list(mean), list(std), **net_cfg
        )
        self.optimizer_cfg = {"lr": 1e-3, "weight_decay": 1e-4, "betas": (0.9, 0.999), **(optimizer or {})}
        self.scheduler_cfg = {"name": "onecycle", "pct_start": 0.15, **(scheduler or {})}
        loss_cfg = {"class_weights": None, "label_smoothing": 0.0, "ordinal_scale": 1.0, **(loss or {})}
        self.label_smoothing = float(loss_cfg["label_smoothing"])
        self.ordinal_scale = float(loss_cfg["ordinal_scale"])
        # multi-label: class_counts are the positives per label, and the weights scale each label's BCE term
        self.register_buffer("class_weights", self._class_weights(loss_cfg["class_weights"], class_counts))
        self.augment = BatchAugment(AugmentConfig(**(augment or {})))
        self.channels_last = channels_last
        self.set_task(task or default_task(num_classes))
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    def set_task(self, task: str) -> None:
        """Loss, metrics and output activation for ``task``; recorded in the hyper-parameters (the checkpoint) and
        on the network (``net.task``, which export reads to choose softmax or sigmoid)."""
        num_classes = self.hparams.num_classes
        self.task = task
        self.hparams["task"] = task
        self.net.task = task  # type: ignore[assignment]  # a plain attribute: export.onnx_export.output_task
        self.val_metrics = classification_metrics(num_classes, "val/", task)
        self.test_metrics = classification_metrics(num_classes, "test/", task)
        self.test_confusion = None if task == "multilabel" else ConfusionMatrix(task="multiclass",
                                                                                num_classes=num_classes)

    def setup(self, stage: str) -> None:
        """Take the task the data resolved (``datamodule.task``) when the module was built without one."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        task = getattr(dm, "task", "") if dm is not None else ""
        if task and not self._task_declared and task != self.task:
            self.set_task(task)
        self._task_declared = self._task_declared or bool(task)

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
        logits = logits.float()
        if self.task == "multilabel":
            target = y.float() * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
            return F.binary_cross_entropy_with_logits(logits, target, weight=self.class_weights)
        if self.task == "ordinal":
            per_sample = -(ordinal_soft_targets(y, logits.shape[-1], self.ordinal_scale) * logits.log_softmax(-1))
            per_sample = per_sample.sum(-1)
            if self.class_weights is None:
                return per_sample.mean()
            w = self.class_weights[y]
            return (per_sample * w).sum() / w.sum()
        return F.cross_entropy(logits, y, weight=self.class_weights, label_smoothing=self.label_smoothing)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        ensemble = ensemble_of(self.net)
        if ensemble is None:
            loss = self._loss(self(x), y)
        else:  # every member on its own loss: independent members, not one wide co-adapted network
            normalised = self.net[0](x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)
            loss = torch.stack([self._loss(z, y) for z in ensemble.member_logits(normalised)]).mean()
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x).float()
        self.log("val/loss", self._loss(logits, y), prog_bar=True, batch_size=len(y), sync_dist=True)
        self.val_metrics.update(probabilities(logits, self.task), y)

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute()
        self.log("val/auroc", metrics.pop("val/auroc"), prog_bar=True, sync_dist=True)
        self.log_dict(metrics, sync_dist=True)
        self.val_metrics.reset()

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x).float()
        self.log("test/loss", self._loss(logits, y), batch_size=len(y), sync_dist=True)
        probs = probabilities(logits, self.task)
        self.test_metrics.update(probs, y)
        if self.test_confusion is not None:
            self.test_confusion.update(probs, y)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=True)
        self.test_metrics.reset()

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return probabilities(self(x), self.task)

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
