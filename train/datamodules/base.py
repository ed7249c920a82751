"""The in-memory image-classification DataModule that the format-specific modules build on.

A subclass only loads its source into :class:`SplitArrays` (uint8 N x H x W x C images and int64
labels per split); this base class validates them, computes normalisation statistics on the training
split, fingerprints the data and serves tensors in the model-input contract (float32 NCHW in [0, 1]).

k-fold cross-validation (``fold`` set): train and val are pooled and split into ``num_folds``
stratified, seeded folds; fold ``fold`` becomes the validation split, the others the training split,
and the test split is left untouched. The dataset fingerprint stays that of the data as loaded, so
every fold of a sweep records the same one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medimg import dataset_fingerprint

SPLITS = ("train", "val", "test")
log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data, found before training starts; the message names the source and the problem."""


@dataclass
class SplitArrays:
    """Images (N x H x W x C, uint8) and labels (N, int64) of each split, with class names."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    class_names: list[str]
    source: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.images["train"].shape[-1])

    @property
    def image_size(self) -> int:
        return int(self.images["train"].shape[1])


def validate_splits(data: SplitArrays) -> None:
    """Raise :class:`DataError` naming the source for missing splits, bad shapes or out-of-range labels."""
    num_classes = len(data.class_names)
    if num_classes < 2:
        raise DataError(f"{data.source}: need at least 2 classes, found {num_classes}")
    shapes = set()
    for split in SPLITS:
        if split not in data.images:
            raise DataError(f"{data.source}: split {split!r} is missing")
        images, labels = data.images[split], data.labels[split]
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[1] != images.shape[2]:
            raise DataError(
                f"{data.source}: {split} images have shape {images.shape}; expected N x S x S x C with C in 1 or 3"
            )
        if images.dtype != np.uint8:
            raise DataError(f"{data.source}: {split} images have dtype {images.dtype}; expected uint8")
        if len(images) == 0:
            raise DataError(f"{data.source}: split {split!r} is empty")
        if labels.shape != (len(images),):
            raise DataError(
                f"{data.source}: {split} has {len(images)} images but labels of shape {labels.shape}"
            )
        bad = (labels < 0) | (labels >= num_classes)
        if bad.any():
            raise DataError(
                f"{data.source}: {split} label {int(labels[bad][0])} at index {int(np.argmax(bad))} is out of "
                f"range for {num_classes} classes (0..{num_classes - 1})"
            )
        shapes.add(images.shape[1:])
    if len(shapes) != 1:
        raise DataError(f"{data.source}: splits disagree on image shape: {sorted(shapes)}")


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in the [0, 1] model-input scale."""
    flat = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    std = np.maximum(flat.std(axis=0), 1e-6)
    return flat.mean(axis=0).round(6).tolist(), std.round(6).tolist()


