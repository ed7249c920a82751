"""Inputs of a batch job: an image folder, a CSV manifest or a MedMNIST ``.npz``, as a list of :class:`InputItem`.

Listing is cheap (no pixels are decoded); :func:`load_item` turns one item into model input through the same
:mod:`medops` contract that training used, so batch predictions match the exported model's test metrics.

Torch-free: numpy and :mod:`medops` only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import medops
from medops.datasets import DataError, canonical_split, manifest_rows, npz_split
from serve.contract import ModelInfo, ServeError

__all__ = ["InputItem", "iter_inputs", "load_item", "parse_label"]


@dataclass
class InputItem:
    """One input of a batch job.

    ``key`` is the unique row id in the predictions CSV: the file path as given (folder inputs: the folder as given
    joined with the file's relative path; CSV inputs: the ``path`` cell as written) or ``npz:<split>:<index>``.
    ``path`` is the file to read (None for ``.npz`` items, which carry ``array``); ``label`` a class index or None.
    """

    key: str
    path: str | None
    label: int | None
    array: np.ndarray | None = None


def iter_inputs(source: str | Path, *, split: str | None = "test",
                class_names: Sequence[str] | None = None) -> tuple[list[InputItem], dict[str, Any]]:
    """List the inputs in ``source`` and describe them.

    * a folder: every file below it (recursive; suffixes in :data:`medops.SUPPORTED_SUFFIXES` or none; hidden
      files and folders skipped, other files counted by extension in ``info["skipped"]``), sorted. When every
      first-level sub-folder holding images is named after a class in ``class_names``, the sub-folder gives the
      label.
    * a ``.csv`` manifest with a ``path`` column and optional ``label`` and ``split`` columns; paths are relative
      to the CSV's folder; a label is a class name (of ``class_names``) or a class index. With a ``split`` column,
      only rows of ``split`` are kept (``split=None`` keeps all rows).
    * a MedMNIST ``.npz``: ``<split>_images`` (uint8 N x H x W or N x H x W x C) and ``<split>_labels``.
    * a ``.txt`` (or ``.lst``) file list: one path per line, relative to the list's folder; blank lines and
      ``#`` comments skipped; no labels.

    Returns ``(items, info)`` with info keys ``kind`` (folder/csv/npz/list), ``source``, ``split`` (the split applied,
    or None), ``count``, ``labelled`` and for a folder ``skipped`` (extension -> files that are not read, e.g.
    ``{".nii.gz": 2}``). Raises ServeError naming the path when the input is missing, empty or
    malformed.
    """
    path = Path(source)
    names = list(class_names) if class_names is not None else None
    if not path.exists():
        raise ServeError(f"{path}: input not found")
    skipped: dict[str, int] = {}
    if path.is_dir():
        (items, skipped), kind, applied = _folder_items(path, names), "folder", None
    elif path.suffix.lower() == ".csv":
        items, applied = _csv_items(path, split, names)
        kind = "csv"
    elif path.suffix.lower() == ".npz":
        items, applied = _npz_items(path, split or "test", names)
        kind = "npz"
    elif path.suffix.lower() in (".txt", ".lst"):
        items, kind, applied = _list_items(path), "list", None
    else:
        raise ServeError(f"{path}: unsupported input; give an image folder, a .csv manifest, a .txt file list "
                         "or a MedMNIST .npz")
    info = {"kind": kind, "source": str(path), "split": applied, "count": len(items),
            "labelled": sum(item.label is not None for item in items)}
    if kind == "folder":
        info["skipped"] = skipped
    return items, info


def skipped_text(skipped: dict[str, int]) -> str:
    """``3 file(s) of types predict cannot read: .nii.gz 2, .nii 1``, or empty when none were skipped."""
    if not skipped:
        return ""
    counts = ", ".join(f"{ext} {n}" for ext, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{sum(skipped.values())} file(s) of types predict cannot read: {counts}"


def _extension(path: Path) -> str:
    """The file type as a person names it: ``.nii.gz`` for a compressed file, else the last suffix, lower case."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in (".gz", ".bz2", ".xz", ".zip"):
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else "(no suffix)"


def load_item(item: InputItem, info: ModelInfo) -> np.ndarray:
    """One input -> float32 C x H x W in [0, 1] for ``info``'s model. Any failure raises medops.ImageReadError."""
    where = item.path if item.path is not None else item.key
    try:
        if item.array is not None:
            array = item.array[..., None] if item.array.ndim == 2 else item.array
            return medops.preprocess(medops.refuse_blank(where, array), info.size, info.channels)
        if item.path is None:
            raise medops.ImageReadError(where, "input has neither a file path nor an array")
        return medops.load_for_model(item.path, info.size, info.channels, window=info.window)
    except medops.ImageReadError:
        raise
    except (ValueError, OSError) as exc:  # medops's array checks raise ValueError; no header values in either
        raise medops.ImageReadError(where, f"{type(exc).__name__}: {exc}") from None


def parse_label(value: str | int | None, class_names: Sequence[str] | None, where: str = "") -> int | None:
    """A label cell -> class index: a class name of ``class_names`` or an integer index; empty -> None."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    if class_names is not None and text in class_names:
        return list(class_names).index(text)
    try:
        index = int(text)
    except ValueError:
        known = f"one of {list(class_names)}" if class_names is not None else "an integer (class names unknown)"
        raise ServeError(f"{where}label {text!r} is not a known class; expected {known} or a class index") from None
    if index < 0 or (class_names is not None and index >= len(class_names)):
        raise ServeError(f"{where}label index {index} is out of range for {len(class_names or [])} classes")
    return index


def _is_image_file(path: Path) -> bool:
    return path.is_file() and (path.suffix.lower() in medops.SUPPORTED_SUFFIXES or path.suffix == "")


def _folder_items(root: Path, class_names: list[str] | None) -> tuple[list[InputItem], dict[str, int]]:
    """The image files below ``root`` as items, and the other (not hidden) files counted by extension."""
    files = []
    skipped: Counter[str] = Counter()
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not f.is_file():
            continue
        if not _is_image_file(f):
            skipped[_extension(f)] += 1
            continue
        files.append(rel)
    if not files:
        other = f"; skipped {skipped_text(dict(skipped))}" if skipped else ""
        raise ServeError(f"{root}: no image files found (suffixes {', '.join(sorted(medops.SUPPORTED_SUFFIXES))} "
                         f"or none){other}")
    first_level = {rel.parts[0] for rel in files if len(rel.parts) > 1}
    by_folder = bool(class_names) and bool(first_level) and first_level <= set(class_names or [])
    items = []
    for rel in files:
        label = None
        if by_folder and len(rel.parts) > 1:
            label = list(class_names or []).index(rel.parts[0])
        items.append(InputItem(key=str(root / rel), path=str(root / rel), label=label))
    return items, dict(skipped)


def _csv_items(csv_path: Path, split: str | None, class_names: list[str] | None
               ) -> tuple[list[InputItem], str | None]:
    try:
        rows = manifest_rows(csv_path)
    except DataError as exc:
        raise ServeError(str(exc)) from None
    has_split = any("split" in row for _, row in rows)
    wanted = canonical_split(split) if (has_split and split) else None
    items: list[InputItem] = []
    seen: set[str] = set()
    for line, row in rows:
        if wanted is not None:
            if canonical_split(row.get("split", "")) != wanted:
                continue
        given = row["path"]
        if not given:
            raise ServeError(f"{csv_path}:{line}: empty path")
        file = Path(given)
        if not file.is_absolute():
            file = csv_path.parent / file
        label = parse_label(row.get("label"), class_names, f"{csv_path}:{line}: ")
        key = given if given not in seen else f"{given}#{line}"
        seen.add(key)
        items.append(InputItem(key=key, path=str(file), label=label))
    if not items:
        which = f" of split {split!r}" if wanted is not None else ""
        raise ServeError(f"{csv_path}: the manifest has no rows{which}")
    return items, wanted


def _list_items(list_path: Path) -> list[InputItem]:
    try:
        lines = list_path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ServeError(f"{list_path}: cannot read the file list ({type(exc).__name__}: {exc})") from None
    items: list[InputItem] = []
    seen: set[str] = set()
    for line, text in enumerate(lines, start=1):
        given = text.strip()
        if not given or given.startswith("#"):
            continue
        file = Path(given) if Path(given).is_absolute() else list_path.parent / given
        key = given if given not in seen else f"{given}#{line}"
        seen.add(key)
        items.append(InputItem(key=key, path=str(file), label=None))
    if not items:
        raise ServeError(f"{list_path}: the file list has no paths")
    return items


def _npz_items(npz_path: Path, split: str, class_names: list[str] | None) -> tuple[list[InputItem], str]:
    split = canonical_split(split)
    try:
        images, labels = npz_split(npz_path, split)
    except DataError as exc:
        raise ServeError(str(exc)) from None
    if len(images) == 0:
        raise ServeError(f"{npz_path}: '{split}_images' has shape {images.shape}; expected N x H x W[ x C], N > 0")
    flat: np.ndarray | None = None
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim == 1 and len(labels) == len(images):
            flat = labels.astype(np.int64)  # multi-label (N x K) files have no single class label
    if flat is not None and len(flat) and (flat.min() < 0 or (class_names is not None
                                                            and flat.max() >= len(class_names))):
        raise ServeError(f"{npz_path}: '{split}_labels' range {flat.min()}..{flat.max()} does not fit the "
                         f"{len(class_names or [])} classes {class_names}")
    items = []
    for i in range(len(images)):
        label = int(flat[i]) if flat is not None else None
        items.append(InputItem(key=f"npz:{split}:{i}", path=None, label=label, array=images[i]))
    return items, split
