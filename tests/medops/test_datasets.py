"""medops.datasets: the positive class, split names and the shared manifest and npz readers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medops.datasets import (
    DataError,
    SplitArrays,
    canonical_split,
    class_order,
    grouped_folds,
    label_index,
    manifest_rows,
    npz_split,
    positive_index,
    read_manifest,
    resolve_task,
    split_fold,
)


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


def one_big_patient(n: int = 100, big: int = 30, seed: int = 0) -> tuple[np.ndarray, list[str | None]]:
    """``n`` labels; patient ``p0`` has ``big`` of the samples, the others 1-3 each; two rows lack a patient."""
    rng = np.random.default_rng(seed)
    groups: list[str | None] = ["p0"] * big
    while len(groups) < n:
        groups += [f"p{len(groups)}"] * int(rng.integers(1, 4))
    groups = groups[:n]
    groups[-1] = groups[-2] = None
    return rng.integers(0, 2, n), groups


def test_grouped_folds_keep_every_patient_in_one_fold() -> None:
    labels, groups = one_big_patient()
    folds = grouped_folds(labels, groups, 5, seed=0)
    assert folds.shape == (100,) and set(folds.tolist()) == set(range(5))
    for patient in {g for g in groups if g is not None}:
        assert len({int(folds[i]) for i, g in enumerate(groups) if g == patient}) == 1, patient
    assert np.array_equal(folds, grouped_folds(labels, groups, 5, seed=0))  # seeded
    assert not np.array_equal(folds, grouped_folds(labels, groups, 5, seed=1))
    with pytest.raises(DataError, match="2 patient/study groups cannot make 3 folds"):
        grouped_folds(np.array([0, 1, 0, 1]), ["a", "a", "b", "b"], 3, seed=0)


def test_split_fold_uses_the_groups_and_keeps_them_aligned() -> None:
    labels, groups = one_big_patient()
    images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1)  # the pixel names the sample
    data = SplitArrays(images={"train": images[:80], "val": images[80:], "test": images[:3]},
                       labels={"train": labels[:80], "val": labels[80:], "test": labels[:3]},
                       class_names=["a", "b"], source="mem", info={"group_column": "patient_id"},
                       groups={"train": groups[:80], "val": groups[80:], "test": ["t", "t", "t"]})
    seen = []
    for fold in range(4):
        out = split_fold(data, fold, 4, seed=7)
        train, val = out.groups["train"], out.groups["val"]
        assert not {g for g in train if g is not None} & {g for g in val if g is not None}
        assert [groups[int(i)] for i in out.images["val"].reshape(-1)] == val  # groups follow their images
        assert out.groups["test"] == ["t", "t", "t"] and out.info["fold_grouped_by"] == "patient_id"
        seen += out.images["val"].reshape(-1).tolist()
    assert sorted(seen) == list(range(100))
    plain = SplitArrays(images=data.images, labels=data.labels, class_names=["a", "b"], source="mem")
    assert split_fold(plain, 0, 4, seed=7).info["fold_grouped_by"] is None  # no groups: stratified by sample


@pytest.mark.parametrize(("labels", "expected", "kind"), [
    (["tumor", "cyst", "normal"], ["cyst", "normal", "tumor"], "alphabetical"),  # was [cyst, tumor, normal]
    (["tumor", "benign"], ["benign", "tumor"], "alphabetical"),  # was [tumor, benign]
    (["severe", "mild", "moderate"], ["mild", "moderate", "severe"], "alphabetical"),  # was [mild, severe, moderate]
    (["Tumor", "benign", "a_very_long_class_name"], ["a_very_long_class_name", "benign", "Tumor"], "alphabetical"),
    (["10", "2", "1", "0"], ["0", "1", "2", "10"], "numeric"),
    (["-1", "3", "007"], ["-1", "3", "007"], "numeric"),
    (["other", "10", "Bone", "2"], ["2", "10", "Bone", "other"], "mixed"),  # numbers by value first, then words
])
def test_class_order_is_numbers_by_value_then_names_alphabetically(labels: list[str], expected: list[str],
                                                                   kind: str) -> None:
    assert class_order(labels) == (expected, kind)
    info: dict = {}
    index, names = label_index(labels, None, "mem", info)
    assert names == expected and info["class_order"] == kind
    assert [names[i] for i in index] == labels  # every label maps back to itself


def test_a_binary_folder_without_declared_finding_takes_the_second_name_in_sorted_order() -> None:
    _, names = label_index(["tumor", "benign", "tumor"], None, "mem")
    assert names[positive_index(names, None)] == "tumor"  # conf/data/folder.yaml: the second name in sorted order


def test_declared_class_names_keep_their_order_and_the_changed_order_is_announced(
        caplog: pytest.LogCaptureFixture) -> None:
    info: dict = {}
    index, names = label_index(["severe", "mild", "moderate"], ["mild", "moderate", "severe"], "mem", info)
    assert names == ["mild", "moderate", "severe"] and index.tolist() == [2, 0, 1]
    assert info["class_order"] == "configured"
    with caplog.at_level("INFO"):  # a note, not a warning: a first-time user has no older runs
        label_index(["tumor", "cyst", "normal"], None, "mem")
    assert "recorded ['cyst', 'tumor', 'normal']" in caplog.text
    assert "data.class_names=[cyst,tumor,normal]" in caplog.text


def _grades(order: str | None) -> SplitArrays:
    labels = {s: np.array([0, 1, 2, 0, 1, 2]) for s in ("train", "val", "test")}
    images = {s: np.zeros((6, 4, 4, 1), np.uint8) for s in labels}
    info = {} if order is None else {"class_order": order}
    return SplitArrays(images, labels, ["mild", "moderate", "severe"], source="grades.csv", info=info)


def test_ordinal_task_refuses_a_grade_order_sorted_from_names() -> None:
    with pytest.raises(DataError, match=r"data.task=ordinal needs the classes in grade order.*"
                                        r"'data.class_names=\[mild,moderate,severe\]'"):
        resolve_task("ordinal", _grades("alphabetical"))
    with pytest.raises(DataError, match="grade order"):
        resolve_task("ordinal", _grades("mixed"))
    for order in ("configured", "numeric", "index", None):  # declared, numbers, MedMNIST indices, built in code
        assert resolve_task("ordinal", _grades(order)) == "ordinal"
    assert resolve_task("multiclass", _grades("alphabetical")) == "multiclass"  # no order needed


def test_a_manifest_lists_every_malformed_row_with_a_count(tmp_path: Path) -> None:
    rows = ["path,label,split", "a.png,x,train", "b.png,,train", ",y,", "c.png,y,holdout"]
    rows += [f"d{i}.png,,train" for i in range(25)] + ["e.png,y,val"]
    csv = tmp_path / "m.csv"
    csv.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as err:
        read_manifest(csv)
    message = str(err.value)
    assert f"{csv}: 28 of 30 rows are malformed" in message
    assert f"{csv}:3: empty label" in message and f"{csv}:4: empty path" in message
    assert f"{csv}:5: unknown split 'holdout'" in message and "... and 8 more" in message
    assert message.count("empty label") == 18  # the first 20 problems are listed one by one


@pytest.mark.parametrize(("names", "finding"), [
    (["abnormal", "normal"], 0), (["Normal", "Pneumonia"], 1), (["benign", "tumor"], 1),
    (["no_finding", "mass"], 1), (["non_tumor", "tumor"], 1), (["malignant", "normal_or_benign"], 0),
    (["a", "b"], None), (["benign", "normal"], None), (["x", "y", "normal"], None),
])
def test_the_finding_is_the_class_whose_counterpart_reads_as_none(names: list[str], finding: int | None) -> None:
    from medops.datasets import finding_by_name

    assert finding_by_name(names) == finding
