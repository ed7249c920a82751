"""The in-memory image-classification DataModule that the format-specific modules build on.

A subclass only loads its source into :class:`SplitArrays` (uint8 N x H x W x C images and int64
labels per split); this base class validates them, computes normalisation statistics on the training
split, fingerprints the data and serves tensors in the model-input contract (float32 NCHW in [0, 1]).

k-fold cross-validation (``fold`` set): train and val are pooled and split into ``num_folds``
stratified, seeded folds; fold ``fold`` becomes the validation split, the others the training split,
and the test split is left untouched. When the data has patient/study groups (a manifest's ``patient_id`` or
``study_id`` column) the folds are grouped (scikit-learn's ``StratifiedGroupKFold``): every patient's images stay
in one fold, so no patient is in both train and val. The dataset fingerprint stays that of the data as loaded, so
every fold of a sweep records the same one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medops import to_unit_range
from medops.abnormal import abnormal_indices
from medops.abnormal import describe as describe_abnormal
from medops.datasets import (
    SPLITS,
    SplitArrays,
    channel_stats,
    check_fold,
    check_grade_order,
    finding_by_name,
    fingerprint_of,
    label_counts,
    positive_index,
    resolve_task,
    split_fold,
    validate_splits,
)
from medops.dicom import UNRECOGNISED_MODALITY, dicom_modality

log = logging.getLogger(__name__)


class ArrayDataset(Dataset):
    """Serves (float32 C x H x W in [0, 1], int64 label) pairs from uint8 N x H x W x C arrays (multi-label: the
    label is the int64 0/1 vector of the K labels)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # uint8 NCHW view
        self.labels = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(to_unit_range(self.images[index].numpy())), self.labels[index]


