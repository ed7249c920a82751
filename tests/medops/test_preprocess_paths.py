"""One preprocessing path: the same PNG, 16-bit PNG, DICOM, .npy and .npz image gives identical model inputs through
the training loader, evaluation, the export parity gate, ``serve predict``/``batch`` and the drift check."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import medops
from evaluation.evaluate import external_data, predict
from export.source import held_out_images
from serve.contract import ModelInfo
from serve.drift import read_images
from serve.inputs import iter_inputs, load_item
from tests.conftest import write_medmnist
from train.datamodules import FolderDataModule, MedMNISTDataModule

DATA = Path(__file__).resolve().parent.parent / "data"
SIZE = 28


def _files(folder: Path) -> list[Path]:
    """One image per format, each with a different size and dynamic range."""
    rng = np.random.default_rng(7)
    png8 = folder / "gray8.png"
    Image.fromarray(rng.integers(0, 256, (41, 37), dtype=np.uint8)).save(png8)
    png16 = folder / "gray16.png"
    Image.fromarray(rng.integers(200, 4000, (33, 50)).astype(np.uint16)).save(png16)
    rgb = folder / "rgb.png"
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(rgb)
    npy = folder / "array.npy"
    np.save(npy, rng.integers(0, 256, (64, 64), dtype=np.uint8))
    dcm = folder / "ct.dcm"
    shutil.copyfile(DATA / "CT_small.dcm", dcm)
    return [png8, png16, rgb, npy, dcm]


class Recorder(torch.nn.Module):
    """Stands in for a network: remembers the batch it was given, answers uniform probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.hparams = {"num_classes": 2}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().cpu().clone())
        return torch.zeros(len(x), 2)


@pytest.mark.parametrize("channels", [1, 3])
def test_files_give_identical_inputs_on_every_path(tmp_path: Path, channels: int) -> None:
    files = _files(tmp_path)
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        for split in ("train", "val", "test"):
            for i, f in enumerate(files):
                w.writerow([f.name, "a" if i % 2 else "b", split])
    expected = np.stack([medops.load_for_model(f, SIZE, channels) for f in files])  # the core contract
    assert expected.dtype == np.float32 and expected.shape == (5, channels, SIZE, SIZE)
    assert 0.0 <= expected.min() and expected.max() <= 1.0 and expected.std() > 0.05

    # training: the DataModule's test split, as the loader serves it
    dm = FolderDataModule(str(manifest), image_size=SIZE, channels=channels, class_names=["a", "b"],
                          group_column=None)
    dm.prepare()
    training = torch.stack([dm.datasets["test"][i][0] for i in range(len(files))]).numpy()
    np.testing.assert_array_equal(training, expected)

    # evaluation: external data, then the batch the model is called with
    source = SimpleNamespace(class_names=["a", "b"], input_shape=(channels, SIZE, SIZE), checkpoint=tmp_path / "x",
                             record={"config": {"data": {"_target_": "train.datamodules.FolderDataModule",
                                                         "path": str(manifest), "image_size": SIZE,
                                                         "channels": channels, "class_names": ["a", "b"],
                                                         "group_column": None}}})
    ev = external_data(str(manifest), "test", source, [])
    net = Recorder()
    predict(net, ev.images, batch_size=64, device="cpu")
    np.testing.assert_array_equal(torch.cat(net.seen).numpy(), expected)

    # export: the parity gate's images (the run's test split)
    np.testing.assert_array_equal(held_out_images(source, split="test"), expected)

    # serving: predict/batch (one item at a time) and the drift check (a batch)
    info = ModelInfo(name="m", version="1", input_name="image", output_name="probabilities", channels=channels,
                     size=SIZE, max_batch_size=8, class_names=["a", "b"])
    items, _ = iter_inputs(manifest, split="test", class_names=["a", "b"])
    np.testing.assert_array_equal(np.stack([load_item(item, info) for item in items]), expected)
    batch, _, failed = read_images(items, SIZE, channels, None)
    assert failed == []
    np.testing.assert_array_equal(batch, expected)


def test_npz_gives_identical_inputs_on_every_path(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    splits = {s: (rng.integers(0, 256, (6, SIZE, SIZE), dtype=np.uint8), np.array([0, 1] * 3)) for s in
              ("train", "val", "test")}
    npz = write_medmnist(tmp_path / "tiny.npz", splits)
    expected = medops.to_unit_range(splits["test"][0][:, None])
    np.testing.assert_array_equal(expected, np.stack([medops.preprocess(a[..., None], SIZE, 1)
                                                      for a in splits["test"][0]]))

    dm = MedMNISTDataModule(str(npz), md5=False)
    dm.prepare()
    np.testing.assert_array_equal(torch.stack([dm.datasets["test"][i][0] for i in range(6)]).numpy(), expected)

    source = SimpleNamespace(class_names=["0", "1"], input_shape=(1, SIZE, SIZE), checkpoint=tmp_path / "x",
                             record={"config": {"data": {"_target_": "train.datamodules.MedMNISTDataModule",
                                                         "path": str(npz), "md5": False}}})
    net = Recorder()
    predict(net, external_data(str(npz), "test", source, []).images, device="cpu")
    np.testing.assert_array_equal(torch.cat(net.seen).numpy(), expected)
    np.testing.assert_array_equal(held_out_images(source, split="test"), expected)

    info = ModelInfo(name="m", version="1", input_name="image", output_name="probabilities", channels=1, size=SIZE,
                     max_batch_size=8, class_names=["0", "1"])
    items, _ = iter_inputs(npz, split="test", class_names=["0", "1"])
    np.testing.assert_array_equal(np.stack([load_item(item, info) for item in items]), expected)
    np.testing.assert_array_equal(read_images(items, SIZE, 1, None)[0], expected)


def test_contract_rejects_non_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        medops.to_unit_range(np.zeros((2, 2), np.float32))
    assert medops.to_unit_range(np.array([0, 255], np.uint8)).tolist() == [0.0, 1.0]
