"""serve.inputs: listing a folder, a CSV manifest or a MedMNIST .npz, and loading items through medops (no Triton)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medops
from serve.contract import ModelInfo, ServeError
from serve.inputs import InputItem, iter_inputs, load_item, parse_label, skipped_text
from tests.conftest import REPO, write_csv
from tests.test_repo import BLOCK_TORCH

DATA = REPO / "tests" / "data"
CLASSES = ["benign", "malignant"]
INFO = ModelInfo(name="m", version="1", input_name="image", output_name="probabilities", channels=1, size=28,
                 max_batch_size=8, class_names=CLASSES)


def png(path: Path, value: int, shape: tuple[int, ...] = (40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full(shape, value, np.uint8)
    image[0, 0] = value + 1 if value < 255 else value - 1  # not blank: serving refuses a blank image
    Image.fromarray(image).save(path)
    return path


@pytest.fixture
def class_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    png(root / "benign" / "a.png", 10)
    png(root / "benign" / "deep" / "b.png", 20)
    png(root / "malignant" / "c.png", 200)
    shutil.copy(DATA / "CT_small.dcm", root / "malignant" / "ct.dcm")
    shutil.copy(DATA / "MR_small.dcm", root / "malignant" / "mr_nosuffix")  # no suffix: still an input
    (root / "malignant" / "notes.txt").write_text("not an image")
    (root / "malignant" / ".DS_Store").write_bytes(b"\0")
    png(root / ".hidden" / "x.png", 1)
    return root


@pytest.mark.parametrize("module", ["serve.inputs", "serve.batch"])
def test_module_imports_without_torch(module: str) -> None:
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH.format(module=module)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_folder_with_class_subfolders(class_tree: Path) -> None:
    items, info = iter_inputs(class_tree, class_names=CLASSES)
    rel = {str(Path(i.key).relative_to(class_tree)): i.label for i in items}
    assert rel == {"benign/a.png": 0, "benign/deep/b.png": 0, "malignant/c.png": 1, "malignant/ct.dcm": 1,
                   "malignant/mr_nosuffix": 1}
    assert all(i.path == i.key and i.array is None for i in items)
    assert info == {"kind": "folder", "source": str(class_tree), "split": None, "count": 5, "labelled": 5,
                    "skipped": {".txt": 1}}


def test_folder_counts_the_files_it_does_not_read_by_type(class_tree: Path) -> None:
    for name in ("t1.nii", "t2.nii.gz", "t3.nii.gz"):
        (class_tree / "benign" / name).write_bytes(b"\0" * 8)
    items, info = iter_inputs(class_tree, class_names=CLASSES)
    assert info["count"] == 5 and info["skipped"] == {".nii.gz": 2, ".nii": 1, ".txt": 1}
    assert skipped_text(info["skipped"]) == "4 file(s) of types predict cannot read: .nii.gz 2, .nii 1, .txt 1"
    only = class_tree.parent / "volumes"
    only.mkdir()
    (only / "t1.nii.gz").write_bytes(b"\0")
    with pytest.raises(ServeError, match=r"no image files found .*; skipped 1 file\(s\) .*: .nii.gz 1"):
        iter_inputs(only)


def test_folder_labels_only_when_subfolders_are_classes(class_tree: Path) -> None:
    items, info = iter_inputs(class_tree)  # class names unknown
    assert len(items) == 5 and info["labelled"] == 0 and all(i.label is None for i in items)
    png(class_tree / "unsorted" / "d.png", 5)  # a sub-folder that is not a class: no folder labels at all
    items, info = iter_inputs(class_tree, class_names=CLASSES)
    assert info["count"] == 6 and info["labelled"] == 0


def test_flat_folder_and_errors(tmp_path: Path) -> None:
    png(tmp_path / "flat" / "1.png", 3)
    items, info = iter_inputs(tmp_path / "flat", class_names=CLASSES)
    assert [i.key for i in items] == [str(tmp_path / "flat" / "1.png")] and items[0].label is None
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("x")
    with pytest.raises(ServeError, match=str(tmp_path / "empty")):
        iter_inputs(tmp_path / "empty")
    with pytest.raises(ServeError, match="missing.*not found"):
        iter_inputs(tmp_path / "missing")


def test_csv_manifest_with_labels_and_split(tmp_path: Path) -> None:
    png(tmp_path / "img" / "a.png", 1)
    png(tmp_path / "img" / "b.png", 2)
    png(tmp_path / "img" / "c.png", 3)
    absolute = png(tmp_path / "elsewhere" / "d.png", 4)
    manifest = write_csv(tmp_path / "manifest.csv", [
        {"path": "img/a.png", "label": "malignant", "split": "test"},
        {"path": "img/b.png", "label": "0", "split": "train"},
        {"path": "img/c.png", "label": "", "split": "testing"},
        {"path": str(absolute), "label": "1", "split": "test"},
    ])
    items, info = iter_inputs(manifest, class_names=CLASSES)
    assert [(i.key, i.path, i.label) for i in items] == [
        ("img/a.png", str(tmp_path / "img" / "a.png"), 1),
        ("img/c.png", str(tmp_path / "img" / "c.png"), None),
        (str(absolute), str(absolute), 1),
    ]
    assert info["kind"] == "csv" and info["split"] == "test" and info["count"] == 3 and info["labelled"] == 2
    items, info = iter_inputs(manifest, split="train", class_names=CLASSES)
    assert [(i.key, i.label) for i in items] == [("img/b.png", 0)]
    items, info = iter_inputs(manifest, split=None, class_names=CLASSES)
    assert info["count"] == 4 and info["split"] is None
    with pytest.raises(ServeError, match="no rows of split 'val'"):
        iter_inputs(manifest, split="val")


def test_csv_manifest_without_split_or_labels(tmp_path: Path) -> None:
    png(tmp_path / "a.png", 1)
    png(tmp_path / "b.png", 2)
    manifest = write_csv(tmp_path / "paths.csv", [{"path": "a.png"}, {"path": "b.png"}, {"path": "a.png"}])
    items, info = iter_inputs(manifest, split="test", class_names=CLASSES)  # no split column: every row
    assert [i.key for i in items] == ["a.png", "b.png", "a.png#4"]  # a repeated path still gets its own row
    assert {i.path for i in items} == {str(tmp_path / "a.png"), str(tmp_path / "b.png")}
    assert info["labelled"] == 0 and info["split"] is None


def test_csv_manifest_errors(tmp_path: Path) -> None:
    bad = write_csv(tmp_path / "bad.csv", [{"file": "a.png", "label": "0"}])
    with pytest.raises(ServeError, match="'path' column"):
        iter_inputs(bad)
    unknown = write_csv(tmp_path / "unknown.csv", [{"path": "a.png", "label": "cancer"}])
    with pytest.raises(ServeError, match=r"unknown.csv:2: label 'cancer'"):
        iter_inputs(unknown, class_names=CLASSES)
    out_of_range = write_csv(tmp_path / "range.csv", [{"path": "a.png", "label": "2"}])
    with pytest.raises(ServeError, match="out of range"):
        iter_inputs(out_of_range, class_names=CLASSES)


def test_file_list(tmp_path: Path) -> None:
    png(tmp_path / "img" / "a.png", 1)
    listing = tmp_path / "files.txt"
    listing.write_text("# inputs\nimg/a.png\n\n/abs/missing.dcm\nimg/a.png\n")
    items, info = iter_inputs(listing, class_names=CLASSES)
    assert [(i.key, i.path, i.label) for i in items] == [
        ("img/a.png", str(tmp_path / "img" / "a.png"), None),
        ("/abs/missing.dcm", "/abs/missing.dcm", None),
        ("img/a.png#5", str(tmp_path / "img" / "a.png"), None),
    ]
    assert info["kind"] == "list" and info["count"] == 3 and info["labelled"] == 0
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ServeError, match="no paths"):
        iter_inputs(tmp_path / "empty.txt")
    with pytest.raises(ServeError, match="unsupported input"):
        iter_inputs(png(tmp_path / "single.png", 1))


def test_parse_label() -> None:
    assert parse_label("malignant", CLASSES) == 1
    assert parse_label(" 0 ", CLASSES) == 0
    assert parse_label("", CLASSES) is None
    assert parse_label("3", None) == 3
    with pytest.raises(ServeError):
        parse_label("benign", None)


def test_npz_splits(breastmnist_small: Path) -> None:
    data = np.load(breastmnist_small)
    items, info = iter_inputs(breastmnist_small, class_names=["malignant", "normal_or_benign"])
    assert info == {"kind": "npz", "source": str(breastmnist_small), "split": "test", "count": 64, "labelled": 64}
    assert [i.key for i in items[:2]] == ["npz:test:0", "npz:test:1"] and items[0].path is None
    assert [i.label for i in items] == data["test_labels"].reshape(-1).tolist()
    np.testing.assert_array_equal(items[5].array[..., 0], data["test_images"][5])  # H x W x C, C added
    val, info = iter_inputs(breastmnist_small, split="validation")
    assert info["count"] == 78 and val[0].key == "npz:val:0"
    with pytest.raises(ServeError, match=r"no 'extra_images'.*\['test', 'train', 'val'\]"):
        iter_inputs(breastmnist_small, split="extra")
    with pytest.raises(ServeError, match="does not fit"):
        iter_inputs(breastmnist_small, class_names=["only"])


def test_npz_rgb_and_unlabelled(tmp_path: Path, rgb_multiclass: Path) -> None:
    items, info = iter_inputs(rgb_multiclass, class_names=["a", "b", "c"])
    assert items[0].array.shape == (28, 28, 3) and info["labelled"] == 60
    out = load_item(items[0], INFO)  # RGB -> the model's 1 channel by luma
    expected = medops.preprocess(np.load(rgb_multiclass)["test_images"][0], 28, 1)
    np.testing.assert_array_equal(out, expected)
    nolabels = tmp_path / "nolabels.npz"
    np.savez(nolabels, test_images=np.zeros((3, 10, 10), np.uint8))
    items, info = iter_inputs(nolabels)
    assert info["count"] == 3 and info["labelled"] == 0


def test_load_item_files_and_arrays(class_tree: Path) -> None:
    items, _ = iter_inputs(class_tree, class_names=CLASSES)
    by_name = {Path(i.key).name: i for i in items}
    for name in ("a.png", "ct.dcm", "mr_nosuffix"):
        out = load_item(by_name[name], INFO)
        assert out.shape == (1, 28, 28) and out.dtype == np.float32
        np.testing.assert_array_equal(out, medops.load_for_model(by_name[name].path, 28, 1))
    rgb = ModelInfo(**{**INFO.__dict__, "channels": 3, "size": 16})
    assert load_item(by_name["a.png"], rgb).shape == (3, 16, 16)
    array = np.arange(100, dtype=np.uint8).reshape(10, 10)
    out = load_item(InputItem("npz:test:0", None, 1, array), INFO)
    np.testing.assert_array_equal(out, medops.preprocess(array[..., None], 28, 1))


def test_a_blank_array_is_refused_like_a_blank_file() -> None:
    with pytest.raises(medops.ImageReadError, match="npz:test:3: blank image: every pixel has the value 0 "):
        load_item(InputItem("npz:test:3", None, 1, np.zeros((28, 28), np.uint8)), INFO)


def test_load_item_errors_name_the_input(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_text("this is not a png")
    with pytest.raises(medops.ImageReadError) as err:
        load_item(InputItem(str(corrupt), str(corrupt), None), INFO)
    assert err.value.path == str(corrupt) and str(corrupt) in str(err.value)
    with pytest.raises(medops.ImageReadError, match=r"npz:test:7: ValueError.*uint8"):
        load_item(InputItem("npz:test:7", None, None, np.arange(16, dtype=np.float32).reshape(4, 4)), INFO)