class ImageClassificationDataModule(L.LightningDataModule):
    """Validated in-memory splits with statistics, fingerprint and loaders; subclasses implement ``load``.

    Args:
        batch_size, num_workers, pin_memory: the loaders' settings.
        fold: ``None`` (default): the splits as loaded. An integer: k-fold cross-validation, this fold of
            the pooled train+val samples is the validation split and the other folds the training split
            (test untouched); with patient/study groups each group stays in one fold.
        num_folds: number of folds (>= 2) when ``fold`` is set.
        fold_seed: seed of the (stratified, patient-grouped where groups exist) fold assignment (the same for
            every fold of a sweep).
        positive_class: binary tasks: the clinically positive class (the finding, e.g. ``malignant``), by name or
            index; ``None``: class 1, the default for data that does not declare it (see
            :func:`medops.datasets.positive_index`).
        task: ``auto`` (default): multi-label for N x K labels, ordinal for a known ordinal MedMNIST file
            (RetinaMNIST), else binary or multi-class by the class count; or declared: ``binary``, ``multiclass``,
            ``ordinal`` (ordered grades) or ``multilabel`` (see :func:`medops.datasets.resolve_task`). The resolved
            task is :attr:`task` and goes into :meth:`summary` (the run record) and the checkpoint.
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        fold: int | None = None,
        num_folds: int = 5,
        fold_seed: int = 0,
        positive_class: str | int | None = None,
        modality: str | list[str] | None = None,
        abnormal_classes: list[str | int] | None = None,
        ordinal_cutoff: str | int | None = None,
        task: str | None = "auto",
    ) -> None:
        super().__init__()
        self.declared_task = task
        self.task = ""  # resolved by prepare(): binary, multiclass, ordinal or multilabel
        self.declared_positive = positive_class
        self.inferred_positive: int | None = None  # undeclared binary data: see _infer_positive
        self.declared_modality = [modality] if isinstance(modality, str) else list(modality or [])
        self.declared_abnormal, self.ordinal_cutoff = list(abnormal_classes or []), ordinal_cutoff
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

    source: Any = None  # the torch-free reader (medops.datasets) a subclass sets: FolderDataset, MedMNISTFile

    @property
    def path(self) -> Path:
        return self.source.path

    def load(self) -> SplitArrays:
        """The data as its reader loads it (before any fold split)."""
        return self.source.load()

    def prepare(self) -> SplitArrays:
        """Load, validate and summarise the data once (idempotent); raises :class:`DataError` on bad data."""
        if self.data is None:
            check_fold(self.fold, self.num_folds)  # before loading: a bad setting fails fast
            data = self.load()
            validate_splits(data)
            self.task = resolve_task(self.declared_task, data)
            self.fingerprint = fingerprint_of(data)
            self.split_fingerprint = self.fingerprint
            if self.fold is not None:
                data = split_fold(data, int(self.fold), int(self.num_folds), int(self.fold_seed))
                validate_splits(data)
                self.split_fingerprint = fingerprint_of(data)
            self.mean, self.std = channel_stats(data.images["train"])
            if self.task == "binary":
                positive_index(data.class_names, self.declared_positive)  # a class the data lacks fails here
            if self.task != "multilabel":
                if self.ordinal_cutoff not in (None, ""):  # "this grade and every later one": needs a real order
                    check_grade_order(data, f"data.ordinal_cutoff={self.ordinal_cutoff}")
                abnormal_indices(data.class_names, self.declared_abnormal, self.ordinal_cutoff)  # unknown: fails here
            elif self.declared_abnormal or self.ordinal_cutoff is not None:
                log.warning("data.abnormal_classes/ordinal_cutoff apply to multi-class data; ignored for multi-label")
            if self.task == "binary" and self.declared_positive is None:
                self._infer_positive(data.class_names)
            self.datasets = {s: ArrayDataset(data.images[s], data.labels[s]) for s in SPLITS}
            self.data = data
        return self.data

    def _infer_positive(self, names: Sequence[str]) -> None:
        """Undeclared binary data: the class whose counterpart's name reads as no finding (``[abnormal, normal]``:
        abnormal), else class 1; said in a warning, and recorded in the run record as the positive class."""
        guess = finding_by_name(names)
        self.inferred_positive = 1 if guess is None else guess
        why = ("class 1 of the class order" if guess is None
               else f"the other class, {names[1 - guess]}, reads as no finding")
        log.warning("data.positive_class is not declared: %s is taken as the positive class (the finding; %s); set "
                    "data.positive_class=<name> if that is wrong", names[self.inferred_positive], why)

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

    @property
    def positive_class(self) -> str | None:
        """The clinically positive class of a binary task by name (``None`` for other tasks)."""
        names = self.class_names
        if self.task != "binary":
            return None
        declared = self.declared_positive if self.declared_positive is not None else self.inferred_positive
        return names[positive_index(names, declared)]

    @property
    def abnormal(self) -> list[int] | None:
        """Multi-class tasks: the declared abnormal classes (``abnormal_classes`` or ``ordinal_cutoff``) as indices."""
        self.prepare()
        if self.task == "multilabel":
            return None
        return abnormal_indices(self.class_names, self.declared_abnormal, self.ordinal_cutoff)

    def modalities(self) -> list[str]:
        """The DICOM Modality of the data: the declared ``modality``, else read from the DICOM files of a folder or
        manifest (up to 200), else ``[]`` (unknown)."""
        if self.declared_modality:
            return sorted({str(m).upper() for m in self.declared_modality})
        meta = self.file_meta() if hasattr(self, "file_meta") else {}
        paths = [p for split in (meta.get("paths") or {}).values() for p in split]
        found = {dicom_modality(p) for p in paths[:: max(1, len(paths) // 200)]}
        return sorted(m for m in found if m and m != UNRECOGNISED_MODALITY)  # free text says nothing of the data

    def class_counts(self, split: str = "train") -> list[int]:
        """Samples per class; multi-label: positives per label."""
        data = self.prepare()
        return label_counts(data.labels[split], len(data.class_names))

    def summary(self) -> dict[str, Any]:
        """What the run record stores about the data: source, geometry, classes, counts, stats, fingerprint.

        ``fingerprint`` is that of the data as loaded (the same for all folds of a cross-validation);
        ``split_fingerprint`` that of the splits this run used; ``fold``, ``num_folds`` and ``fold_seed``
        say how they were made (``fold`` ``None``: the splits as loaded); for a fold, ``fold_grouped_by`` names
        the group column the folds kept together (``None``: folds by sample).
        """
        data = self.prepare()
        return {
            "source": data.source,
            "image_size": data.image_size,
            "channels": data.channels,
            "class_names": data.class_names,
            "task": self.task,
            "counts": {s: self.class_counts(s) for s in SPLITS},
            "sizes": {s: int(len(data.labels[s])) for s in SPLITS},
            "mean": self.mean,
            "std": self.std,
            "fingerprint": self.fingerprint,
            "split_fingerprint": self.split_fingerprint,
            "fold": None if self.fold is None else int(self.fold),
            "num_folds": int(self.num_folds),
            "fold_seed": int(self.fold_seed),
            "positive_class": self.positive_class,
            "positive_class_declared": self.declared_positive is not None,
            "abnormal": None if self.abnormal is None else describe_abnormal(data.class_names, self.abnormal),
            "modalities": self.modalities(),
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


