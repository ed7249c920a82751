"""Datasets as every stage reads them: split names, in-memory splits, manifests, class folders and MedMNIST files.

One owner for the dataset formats that training, data validation, evaluation and serving share: the split names
(and their aliases), :class:`SplitArrays` (uint8 N x H x W x C images and int64 labels per split), CSV manifests
(``path,label[,split][,patient_id]``), class-folder trees, MedMNIST v2 ``.npz`` files, and the seeded
stratified, patient-grouped and k-fold splits. Numpy only; the torch DataModules in ``train.datamodules`` wrap it.
"""

from __future__ import annotations

import csv
import logging
import re
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import track

from medops.errors import ImageReadError
from medops.fingerprint import dataset_fingerprint, file_md5
from medops.io import SUPPORTED_SUFFIXES, fit_to_model, read_image, refuse_blank

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad input data, found before training starts; the message names the source and the problem."""


TASKS = ("binary", "multiclass", "ordinal", "multilabel")
# MedMNIST v2 files whose classes are ordered grades (``auto`` trains them as ordinal): RetinaMNIST's 5 DR grades
ORDINAL_MEDMNIST = ("retinamnist",)


def is_multilabel(labels: np.ndarray) -> bool:
    """True for an N x K (K > 1) label array: one 0/1 column per label (MedMNIST ChestMNIST's format)."""
    return np.asarray(labels).ndim == 2 and np.asarray(labels).shape[1] > 1


def resolve_task(declared: str | None, data: SplitArrays) -> str:
    """The task of ``data``: ``declared`` (``data.task``) checked against the labels, or for ``auto``/``None``:
    ``multilabel`` for N x K labels (K > 1), ``ordinal`` for a known ordinal MedMNIST file (RetinaMNIST),
    else ``binary`` for 2 classes and ``multiclass`` for more. Raises :class:`DataError` when the declared
    task does not fit the labels, or for ``ordinal`` when the class order came from sorting names
    (:func:`check_grade_order`)."""
    task = str(declared or "auto").lower()
    multi = is_multilabel(data.labels["train"])
    if task == "auto":
        if multi:
            return "multilabel"
        if data.info.get("ordinal"):
            return "ordinal"
        return "binary" if len(data.class_names) == 2 else "multiclass"
    if task not in TASKS:
        raise DataError(f"data.task={declared!r}: choose auto, {', '.join(TASKS)}")
    if multi != (task == "multilabel"):
        found = f"N x {data.labels['train'].shape[1]} multi-label" if multi else "single-label (one class per image)"
        raise DataError(f"{data.source}: data.task={task} but the labels are {found}: set data.task=auto or "
                        f"{'multilabel' if multi else 'binary, multiclass or ordinal'}")
    if task == "binary" and len(data.class_names) != 2:
        raise DataError(f"{data.source}: data.task=binary but the data has {len(data.class_names)} classes")
    if task in ("multiclass", "ordinal") and len(data.class_names) < 3:
        raise DataError(f"{data.source}: data.task={task} needs at least 3 classes, the data has "
                        f"{len(data.class_names)} (use binary)")
    if task == "ordinal":
        check_grade_order(data, "data.task=ordinal")
    return task


def label_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    """Samples per class (single-label), or positives per label (N x K multi-label)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return labels.astype(np.int64).sum(axis=0).tolist()
    return np.bincount(labels.astype(np.int64), minlength=num_classes).tolist()


def stratification_key(labels: np.ndarray, min_count: int = 2) -> np.ndarray:
    """One integer stratum per sample: the label itself (single-label), or for N x K multi-label the label set
    (the row's 0/1 pattern), label sets with fewer than ``min_count`` samples pooled into one stratum (-1)."""
    labels = np.asarray(labels)
    if labels.ndim < 2:
        return labels.reshape(-1).astype(np.int64)
    _, key, counts = np.unique(labels.astype(np.int64), axis=0, return_inverse=True, return_counts=True)
    key = key.reshape(-1).astype(np.int64)
    return np.where(counts[key] < min_count, -1, key)


@dataclass
class SplitArrays:
    """Images (N x H x W x C, uint8) and labels (N, int64; multi-label: N x K of 0/1) of each split, with class
    (label) names.

    ``groups``: per split, the patient/study id of every sample (``None`` where a row has none), aligned with
    ``labels``; empty when the source has no group column. k-fold cross-validation keeps each group in one fold.
    """

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    class_names: list[str]
    source: str
    info: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, list[str | None]] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return int(self.images["train"].shape[-1])

    @property
    def image_size(self) -> int:
        return int(self.images["train"].shape[1])


SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}




