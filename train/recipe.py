"""The recipe's data-dependent choices, resolved once the data is loaded, printed at the start of training and kept
in the run record (``run.json`` ``recipe``).

Each choice follows a rule stated in the config (``recipe:`` in ``conf/train.yaml``):

* **Training length** from an optimiser-step budget: ``epochs = ceil(recipe.steps / steps per epoch)``, clipped to
  ``[recipe.min_epochs, trainer.max_epochs]`` (``trainer.max_epochs`` is the ceiling, and wins over
  ``recipe.min_epochs``); ``recipe.steps: null`` trains ``trainer.max_epochs`` epochs as given. Steps per epoch are
  counted as the training DataLoader makes them (per process under DDP, ``drop_last`` when the split holds more
  than one batch, ``limit_train_batches``, gradient accumulation), so the one-cycle schedule, whose total steps
  come from ``trainer.estimated_stepping_batches``, spans exactly the resolved epochs.
* **Class weights**: ``model.loss.class_weights: auto`` becomes ``balanced`` when the largest training class
  outnumbers the smallest more than ``recipe.imbalance_ratio`` times (multi-label: positives against negatives of
  the most skewed label), else no weights.
* **Model selection**: ``recipe.monitor: auto`` picks the checkpoint and early-stopping metric by task
  (``recipe.monitor_by_task``), with ``recipe.monitor_fallback`` when the module does not log it.
* **Early stopping** cannot cut an annealing schedule short: with ``onecycle``/``cosine`` the patience is raised to
  the resolved epochs (``recipe.patience_covers_schedule``).
* **Cost**: the expected wall time, from training and evaluation throughput measured on a reference machine
  (:data:`REFERENCE`, ``python -m bench training-cost``); an estimate for that machine class only.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from train.datamodules import ImageClassificationDataModule

log = logging.getLogger(__name__)

TASKS = ("binary", "multiclass", "ordinal", "multilabel")
ANNEALING_SCHEDULES = ("onecycle", "cosine")  # schedules whose learning rate reaches its floor at the last step

# Throughput measured by `python -m bench training-cost` (median of 3 runs, 2 threads) for the default model
# (ResNet-18, base width 32, small-input stem, batch 64, EMA, flips and shifts) per precision: training images/s of a
# Lightning fit (augmentation, optimiser and EMA included) and evaluation images/s of the per-epoch validation;
# `fixed_seconds`: start-up, data checks, the best checkpoint's test, calibration and plots of the BreastMNIST run.
# The same VM measured up to 1.9x faster at another time (docs/performance.md); `python -m train experiment=breastmnist`
# took 167 s (fit 155 s) where this reference predicts 170 s. An estimate for that machine class only.
REFERENCE: dict[str, Any] = {
    "machine": "2-core Intel Xeon KVM guest (AVX512-BF16, AMX), 2 threads, torch 2.14.1",
    "measured": "2026-11-28",
    "arch": "resnet18",
    "width": 32,
    "batch_size": 64,
    "images_per_s": {
        "bf16-mixed": {"train": {28: 269.2, 64: 128.0}, "eval": {28: 988.3, 64: 462.0}},
        "32-true": {"train": {28: 199.1, 64: 35.0}, "eval": {28: 580.8, 64: 134.0}},
    },
    "fixed_seconds": 12.0,
}


@dataclass
class Recipe:
    """What the rules chose for this run, and why; ``asdict`` of it is the run record's ``recipe``."""

    task: str
    train_images: int
    batch_size: int
    world_size: int = 1
    steps_per_epoch: int = 0
    steps_budget: int | None = None
    min_epochs: int | None = None
    max_epochs: int | None = None
    epochs: int | None = None
    total_steps: int | None = None
    epochs_rule: str = ""
    class_weights: Any = None
    class_counts: list[int] = field(default_factory=list)
    imbalance_ratio: float | None = None
    imbalance_threshold: float | None = None
    class_weights_rule: str = ""
    monitor: str = "val/auroc"
    mode: str = "max"
    monitor_fallback: str | None = None
    monitor_rule: str = ""
    early_stopping_patience: int | None = None
    patience_rule: str = ""
    estimate: dict[str, Any] | None = None

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------- the rules


