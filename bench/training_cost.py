"""Case training-cost: what training costs on this machine, and what a 5,000- or 50,000-image dataset will take.

A real Lightning fit of the default model (``experiment=breastmnist``: ResNet-18 at base width 32 with the
small-input stem, batch 64, one-cycle AdamW, flips and shifts, EMA of the weights, channels_last) on BreastMNIST,
resized to each ``--sizes`` (28 px as shipped, larger by bilinear interpolation: the speed does not depend on the
pixels), in each precision (``auto``: what ``precision: auto`` picks on this machine, bf16-mixed on CPUs with
AVX512-BF16/AMX; and float32). One untimed epoch first (kernel selection, allocator), then ``epochs`` timed epochs,
each with its validation; ``repeats`` runs, medians over them.

* training images/s: optimiser steps x batch over the time from an epoch's start to its last training batch's end
  (data, augmentation, forward, backward, AdamW, EMA and Lightning's bookkeeping);
* evaluation images/s: the validation split over the validation loop's time (EMA weights swapped in and out).

From these, the wall time :mod:`train.recipe` expects for a dataset of N training images under its step-budget
rule (``recipe.steps`` 640, ``recipe.min_epochs`` 10, ``trainer.max_epochs`` 30 by default, 80 in
``experiment=breastmnist``), a validation split of N/7 (BreastMNIST's 546:78) checked every epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import common

DATA = Path(__file__).resolve().parent.parent / "data" / "breastmnist.npz"


@dataclass
class TrainingCostConfig:
    arch: str = "resnet18"
    width: int = 32
    data: str = str(DATA)
    sizes: list[int] = field(default_factory=lambda: [28, 64])
    precisions: list[str] = field(default_factory=lambda: ["auto", "32-true"])
    batch_size: int = 64
    images: int = 0  # training images per epoch (0: the whole train split)
    epochs: int = 2  # timed epochs per run, after one untimed epoch
    repeats: int = 3
    threads: int = 1
    datasets: list[int] = field(default_factory=lambda: [546, 5000, 50000])  # training images, for the estimates
    steps: int = 640  # the step budget (conf/train.yaml recipe.steps)
    min_epochs: int = 10
    max_epochs: list[int] = field(default_factory=lambda: [80])  # ceilings: experiment=breastmnist's (the default: 30)

    @classmethod
    def quick(cls, threads: int) -> TrainingCostConfig:
        return cls(sizes=[28], precisions=["32-true"], batch_size=16, images=32, epochs=1, repeats=1, threads=threads)


class _Timer:
    """Lightning callback: per epoch, the training part (start to the last training batch) and the validation loop."""

    def __init__(self) -> None:
        self.epoch_start = self.last_batch_end = self.val_start = 0.0
        self.train_seconds: list[float] = []
        self.val_seconds: list[float] = []
        self.steps: list[int] = []
        self._steps = 0

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        self.epoch_start = self.last_batch_end = time.perf_counter()
        self._steps = 0

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.last_batch_end = time.perf_counter()
        self._steps += 1

    def on_validation_epoch_start(self, trainer: Any, module: Any) -> None:
        if not trainer.sanity_checking:
            self.train_seconds.append(self.last_batch_end - self.epoch_start)
            self.steps.append(self._steps)
            self.val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: Any, module: Any) -> None:
        if not trainer.sanity_checking:
            self.val_seconds.append(time.perf_counter() - self.val_start)


def _callback() -> Any:
    import lightning as L

    class Timer(_Timer, L.Callback):
        pass

    return Timer()


def _data(cfg: TrainingCostConfig, size: int) -> dict[str, Any]:
    """BreastMNIST train and val at ``size`` px (uint8 N x H x W x C), as the DataModule's datasets."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from medops.datasets import channel_stats, load_medmnist_npz
    from train.datamodules.base import ArrayDataset

    data = load_medmnist_npz(cfg.data)
    out: dict[str, Any] = {"classes": len(data.class_names)}
    for split in ("train", "val"):
        images, labels = data.images[split], data.labels[split]
        if split == "train" and cfg.images:
            images, labels = images[: cfg.images], labels[: cfg.images]
        if images.shape[1] != size:
            t = torch.from_numpy(images).permute(0, 3, 1, 2).float()
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
            images = t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        out[split] = ArrayDataset(np.ascontiguousarray(images), labels)
        if split == "train":
            out["mean"], out["std"] = channel_stats(images)
            out["channels"] = int(images.shape[-1])
    return out


