"""The recipe's data-dependent defaults (train/recipe.py): the rules one by one, the BreastMNIST default resolved from
the real config and data (32 epochs, no class weights, val/auroc, the BatchNorm-aware EMA), and one real CLI run where
the rules bite (an imbalanced split gets balanced weights, an unlogged monitor falls back to val/auroc)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import FAST, REPO, run_cli, write_medmnist
from train.recipe import (
    REFERENCE,
    estimate_cost,
    fmt_duration,
    imbalance,
    plan,
    resolve_class_weights,
    resolve_epochs,
    resolve_monitor,
    resolve_patience,
    train_batches,
)

# -- the rules ----------------------------------------------------------------------------------------------------


def test_steps_per_epoch_count_like_the_dataloader() -> None:
    assert train_batches(546, 64) == 8  # BreastMNIST: 8 full batches, the last 34 images dropped
    assert train_batches(5000, 64) == 78 and train_batches(50000, 64) == 781
    assert train_batches(546, 64, world_size=2) == 4  # DDP: 273 images per process
    assert train_batches(40, 64) == 1  # fewer images than a batch: one partial batch, not dropped
    assert train_batches(546, 64, limit=2) == 2 and train_batches(546, 64, limit=0.5) == 4
    assert train_batches(546, 64, limit=1.0) == 8


@pytest.mark.parametrize(("steps", "per_epoch", "low", "cap", "epochs", "why"), [
    (640, 8, 10, 80, 80, "= 80"),  # BreastMNIST at 640 steps (experiment=breastmnist before 2026-11-28)
    (640, 8, 10, 30, 30, "clipped to trainer.max_epochs=30"),  # the default trainer's ceiling
    (640, 78, 10, 30, 10, "clipped to recipe.min_epochs=10"),  # 5,000 images: 9 epochs -> at least 10
    (640, 781, 10, 30, 10, "clipped to recipe.min_epochs=10"),  # 50,000 images
    (640, 17, 10, 80, 38, "= 38"),  # BreastMNIST at batch 32
    (640, 3, 10, 2, 2, "clipped to trainer.max_epochs=2"),  # an explicit short run wins over min_epochs
    (None, 8, 10, 30, 30, "fixed"),
])
def test_epochs_from_the_step_budget(steps: int | None, per_epoch: int, low: int, cap: int, epochs: int,
                                     why: str) -> None:
    got, reason = resolve_epochs(steps, per_epoch, low, cap)
    assert got == epochs and why in reason


def test_class_weights_auto_by_the_imbalance_ratio() -> None:
    weights, ratio, why = resolve_class_weights("auto", [147, 399], 546, "binary", 3.0)  # BreastMNIST
    assert weights is None and ratio == pytest.approx(399 / 147) and "2.71 <= 3" in why
    weights, ratio, why = resolve_class_weights("auto", [100, 20, 400], 520, "multiclass", 3.0)
    assert weights == "balanced" and ratio == 20 and "20.00 > 3" in why
    weights, ratio, _ = resolve_class_weights("auto", [0, 5, 10], 15, "multiclass", 3.0)
    assert weights == "balanced" and math.isinf(ratio)
    assert resolve_class_weights(None, [10, 100], 110, "binary", 3.0)[0] is None  # explicit: as configured
    assert resolve_class_weights([1.0, 2.0], [10, 100], 110, "binary", 3.0)[0] == [1.0, 2.0]
    # multi-label: positives against negatives of the most skewed label (5 of 100 -> 19)
    assert imbalance([50, 5], 100, "multilabel") == pytest.approx(19.0)
    assert resolve_class_weights("auto", [50, 40], 100, "multilabel", 3.0)[0] is None


def test_monitor_by_task_with_a_stated_mode() -> None:
    settings = OmegaConf.to_container(compose_cfg().recipe)
    assert isinstance(settings, dict)
    assert resolve_monitor(settings, "binary")[:2] == ("val/auroc", "max")
    assert resolve_monitor(settings, "multiclass")[:2] == ("val/auroc", "max")
    assert resolve_monitor(settings, "multilabel")[:2] == ("val/auroc", "max")
    assert resolve_monitor(settings, "ordinal")[:2] == ("val/qwk", "max")
    assert resolve_monitor({**settings, "monitor": "val/loss"}, "binary")[:2] == ("val/loss", "min")


def test_early_stopping_cannot_cut_an_annealing_schedule() -> None:
    assert resolve_patience(30, 80, "onecycle", True)[0] == 80
    assert resolve_patience(30, 80, "cosine", True)[0] == 80
    assert resolve_patience(30, 80, "none", True)[0] == 30
    assert resolve_patience(30, 80, "onecycle", False)[0] == 30
    assert resolve_patience(100, 80, "onecycle", True)[0] == 100


def test_cost_estimate_only_for_the_measured_setting() -> None:
    reference = {**REFERENCE, "fixed_seconds": 10.0, "images_per_s": {
        "bf16-mixed": {"train": {28: 400.0, 64: 100.0}, "eval": {28: 1600.0, 64: 400.0}}}}
    common = {"arch": "resnet18", "width": 32, "cpu": True, "precision": "bf16-mixed", "epochs": 80,
              "total_steps": 640, "batch_size": 64, "val_images": 80, "reference": reference}
    est = estimate_cost(size=28, **common)
    assert est["seconds"] == round(640 * 64 / 400 + 80 * 80 / 1600 + 10)
    assert est["train_images_per_s"] == 400.0 and "estimate for a" in est["why"]
    mid = estimate_cost(size=42, **common)
    assert 100 < mid["train_images_per_s"] < 400  # log-log between the measured sizes
    assert estimate_cost(size=224, **common)["seconds"] is None
    assert estimate_cost(size=28, **{**common, "width": 64})["seconds"] is None
    assert estimate_cost(size=28, **{**common, "cpu": False})["seconds"] is None
    assert estimate_cost(size=28, **{**common, "precision": "32-true"})["seconds"] is None
    ensemble = estimate_cost(size=28, **common, members=3, views=2)  # 3 members train 3x, validate 6x
    assert ensemble["seconds"] == round(3 * 640 * 64 / 400 + 6 * 80 * 80 / 1600 + 10)
    assert fmt_duration(None) == "-" and fmt_duration(90) == "90 s" and fmt_duration(600) == "10 min"
    assert fmt_duration(3 * 3600) == "3.0 h"


def test_ordinal_data_selects_on_quadratic_weighted_kappa() -> None:
    """plan() on a stand-in DataModule of an ordinal task (the DataModule resolves ``data.task``)."""
    dm = SimpleNamespace(task="ordinal", num_classes=5, batch_size=64, datasets={"train": list(range(1080))},
                         class_counts=lambda split: [486, 128, 206, 194, 66])
    recipe = plan(compose_cfg(), dm)  # type: ignore[arg-type]
    assert recipe.task == "ordinal" and recipe.monitor == "val/qwk" and recipe.mode == "max"
    assert recipe.monitor_fallback == "val/auroc"
    assert recipe.class_weights == "balanced" and recipe.imbalance_ratio == pytest.approx(486 / 66, abs=1e-3)


# -- the BreastMNIST default, resolved from the real config and data (no training) ------------------------------


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def resolved(tmp_path: Path, *overrides: str):
    from train.fit import build_trainer, prepare_data
    from train.recipe import fit_length

    cfg = compose_cfg(f"paths.root_dir={REPO}", f"paths.output_dir={tmp_path}", "logger=none",
                      "callbacks.model_summary=null", *overrides)
    dm, _ = prepare_data(cfg, tmp_path)
    recipe = plan(cfg, dm)
    trainer, _ = build_trainer(cfg, [], recipe)
    fit_length(recipe, cfg, trainer, dm)
    return recipe, trainer


def test_breastmnist_default_recipe(tmp_path: Path) -> None:
    """experiment=breastmnist: 546 images / batch 64 = 8 steps, 256 steps -> 32 epochs; 399:147 = 2.7: no weights."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    recipe, trainer = resolved(tmp_path, "experiment=breastmnist")
    assert (recipe.train_images, recipe.steps_per_epoch, recipe.epochs, recipe.total_steps) == (546, 8, 32, 256)
    assert trainer.max_epochs == 32
    assert recipe.class_weights is None and recipe.imbalance_ratio == pytest.approx(2.714, abs=1e-3)
    assert recipe.monitor == "val/auroc" and recipe.mode == "max" and recipe.monitor_fallback is None
    assert recipe.early_stopping_patience == 32
    checkpoint = next(c for c in trainer.callbacks if isinstance(c, ModelCheckpoint))
    stopping = next(c for c in trainer.callbacks if isinstance(c, EarlyStopping))
    assert checkpoint.monitor == "val/auroc" and checkpoint.mode == "max"
    assert checkpoint.filename == "epoch{epoch:03d}-auroc{val/auroc:.4f}"  # named by the metric it selects on
    assert stopping.monitor == "val/auroc" and stopping.patience == 32
    assert any(type(c).__name__ == "BatchNormEMA" for c in trainer.callbacks)
    record = json.loads(json.dumps(recipe.as_record()))  # JSON-safe, as run.json stores it
    assert record["epochs_rule"] == "ceil(256 steps / 8 steps per epoch) = 32"