def train_batches(images: int, batch_size: int, world_size: int = 1, limit: int | float | None = None) -> int:
    """Training batches per epoch and process, as the project's DataLoader makes them: ``drop_last`` when the split
    holds more than one batch, every process ``ceil(images / world_size)`` samples (DistributedSampler), then
    Lightning's ``limit_train_batches`` (an int caps the count, a float takes that fraction)."""
    per_rank = math.ceil(images / max(world_size, 1))
    batches = per_rank // batch_size if images > batch_size else math.ceil(per_rank / batch_size)
    if isinstance(limit, float) and limit != 1.0:
        batches = int(batches * limit)
    elif isinstance(limit, int) and not isinstance(limit, bool):
        batches = min(batches, limit)
    return max(batches, 1)


def resolve_epochs(steps: int | None, steps_per_epoch: int, min_epochs: int | None, max_epochs: int
                   ) -> tuple[int, str]:
    """Epochs from an optimiser-step budget, clipped to ``[min_epochs, max_epochs]`` (``max_epochs`` wins)."""
    if not steps:
        return max_epochs, f"fixed: trainer.max_epochs={max_epochs} (recipe.steps is null)"
    wanted = math.ceil(steps / steps_per_epoch)
    epochs = min(max(wanted, min_epochs or 1), max_epochs)
    why = f"ceil({steps} steps / {steps_per_epoch} steps per epoch) = {wanted}"
    if epochs != wanted:
        bound = "trainer.max_epochs" if epochs == max_epochs and wanted > max_epochs else "recipe.min_epochs"
        why += f", clipped to {bound}={epochs}"
    return epochs, why


def imbalance(counts: list[int], images: int, task: str) -> float:
    """Largest over smallest training class count (a class without images: infinite); multi-label: the largest
    ratio of negatives to positives (or positives to negatives) over the labels."""
    if task == "multilabel":
        ratios = [max(p, images - p) / min(p, images - p) if min(p, images - p) else math.inf for p in counts]
        return max(ratios, default=1.0)
    if not counts:
        return 1.0
    return max(counts) / min(counts) if min(counts) else math.inf


def resolve_class_weights(spec: Any, counts: list[int], images: int, task: str, threshold: float
                          ) -> tuple[Any, float, str]:
    """``auto``: ``balanced`` when the imbalance ratio exceeds ``threshold``, else ``None``; anything else as given.
    Returns (the module's ``loss.class_weights``, the ratio, why)."""
    ratio = imbalance(counts, images, task)
    shown = "inf (a class has no training images)" if math.isinf(ratio) else f"{ratio:.2f}"
    if spec != "auto":
        return spec, ratio, f"as configured (model.loss.class_weights={spec}); class ratio {shown}"
    if ratio > threshold:
        return "balanced", ratio, f"auto: class ratio {shown} > {threshold:g}: balanced weights"
    return None, ratio, f"auto: class ratio {shown} <= {threshold:g}: unweighted"


def resolve_monitor(recipe_cfg: dict[str, Any], task: str) -> tuple[str, str, str]:
    """(metric, mode, why): ``recipe.monitor`` as given, or for ``auto`` the task's metric from ``monitor_by_task``;
    mode ``auto`` is ``min`` for a loss, else ``max``."""
    spec = recipe_cfg.get("monitor") or "auto"
    if spec == "auto":
        by_task = recipe_cfg.get("monitor_by_task") or {}
        monitor = by_task.get(task) or recipe_cfg.get("monitor_fallback") or "val/auroc"
        why = f"auto: {task} task -> {monitor}"
    else:
        monitor, why = str(spec), f"as configured (recipe.monitor={spec})"
    mode = recipe_cfg.get("mode") or "auto"
    if mode == "auto":
        mode = "min" if "loss" in monitor.rpartition("/")[2] else "max"
    return monitor, str(mode), why