def measure(cfg: TrainingCostConfig, size: int, precision: str, data: dict[str, Any]) -> dict[str, float]:
    """One run: a fit of 1 + ``epochs`` epochs; training and evaluation images/s of the timed epochs."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import EMAWeightAveraging
    from torch.utils.data import DataLoader

    from train.module import ClassificationModule

    torch.manual_seed(0)
    module = ClassificationModule(
        num_classes=data["classes"], in_channels=data["channels"], image_size=size, mean=data["mean"],
        std=data["std"], net={"arch": cfg.arch, "width": cfg.width}, optimizer={"lr": 0.002},
        augment={"hflip": 0.5, "translate": 0.1}, channels_last=True)
    train = DataLoader(data["train"], batch_size=cfg.batch_size, shuffle=True,
                       drop_last=len(data["train"]) > cfg.batch_size, generator=torch.Generator().manual_seed(0))
    val = DataLoader(data["val"], batch_size=cfg.batch_size)
    timer = _callback()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1 + cfg.epochs, precision=precision,  # type: ignore[arg-type]
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[timer, EMAWeightAveraging(decay=0.99)])
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    steps, train_s, val_s = timer.steps[1:], timer.train_seconds[1:], timer.val_seconds[1:]
    return {"train_images_per_s": sum(steps) * cfg.batch_size / sum(train_s),
            "eval_images_per_s": len(timer.val_seconds[1:]) * len(data["val"]) / sum(val_s),
            "epoch_train_seconds": common.median(train_s), "epoch_val_seconds": common.median(val_s),
            "steps_per_epoch": steps[0]}


def estimates(cfg: TrainingCostConfig, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Expected fit wall time per dataset size, image size, precision and epoch ceiling under the step-budget rule."""
    from train.recipe import resolve_epochs, train_batches

    out = []
    for row in rows:
        for n in cfg.datasets:
            for cap in cfg.max_epochs:
                per_epoch = train_batches(n, cfg.batch_size)
                epochs, why = resolve_epochs(cfg.steps, per_epoch, cfg.min_epochs, cap)
                val = math.ceil(n / 7)
                train_s = epochs * per_epoch * cfg.batch_size / row["train_images_per_s"]
                val_s = epochs * val / row["eval_images_per_s"]
                out.append({"size": row["size"], "precision": row["precision"], "train_images": n,
                            "val_images": val, "max_epochs": cap, "steps_per_epoch": per_epoch, "epochs": epochs,
                            "steps": epochs * per_epoch, "rule": why, "train_seconds": train_s, "val_seconds": val_s,
                            "seconds": train_s + val_s})
    return out