def test_the_plain_default_keeps_its_ceiling_and_batch_size_changes_the_epochs(tmp_path: Path) -> None:
    recipe, trainer = resolved(tmp_path)  # no experiment: trainer.max_epochs 30 is the ceiling
    assert recipe.epochs == 30 == trainer.max_epochs and "clipped to trainer.max_epochs=30" in recipe.epochs_rule
    recipe, trainer = resolved(tmp_path, "experiment=breastmnist", "data.batch_size=32")
    assert (recipe.steps_per_epoch, recipe.epochs, trainer.max_epochs) == (17, 16, 16)
    recipe, trainer = resolved(tmp_path, "experiment=breastmnist", "recipe.steps=null", "trainer.max_epochs=12")
    assert recipe.epochs == 12 == trainer.max_epochs and recipe.epochs_rule.startswith("fixed")


# -- a real run where the rules bite ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BreastMNIST with 30 malignant against 300 benign training images (10:1)."""
    src = np.load(REPO / "data" / "breastmnist.npz")
    labels = src["train_labels"].reshape(-1)
    keep = np.sort(np.concatenate([np.flatnonzero(labels == 0)[:30], np.flatnonzero(labels == 1)[:300]]))
    splits = {"train": (src["train_images"][keep], labels[keep])}
    for split in ("val", "test"):
        splits[split] = (src[f"{split}_images"], src[f"{split}_labels"].reshape(-1))
    return write_medmnist(tmp_path_factory.mktemp("data") / "imbalanced.npz", splits)