def resolve_patience(patience: int | None, epochs: int, scheduler: str | None, covers_schedule: bool
                     ) -> tuple[int | None, str]:
    """Early-stopping patience: raised to ``epochs`` under an annealing schedule (one-cycle, cosine) when
    ``covers_schedule``, so early stopping never ends a run in the schedule's high-learning-rate phase."""
    if patience is None:
        return None, "no early stopping"
    if covers_schedule and scheduler in ANNEALING_SCHEDULES and patience < epochs:
        return epochs, f"{patience} raised to the {epochs} epochs: the {scheduler} schedule anneals to the last step"
    return patience, f"{patience} as configured"


# ------------------------------------------------------------------------------------------------- the cost


def _interpolate(table: dict[int, float], size: int) -> float | None:
    """Images/s at ``size`` px from measured sizes, log-log between the two nearest (``None`` outside them)."""
    known = sorted((int(k), float(v)) for k, v in table.items() if v)
    if not known or not known[0][0] <= size <= known[-1][0]:
        return None
    for (s0, v0), (s1, v1) in zip(known, known[1:], strict=False):
        if s0 <= size <= s1:
            t = 0.0 if s1 == s0 else math.log(size / s0) / math.log(s1 / s0)
            return math.exp(math.log(v0) + t * (math.log(v1) - math.log(v0)))
    return known[0][1]


def estimate_cost(*, arch: str, width: int | None, size: int, cpu: bool, precision: str, epochs: int,
                  total_steps: int, batch_size: int, val_images: int, reference: dict[str, Any] = REFERENCE,
                  members: int = 1, views: int = 1) -> dict[str, Any]:
    """Expected wall time of the fit on the reference machine class, or why there is no estimate. An ensemble
    (``members``, ``views`` test-time views) costs ``members`` times the training and ``members x views`` times
    the validation of one network."""
    measured = reference["images_per_s"]
    sizes = sorted({int(s) for p in measured.values() for s in p["train"]})
    where = (f"measured for {reference['arch']} width {reference['width']} at {'/'.join(map(str, sizes))} px, "
             f"{' or '.join(measured)}, on a CPU")
    if not cpu:
        return {"seconds": None, "why": f"no estimate on an accelerator ({where})"}
    if arch != reference["arch"] or width != reference["width"] or precision not in measured:
        return {"seconds": None, "why": f"no estimate for {arch} width {width} {precision} ({where})"}
    train_ips = _interpolate(measured[precision]["train"], size)
    eval_ips = _interpolate(measured[precision]["eval"], size)
    if not train_ips or not eval_ips:
        return {"seconds": None, "why": f"no estimate at {size} px ({where})"}
    train_ips, eval_ips = train_ips / members, eval_ips / (members * views)
    train_s = total_steps * batch_size / train_ips
    val_s = epochs * val_images / eval_ips
    fixed = float(reference.get("fixed_seconds") or 0.0)
    seconds = train_s + val_s + fixed
    return {"seconds": round(seconds), "train_seconds": round(train_s), "val_seconds": round(val_s),
            "train_images_per_s": round(train_ips, 1), "eval_images_per_s": round(eval_ips, 1),
            "machine": reference["machine"],
            "why": f"estimate for a {reference['machine']}: {total_steps} steps x {batch_size} images at "
                   f"{train_ips:.0f} images/s + {epochs} validations of {val_images} images at {eval_ips:.0f}/s + "
                   f"{fixed:.0f} s start-up, test and calibration"}


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 600:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------------------------------------ resolving a run


def data_task(dm: ImageClassificationDataModule) -> str:
    """The data's task: the DataModule's resolved ``task`` where it has one, else binary or multi-class by count."""
    task = str(getattr(dm, "task", "") or "")
    return task if task in TASKS else ("binary" if dm.num_classes == 2 else "multiclass")