def run(cfg: TrainingCostConfig, out_dir: Path, info: dict[str, Any],
        log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    from train.fit import choose_precision

    started = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    rows = []
    for size in cfg.sizes:
        data = _data(cfg, size)
        for asked in cfg.precisions:
            precision = str(choose_precision(asked, "cpu"))
            runs = []
            for rep in range(cfg.repeats):
                r = measure(cfg, size, precision, data)
                runs.append(r)
                log(f"run {rep + 1}/{cfg.repeats} {size} px {precision}: train {r['train_images_per_s']:.1f} "
                    f"images/s, eval {r['eval_images_per_s']:.1f} images/s")
            row: dict[str, Any] = {"size": size, "precision": precision, "asked": asked, "runs": len(runs),
                                   "train_images": len(data["train"]), "val_images": len(data["val"])}
            for key in ("train_images_per_s", "eval_images_per_s", "epoch_train_seconds", "epoch_val_seconds"):
                row[key] = common.median([r[key] for r in runs])
                row[f"{key}_runs"] = [r[key] for r in runs]
            row["steps_per_epoch"] = runs[0]["steps_per_epoch"]
            rows.append(row)
    from train.models import build_network

    flops = {size: common.count_flops(build_network(cfg.arch, 1, 2, size, [0.5], [0.25], width=cfg.width),
                                      (1, size, size)) for size in cfg.sizes}
    return {
        **common.header("training-cost", info, asdict(cfg)),
        "flops_per_image_forward": flops,
        "rows": rows,
        "estimates": estimates(cfg, rows),
        "seconds": time.perf_counter() - started,
    }


# -- tables and chart (registered with bench.report when this module is imported) ---------------------------------
def _duration(seconds: float) -> str:
    from train.recipe import fmt_duration

    return fmt_duration(seconds)


def cost_table(result: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.table import Table

    cfg = result["config"]
    speed = Table(title=f"Training cost ({cfg['arch']} width {cfg['width']}, batch {cfg['batch_size']}, EMA, "
                        f"one-cycle AdamW, flips and shifts): median of {cfg['repeats']} runs of {cfg['epochs']} "
                        "timed epochs")
    for col in ("px", "precision", "train images/s", "eval images/s", "epoch (train)", "validation", "GFLOP/img"):
        speed.add_column(col, justify="left" if col == "precision" else "right")
    flops = {str(k): v for k, v in result["flops_per_image_forward"].items()}
    for r in result["rows"]:
        speed.add_row(str(r["size"]), r["precision"], f"{r['train_images_per_s']:.1f}", f"{r['eval_images_per_s']:.1f}",
                      f"{r['epoch_train_seconds']:.2f} s ({r['steps_per_epoch']} steps)",
                      f"{r['epoch_val_seconds']:.2f} s ({r['val_images']} img)", f"{flops[str(r['size'])] / 1e9:.2f}")
    wall = Table(title=f"Expected fit time: step budget {cfg['steps']}, at least {cfg['min_epochs']} epochs, at most "
                       "trainer.max_epochs; validation split N/7 every epoch (test, calibration and start-up extra)")
    for col in ("training images", "px", "precision", "max_epochs", "steps/epoch", "epochs", "steps", "fit time"):
        wall.add_column(col, justify="left" if col == "precision" else "right")
    for e in result["estimates"]:
        wall.add_row(f"{e['train_images']:,}", str(e["size"]), e["precision"], str(e["max_epochs"]),
                     str(e["steps_per_epoch"]), str(e["epochs"]), str(e["steps"]), _duration(e["seconds"]))
    return Group(speed, wall)


def cost_chart(result: dict[str, Any], path: Path) -> Path:
    from bench import report

    rows = result["rows"]
    fig, axes = report._figure(2, width=5.5)
    groups = [f"{r['size']} px\n{r['precision']}" for r in rows]
    report._bars(axes[0], groups, {"training": [r["train_images_per_s"] for r in rows],
                                   "evaluation": [r["eval_images_per_s"] for r in rows]}, "images/s", log=True)
    cap = max(result["config"]["max_epochs"])
    shown = [e for e in result["estimates"] if e["max_epochs"] == cap]
    sizes = sorted({e["train_images"] for e in shown})
    series = {f"{r['size']} px {r['precision']}": [
        next(e["seconds"] / 60 for e in shown if e["train_images"] == n and e["size"] == r["size"]
             and e["precision"] == r["precision"]) for n in sizes] for r in rows}
    report._bars(axes[1], [f"{n:,} images" for n in sizes], series, f"expected fit minutes (max_epochs {cap})",
                 log=True)
    return report._save(fig, path, result["machine_line"])


def _register() -> None:
    from bench import report

    report.TABLES.setdefault("training-cost", cost_table)
    report.CHARTS.setdefault("training-cost", cost_chart)


_register()
