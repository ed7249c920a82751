"""MedMNIST v2 ``.npz`` files (any 2D dataset, 28 to 224 px, grayscale or RGB, binary or multi-class)."""

from __future__ import annotations

import logging
from typing import Any

from medops.datasets import MedMNISTFile
from train.datamodules.base import ImageClassificationDataModule

log = logging.getLogger(__name__)



class MedMNISTDataModule(ImageClassificationDataModule):
    """A MedMNIST v2 2D ``.npz``; ``path=`` points at any such file, ``md5`` is checked on load.

    Args:
        path: the ``.npz`` file.
        md5: expected MD5; null: the official checksum when the file stem is a known MedMNIST name;
            false: no check.
        download: fetch ``name`` from the official Zenodo record when the file is missing.
        name: the MedMNIST file stem (e.g. ``breastmnist``, ``pathmnist_64``), for download and checksum lookup.
        class_names: human-readable names in label order (optional).
        settings: loaders, folds and the positive class (see
            :class:`~train.datamodules.base.ImageClassificationDataModule`); ``fold=None`` keeps the file's splits.
    """

    def __init__(
        self,
        path: str,
        md5: str | bool | None = None,
        download: bool = False,
        name: str | None = None,
        class_names: list[str] | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(**settings)
        self.source = MedMNISTFile(path, md5, download, name, class_names)

    def prepare_data(self) -> None:
        self.source.prepare_data()
