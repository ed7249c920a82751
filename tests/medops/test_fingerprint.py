"""Tests for medops.fingerprint."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from medops import dataset_fingerprint, file_md5, sample_digest


def _dataset(seed: int = 0, n: int = 12) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 6, 5), dtype=np.uint8)
    labels = rng.integers(0, 4, size=n)
    return {
        "train": (images[:8], labels[:8]),
        "val": (images[8:10], labels[8:10]),
        "test": (images[10:], labels[10:]),
    }


def _copy(ds: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {k: (x.copy(), y.copy()) for k, (x, y) in ds.items()}


def test_file_md5_matches_hashlib_across_chunk_sizes(tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000 + b"tail"
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    expected = hashlib.md5(data).hexdigest()
    assert file_md5(path) == expected
    assert file_md5(str(path), chunk_size=1000) == expected
    path.write_bytes(data[:-1])
    assert file_md5(path) != expected


def test_sample_digest_covers_dtype_shape_bytes_and_label() -> None:
    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    base = sample_digest(img, 1)
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert sample_digest(img.copy(), np.int64(1)) == base
    assert sample_digest(np.asfortranarray(img), 1) == base  # C-order bytes, not memory layout
    assert sample_digest(img, np.array([1])) == base
    assert sample_digest(img, 2) != base
    assert sample_digest(img.reshape(4, 3), 1) != base
    assert sample_digest(img.view(np.int8), 1) != base
    changed = img.copy()
    changed[2, 3] += 1
    assert sample_digest(changed, 1) != base


def test_sample_digest_is_byte_order_independent() -> None:
    img = np.arange(6, dtype="<i2").reshape(2, 3)
    assert sample_digest(img.astype(">i2"), 0) == sample_digest(img, 0)


def test_sample_digest_rejects_float_labels() -> None:
    with pytest.raises(TypeError):
        sample_digest(np.zeros((2, 2), np.uint8), 1.5)  # type: ignore[arg-type]


def test_dataset_fingerprint_format_and_determinism() -> None:
    fp = dataset_fingerprint(_dataset())
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fp)
    assert dataset_fingerprint(_dataset()) == fp
    assert dataset_fingerprint(_dataset(seed=1)) != fp


def test_dataset_fingerprint_golden_value() -> None:
    """Pins the algorithm: a change here silently invalidates every logged fingerprint."""
    images = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    fp = dataset_fingerprint({"train": (images, np.array([0, 1])), "val": (images[:1], np.array([1]))})
    assert fp == GOLDEN


def test_dataset_fingerprint_is_permutation_invariant() -> None:
    ds = _dataset()
    perm = np.random.default_rng(5).permutation(8)
    shuffled = _copy(ds)
    shuffled["train"] = (ds["train"][0][perm], ds["train"][1][perm])
    reordered = {k: shuffled[k] for k in ("val", "test", "train")}  # mapping order irrelevant too
    assert dataset_fingerprint(reordered) == dataset_fingerprint(ds)


def test_dataset_fingerprint_changes_on_one_pixel() -> None:
    ds, changed = _dataset(), _copy(_dataset())
    changed["val"][0][1, 2, 3] ^= 1
    assert dataset_fingerprint(changed) != dataset_fingerprint(ds)


def test_dataset_fingerprint_changes_on_one_label() -> None:
    ds, changed = _dataset(), _copy(_dataset())
    changed["test"][1][0] = (changed["test"][1][0] + 1) % 4
    assert dataset_fingerprint(changed) != dataset_fingerprint(ds)


def test_dataset_fingerprint_changes_when_a_sample_moves_between_splits() -> None:
    ds = _dataset()
    (xt, yt), (xv, yv) = ds["train"], ds["val"]
    moved = dict(ds)
    moved["train"] = (xt[1:], yt[1:])
    moved["val"] = (np.concatenate([xv, xt[:1]]), np.concatenate([yv, yt[:1]]))
    assert dataset_fingerprint(moved) != dataset_fingerprint(ds)
    renamed = {("valid" if k == "val" else k): v for k, v in ds.items()}
    assert dataset_fingerprint(renamed) != dataset_fingerprint(ds)


def test_dataset_fingerprint_label_layouts_and_duplicates() -> None:
    ds = _dataset()
    column = {k: (x, y.reshape(-1, 1)) for k, (x, y) in ds.items()}  # MedMNIST-style N x 1 labels
    assert dataset_fingerprint(column) == dataset_fingerprint(ds)
    x, y = ds["train"]
    doubled = dict(ds)
    doubled["train"] = (np.concatenate([x, x[:1]]), np.concatenate([y, y[:1]]))
    assert dataset_fingerprint(doubled) != dataset_fingerprint(ds)  # a duplicate counts
    multi = {"train": (x, np.eye(4, dtype=bool)[y])}
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", dataset_fingerprint(multi))


def test_dataset_fingerprint_validates_and_handles_empty_splits() -> None:
    x, y = _dataset()["val"]
    one_by_one = {"val": (np.stack([x[1], x[0]]), np.array([y[1], y[0]]))}
    assert dataset_fingerprint(one_by_one) == dataset_fingerprint({"val": (x, y)})
    assert sample_digest(x[0], int(y[0])) != sample_digest(x[1], int(y[1]))
    with pytest.raises(ValueError, match="labels"):
        dataset_fingerprint({"train": (x, y[:1])})
    assert dataset_fingerprint({"empty": (x[:0], y[:0])}) != dataset_fingerprint({})


GOLDEN = "sha256:cd7634af85c802aac610a6e269aa477c5296dc7c16f0ea91e14c5ed4b89d1cfd"
