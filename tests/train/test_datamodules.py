"""DataModules: shapes, dtypes, statistics and every bad-data error, before any training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medops.datasets import stratified_split
from tests.conftest import REPO, synthetic_rgb_splits, write_csv, write_medmnist
from train.datamodules import DataError, FolderDataModule, MedMNISTDataModule


def test_breastmnist_shapes_dtypes_and_stats(breastmnist: Path) -> None:
    dm = MedMNISTDataModule(str(breastmnist), batch_size=32)
    dm.setup("fit")
    assert (dm.num_classes, dm.channels, dm.image_size) == (2, 1, 28)
    assert dm.class_counts("train") == [147, 399]  # the published BreastMNIST split
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
    assert 0.0 <= x.min() and x.max() <= 1.0
    raw = np.load(breastmnist)["train_images"] / 255.0
    assert dm.mean == pytest.approx([raw.mean()], abs=1e-5)
    assert dm.std == pytest.approx([raw.std()], abs=1e-5)
    assert dm.fingerprint.startswith("sha256:")
    assert len(dm.datasets["val"]) == 78 and len(dm.datasets["test"]) == 156


def test_rgb_multiclass_shapes(rgb_multiclass: Path) -> None:
    dm = MedMNISTDataModule(str(rgb_multiclass), batch_size=16)
    dm.setup("fit")
    assert (dm.num_classes, dm.channels) == (3, 3)
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (16, 3, 28, 28)
    assert len(dm.mean) == 3 and len(dm.std) == 3
    assert dm.summary()["class_names"] == ["0", "1", "2"]


def test_md5_is_checked(breastmnist: Path) -> None:
    dm = MedMNISTDataModule(str(breastmnist), md5="0" * 32)
    with pytest.raises(DataError, match="MD5 750601b1f35ba3300ea97c75c52ff8f6 does not match"):
        dm.setup()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothere\.npz: dataset file not found"):
        MedMNISTDataModule(str(tmp_path / "nothere.npz")).setup()


def test_not_an_npz(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.npz"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match=r"garbage\.npz: not a readable \.npz"):
        MedMNISTDataModule(str(bad)).setup()


def test_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "nokeys.npz"
    np.savez(path, train_images=np.zeros((4, 28, 28), np.uint8), train_labels=np.zeros((4, 1)))
    with pytest.raises(DataError, match=r"nokeys\.npz: missing keys .*val_images"):
        MedMNISTDataModule(str(path)).setup()


@pytest.mark.parametrize("bad_label", [-1, 7])
def test_labels_out_of_range(tmp_path: Path, bad_label: int) -> None:
    splits = synthetic_rgb_splits({"train": 20, "val": 6, "test": 6})
    images, labels = splits["val"]
    labels[3] = bad_label
    path = write_medmnist(tmp_path / "badlabel.npz", splits)
    dm = MedMNISTDataModule(str(path), class_names=["a", "b", "c"])
    with pytest.raises(DataError, match=rf"badlabel\.npz: val label {bad_label} at index 3 is out of range"):
        dm.setup()


def test_multilabel_read_as_such_and_refused_for_a_single_label_task(tmp_path: Path) -> None:
    path = tmp_path / "multilabel.npz"
    arrays = {f"{s}_images": np.zeros((4, 28, 28), np.uint8) for s in ("train", "val", "test")}
    arrays |= {f"{s}_labels": np.eye(14, dtype=np.uint8)[:4] for s in ("train", "val", "test")}
    np.savez(path, **arrays)
    dm = MedMNISTDataModule(str(path))  # data.task=auto: N x 14 labels are multi-label (ChestMNIST's format)
    dm.setup()
    assert dm.task == "multilabel" and dm.num_classes == 14 and dm.datasets["train"].labels.shape == (4, 14)
    with pytest.raises(DataError, match="multi-label"):
        MedMNISTDataModule(str(path), task="multiclass").setup()


def test_image_size_mismatch_between_splits(tmp_path: Path) -> None:
    splits = synthetic_rgb_splits({"train": 10, "val": 4, "test": 4})
    splits["test"] = synthetic_rgb_splits({"test": 4}, size=32)["test"]
    path = write_medmnist(tmp_path / "sizes.npz", splits)
    with pytest.raises(DataError, match="splits disagree on image shape"):
        MedMNISTDataModule(str(path)).setup()


def test_folder_of_class_subfolders(png_folder: Path) -> None:
    dm = FolderDataModule(str(png_folder), image_size=32, channels=1, batch_size=8)
    dm.setup()
    assert dm.class_names == ["benign", "malignant"]
    counts = {s: len(dm.datasets[s]) for s in ("train", "val", "test")}
    assert counts == {"train": 28, "val": 4, "test": 8}  # stratified 10% / 20% of 2 x 20
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 32, 32)


def test_folder_rgb_output_channels(png_folder: Path) -> None:
    dm = FolderDataModule(str(png_folder), image_size=28, channels=3, batch_size=4)
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 28, 28)
    assert torch.equal(x[:, 0], x[:, 1])  # grey replicated to RGB


def test_csv_manifest_with_dicom_and_splits(tmp_path: Path, png_folder: Path) -> None:
    pngs = sorted(png_folder.rglob("*.png"))
    rows = [{"path": str(p), "label": p.parent.name, "split": "train"} for p in pngs[:30]]
    rows += [{"path": str(p), "label": p.parent.name, "split": "val"} for p in pngs[30:35]]
    rows += [{"path": str(REPO / "tests/data/CT_small.dcm"), "label": "malignant", "split": "test"},
             {"path": str(REPO / "tests/data/MR_small.dcm"), "label": "benign", "split": "test"}]
    dm = FolderDataModule(str(write_csv(tmp_path / "m.csv", rows)), image_size=32, channels=1)
    dm.setup()
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [30, 5, 2]
    ct = dm.datasets["test"].images[0]
    assert ct.shape == (1, 32, 32) and ct.float().std() > 5  # a real windowed CT, not blank


def test_csv_missing_and_corrupt_files_all_reported(tmp_path: Path, png_folder: Path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    good = sorted(png_folder.rglob("*.png"))
    rows = [{"path": str(p), "label": p.parent.name} for p in good]
    rows += [{"path": str(tmp_path / "missing.png"), "label": "benign"}, {"path": str(corrupt), "label": "benign"}]
    dm = FolderDataModule(str(write_csv(tmp_path / "m.csv", rows)), image_size=28)
    with pytest.raises(DataError) as err:
        dm.setup()
    message = str(err.value)
    assert "2 of 42 images cannot be used" in message
    assert "missing.png" in message and "corrupt.png" in message
    # the message names the setting that trains on the rest, and that setting exists under that name
    assert "set data.validation.allow_corrupt=true to leave them out" in message
    assert "allow_corrupt: false" in (REPO / "conf/data/validation/default.yaml").read_text()


def test_csv_bad_columns_and_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs 'path' and 'label' columns"):
        FolderDataModule(str(write_csv(tmp_path / "a.csv", [{"file": "x.png", "y": "1"}]))).setup()
    bad_split = write_csv(tmp_path / "b.csv", [{"path": "x.png", "label": "1", "split": "holdout"}])
    with pytest.raises(DataError, match=r"b\.csv:2: unknown split 'holdout'"):
        FolderDataModule(str(bad_split)).setup()


def test_csv_label_not_in_configured_classes(tmp_path: Path, png_folder: Path) -> None:
    rows = [{"path": str(p), "label": p.parent.name} for p in sorted(png_folder.rglob("*.png"))]
    path = write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(DataError, match=r"labels \['malignant'\] are not among the configured classes"):
        FolderDataModule(str(path), class_names=["benign", "other"]).setup()


def test_stratified_split_is_seeded_and_disjoint() -> None:
    labels = np.array([0] * 50 + [1] * 30)
    a = stratified_split(labels, {"val": 0.1, "test": 0.2}, seed=3)
    b = stratified_split(labels, {"val": 0.1, "test": 0.2}, seed=3)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    together = np.concatenate([a["train"], a["val"], a["test"]])
    assert sorted(together.tolist()) == list(range(80))
    assert (labels[a["test"]] == 1).sum() == 6 and (labels[a["test"]] == 0).sum() == 10


def test_download_verifies_md5(tmp_path: Path, breastmnist: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The download path (no network here: the 'server' is a local file URL) checks the official MD5."""
    from medops import datasets as medmnist

    monkeypatch.setattr(medmnist, "medmnist_url", lambda name: breastmnist.resolve().as_uri())
    target = tmp_path / "dl" / "breastmnist.npz"
    dm = MedMNISTDataModule(str(target), download=True)
    dm.setup()
    assert target.is_file() and dm.num_classes == 2
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(breastmnist.read_bytes()[:-10] + b"0123456789")
    monkeypatch.setattr(medmnist, "medmnist_url", lambda name: corrupt.resolve().as_uri())
    other = tmp_path / "dl2" / "breastmnist.npz"
    with pytest.raises(DataError, match="downloaded file has MD5 .* expected 750601b1f35ba3300ea97c75c52ff8f6"):
        MedMNISTDataModule(str(other), download=True).setup()
    assert not other.exists() and not other.with_suffix(".part").exists()