class ArrayDataset(Dataset):
    """Serves (float32 C x H x W in [0, 1], int64 label) pairs from uint8 N x H x W x C arrays."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index].float().div_(255.0), self.labels[index]


def check_fold(fold: int | None, num_folds: int) -> None:
    """With ``fold`` set, raise :class:`DataError` unless ``num_folds >= 2`` and ``0 <= fold < num_folds``."""
    if fold is None:
        return
    if isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer)) or num_folds < 2:
        raise DataError(f"data.num_folds must be an integer >= 2 for cross-validation, got {num_folds!r}")
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= fold < num_folds:
        raise DataError(
            f"data.fold must be an integer in 0..{num_folds - 1} for data.num_folds={num_folds}, got {fold!r}"
        )


def stratified_folds(labels: np.ndarray, num_folds: int, seed: int) -> np.ndarray:
    """The fold (0..num_folds-1) of every sample: stratified by label, seeded, deterministic.

    Per class, the samples are shuffled and dealt round-robin to the folds, so each fold holds
    ``floor`` or ``ceil`` of ``n_class / num_folds`` samples of every class; the dealing continues
    where the previous class stopped, so the fold sizes differ by at most one.
    """
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        folds[idx] = (offset + np.arange(len(idx))) % num_folds
        offset = (offset + len(idx)) % num_folds
    return folds


def split_fold(data: SplitArrays, fold: int, num_folds: int, seed: int) -> SplitArrays:
    """``data`` with train and val replaced by fold ``fold`` (val) and the remaining folds (train)."""
    check_fold(fold, num_folds)
    images = np.concatenate([data.images["train"], data.images["val"]])
    labels = np.concatenate([data.labels["train"], data.labels["val"]])
    if len(labels) < num_folds:
        raise DataError(f"{data.source}: {len(labels)} train+val samples cannot make {num_folds} folds")
    counts = np.bincount(labels, minlength=len(data.class_names))
    rare = [data.class_names[c] for c in np.flatnonzero(counts < num_folds)]
    if rare:
        log.warning("%s: classes %s have fewer than %d train+val samples; some validation folds lack them",
                    data.source, rare, num_folds)
    folds = stratified_folds(labels, num_folds, seed)
    val, train = np.flatnonzero(folds == fold), np.flatnonzero(folds != fold)
    return SplitArrays(
        images={"train": images[train], "val": images[val], "test": data.images["test"]},
        labels={"train": labels[train], "val": labels[val], "test": data.labels["test"]},
        class_names=data.class_names,
        source=data.source,
        info=dict(data.info),
    )


class ImageClassificationDataModule(L.LightningDataModule):
    """Validated in-memory splits with statistics, fingerprint and loaders; subclasses implement ``load``.

    Args:
        batch_size, num_workers, pin_memory: the loaders' settings.
        fold: ``None`` (default): the splits as loaded. An integer: k-fold cross-validation, this fold of
            the pooled train+val samples is the validation split and the other folds the training split
            (test untouched).
        num_folds: number of folds (>= 2) when ``fold`` is set.
        fold_seed: seed of the stratified fold assignment (the same for every fold of a sweep).
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        fold: int | None = None,
        num_folds: int = 5,
        fold_seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.fold = fold
        self.num_folds = num_folds
        self.fold_seed = fold_seed
        self.data: SplitArrays | None = None
        self.datasets: dict[str, ArrayDataset] = {}
        self.mean: list[float] = []
        self.std: list[float] = []
        self.fingerprint = ""  # of the data as loaded (the same for every fold)
        self.split_fingerprint = ""  # of the splits actually served (differs between folds)

    def load(self) -> SplitArrays:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self) -> SplitArrays:
        """Load, validate and summarise the data once (idempotent); raises :class:`DataError` on bad data."""
        if self.data is None:
            check_fold(self.fold, self.num_folds)  # before loading: a bad setting fails fast
            data = self.load()
            validate_splits(data)
            self.fingerprint = dataset_fingerprint({s: (data.images[s], data.labels[s]) for s in SPLITS})
            self.split_fingerprint = self.fingerprint
            if self.fold is not None:
                data = split_fold(data, int(self.fold), int(self.num_folds), int(self.fold_seed))
                validate_splits(data)
                self.split_fingerprint = dataset_fingerprint({s: (data.images[s], data.labels[s]) for s in SPLITS})
            self.mean, self.std = channel_stats(data.images["train"])
            self.datasets = {s: ArrayDataset(data.images[s], data.labels[s]) for s in SPLITS}
            self.data = data
        return self.data

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    @property
    def num_classes(self) -> int:
        return len(self.prepare().class_names)

    @property
    def class_names(self) -> list[str]:
        return self.prepare().class_names

    @property
    def channels(self) -> int:
        return self.prepare().channels

    @property
    def image_size(self) -> int:
        return self.prepare().image_size

    def class_counts(self, split: str = "train") -> list[int]:
        data = self.prepare()
        return np.bincount(data.labels[split], minlength=len(data.class_names)).tolist()

    def summary(self) -> dict[str, Any]:
        """What the run record stores about the data: source, geometry, classes, counts, stats, fingerprint.

        ``fingerprint`` is that of the data as loaded (the same for all folds of a cross-validation);
        ``split_fingerprint`` that of the splits this run used; ``fold``, ``num_folds`` and ``fold_seed``
        say how they were made (``fold`` ``None``: the splits as loaded).
        """
        data = self.prepare()
        return {
            "source": data.source,
            "image_size": data.image_size,
            "channels": data.channels,
            "class_names": data.class_names,
            "counts": {s: self.class_counts(s) for s in SPLITS},
            "mean": self.mean,
            "std": self.std,
            "fingerprint": self.fingerprint,
            "split_fingerprint": self.split_fingerprint,
            "fold": None if self.fold is None else int(self.fold),
            "num_folds": int(self.num_folds),
            "fold_seed": int(self.fold_seed),
            **data.info,
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.prepare()
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle and len(self.datasets[split]) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_split_dataloader(self, split: str) -> DataLoader:
        return self._loader(split, shuffle=False)


def stratified_split(
    labels: np.ndarray, fractions: Mapping[str, float], seed: int
) -> dict[str, np.ndarray]:
    """Indices per split (``fractions`` for val/test, the rest train), stratified by label, seeded."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        start = 0
        for split in ("val", "test"):
            n = int(round(fractions.get(split, 0.0) * len(idx)))
            out[split].extend(idx[start : start + n].tolist())
            start += n
        out["train"].extend(idx[start:].tolist())
    return {s: np.array(sorted(v), dtype=np.int64) for s, v in out.items()}




def grouped_split(
    labels: np.ndarray, groups: np.ndarray, fractions: Mapping[str, float], seed: int
) -> dict[str, np.ndarray]:
    """Indices per split with every group (patient/study) in exactly one split.

    The groups are stratified by their majority label (ties: the smallest label) and split with
    :func:`stratified_split` (seeded); each sample follows its group.
    """
    labels = np.asarray(labels).reshape(-1)
    groups = np.asarray(groups).reshape(-1)
    names, inverse = np.unique(groups, return_inverse=True)
    majority = np.empty(len(names), dtype=np.int64)
    for g in range(len(names)):
        majority[g] = int(np.argmax(np.bincount(labels[inverse == g])))
    parts = stratified_split(majority, fractions, seed)
    out = {}
    for split in SPLITS:
        member = np.zeros(len(names), dtype=bool)
        member[parts[split]] = True
        out[split] = np.flatnonzero(member[inverse]).astype(np.int64)
    return out
