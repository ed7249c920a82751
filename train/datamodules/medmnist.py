"""MedMNIST v2 ``.npz`` files (any 2D dataset, 28 to 224 px, grayscale or RGB, binary or multi-class)."""

from __future__ import annotations

import logging
import urllib.request
from pathlib import Path

import numpy as np

from medimg import file_md5
from train.datamodules.base import SPLITS, DataError, ImageClassificationDataModule, SplitArrays

log = logging.getLogger(__name__)

ZENODO_RECORD = "https://zenodo.org/records/10519652/files"
# Official MD5 checksums of the 28 px MedMNIST v2 2D files (as published in medmnist/info.py, v2.1.0).
# Other sizes (``*_64``, ``*_128``, ``*_224``) need ``data.md5=...`` to be verified.
OFFICIAL_MD5 = {
    "pathmnist": "a8b06965200029087d5bd730944a56c1",
    "chestmnist": "02c8a6516a18b556561a56cbdd36c4a8",
    "dermamnist": "0744692d530f8e62ec473284d019b0c7",
    "octmnist": "c68d92d5b585d8d81f7112f81e2d0842",
    "pneumoniamnist": "28209eda62fecd6e6a2d98b1501bb15f",
    "retinamnist": "bd4c0672f1bba3e3a89f0e4e876791e4",
    "breastmnist": "750601b1f35ba3300ea97c75c52ff8f6",
    "bloodmnist": "7053d0359d879ad8a5505303e11de1dc",
    "tissuemnist": "ebe78ee8b05294063de985d821c1c34b",
    "organamnist": "866b832ed4eeba67bfb9edee1d5544e6",
    "organcmnist": "0afa5834fb105f7705a7d93372119a21",
    "organsmnist": "e5c39f1af030238290b9557d9503af9d",
}


def medmnist_url(name: str) -> str:
    """The official Zenodo URL of a MedMNIST v2 file stem such as ``breastmnist`` or ``pathmnist_64``."""
    return f"{ZENODO_RECORD}/{name}.npz?download=1"


def download_medmnist(name: str, path: Path, md5: str | None = None) -> Path:
    """Download a MedMNIST file from Zenodo and verify its MD5 (for users with internet; never in tests)."""
    expected = md5 or OFFICIAL_MD5.get(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    log.info("downloading %s to %s", medmnist_url(name), path)
    urllib.request.urlretrieve(medmnist_url(name), tmp)  # noqa: S310 - fixed https URL
    actual = file_md5(tmp)
    if expected and actual != expected:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{path}: downloaded file has MD5 {actual}, expected {expected}")
    if not expected:
        log.warning("%s: no official MD5 known for %r; downloaded file has MD5 %s", path, name, actual)
    tmp.replace(path)
    return path


def load_medmnist_npz(path: str | Path, class_names: list[str] | None = None) -> SplitArrays:
    """Read ``{train,val,test}_images`` and ``*_labels`` from a MedMNIST ``.npz`` into :class:`SplitArrays`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    try:
        npz = np.load(path, allow_pickle=False)
        keys = set(npz.files)
    except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError...
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    needed = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
    missing = [k for k in needed if k not in keys]
    if missing:
        raise DataError(f"{path}: missing keys {missing}; a MedMNIST file has {needed} (found {sorted(keys)})")
    images: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    for split in SPLITS:
        try:
            imgs, labs = npz[f"{split}_images"], npz[f"{split}_labels"]
        except Exception as exc:
            raise DataError(f"{path}: cannot read split {split!r} ({exc})") from exc
        if imgs.ndim == 3:
            imgs = imgs[..., None]
        if imgs.ndim != 4:
            raise DataError(f"{path}: {split}_images has shape {imgs.shape}; expected N x H x W [x C] (2D MedMNIST)")
        if labs.ndim == 2 and labs.shape[1] > 1:
            raise DataError(
                f"{path}: {split}_labels has shape {labs.shape}: multi-label datasets (e.g. ChestMNIST) are not "
                "supported by single-label classification"
            )
        labs = labs.reshape(-1)
        if not np.issubdtype(labs.dtype, np.integer):
            raise DataError(f"{path}: {split}_labels has dtype {labs.dtype}; expected integer class indices")
        images[split], labels[split] = imgs, labs.astype(np.int64)
    num_classes = int(max(int(labels[s].max(initial=0)) for s in SPLITS)) + 1
    # with configured names, a label beyond them is reported by validate_splits (file, split, index)
    names = list(class_names) if class_names else [str(i) for i in range(max(num_classes, 2))]
    return SplitArrays(images, labels, names, source=str(path), info={"format": "medmnist", "md5": file_md5(path),
                                     "licence": "CC BY 4.0" if path.stem in OFFICIAL_MD5 else None})


class MedMNISTDataModule(ImageClassificationDataModule):
    """A MedMNIST v2 2D ``.npz``; ``path=`` points at any such file, ``md5`` is checked on load.

    Args:
        path: the ``.npz`` file.
        md5: expected MD5; null: the official checksum when the file stem is a known MedMNIST name;
            false: no check.
        download: fetch ``name`` from the official Zenodo record when the file is missing.
        name: the MedMNIST file stem (e.g. ``breastmnist``, ``pathmnist_64``), for download and checksum lookup.
        class_names: human-readable names in label order (optional).
        fold, num_folds, fold_seed: k-fold cross-validation over train+val (see
            :class:`~train.datamodules.base.ImageClassificationDataModule`); ``fold=None`` keeps the file's splits.
    """

    def __init__(
        self,
        path: str,
        md5: str | bool | None = None,
        download: bool = False,
        name: str | None = None,
        class_names: list[str] | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        fold: int | None = None,
        num_folds: int = 5,
        fold_seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, fold=fold,
                         num_folds=num_folds, fold_seed=fold_seed)
        self.path = Path(path)
        self.name = name or self.path.stem
        self.md5 = None if md5 is False else (md5 or OFFICIAL_MD5.get(self.path.stem))
        self.download = download
        self.configured_class_names = list(class_names) if class_names else None

    def prepare_data(self) -> None:
        if self.download and not self.path.is_file():
            download_medmnist(self.name, self.path, self.md5)

    def load(self) -> SplitArrays:
        self.prepare_data()
        if self.md5 and self.path.is_file():
            actual = file_md5(self.path)
            if actual != self.md5:
                raise DataError(
                    f"{self.path}: MD5 {actual} does not match the expected {self.md5} (corrupt or different file; "
                    "set data.md5=false to accept it)"
                )
        return load_medmnist_npz(self.path, self.configured_class_names)
