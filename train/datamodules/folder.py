"""Image files listed in a CSV manifest (``path,label[,split]``) or sorted into class sub-folders.

Every file is read through the torch-free :mod:`medimg` reader (PNG, JPEG, BMP, TIFF, DICOM with
rescale and windowing, ``.npy``), converted to the configured channels and size, and kept in memory.
All unreadable files are reported together, with their paths, before training starts.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import track

from medimg import SUPPORTED_SUFFIXES, ImageReadError, read_image, resize, to_channels
from train.datamodules.base import (
    SPLITS,
    DataError,
    ImageClassificationDataModule,
    SplitArrays,
    stratified_split,
)

log = logging.getLogger(__name__)
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}


@dataclass
class Sample:
    path: Path
    label: str
    split: str | None


def read_manifest(csv_path: Path) -> list[Sample]:
    """Rows of a ``path,label[,split]`` CSV (paths relative to the CSV's folder); errors name the row."""
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: manifest not found")
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        if "path" not in columns or "label" not in columns:
            raise DataError(f"{csv_path}: manifest needs 'path' and 'label' columns, found {columns}")
        samples = []
        for line, row in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            if not row["path"] or not row["label"]:
                raise DataError(f"{csv_path}:{line}: empty path or label")
            split = row.get("split") or None
            if split is not None:
                if split.lower() not in SPLIT_ALIASES:
                    raise DataError(f"{csv_path}:{line}: unknown split {split!r}; use train, val or test")
                split = SPLIT_ALIASES[split.lower()]
            path = Path(row["path"])
            samples.append(Sample(path if path.is_absolute() else csv_path.parent / path, row["label"], split))
    if not samples:
        raise DataError(f"{csv_path}: manifest has no rows")
    return samples


def scan_class_folders(root: Path) -> list[Sample]:
    """``root/<class>/*`` or ``root/<split>/<class>/*`` image files as samples."""
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    split_dirs = [d for d in root.iterdir() if d.is_dir() and d.name.lower() in SPLIT_ALIASES]
    layout = [(d, SPLIT_ALIASES[d.name.lower()]) for d in split_dirs] if split_dirs else [(root, None)]
    samples = []
    for base, split in layout:
        for class_dir in sorted(d for d in base.iterdir() if d.is_dir()):
            for f in sorted(class_dir.rglob("*")):
                if f.is_file() and (f.suffix.lower() in SUPPORTED_SUFFIXES or f.suffix == ""):
                    samples.append(Sample(f, class_dir.name, split))
    if not samples:
        raise DataError(f"{root}: no image files found in class sub-folders")
    return samples


def _label_index(labels: list[str], class_names: list[str] | None, source: str) -> tuple[np.ndarray, list[str]]:
    names = list(class_names) if class_names else sorted(set(labels), key=lambda s: (not s.isdigit(), s.zfill(12)))
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataError(f"{source}: labels {unknown} are not among the configured classes {names}")
    return np.array([index[label] for label in labels], dtype=np.int64), names


class FolderDataModule(ImageClassificationDataModule):
    """PNG/JPEG/DICOM/... images from a CSV manifest or class folders, resized to ``image_size``.

    Args:
        path: a ``.csv`` manifest or a folder of class sub-folders (optionally under train/val/test).
        image_size: square side the images are resized to.
        channels: 1 (grayscale) or 3 (RGB).
        class_names: label order; default: sorted label values.
        val_fraction, test_fraction: used for samples without a split, stratified by label and seeded.
        window: DICOM window ``[center, width]``; default: the file's own window, else min-max.
        fold, num_folds, fold_seed: k-fold cross-validation over train+val (see
            :class:`~train.datamodules.base.ImageClassificationDataModule`); ``fold=None`` keeps the splits.
    """

    def __init__(
        self,
        path: str,
        image_size: int = 28,
        channels: int = 1,
        class_names: list[str] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        window: list[float] | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        fold: int | None = None,
        num_folds: int = 5,
        fold_seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, fold=fold,
                         num_folds=num_folds, fold_seed=fold_seed)
        if channels not in (1, 3):
            raise DataError(f"data.channels must be 1 or 3, got {channels}")
        self.path = Path(path)
        self.size = image_size
        self.out_channels = channels
        self.configured_class_names = list(class_names) if class_names else None
        self.fractions = {"val": val_fraction, "test": test_fraction}
        self.split_seed = split_seed
        self.window = tuple(window) if window else None

    def _samples(self) -> list[Sample]:
        if self.path.suffix.lower() == ".csv":
            return read_manifest(self.path)
        return scan_class_folders(self.path)

    def _decode_all(self, samples: list[Sample]) -> np.ndarray:
        images = np.zeros((len(samples), self.size, self.size, self.out_channels), dtype=np.uint8)
        errors: list[str] = []
        for i, sample in enumerate(track(samples, description=f"reading {len(samples)} images", transient=True)):
            try:
                img = read_image(sample.path, window=self.window)  # type: ignore[arg-type]
                images[i] = resize(to_channels(img, self.out_channels), self.size)
            except ImageReadError as exc:
                errors.append(str(exc))
        if errors:
            shown = "\n  ".join(errors[:20])
            more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
            raise DataError(f"{self.path}: {len(errors)} of {len(samples)} images cannot be used:\n  {shown}{more}")
        return images

    def load(self) -> SplitArrays:
        samples = self._samples()
        labels, names = _label_index([s.label for s in samples], self.configured_class_names, str(self.path))
        images = self._decode_all(samples)
        given = np.array([s.split or "" for s in samples])
        index: dict[str, np.ndarray] = {s: np.flatnonzero(given == s) for s in SPLITS}
        unsplit = np.flatnonzero(given == "")
        if len(unsplit):
            parts = stratified_split(labels[unsplit], self.fractions, self.split_seed)
            for s in SPLITS:
                index[s] = np.sort(np.concatenate([index[s], unsplit[parts[s]]]))
        return SplitArrays(
            images={s: images[index[s]] for s in SPLITS},
            labels={s: labels[index[s]] for s in SPLITS},
            class_names=names,
            source=str(self.path),
            info={"format": "csv" if self.path.suffix.lower() == ".csv" else "folder", "files": len(samples)},
        )
