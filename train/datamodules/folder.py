"""Image files listed in a CSV manifest (``path,label[,split]``) or sorted into class sub-folders.

Every file is read through the torch-free :mod:`medops` reader (PNG, JPEG, BMP, TIFF, DICOM with
rescale and windowing, ``.npy``), converted to the configured channels and size, and kept in memory.
All unreadable files are reported together, with their paths, before training starts.
"""

from __future__ import annotations

import logging
from typing import Any

from medops.datasets import FolderDataset, ScanResult
from train.datamodules.base import ImageClassificationDataModule

log = logging.getLogger(__name__)


class FolderDataModule(ImageClassificationDataModule):
    """PNG/JPEG/DICOM/... images from a CSV manifest or class folders, resized to ``image_size``.

    Args:
        path: a ``.csv`` manifest or a folder of class sub-folders (optionally under train/val/test).
        image_size: square side the images are resized to.
        channels: 1 (grayscale) or 3 (RGB).
        class_names: label order; default: numeric labels by value, then the others alphabetically ignoring
            case (:func:`medops.datasets.class_order`). Required, in grade order, for ``task=ordinal`` and
            ``ordinal_cutoff`` unless the labels are numbers.
        val_fraction, test_fraction: used for samples without a split, stratified by label and seeded.
        window: DICOM window ``[center, width]``; default: the file's own window, else min-max.
        group_column: CSV column of patient/study ids; ``auto`` (default): ``patient_id`` or ``study_id`` when
            present. Rows without a split are then split by group (stratified by each group's majority
            label, seeded), so no patient is in two splits. ``null``: sample-level splitting.
        skip_unreadable: drop unreadable files with a warning instead of raising (``allow_corrupt``).
        settings: loaders, folds and the positive class (see
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
        group_column: str | None = "auto",
        skip_unreadable: bool = False,
        **settings: Any,
    ) -> None:
        super().__init__(**settings)
        self.source = FolderDataset(path, image_size, channels, class_names, val_fraction, test_fraction, split_seed,
                                    window, group_column, skip_unreadable)

    @property
    def scan_result(self) -> ScanResult | None:
        return self.source.scan_result

    def scan(self) -> ScanResult:
        """Every file read; unreadable ones as ``(path, reason)`` (see :meth:`FolderDataset.scan`)."""
        return self.source.scan()

    def file_meta(self) -> dict[str, Any]:
        """Per-split paths, groups and original shapes of the loaded files (for data validation)."""
        return self.source.file_meta()
