"""Image files listed in a CSV manifest (``path,label[,split]``) or sorted into class sub-folders.

Every file is read through the torch-free :mod:`medimg` reader (PNG, JPEG, BMP, TIFF, DICOM with
rescale and windowing, ``.npy``), converted to the configured channels and size, and kept in memory.
All unreadable files are reported together, with their paths, before training starts.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import track

from medimg import SUPPORTED_SUFFIXES, ImageReadError, read_image, resize, to_channels
from train.datamodules.base import (
    SPLITS,
    DataError,
    ImageClassificationDataModule,
    SplitArrays,
    grouped_split,
    stratified_split,
)

log = logging.getLogger(__name__)
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
GROUP_COLUMNS = ("patient_id", "study_id")  # ``group_column: auto`` uses the first one present
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"


@dataclass
class Sample:
    path: Path
    label: str
    split: str | None
    group: str | None = None


@dataclass
class ScanResult:
    """What :meth:`FolderDataModule.scan` found: the readable files as splits, and every unreadable file.

    ``paths``/``groups``/``original_shapes``/``original_dtypes`` are per split, aligned with ``data``;
    ``errors`` lists ``(path, reason)`` of the files that could not be used (``data`` is ``None`` when
    none could).
    """

    data: SplitArrays | None
    errors: list[tuple[str, str]]
    paths: dict[str, list[str]] = field(default_factory=dict)
    groups: dict[str, list[str | None]] = field(default_factory=dict)
    original_shapes: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    original_dtypes: dict[str, list[str]] = field(default_factory=dict)
    group_column: str | None = None


def is_lfs_pointer(path: Path) -> bool:
    """True for a Git LFS pointer file (the object itself was not fetched)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX
    except OSError:
        return False


def manifest_group_column(csv_path: Path, group_column: str | None = "auto") -> str | None:
    """The patient/study column used for grouped splitting: ``auto`` picks the first of GROUP_COLUMNS present."""
    if not group_column or str(group_column).lower() in ("none", "null", "false"):
        return None
    with csv_path.open(newline="") as fh:
        columns = [c.strip().lower() for c in csv.DictReader(fh).fieldnames or []]
    if str(group_column).lower() == "auto":
        return next((c for c in GROUP_COLUMNS if c in columns), None)
    if group_column.lower() not in columns:
        raise DataError(f"{csv_path}: group column {group_column!r} not found among {columns}")
    return group_column.lower()