def test_a_real_run_records_and_applies_the_recipe(tmp_path: Path, imbalanced: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(*FAST, f"data.path={imbalanced}", "data.md5=false", "trainer.max_epochs=2",
                   "++trainer.limit_train_batches=3", "recipe.monitor_by_task.binary=val/not_logged",
                   run_dir=run_dir)
    assert "recipe: binary task, 330 training images" in proc.stdout  # printed at the start
    record = json.loads((run_dir / "run.json").read_text())
    recipe = record["recipe"]
    assert recipe["class_weights"] == "balanced" and recipe["imbalance_ratio"] == 10.0
    assert "10.00 > 3: balanced" in recipe["class_weights_rule"]
    assert (recipe["steps_per_epoch"], recipe["epochs"], recipe["total_steps"]) == (3, 2, 6)
    assert record["epochs"] == 2 and record["global_step"] == 6 and record["trainer"]["max_epochs"] == 2
    # the unlogged metric fell back to val/auroc, for the checkpoint and in the record
    assert recipe["monitor"] == "val/auroc" and "val/not_logged was not logged" in recipe["monitor_rule"]
    assert record["checkpoints"]["monitor"] == "val/auroc" and record["checkpoints"]["best"]
    assert record["status"] == "completed"
    # the module trained with balanced weights: n / (classes x count)
    ckpt = torch.load(record["checkpoints"]["best"], map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["loss"]["class_weights"] == "balanced"
    np.testing.assert_allclose(ckpt["state_dict"]["class_weights"].numpy(), [330 / 60, 330 / 600], rtol=1e-6)