def canonical_split(name: str) -> str:
    """``training``/``valid``/``testing``... -> ``train``/``val``/``test``; other names lower-cased, unchanged."""
    key = str(name).strip().lower()
    return SPLIT_ALIASES.get(key, key)


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
        if labels.ndim == 2:  # multi-label: N x K of 0/1, one column per label
            _check_multilabel(data, split, labels, len(images))
            shapes.add(images.shape[1:])
            continue
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


def _check_multilabel(data: SplitArrays, split: str, labels: np.ndarray, n: int) -> None:
    """N x K multi-label labels: K columns for the K label names, every value 0 or 1."""
    if labels.shape != (n, len(data.class_names)):
        raise DataError(f"{data.source}: {split} has {n} images but multi-label labels of shape {labels.shape}; "
                        f"expected ({n}, {len(data.class_names)}) for the labels {data.class_names}")
    bad = (labels != 0) & (labels != 1)
    if bad.any():
        row, col = (int(v[0]) for v in np.nonzero(bad))
        raise DataError(f"{data.source}: {split} multi-label value {labels[row, col]} at index {row}, label "
                        f"{data.class_names[col]!r} is not 0 or 1")


def fingerprint_of(data: SplitArrays) -> str:
    """The dataset fingerprint (``sha256:``) of every split's pixels and labels, as the run record stores it."""
    return dataset_fingerprint({s: (data.images[s], data.labels[s]) for s in SPLITS})


NEGATIVE_FINDINGS = frozenset({"normal", "benign", "negative", "healthy", "control", "absent", "unremarkable"})


def finding_by_name(class_names: Sequence[str]) -> int | None:
    """The index of the finding in a binary task whose other class's name reads as no finding (``normal``,
    ``benign``, ``negative``, ``healthy``, ``no_pneumonia``, ``non_tumor``...: one of ``NEGATIVE_FINDINGS`` as a
    word, or a name that starts with the word ``no`` or ``non``), so that ``[abnormal, normal]`` takes ``abnormal``
    whatever the sort order; None when neither or both names read so. Our own rule, for undeclared data only."""
    def negative(name: str) -> bool:
        words = [w for w in re.split(r"[^a-z0-9]+", str(name).lower()) if w]
        return bool(words) and (words[0] in ("no", "non") or any(w in NEGATIVE_FINDINGS for w in words))

    if len(class_names) != 2:
        return None
    flags = [negative(n) for n in class_names]
    return flags.index(False) if flags.count(True) == 1 else None


