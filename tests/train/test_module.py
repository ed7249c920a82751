"""The LightningModule: losses, schedules and checkpoint round trips."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from train.datamodules import MedMNISTDataModule
from train.module import ClassificationModule


def make_module(**kwargs) -> ClassificationModule:
    base = dict(num_classes=3, in_channels=1, image_size=28, mean=[0.4], std=[0.2],
                net={"arch": "smallcnn", "width": 8})
    return ClassificationModule(**{**base, **kwargs})


def test_balanced_class_weights() -> None:
    module = make_module(loss={"class_weights": "balanced"}, class_counts=[10, 30, 60])
    w = module.class_weights
    assert w is not None and w[0] > w[1] > w[2]
    assert torch.allclose(w * torch.tensor([10.0, 30.0, 60.0]), torch.full((3,), 100 / 3))


def test_class_weights_wrong_length() -> None:
    with pytest.raises(ValueError, match="2 values for 3 classes"):
        make_module(loss={"class_weights": [1.0, 2.0]})


@pytest.mark.parametrize("scheduler", ["onecycle", "cosine", "none"])
def test_short_fit_and_checkpoint_reload_is_identical(tmp_path: Path, breastmnist_small: Path, scheduler: str) -> None:
    L.seed_everything(0)
    dm = MedMNISTDataModule(str(breastmnist_small), md5=None, batch_size=32)
    dm.setup()
    module = ClassificationModule(num_classes=2, in_channels=1, image_size=28, mean=dm.mean, std=dm.std,
                                  net={"arch": "smallcnn", "width": 8}, scheduler={"name": scheduler})
    trainer = L.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, accelerator="cpu",
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    reloaded = ClassificationModule.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    x = next(iter(dm.test_dataloader()))[0]
    module.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(module(x), reloaded(x))
    assert reloaded.hparams.mean == dm.mean and reloaded.hparams.image_size == 28
