"""medops.datasets: the positive class, split names and the shared manifest and npz readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medops.datasets import DataError, canonical_split, manifest_rows, npz_split, positive_index


def test_the_positive_class_is_the_declared_finding() -> None:
    names = ["malignant", "normal_or_benign"]
    assert positive_index(names, "malignant") == 0  # BreastMNIST: the finding is class 0
    assert positive_index(names, 0) == 0 and positive_index(names, 1) == 1
    assert positive_index(names, None) == 1  # undeclared (older runs): the documented default
    with pytest.raises(DataError, match="'benign' is not one of the classes"):
        positive_index(names, "benign")
    with pytest.raises(DataError, match="not a class index"):
        positive_index(names, 2)


def test_split_aliases() -> None:
    assert [canonical_split(s) for s in ("Training", "VALID", " validation ", "testing", "holdout")] == [
        "train", "val", "val", "test", "holdout"]


def test_manifest_rows_normalise_and_name_what_is_missing(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text("\ufeffPath , Label,Split\n a.png , x ,Train\n,,\nb.png,y,\n", encoding="utf-8")
    assert manifest_rows(csv, ("path", "label")) == [(2, {"path": "a.png", "label": "x", "split": "Train"}),
                                                     (4, {"path": "b.png", "label": "y", "split": ""})]
    with pytest.raises(DataError, match="needs 'path' and 'patient_id' columns"):
        manifest_rows(csv, ("path", "patient_id"))
    with pytest.raises(DataError, match="manifest not found"):
        manifest_rows(tmp_path / "none.csv")


def test_npz_split_adds_the_channel_and_names_the_splits_it_has(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, train_images=np.zeros((3, 5, 5), np.uint8), train_labels=np.zeros((3, 1)))
    images, labels = npz_split(path, "train")
    assert images.shape == (3, 5, 5, 1) and labels.shape == (3, 1)
    with pytest.raises(DataError, match=r"no 'test_images' array; splits in the file: \['train'\]"):
        npz_split(path, "test")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        npz_split(tmp_path / "bad.npz", "train")