def recipe_settings(cfg: DictConfig) -> dict[str, Any]:
    settings = OmegaConf.to_container(cfg.get("recipe") or OmegaConf.create({}), resolve=True)
    assert isinstance(settings, dict)
    return settings


def plan(cfg: DictConfig, dm: ImageClassificationDataModule) -> Recipe:
    """The choices the data decides before the trainer exists: task, class weights, the monitored metric."""
    settings = recipe_settings(cfg)
    task = data_task(dm)
    images = len(dm.datasets["train"])
    counts = [int(c) for c in dm.class_counts("train")]
    threshold = float(settings.get("imbalance_ratio", 3.0))
    spec = OmegaConf.select(cfg, "model.loss.class_weights", default=None)
    spec = OmegaConf.to_container(spec) if OmegaConf.is_config(spec) else spec
    weights, ratio, weights_why = resolve_class_weights(spec, counts, images, task, threshold)
    monitor, mode, monitor_why = resolve_monitor(settings, task)
    fallback = settings.get("monitor_fallback")
    if fallback and fallback != monitor:
        monitor_why += f" ({fallback} if the module does not log it)"
    return Recipe(task=task, train_images=images, batch_size=int(dm.batch_size), class_weights=weights,
                  class_counts=counts, imbalance_ratio=None if math.isinf(ratio) else round(ratio, 3),
                  imbalance_threshold=threshold, class_weights_rule=weights_why, monitor=monitor, mode=mode,
                  monitor_fallback=fallback if fallback != monitor else None, monitor_rule=monitor_why)


def fit_length(recipe: Recipe, cfg: DictConfig, trainer: Any, dm: ImageClassificationDataModule) -> Recipe:
    """Epochs from the step budget on the built trainer (its processes, batch limits and accumulation), set as the
    trainer's ``max_epochs``; the early-stopping patience that goes with them; the cost estimate."""
    settings = recipe_settings(cfg)
    if trainer.fast_dev_run:
        recipe.epochs_rule = "fast_dev_run: one batch of each split"
        return recipe
    recipe.world_size = int(trainer.world_size)
    batches = train_batches(recipe.train_images, recipe.batch_size, recipe.world_size, trainer.limit_train_batches)
    recipe.steps_per_epoch = math.ceil(batches / max(int(trainer.accumulate_grad_batches), 1))
    cap = cfg.trainer.get("max_epochs")
    recipe.steps_budget, recipe.min_epochs = settings.get("steps"), settings.get("min_epochs")
    recipe.max_epochs = cap
    if cap is None and not recipe.steps_budget:
        recipe.epochs_rule = "Lightning's default (trainer.max_epochs and recipe.steps are null)"
        return recipe
    recipe.epochs, recipe.epochs_rule = resolve_epochs(recipe.steps_budget, recipe.steps_per_epoch,
                                                       recipe.min_epochs, cap if cap is not None else 10**9)
    trainer.fit_loop.max_epochs = recipe.epochs
    recipe.total_steps = recipe.epochs * recipe.steps_per_epoch
    if trainer.max_steps not in (None, -1):
        recipe.total_steps = min(recipe.total_steps, int(trainer.max_steps))
    scheduler = OmegaConf.select(cfg, "model.scheduler.name", default=None)
    for cb in trainer.callbacks:
        if isinstance(cb, EarlyStopping):
            patience, recipe.patience_rule = resolve_patience(int(cb.patience), recipe.epochs, scheduler,
                                                              bool(settings.get("patience_covers_schedule", True)))
            cb.patience = recipe.early_stopping_patience = patience
    net = OmegaConf.select(cfg, "model.net", default={}) or {}
    recipe.estimate = estimate_cost(
        arch=str(net.get("arch")), width=net.get("width"), size=int(dm.image_size),
        cpu=isinstance(trainer.accelerator, CPUAccelerator), precision=str(trainer.precision),
        epochs=recipe.epochs, total_steps=recipe.total_steps, batch_size=recipe.batch_size,
        val_images=len(dm.datasets["val"]), members=int(net.get("members") or 1),
        views=1 if (net.get("tta") or "none") == "none" else 2)
    return recipe


