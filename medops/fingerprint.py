"""Content fingerprints for files and in-memory datasets (for reproducibility logs)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import numpy as np

__all__ = ["dataset_fingerprint", "file_md5", "sample_digest"]

# the tags keep the package's former name (medimg): changing them would change every recorded fingerprint
_SAMPLE_TAG = b"medimg.sample.v1\n"
_SPLIT_TAG = b"medimg.split.v1\n"
_DATASET_TAG = b"medimg.dataset.v1\n"


def file_md5(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex MD5 of a file's bytes, read in chunks (an identifier, not a security hash)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sample_digest(image: np.ndarray, label: int | np.ndarray) -> str:
    """Hex SHA-256 over an image's dtype, shape, C-order bytes and its integer label.

    Byte order is normalised to little-endian so digests agree across machines. ``label``
    may also be a 1-element or multi-label integer/bool vector; ``3`` and ``[3]`` hash alike.
    """
    image = _canonical(np.asarray(image))
    labels = _canonical_labels(np.asarray(label).reshape(1, -1))
    return _digest(_prefix(image.dtype, image.shape, labels.shape[1]), image.tobytes(), labels[0].tobytes())


def dataset_fingerprint(splits: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """``"sha256:<hex>"`` of a dataset given as split name -> (images N x ..., labels N).

    Stable under reordering samples within a split (per-sample digests are sorted) and
    across machines; changes if any pixel, label or split membership changes. Labels may
    also be N x K (multi-label). Hash: per split, the sorted sample digests; then the
    split names in sorted order with their split hashes.
    """
    total = hashlib.sha256(_DATASET_TAG)
    for name in sorted(splits):
        images, labels = splits[name]
        total.update(f"{len(name)}:{name}\n".encode())
        total.update(_split_hash(str(name), np.asarray(images), np.asarray(labels)))
    return f"sha256:{total.hexdigest()}"


def _split_hash(name: str, images: np.ndarray, labels: np.ndarray) -> bytes:
    n = len(images)
    if labels.ndim == 0 or len(labels) != n:
        raise ValueError(f"split {name!r}: {n} images but labels of shape {labels.shape}")
    images = _canonical(images)
    n_labels = int(np.prod(labels.shape[1:])) if labels.ndim > 1 else 1
    labels = _canonical_labels(labels.reshape(n, n_labels))
    prefix = _prefix(images.dtype, images.shape[1:], labels.shape[1])
    digests = sorted(_digest(prefix, images[i].tobytes(), labels[i].tobytes()) for i in range(n))
    split = hashlib.sha256(_SPLIT_TAG)
    split.update(f"{n}\n".encode())
    for d in digests:
        split.update(bytes.fromhex(d))
    return split.digest()


def _prefix(dtype: np.dtype, shape: tuple[int, ...], n_labels: int) -> hashlib._Hash:
    h = hashlib.sha256(_SAMPLE_TAG)
    h.update(f"{dtype.str}|{tuple(int(s) for s in shape)}|{n_labels}\n".encode())
    return h


def _digest(prefix: hashlib._Hash, image_bytes: bytes, label_bytes: bytes) -> str:
    h = prefix.copy()
    h.update(image_bytes)
    h.update(label_bytes)
    return h.hexdigest()


def _canonical(arr: np.ndarray) -> np.ndarray:
    """C-contiguous, little-endian (or byte-order-free) copy/view of ``arr``."""
    if arr.dtype.hasobject:
        raise TypeError("object arrays cannot be fingerprinted")
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not np.little_endian):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr)


def _canonical_labels(labels: np.ndarray) -> np.ndarray:
    if labels.dtype.kind not in "biu":
        raise TypeError(f"labels must be integer or bool, got dtype {labels.dtype}")
    return np.ascontiguousarray(labels.astype("<i8"))