def read_manifest(csv_path: Path, group_column: str | None = None) -> list[Sample]:
    """Rows of a ``path,label[,split][,patient_id]`` CSV (paths relative to the CSV's folder); errors name the row."""
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
            group = (row.get(group_column) or None) if group_column else None
            samples.append(Sample(path if path.is_absolute() else csv_path.parent / path, row["label"], split, group))
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
        group_column: CSV column of patient/study ids; ``auto`` (default): ``patient_id`` or ``study_id`` when
            present. Rows without a split are then split by group (stratified by each group's majority
            label, seeded), so no patient is in two splits. ``null``: sample-level splitting.
        skip_unreadable: drop unreadable files with a warning instead of raising (``allow_corrupt``).
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
        group_column: str | None = "auto",
        skip_unreadable: bool = False,
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
        self.group_column = group_column
        self.skip_unreadable = skip_unreadable
        self.scan_result: ScanResult | None = None

    def _samples(self) -> tuple[list[Sample], str | None]:
        if self.path.suffix.lower() == ".csv":
            if not self.path.is_file():
                raise DataError(f"{self.path}: manifest not found")
            column = manifest_group_column(self.path, self.group_column)
            return read_manifest(self.path, column), column
        return scan_class_folders(self.path), None

    def _read(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """(original HxWxC image, resized model image); raises ImageReadError."""
        if is_lfs_pointer(sample.path):
            raise ImageReadError(str(sample.path), "Git LFS pointer file: the LFS object is not fetched (git lfs pull)")
        if sample.path.is_file() and sample.path.stat().st_size == 0:
            raise ImageReadError(str(sample.path), "empty file (0 bytes)")
        img = read_image(sample.path, window=self.window)  # type: ignore[arg-type]
        return img, resize(to_channels(img, self.out_channels), self.size)

    def scan(self) -> ScanResult:
        """Read every file; unreadable or empty ones are collected as ``(path, reason)`` instead of raising.

        The readable files are split as :meth:`load` would split them (given splits, else by patient
        group, else stratified by label). Configuration problems (missing manifest, unknown labels)
        still raise :class:`DataError`.
        """
        if self.scan_result is not None:
            return self.scan_result
        samples, column = self._samples()
        labels, names = _label_index([s.label for s in samples], self.configured_class_names, str(self.path))
        images = np.zeros((len(samples), self.size, self.size, self.out_channels), dtype=np.uint8)
        ok = np.ones(len(samples), dtype=bool)
        shapes: list[tuple[int, ...]] = [()] * len(samples)
        dtypes: list[str] = [""] * len(samples)
        errors: list[tuple[str, str]] = []
        for i, sample in enumerate(track(samples, description=f"reading {len(samples)} images", transient=True)):
            try:
                original, images[i] = self._read(sample)
                shapes[i], dtypes[i] = tuple(int(d) for d in original.shape), str(original.dtype)
            except ImageReadError as exc:
                ok[i] = False
                errors.append((str(sample.path), getattr(exc, "reason", None) or str(exc)))
        keep = np.flatnonzero(ok)
        samples = [samples[i] for i in keep]
        images, labels = images[keep], labels[keep]
        shapes = [shapes[i] for i in keep]
        dtypes = [dtypes[i] for i in keep]
        result = ScanResult(data=None, errors=errors, group_column=column)
        if samples:
            index = self._split_index(samples, labels)
            result.data = SplitArrays(
                images={s: images[index[s]] for s in SPLITS},
                labels={s: labels[index[s]] for s in SPLITS},
                class_names=names,
                source=str(self.path),
                info={"format": "csv" if self.path.suffix.lower() == ".csv" else "folder", "files": len(samples),
                      "group_column": column},
            )
            result.paths = {s: [str(samples[i].path) for i in index[s]] for s in SPLITS}
            result.groups = {s: [samples[i].group for i in index[s]] for s in SPLITS}
            result.original_shapes = {s: [shapes[i] for i in index[s]] for s in SPLITS}
            result.original_dtypes = {s: [dtypes[i] for i in index[s]] for s in SPLITS}
        self.scan_result = result
        return result

    def _split_index(self, samples: list[Sample], labels: np.ndarray) -> dict[str, np.ndarray]:
        given = np.array([s.split or "" for s in samples])
        index: dict[str, np.ndarray] = {s: np.flatnonzero(given == s) for s in SPLITS}
        unsplit = np.flatnonzero(given == "")
        if len(unsplit):
            groups = [samples[i].group for i in unsplit]
            if any(g is not None for g in groups):
                # a patient that already has rows in a given split keeps all its unsplit rows there
                fixed = {samples[i].group: samples[i].split for i in range(len(samples))
                         if samples[i].split and samples[i].group is not None}
                keys = np.array([g if g is not None else f"__row{i}" for g, i in zip(groups, unsplit, strict=True)])
                free = np.array([k not in fixed for k in keys])
                parts = grouped_split(labels[unsplit[free]], keys[free], self.fractions, self.split_seed)
                for s in SPLITS:
                    pinned = unsplit[~free][np.array([fixed[k] == s for k in keys[~free]], dtype=bool)]
                    index[s] = np.sort(np.concatenate([index[s], unsplit[free][parts[s]], pinned]))
            else:
                parts = stratified_split(labels[unsplit], self.fractions, self.split_seed)
                for s in SPLITS:
                    index[s] = np.sort(np.concatenate([index[s], unsplit[parts[s]]]))
        return index

    def load(self) -> SplitArrays:
        result = self.scan()
        if result.errors and (not self.skip_unreadable or result.data is None):
            total = len(result.errors) + (int(result.data.info["files"]) if result.data else 0)
            lines = [f"{path}: {reason}" for path, reason in result.errors]
            shown = "\n  ".join(lines[:20])
            more = f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else ""
            raise DataError(f"{self.path}: {len(lines)} of {total} images cannot be used:\n  {shown}{more}")
        if result.errors:
            log.warning("%s: skipping %d unreadable files (allow_corrupt): %s", self.path, len(result.errors),
                        ", ".join(p for p, _ in result.errors[:5]))
        assert result.data is not None
        return result.data

    def file_meta(self) -> dict[str, Any]:
        """Per-split paths, groups and original shapes of the loaded files (for data validation)."""
        r = self.scan()
        return {"paths": r.paths, "groups": r.groups, "original_shapes": r.original_shapes,
                "original_dtypes": r.original_dtypes, "group_column": r.group_column}
