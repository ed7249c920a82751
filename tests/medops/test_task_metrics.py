"""Task types (binary, multi-class, ordinal, multi-label): resolution, label checks, splits and the numpy metrics."""

from __future__ import annotations

import numpy as np
import pytest

from medops.calibration import fit_temperature, label_columns, sigmoid_temperature
from medops.datasets import (
    DataError,
    SplitArrays,
    label_counts,
    resolve_task,
    split_fold,
    stratification_key,
    validate_splits,
)
from medops.fingerprint import dataset_fingerprint
from medops.metrics import (
    evaluate_multilabel,
    label_thresholds,
    multilabel_summary,
    ordinal_metrics,
    per_label,
    quadratic_weighted_kappa,
    task_summary,
)
from medops.ood import fit_gaussians


def splits(labels: dict[str, np.ndarray], names: list[str], info: dict | None = None) -> SplitArrays:
    images = {s: np.zeros((len(y), 8, 8, 1), np.uint8) for s, y in labels.items()}
    return SplitArrays(images, labels, names, source="mem.npz", info=info or {})


def multilabel_data(n: int = 40, k: int = 3, seed: int = 0) -> SplitArrays:
    rng = np.random.default_rng(seed)
    return splits({s: rng.integers(0, 2, (n, k)) for s in ("train", "val", "test")}, [f"l{i}" for i in range(k)])


def test_auto_task_from_the_labels() -> None:
    two = {s: np.array([0, 1, 0, 1]) for s in ("train", "val", "test")}
    three = {s: np.array([0, 1, 2, 1]) for s in ("train", "val", "test")}
    assert resolve_task("auto", splits(two, ["a", "b"])) == "binary"
    assert resolve_task(None, splits(three, ["a", "b", "c"])) == "multiclass"
    assert resolve_task("auto", splits(three, ["a", "b", "c"], {"ordinal": True})) == "ordinal"  # RetinaMNIST
    assert resolve_task("auto", multilabel_data()) == "multilabel"
    assert resolve_task("ordinal", splits(three, ["a", "b", "c"])) == "ordinal"


@pytest.mark.parametrize(("declared", "message"), [
    ("multilabel", "single-label"), ("binary", "has 3 classes"), ("sideways", "choose auto"),
])
def test_a_declared_task_that_does_not_fit_fails(declared: str, message: str) -> None:
    three = {s: np.array([0, 1, 2, 1]) for s in ("train", "val", "test")}
    with pytest.raises(DataError, match=message):
        resolve_task(declared, splits(three, ["a", "b", "c"]))
    with pytest.raises(DataError, match="N x 3 multi-label"):
        resolve_task("multiclass", multilabel_data())
    with pytest.raises(DataError, match="at least 3 classes"):
        resolve_task("ordinal", splits({s: np.array([0, 1]) for s in ("train", "val", "test")}, ["a", "b"]))


def test_multilabel_labels_are_validated() -> None:
    data = multilabel_data()
    validate_splits(data)  # N x K of 0/1 with K names: fine
    data.labels["val"][3, 1] = 2
    with pytest.raises(DataError, match="val multi-label value 2 at index 3, label 'l1' is not 0 or 1"):
        validate_splits(data)
    data = multilabel_data()
    data.labels["test"] = data.labels["test"][:, :2]
    with pytest.raises(DataError, match=r"expected \(40, 3\)"):
        validate_splits(data)


def test_label_counts_and_stratification_key() -> None:
    assert label_counts(np.array([0, 2, 2]), 3) == [1, 0, 2]
    Y = np.array([[1, 0], [1, 0], [0, 1], [1, 1], [1, 0]])
    assert label_counts(Y, 2) == [4, 2]
    key = stratification_key(Y, min_count=2)
    assert key[0] == key[1] == key[4] and key[2] == key[3] == -1  # rare label sets pooled into one stratum
    assert stratification_key(np.array([[2], [0]]).reshape(-1)).tolist() == [2, 0]


def test_multilabel_folds_keep_the_label_sets_and_the_fingerprint_takes_n_x_k() -> None:
    data = multilabel_data(n=60)
    fold = split_fold(data, 1, 3, seed=0)
    assert fold.labels["train"].shape[1] == 3 and len(fold.labels["train"]) + len(fold.labels["val"]) == 120
    assert dataset_fingerprint({"train": (data.images["train"], data.labels["train"])}).startswith("sha256:")


def test_quadratic_weighted_kappa() -> None:
    y = np.array([0, 1, 2, 2, 1, 0])
    assert quadratic_weighted_kappa(y, y, 3) == pytest.approx(1.0)
    one_off, two_off = np.array([1, 1, 2, 2, 1, 0]), np.array([2, 1, 2, 2, 1, 0])
    assert quadratic_weighted_kappa(y, two_off, 3) < quadratic_weighted_kappa(y, one_off, 3) < 1.0
    P = np.eye(3)[one_off]
    assert ordinal_metrics(P, y) == {"qwk": pytest.approx(quadratic_weighted_kappa(y, one_off, 3)),
                                     "mae": pytest.approx(1 / 6)}
    assert set(task_summary(P, y, "ordinal")) >= {"acc", "auroc", "qwk", "mae"}


def test_multilabel_metrics_and_thresholds() -> None:
    rng = np.random.default_rng(0)
    Y = rng.integers(0, 2, (200, 3))
    P = np.clip(0.35 * Y + 0.65 * rng.random((200, 3)), 0, 1)
    P[:, 2] = rng.random(200)  # an uninformative label
    summary = multilabel_summary(P, Y)
    f = per_label(P, Y, ["a", "b", "c"], [0.5, 0.5, 0.5])
    assert summary["auroc"] == pytest.approx(np.mean([f[n]["auroc"] for n in "abc"]))
    assert f["a"]["auroc"] > 0.8 and 0.35 < f["c"]["auroc"] < 0.65
    thresholds = label_thresholds(P, Y)
    assert all(0 < t < 1 for t in thresholds)
    const = Y.copy()
    const[:, 1] = 0
    assert label_thresholds(P, const)[1] is None  # a label with one value in val: no threshold (0.5 is used)
    result = evaluate_multilabel(P, Y, ["a", "b", "c"], thresholds, n_resamples=50)
    auroc = result["metrics"]["auroc"]
    assert auroc["ci_low"] <= auroc["value"] <= auroc["ci_high"] and result["label_counts"] == Y.sum(0).tolist()


def test_one_temperature_on_the_sigmoid_logits() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.5, (2000, 4))
    Y = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(int)  # labels drawn from sigmoid(z)
    logits = 3.0 * z  # a model three times over-confident
    P = 1 / (1 + np.exp(-logits))
    T = fit_temperature(*label_columns(P, Y))
    assert T == pytest.approx(3.0, rel=0.15)
    assert np.allclose(sigmoid_temperature(P, T), 1 / (1 + np.exp(-logits / T)))


def test_ood_fits_one_gaussian_for_multilabel_labels() -> None:
    rng = np.random.default_rng(2)
    means, factor = fit_gaussians(rng.normal(size=(50, 4)), rng.integers(0, 2, (50, 3)))
    assert means.shape == (1, 4) and factor.shape == (4, 4)
