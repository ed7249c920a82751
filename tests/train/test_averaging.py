"""train.averaging: the EMA of the weights whose BatchNorm statistics are re-estimated for the averaged weights."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import run_cli
from train.averaging import recalibrate_batchnorm
from train.datamodules.base import ArrayDataset
from train.module import ClassificationModule


class _Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 3, 3),
                                  nn.BatchNorm2d(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_recalibration_equals_swa_update_bn_on_the_same_batches() -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 1, 8, 8) * 3 + 1, torch.zeros(40, dtype=torch.long))
    loader = DataLoader(data, batch_size=10, shuffle=False)
    trainer = SimpleNamespace(train_dataloader=loader,  # what the function reads of a Lightning trainer
                              precision_plugin=SimpleNamespace(forward_context=contextlib.nullcontext))
    ours, reference = _Net(), _Net()
    reference.load_state_dict(ours.state_dict())
    ours.eval()
    assert recalibrate_batchnorm(ours, trainer, batches=2) == 20
    update_bn([b for i, b in enumerate(loader) if i < 2], reference)
    for a, b in zip(ours.body.modules(), reference.body.modules(), strict=True):
        if isinstance(a, nn.BatchNorm2d):
            assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6)
            assert torch.allclose(a.running_var, b.running_var, atol=1e-6)
            assert a.momentum == 0.1  # restored after the cumulative average
    assert not ours.training  # the module's mode is restored


def _stored_stats_error(run_dir: Path, data: Path) -> float:
    """Median relative difference between the selected checkpoint's BatchNorm variances and the variances its own
    weights produce on the whole (un-augmented) training split."""
    ckpt = next((run_dir / "checkpoints").glob("epoch*.ckpt"))
    stored = ClassificationModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    fresh = ClassificationModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    split = np.load(data)
    update_bn(DataLoader(ArrayDataset(split["train_images"][..., None], split["train_labels"]), batch_size=64),
              fresh)
    errors = [((a.running_var - b.running_var).abs() / b.running_var.clamp_min(1e-6)).median().item()
              for a, b in zip(stored.modules(), fresh.modules(), strict=True) if isinstance(a, nn.BatchNorm2d)]
    return float(np.median(errors))


@pytest.mark.slow
def test_the_selected_checkpoint_carries_statistics_of_its_own_weights(tmp_path: Path,
                                                                       breastmnist_small: Path) -> None:
    """A real short fit of the default recipe: the checkpoint's BatchNorm statistics describe its averaged weights,
    where Lightning's plain EMA (averaged statistics) stores ones that do not."""
    common = ("logger=csv", "experiment=breastmnist", "model.net.width=8", "trainer=cpu", "trainer.precision=32-true",
              "callbacks.model_summary=null", f"data.path={breastmnist_small}", "data.md5=false", "recipe.steps=null",
              "trainer.max_epochs=3", "callbacks.early_stopping.patience=3", "model.optimizer.lr=0.01")
    run_cli(*common, run_dir=tmp_path / "bn_ema")
    run_cli(*common, "callbacks.ema._target_=lightning.pytorch.callbacks.EMAWeightAveraging", run_dir=tmp_path / "ema")
    ours, plain = _stored_stats_error(tmp_path / "bn_ema", breastmnist_small), _stored_stats_error(
        tmp_path / "ema", breastmnist_small)
    assert ours < 0.25, ours  # two batches of 64 against the whole split: sampling error only
    assert plain > 2 * ours, (plain, ours)