def positive_index(class_names: Sequence[str], positive_class: str | int | None = None) -> int:
    """The index of the clinically positive class (the finding: malignant, pneumonia) of a binary task.

    Declared by name (``data.positive_class=malignant``) or index; undeclared (``None``, and every run recorded
    before it could be declared): class 1, the documented default. Multi-class tasks are one-vs-rest per class and
    have no single positive class: this returns 1 for them too, which callers use only for binary tasks.
    """
    names = [str(n) for n in class_names]
    if positive_class is None or positive_class == "":
        return 1
    if isinstance(positive_class, int) and not isinstance(positive_class, bool):
        if not 0 <= positive_class < len(names):
            raise DataError(f"positive_class {positive_class} is not a class index of {names}")
        return positive_class
    if str(positive_class) not in names:
        raise DataError(f"positive_class {positive_class!r} is not one of the classes {names}")
    return names.index(str(positive_class))


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in the [0, 1] model-input scale."""
    flat = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    std = np.maximum(flat.std(axis=0), 1e-6)
    return flat.mean(axis=0).round(6).tolist(), std.round(6).tolist()


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


def grouped_folds(labels: np.ndarray, groups: Sequence[str | None], num_folds: int, seed: int) -> np.ndarray:
    """The fold (0..num_folds-1) of every sample with every group (patient/study) in exactly one fold.

    scikit-learn's ``StratifiedGroupKFold`` (shuffled, seeded): the groups are dealt to the folds so that each
    fold's class distribution stays close to the whole's. A sample without a group (``None``) is its own group.
    Raises :class:`DataError` when there are fewer groups than folds.
    """
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels).reshape(-1)
    keys = np.array([str(g) if g is not None else f"\0row{i}" for i, g in enumerate(groups)], dtype=object)
    if len(keys) != len(labels):
        raise ValueError(f"{len(keys)} groups for {len(labels)} labels")
    n_groups = len(set(keys.tolist()))
    if n_groups < num_folds:
        raise DataError(f"{n_groups} patient/study groups cannot make {num_folds} folds (each group stays in one)")
    folds = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # too few samples of a class: split_fold logs its own warning
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, val) in enumerate(splitter.split(np.zeros(len(labels)), labels, keys)):
            folds[val] = k
    return folds


def split_fold(data: SplitArrays, fold: int, num_folds: int, seed: int) -> SplitArrays:
    """``data`` with train and val replaced by fold ``fold`` (val) and the remaining folds (train).

    With patient/study groups (``data.groups``, from a manifest's group column) the folds keep every group in one
    fold (:func:`grouped_folds`), so no patient is in both train and val; without, :func:`stratified_folds`.
    """
    check_fold(fold, num_folds)
    images = np.concatenate([data.images["train"], data.images["val"]])
    labels = np.concatenate([data.labels["train"], data.labels["val"]])
    if len(labels) < num_folds:
        raise DataError(f"{data.source}: {len(labels)} train+val samples cannot make {num_folds} folds")
    counts = np.asarray(label_counts(labels, len(data.class_names)))
    rare = [data.class_names[c] for c in np.flatnonzero(counts < num_folds)]
    if rare:
        log.warning("%s: %s %s have fewer than %d train+val samples; some validation folds lack them",
                    data.source, "labels" if labels.ndim == 2 else "classes", rare, num_folds)
    strata = stratification_key(labels, num_folds)  # multi-label: the label set (rare sets pooled)
    pooled = [*data.groups.get("train", []), *data.groups.get("val", [])]
    grouped = len(pooled) == len(labels) and any(g is not None for g in pooled)
    if grouped:
        try:
            folds = grouped_folds(strata, pooled, num_folds, seed)
        except DataError as exc:
            raise DataError(f"{data.source}: {exc}") from None
    else:
        folds = stratified_folds(strata, num_folds, seed)
    val, train = np.flatnonzero(folds == fold), np.flatnonzero(folds != fold)
    groups = {"train": [pooled[i] for i in train], "val": [pooled[i] for i in val],
              "test": list(data.groups.get("test", []))} if len(pooled) == len(labels) else {}
    return SplitArrays(
        images={"train": images[train], "val": images[val], "test": data.images["test"]},
        labels={"train": labels[train], "val": labels[val], "test": data.labels["test"]},
        class_names=data.class_names,
        source=data.source,
        info={**data.info, "fold_grouped_by": (data.info.get("group_column") or "group") if grouped else None},
        groups=groups,
    )


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


def manifest_rows(csv_path: Path, required: tuple[str, ...] = ("path",)) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of every non-blank row of a CSV manifest: column names stripped and lower-cased, cells
    stripped, a byte-order mark ignored. Raises :class:`DataError` for an unreadable file or a missing column."""
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: manifest not found")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            raw = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path}: cannot read the CSV manifest ({type(exc).__name__}: {exc})") from None
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{csv_path}: manifest needs {' and '.join(repr(c) for c in required)} column"
                        f"{'s' if len(required) > 1 else ''}, found {columns}")
    rows = []
    for line, row in enumerate(raw, start=2):
        clean = {k.strip().lower(): v.strip() if isinstance(v, str) else "" for k, v in row.items() if k}
        if any(clean.values()):
            rows.append((line, clean))
    return rows


