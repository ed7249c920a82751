"""Cross-validation folds through the real FolderDataModule: a patient's images never straddle train and val."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_csv
from train.datamodules import DataError, FolderDataModule


def patient_manifest(tmp_path: Path) -> tuple[Path, dict[int, str]]:
    """100 PNGs: patient P00 has 30 of them (both labels), 35 more patients have 2 each; P31-P35 are the test split,
    P29-P30 the given val split. Pixels 0 and 1 of every image spell its row number, so a served image names its
    patient."""
    from PIL import Image

    rng = np.random.default_rng(0)
    patients = ["P00"] * 30 + [f"P{1 + i // 2:02d}" for i in range(70)]
    rows, owner = [], {}
    for i, patient in enumerate(patients):
        img = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        img[0, 0], img[0, 1] = i // 256, i % 256
        path = tmp_path / f"{i:03d}.png"
        Image.fromarray(img).save(path)
        label = ("benign", "malignant")[i % 2] if patient == "P00" else ("benign", "malignant")[int(patient[1:]) % 2]
        number = int(patient[1:])
        split = "test" if number > 30 else "val" if number > 28 else "train"
        rows.append({"path": str(path), "label": label, "split": split, "patient_id": patient})
        owner[i] = patient
    return write_csv(tmp_path / "manifest.csv", rows), owner


def served_patients(dm: FolderDataModule, split: str, owner: dict[int, str]) -> list[str]:
    images = dm.datasets[split].images.numpy()  # uint8 N x 1 x 28 x 28
    return [owner[int(img[0, 0, 0]) * 256 + int(img[0, 0, 1])] for img in images]


def test_folds_keep_each_patient_in_one_split(tmp_path: Path) -> None:
    csv, owner = patient_manifest(tmp_path)
    vals, pool = [], None
    for fold in range(5):
        dm = FolderDataModule(str(csv), image_size=28, fold=fold, num_folds=5, fold_seed=3)
        dm.setup()
        train, val = served_patients(dm, "train", owner), served_patients(dm, "val", owner)
        assert not set(train) & set(val), f"fold {fold}: patients in train and val: {set(train) & set(val)}"
        assert train == dm.data.groups["train"] and val == dm.data.groups["val"]  # groups follow the samples
        assert dm.summary()["fold_grouped_by"] == "patient_id"
        assert not set(served_patients(dm, "test", owner)) & set(train + val)  # the held-out test stays apart
        vals.append(val)
        pool = sorted(train + val) if pool is None else pool
        assert sorted(train + val) == pool  # every fold uses the same train+val pool
    assert sorted(p for val in vals for p in val) == pool  # each sample is validated exactly once
    assert len(pool) == 90 and pool.count("P00") == 30
    assert [val.count("P00") for val in vals].count(30) == 1  # the 30 images of P00 are validated together


def test_without_the_group_column_the_folds_are_by_sample(tmp_path: Path) -> None:
    """The same manifest with grouping switched off: the big patient lands in train and val (what grouping
    prevents), and the summary says the folds were not grouped."""
    csv, owner = patient_manifest(tmp_path)
    straddles = 0
    for fold in range(5):
        dm = FolderDataModule(str(csv), image_size=28, fold=fold, num_folds=5, group_column=None)
        dm.setup()
        straddles += bool(set(served_patients(dm, "train", owner)) & set(served_patients(dm, "val", owner)))
        assert dm.summary()["fold_grouped_by"] is None
    assert straddles == 5


def test_fewer_patients_than_folds_is_a_data_error(tmp_path: Path) -> None:
    from PIL import Image

    rows = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        image = np.full((8, 8), 20 * i, np.uint8)
        image[0, 0] += 1  # one pixel apart: a blank image is refused as data
        Image.fromarray(image).save(path)
        patient = f"p{i % 3}" if i < 10 else "p9"
        rows.append({"path": str(path), "label": "ab"[i % 2], "patient_id": patient,
                     "split": "test" if i >= 10 else ("val" if patient == "p2" else "train")})
    dm = FolderDataModule(str(write_csv(tmp_path / "m.csv", rows)), image_size=8, fold=0, num_folds=5)
    with pytest.raises(DataError, match="3 patient/study groups cannot make 5 folds"):
        dm.setup()