def test_modality_is_read_from_dicom_files_or_declared(tmp_path: Path) -> None:
    import shutil

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            shutil.copy(REPO / "tests" / "data" / "CT_small.dcm", tmp_path / cls / f"{i}.dcm")
    dm = FolderDataModule(str(tmp_path), image_size=16, val_fraction=0.34, test_fraction=0.34)
    assert dm.summary()["modalities"] == ["CT"]
    declared = FolderDataModule(str(tmp_path), image_size=16, val_fraction=0.34, test_fraction=0.34, modality="us")
    assert declared.summary()["modalities"] == ["US"]  # declared wins, upper-case like DICOM's defined terms


def _grade_folder(root: Path, names: tuple[str, ...]) -> Path:
    """Class folders of 10 noisy grey PNGs each, one brightness per class."""
    from PIL import Image

    rng = np.random.default_rng(len(names))
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 30, (8, 8)) + 60 * k
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def test_ordinal_folder_data_need_the_grade_order_declared(tmp_path: Path) -> None:
    root = _grade_folder(tmp_path / "grades", ("severe", "mild", "moderate"))
    with pytest.raises(DataError, match=r"data.task=ordinal needs the classes in grade order"):
        FolderDataModule(str(root), image_size=8, task="ordinal").setup()
    with pytest.raises(DataError, match=r"data.ordinal_cutoff=moderate needs the classes in grade order"):
        FolderDataModule(str(root), image_size=8, ordinal_cutoff="moderate").setup()
    dm = FolderDataModule(str(root), image_size=8, task="ordinal", ordinal_cutoff="moderate",
                          class_names=["mild", "moderate", "severe"])
    dm.setup()
    assert dm.task == "ordinal" and dm.class_names == ["mild", "moderate", "severe"]
    assert dm.abnormal == [1, 2]  # moderate and severe; the old sort made it severe < moderate
    assert dm.summary()["class_order"] == "configured"
    plain = FolderDataModule(str(root), image_size=8)  # unordered use of the same data is fine
    plain.setup()
    assert plain.class_names == ["mild", "moderate", "severe"] and plain.summary()["class_order"] == "alphabetical"