def npz_split(path: Path, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``<split>_images`` of a MedMNIST-style ``.npz`` as N x H x W x C and its ``<split>_labels`` as stored (or
    ``None``). Raises :class:`DataError` for an unreadable file or a missing split, naming the splits it has."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            if f"{split}_images" not in keys:
                found = sorted(k.removesuffix("_images") for k in keys if k.endswith("_images"))
                raise DataError(f"{path}: no '{split}_images' array; splits in the file: {found}")
            images = npz[f"{split}_images"]
            labels = npz[f"{split}_labels"] if f"{split}_labels" in keys else None
    except DataError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, ValueError, OSError...
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise DataError(f"{path}: {split}_images has shape {images.shape}; expected N x H x W [x C] (2D MedMNIST)")
    return images, labels


MAX_LISTED = 20  # problems listed one by one in an error message; the rest are counted


def listing(lines: Sequence[str], limit: int = MAX_LISTED) -> str:
    """The first ``limit`` lines, indented one per line, then ``... and N more``."""
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n  " + "\n  ".join(lines[:limit]) + more


def _row_problem(row: Mapping[str, str]) -> str | None:
    """Why a manifest row cannot be used, or ``None``."""
    empty = [c for c in ("path", "label") if not row.get(c)]
    if empty:
        return f"empty {' and '.join(empty)}"
    split = row.get("split") or ""
    if split and split.lower() not in SPLIT_ALIASES:
        return f"unknown split {split!r}; use train, val or test"
    return None


def read_manifest(csv_path: Path, group_column: str | None = None) -> list[Sample]:
    """Rows of a ``path,label[,split][,patient_id]`` CSV (paths relative to the CSV's folder). Malformed rows (empty
    path or label, unknown split) raise one :class:`DataError` that lists them all by line (the first
    ``MAX_LISTED``, then a count)."""
    samples, bad = [], []
    rows = manifest_rows(csv_path, ("path", "label"))
    for line, row in rows:
        problem = _row_problem(row)
        if problem:
            bad.append(f"{csv_path}:{line}: {problem}")
            continue
        split = SPLIT_ALIASES[row["split"].lower()] if row.get("split") else None
        path = Path(row["path"])
        group = (row.get(group_column) or None) if group_column else None
        samples.append(Sample(path if path.is_absolute() else csv_path.parent / path, row["label"], split, group))
    if bad:
        raise DataError(f"{csv_path}: {len(bad)} of {len(rows)} rows are malformed (fix or delete them):"
                        f"{listing(bad)}")
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


NUMERIC_CLASS = re.compile(r"[+-]?[0-9]+")
# the order a class list's provenance guarantees: declared (data.class_names), numeric names (grades 0, 1, 2...) or
# MedMNIST label indices; ``alphabetical`` and ``mixed`` orders come from the names' spelling, not their meaning
MEANINGFUL_ORDERS = ("configured", "numeric", "index")


def class_sort_key(name: str) -> tuple[int, int, str, str]:
    """Sort key of derived class names: numeric names (``0``, ``2``, ``10``, ``-1``) first, by integer value; then
    the others alphabetically, ignoring case (ties by the exact spelling)."""
    if NUMERIC_CLASS.fullmatch(name):
        return (0, int(name), "", name)
    return (1, 0, name.casefold(), name)


def class_order(labels: Sequence[str]) -> tuple[list[str], str]:
    """The distinct label values in class order (:func:`class_sort_key`) and how that order was made: ``numeric``
    (every name an integer), ``alphabetical`` (none) or ``mixed`` (numbers first, then the names)."""
    names = sorted(set(labels), key=class_sort_key)
    numeric = [bool(NUMERIC_CLASS.fullmatch(n)) for n in names]
    return names, "numeric" if all(numeric) else ("mixed" if any(numeric) else "alphabetical")


def _legacy_order(labels: Sequence[str]) -> list[str]:
    """The order label_index gave before numbers and names were sorted apart (names left-padded with zeros, so
    longer names came last: [cyst, tumor, normal]); runs trained then keep it in their run record."""
    return sorted(set(labels), key=lambda s: (not s.isdigit(), s.zfill(12)))


def label_index(labels: list[str], class_names: list[str] | None, source: str,
                info: dict[str, Any] | None = None) -> tuple[np.ndarray, list[str]]:
    """Class indices of ``labels`` and the class names: ``class_names`` when configured (its order is the class
    order), else the distinct labels in :func:`class_order`. ``info`` (a dict) receives ``class_order``:
    ``configured``, ``numeric``, ``alphabetical`` or ``mixed``. Raises :class:`DataError` for labels outside the
    configured classes."""
    if class_names:
        names, order = [str(n) for n in class_names], "configured"
    else:
        names, order = class_order(labels)
        if order == "mixed":
            log.warning("%s: class names mix numbers and words %s: numbers come first by value, then the words "
                        "alphabetically; set data.class_names to give the order", source, names)
        if _legacy_order(labels) != names:
            log.info("%s: classes in order %s. Only for runs on this data trained before 2026-11-28, which sorted "
                     "names differently: they recorded %s (their evaluation and export keep it); a new run that must "
                     "match them needs data.class_names=[%s]", source, names, _legacy_order(labels),
                     ",".join(_legacy_order(labels)))
    if info is not None:
        info["class_order"] = order
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataError(f"{source}: labels {unknown} are not among the configured classes {names}")
    return np.array([index[label] for label in labels], dtype=np.int64), names


def check_grade_order(data: SplitArrays, why: str) -> None:
    """Refuse ordered use of the classes (``data.task=ordinal``, ``data.ordinal_cutoff``) when their order came
    from sorting their names (grade order is clinical meaning, not spelling: mild < moderate < severe sorts as
    mild < moderate < severe only by luck). Numeric names, declared ``data.class_names`` and MedMNIST indices pass;
    data without a recorded ``class_order`` (built in code) are taken as ordered by their maker."""
    order = data.info.get("class_order")
    if order is None or order in MEANINGFUL_ORDERS:
        return
    raise DataError(f"{data.source}: {why} needs the classes in grade order, which their names cannot give (sorted "
                    f"by spelling they are {data.class_names}): declare them lowest grade first, "
                    f"'data.class_names=[{','.join(data.class_names)}]' reordered to your grade order")


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
        with np.load(path, allow_pickle=False) as npz:
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
        imgs, labs = npz_split(path, split)
        assert labs is not None  # the keys were checked above
        if not is_multilabel(labs):  # N x K (K > 1): multi-label (ChestMNIST), kept as N x K of 0/1
            labs = labs.reshape(-1)
        if not (np.issubdtype(labs.dtype, np.integer) or labs.dtype == np.bool_):
            raise DataError(f"{path}: {split}_labels has dtype {labs.dtype}; expected integer class indices")
        images[split], labels[split] = imgs, labs.astype(np.int64)
    if len({labels[s].ndim for s in SPLITS}) > 1 or len({labels[s].shape[1:] for s in SPLITS}) > 1:
        raise DataError(f"{path}: the splits' labels disagree in shape: "
                        f"{ {s: list(labels[s].shape) for s in SPLITS} }")
    if is_multilabel(labels["train"]):
        num_classes = int(labels["train"].shape[1])
    else:
        num_classes = int(max(int(labels[s].max(initial=0)) for s in SPLITS)) + 1
    # with configured names, a label beyond them is reported by validate_splits (file, split, index)
    names = list(class_names) if class_names else [str(i) for i in range(max(num_classes, 2))]
    info = {"format": "medmnist", "md5": file_md5(path), "licence": "CC BY 4.0" if path.stem in OFFICIAL_MD5 else None,
            "class_order": "configured" if class_names else "index"}
    if path.stem.split("_")[0] in ORDINAL_MEDMNIST:
        info["ordinal"] = True  # ordered grades: data.task=auto trains it as ordinal
    return SplitArrays(images, labels, names, source=str(path), info=info)


class FolderDataset:
    """PNG/JPEG/DICOM/... images from a CSV manifest or class folders as :class:`SplitArrays` (torch-free).

    Every file is read with :func:`medops.io.read_image` and brought to the model's channels and size with the
    preprocessing contract (:func:`medops.io.to_channels`, :func:`medops.io.resize`). :meth:`scan` collects
    unreadable files as ``(path, reason)``; :meth:`load` raises :class:`DataError` listing them (or skips them
    with ``skip_unreadable``). Rows without a split are split by patient group when a group column is present,
    else stratified by label (seeded). ``train.datamodules.FolderDataModule`` serves it to training.
    """

    def __init__(self, path: str | Path, image_size: int = 28, channels: int = 1,
                 class_names: list[str] | None = None, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 split_seed: int = 0, window: list[float] | None = None, group_column: str | None = "auto",
                 skip_unreadable: bool = False) -> None:
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

    def read_sample(self, sample: Sample) -> tuple[np.ndarray, np.ndarray]:
        """(original HxWxC image, resized model image); raises ImageReadError."""
        if is_lfs_pointer(sample.path):
            raise ImageReadError(str(sample.path), "Git LFS pointer file: the LFS object is not fetched (git lfs pull)")
        if sample.path.is_file() and sample.path.stat().st_size == 0:
            raise ImageReadError(str(sample.path), "empty file (0 bytes)")
        # a blank image is refused as serving refuses it: it is reported (and left out with allow_corrupt) rather
        # than trained on and counted in the test figures
        img = refuse_blank(sample.path, read_image(sample.path, window=self.window))  # type: ignore[arg-type]
        return img, fit_to_model(img, self.size, self.out_channels)

    def scan(self) -> ScanResult:
        """Read every file; unreadable or empty ones are collected as ``(path, reason)`` instead of raising.

        The readable files are split as :meth:`load` would split them (given splits, else by patient
        group, else stratified by label). Configuration problems (missing manifest, unknown labels)
        still raise :class:`DataError`.
        """
        if self.scan_result is not None:
            return self.scan_result
        samples, column = self._samples()
        order: dict[str, Any] = {}
        labels, names = label_index([s.label for s in samples], self.configured_class_names, str(self.path), order)
        images = np.zeros((len(samples), self.size, self.size, self.out_channels), dtype=np.uint8)
        ok = np.ones(len(samples), dtype=bool)
        shapes: list[tuple[int, ...]] = [()] * len(samples)
        dtypes: list[str] = [""] * len(samples)
        errors: list[tuple[str, str]] = []
        for i, sample in enumerate(track(samples, description=f"reading {len(samples)} images", transient=True)):
            try:
                original, images[i] = self.read_sample(sample)
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
                      "group_column": column, **order},
                groups={s: [samples[i].group for i in index[s]] for s in SPLITS} if column else {},
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
            fix = ("fix or remove them, or set data.validation.allow_corrupt=true to leave them out (with a warning) "
                   "and use the rest" if result.data is not None else "no image could be read")
            raise DataError(f"{self.path}: {len(lines)} of {total} images cannot be used ({fix}):{listing(lines)}")
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


