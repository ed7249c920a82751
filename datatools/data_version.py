"""Dataset manifests, their differences and fingerprints (works on DVC- or Git-LFS-tracked data).

``python -m datatools.data_version write DATA --out manifest.csv``
    DATA is a MedMNIST ``.npz`` (entries ``npz:<split>:<index>``, SHA-256 of the pixels), a CSV manifest
    or a folder of class sub-folders (entries: file paths relative to the data root, SHA-256 of the file).
    Columns: ``path,sha256,label,split`` (split empty where the data gives none).
``python -m datatools.data_version diff OLD.csv NEW.csv [--json]``
    added / removed / changed-label / moved-split / changed-content entries with counts; exit 0.
``python -m datatools.data_version fingerprint DATA [--image-size 64 --channels 1]``
    the dataset fingerprint, the same value as ``data.fingerprint`` in the ``run.json`` of a training run on
    the same data (folders and CSVs: with the run's ``data.image_size``/``data.channels``).

The real files are read: a Git LFS pointer (object not fetched) or a missing file (DVC data not pulled) is
reported with its path, and the command exits 1.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from medops.datasets import (
    LFS_POINTER_PREFIX,
    SPLITS,
    DataError,
    FolderDataset,
    MedMNISTFile,
    fingerprint_of,
    is_lfs_pointer,
    read_manifest,
    scan_class_folders,
    validate_splits,
)

FIELDS = ("path", "sha256", "label", "split")
CATEGORIES = ("added", "removed", "changed_label", "moved_split", "changed_content")


class NotFetched(DataError):
    """Data files that are Git LFS pointers or missing (not pulled)."""


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def pixel_sha256(image: np.ndarray) -> str:
    image = np.ascontiguousarray(image)
    h = hashlib.sha256(f"{image.dtype.str}|{image.shape}\n".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _check_fetched(paths: list[Path]) -> None:
    pointers = [p for p in paths if p.is_file() and is_lfs_pointer(p)]
    missing = [p for p in paths if not p.is_file()]
    problems = [f"{p}: Git LFS pointer, the LFS object is not fetched (run `git lfs pull`)" for p in pointers]
    problems += [f"{p}: file missing (not pulled? `dvc pull`)" for p in missing]
    if problems:
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise NotFetched(f"{len(problems)} data files are not available:\n  " + "\n  ".join(problems[:20]) + more)


def manifest_entries(data: str | Path) -> list[dict[str, str]]:
    """Manifest rows (path, sha256, label, split) of a MedMNIST .npz, a CSV manifest or a class-folder tree."""
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: not found")
    if data.suffix.lower() == ".npz":
        _check_fetched([data])
        try:
            npz = np.load(data, allow_pickle=False)
        except Exception as exc:
            raise DataError(f"{data}: not a readable .npz file ({exc})") from exc
        rows = []
        for split in SPLITS:
            if f"{split}_images" not in npz.files:
                continue
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"].reshape(len(npz[f"{split}_images"]), -1)
            for i in range(len(images)):
                rows.append({"path": f"npz:{split}:{i}", "sha256": pixel_sha256(images[i]),
                             "label": " ".join(str(int(v)) for v in labels[i]), "split": split})
        return rows
    if data.suffix.lower() == ".csv":
        _check_fetched([data])
        samples, root = read_manifest(data), data.parent
    else:
        samples, root = scan_class_folders(data), data
    _check_fetched([s.path for s in samples])
    rows = []
    for s in samples:
        try:
            rel = s.path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            rel = str(s.path)
        rows.append({"path": rel, "sha256": file_sha256(s.path), "label": s.label, "split": s.split or ""})
    return rows


def write_manifest(rows: list[dict[str, str]], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(FIELDS))
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["path"]))
    return out


def read_data_manifest(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    with path.open("rb") as fh:
        if fh.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX:
            raise NotFetched(f"{path}: Git LFS pointer, the LFS object is not fetched (run `git lfs pull`)")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [f for f in FIELDS if f not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}: not a data manifest (missing columns {missing})")
        return {row["path"]: row for row in reader}


def diff_manifests(old: dict[str, dict[str, str]], new: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Entries added, removed and (for common paths) with changed label, split or content."""
    out: dict[str, list[dict[str, str]]] = {c: [] for c in CATEGORIES}
    for p in sorted(set(new) - set(old)):
        out["added"].append({"path": p, "label": new[p]["label"], "split": new[p]["split"]})
    for p in sorted(set(old) - set(new)):
        out["removed"].append({"path": p, "label": old[p]["label"], "split": old[p]["split"]})
    for p in sorted(set(old) & set(new)):
        a, b = old[p], new[p]
        if a["label"] != b["label"]:
            out["changed_label"].append({"path": p, "old": a["label"], "new": b["label"]})
        if a["split"] != b["split"]:
            out["moved_split"].append({"path": p, "old": a["split"], "new": b["split"]})
        if a["sha256"] != b["sha256"]:
            out["changed_content"].append({"path": p, "old": a["sha256"][:12], "new": b["sha256"][:12]})
    return {"counts": {c: len(v) for c, v in out.items()}, "old_entries": len(old), "new_entries": len(new),
            "unchanged": len(set(old) & set(new)) - len({e["path"] for c in CATEGORIES[2:] for e in out[c]}),
            "changes": out}


def fingerprint(data: str | Path, image_size: int = 64, channels: int = 1,
                class_names: list[str] | None = None) -> str:
    """``data.fingerprint`` of a training run on ``data`` (read as data=medmnist / data=folder read it)."""
    data = Path(data)
    if data.is_file() and is_lfs_pointer(data):
        _check_fetched([data])
    if data.suffix.lower() == ".npz":
        source: Any = MedMNISTFile(data, md5=False, class_names=class_names)
    else:
        source = FolderDataset(data, image_size=image_size, channels=channels, class_names=class_names)
    arrays = source.load()
    validate_splits(arrays)
    return fingerprint_of(arrays)


def _print_diff(result: dict[str, Any], limit: int = 20) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"manifest diff ({result['old_entries']} -> {result['new_entries']} entries)")
    table.add_column("change")
    table.add_column("count", justify="right")
    table.add_column("examples", overflow="fold")
    for c in CATEGORIES:
        entries = result["changes"][c]
        ex = ", ".join(e["path"] + (f" ({e['old']} -> {e['new']})" if "old" in e else "") for e in entries[:limit])
        table.add_row(c, str(len(entries)), ex)
    table.add_row("unchanged", str(result["unchanged"]), "")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datatools.data_version", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the manifest of a dataset")
    w.add_argument("data")
    w.add_argument("--out", required=True)
    d = sub.add_parser("diff", help="compare two manifests")
    d.add_argument("old")
    d.add_argument("new")
    d.add_argument("--json", action="store_true", help="print the diff as JSON")
    f = sub.add_parser("fingerprint", help="print the dataset fingerprint (as in run.json)")
    f.add_argument("data")
    f.add_argument("--image-size", type=int, default=64, help="folders/CSV: data.image_size of the run")
    f.add_argument("--channels", type=int, default=1, help="folders/CSV: data.channels of the run")
    f.add_argument("--class-names", nargs="*", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "write":
            rows = manifest_entries(args.data)
            out = write_manifest(rows, Path(args.out))
            print(f"{out}: {len(rows)} entries")
        elif args.command == "diff":
            result = diff_manifests(read_data_manifest(Path(args.old)), read_data_manifest(Path(args.new)))
            if args.json:
                print(json.dumps(result, indent=2))
            else:
                _print_diff(result)
        else:
            print(fingerprint(args.data, args.image_size, args.channels, args.class_names))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