def test_numeric_grade_folders_are_ordered_by_value(tmp_path: Path) -> None:
    dm = FolderDataModule(str(_grade_folder(tmp_path / "g", ("10", "2", "1"))), image_size=8, task="ordinal",
                          ordinal_cutoff="2")
    dm.setup()
    assert dm.class_names == ["1", "2", "10"] and dm.abnormal == [1, 2] and dm.task == "ordinal"


def test_binary_folder_without_declared_finding_takes_the_second_sorted_name(tmp_path: Path) -> None:
    dm = FolderDataModule(str(_grade_folder(tmp_path / "b", ("tumor", "benign"))), image_size=8)
    dm.setup()
    assert dm.class_names == ["benign", "tumor"] and dm.positive_class == "tumor"


def test_undeclared_finding_is_the_class_that_is_not_normal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """[abnormal, normal] sorts abnormal first: class 1 would make "normal" the finding; the name rule does not, and
    the run record says it was taken, not declared."""
    dm = FolderDataModule(str(_grade_folder(tmp_path / "an", ("normal", "abnormal"))), image_size=8)
    with caplog.at_level("WARNING"):
        dm.setup()
    assert dm.class_names == ["abnormal", "normal"] and dm.positive_class == "abnormal"
    assert dm.summary()["positive_class"] == "abnormal" and dm.summary()["positive_class_declared"] is False
    assert "abnormal is taken as the positive class (the finding; the other class, normal, reads as no finding)" \
        in caplog.text


def test_breastmnist_class_order_is_unaffected(breastmnist: Path) -> None:
    named = MedMNISTDataModule(str(breastmnist), class_names=["malignant", "normal_or_benign"],
                               positive_class="malignant")
    named.setup()
    assert named.class_names == ["malignant", "normal_or_benign"] and named.positive_class == "malignant"
    assert named.summary()["class_order"] == "configured" and named.class_counts("train") == [147, 399]
    bare = MedMNISTDataModule(str(breastmnist))
    bare.setup()
    assert bare.class_names == ["0", "1"] and bare.summary()["class_order"] == "index"