class MedMNISTFile:
    """A MedMNIST v2 2D ``.npz`` as :class:`SplitArrays`, its MD5 checked (torch-free).

    ``md5``: expected MD5; ``None``: the official checksum when the file stem is a known MedMNIST name; ``False``:
    no check. ``download``: fetch ``name`` from the official Zenodo record when the file is missing.
    """

    def __init__(self, path: str | Path, md5: str | bool | None = None, download: bool = False,
                 name: str | None = None, class_names: list[str] | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.stem
        self.md5 = None if md5 is False else (md5 or OFFICIAL_MD5.get(self.path.stem))
        self.download = download
        self.configured_class_names = list(class_names) if class_names else None

    def prepare_data(self) -> None:
        if self.download and not self.path.is_file():
            download_medmnist(self.name, self.path, self.md5)  # type: ignore[arg-type]

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


SOURCES = {"FolderDataModule": FolderDataset, "MedMNISTDataModule": MedMNISTFile}


def source_from_config(data_cfg: Mapping[str, Any]) -> FolderDataset | MedMNISTFile:
    """The torch-free reader of a ``data`` config (its ``_target_`` names the training DataModule that wraps the
    same reader; the loader settings are dropped)."""
    import inspect

    target = str(data_cfg.get("_target_", "")).rsplit(".", 1)[-1]
    if target not in SOURCES:
        raise DataError(f"data._target_ {data_cfg.get('_target_')!r}: no dataset reader for it (known: "
                        f"{sorted(SOURCES)})")
    cls = SOURCES[target]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return cls(**{k: v for k, v in data_cfg.items() if k in accepted})