# ---------------------------------------------------------------------------------------------- reporting


def print_recipe(recipe: Recipe, console: Console | None = None) -> None:
    """The recipe's choices as a table, at the start of training (160 columns wide in a log file)."""
    if console is None:
        console = Console()
        console = console if console.is_terminal else Console(width=160)
    table = Table(title=f"recipe: {recipe.task} task, {recipe.train_images} training images", show_header=True)
    table.add_column("choice")
    table.add_column("value", justify="right")
    table.add_column("why")
    table.add_row("steps per epoch", str(recipe.steps_per_epoch),
                  f"{recipe.train_images} images / batch {recipe.batch_size}"
                  + (f" / {recipe.world_size} processes" if recipe.world_size > 1 else ""))
    table.add_row("epochs", str(recipe.epochs), recipe.epochs_rule)
    table.add_row("optimiser steps", str(recipe.total_steps), "the learning-rate schedule spans them "
                  "(trainer.estimated_stepping_batches)")
    table.add_row("class weights", str(recipe.class_weights or "none"), recipe.class_weights_rule)
    table.add_row("model selection", f"{recipe.monitor} ({recipe.mode})", recipe.monitor_rule)
    table.add_row("early-stopping patience", str(recipe.early_stopping_patience or "-"), recipe.patience_rule)
    estimate = recipe.estimate or {}
    table.add_row("estimated wall time", fmt_duration(estimate.get("seconds")), estimate.get("why", ""))
    console.print(table)


def name_checkpoints_by(callback: ModelCheckpoint, monitor: str) -> None:
    """A checkpoint file name that shows the metric it was chosen by: the config's ``epochNNN-auroc{val/auroc}``
    becomes ``epochNNN-qwk{val/qwk}`` when the recipe monitors ``val/qwk`` (other file name patterns are kept)."""
    name = callback.filename or ""
    match = re.search(r"(\w+)\{(val/\w+)(:[^}]*)?\}", name)
    if match and match.group(2) != monitor:
        tag = monitor.rpartition("/")[2]
        callback.filename = name[:match.start()] + f"{tag}{{{monitor}{match.group(3) or ''}}}" + name[match.end():]


class MonitorFallback(Callback):
    """After the first validation: a checkpoint or early-stopping monitor the module does not log (e.g. ``val/qwk``
    before the module logs it) is switched to ``fallback``, with a warning; :attr:`used` says whether it was."""

    def __init__(self, fallback: str) -> None:
        self.fallback = fallback
        self.checked = False
        self.used: str | None = None  # the metric that was missing

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or self.checked:
            return
        self.checked = True
        metrics = trainer.callback_metrics
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint | EarlyStopping) and cb.monitor and cb.monitor not in metrics \
                    and self.fallback in metrics and cb.mode == "max":
                log.warning("%s is not logged by this module: %s monitors %s instead", cb.monitor,
                            type(cb).__name__, self.fallback)
                self.used = cb.monitor
                cb.monitor = self.fallback
                if isinstance(cb, ModelCheckpoint):
                    name_checkpoints_by(cb, self.fallback)


def note_fallback(record: dict[str, Any], trainer: Any) -> None:
    """Into the run record's ``recipe``: the metric actually monitored when :class:`MonitorFallback` switched it."""
    fallback = next((c for c in trainer.callbacks if isinstance(c, MonitorFallback)), None)
    if fallback is not None and fallback.used and isinstance(record.get("recipe"), dict):
        record["recipe"]["monitor_rule"] += f"; {fallback.used} was not logged: {fallback.fallback} used instead"
        record["recipe"]["monitor"] = fallback.fallback
