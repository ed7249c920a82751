"""De-identifying ingest: a tree of DICOM / NIfTI files -> PNGs (or one .npz) + ``manifest.csv``.

    python -m datatools.ingest_dicom SRC DST [--format png|npz] [--window C W] [--salt S]
        [--label-from folder|none] [--nifti-axis 2] [--sidecar] [--patient-split VAL TEST] [--size 64]
        [--pixels quarantine|clean|keep]
    python -m datatools.ingest_dicom SRC --locate N [N ...]

* DICOM files with or without ``.dcm`` (recognised by the 'DICM' magic), single- and multi-frame
  (each frame -> one image), read with :func:`medops.read_dicom` (modality LUT + windowing:
  ``--window`` or the file's own window or min-max); NIfTI ``.nii``/``.nii.gz`` -> slices along
  ``--nifti-axis`` (:func:`medops.nifti.nifti_slices`). Other files are listed as skipped.
* Output names never contain anything from the source: ``<pseudonymous patient id>_<hash of the
  remapped series UID>_<salted hash of the source path>_<frame>.png`` under ``DST/images/``.
  The pseudonym is ``medops.deid.pseudonym(PatientID, salt)``; NIfTI files (no patient fields)
  get one from their relative path.
* ``DST/manifest.csv``: ``path,label,split,patient_id,pixels`` (paths relative to DST), usable as
  ``data=folder data.path=DST/manifest.csv``. The label is the first folder under SRC
  (``--label-from folder``) or ``unlabelled``. ``split`` is empty (the datamodule splits by
  label) unless ``--patient-split VAL TEST`` assigns whole patients by a hash of the pseudonym.
  ``pixels`` is ``as_is``, ``masked`` (``--pixels clean``) or ``kept`` (``--pixels keep``).
* Burned-in text: a DICOM file that may carry it (BurnedInAnnotation YES, or absent for US, SC, OT, XC, ES,
  GM, SM, PX, IO, secondary capture or no modality: :func:`medops.deid_pixels.burned_in_reason`) is, with
  ``--pixels quarantine`` (the default), not written at all: it is listed under ``quarantined`` in
  ``ingest_report.json`` with the reason, and logged by its number. ``--pixels clean`` writes
  it with the text regions masked (:data:`medops.deid_pixels.MASK_RULE`: top and bottom bands and small
  near-white components; the sidecar declares the Clean Pixel Data Option); ``--pixels keep`` writes it as
  it is, an explicit opt-in that is logged. Both list every such file under ``pixels.files`` in the report.
* ``--format npz``: ``DST/images.npz`` with ``images`` (N x size x size x 1 uint8),
  ``labels`` (int), ``class_names``, ``patient_ids``, ``splits``; no PNGs and no manifest.
* ``--sidecar``: a de-identified copy of each DICOM header (no pixel data) as JSON in ``DST/headers/``
  (:func:`medops.deid.deidentify`: the whole PS3.15 Annex E Basic Profile table, at every sequence depth).
* Unreadable files (corrupt, no pixel data...) go to ``DST/ingest_report.json`` with a technical reason
  and the run goes on. Exit status 0 unless no image was written.
* No source path is written into DST or its log (a folder or file name can carry a patient's name): the
  report and the log name a source file by its number in SRC's sorted listing (``file``) and the salted digest
  its images carry in their names (``source``). ``python -m datatools.ingest_dicom SRC --locate N [N ...]``
  prints the paths of those numbers on the operator's terminal.
* The salt comes from ``--salt`` or ``MEDOPS_DEID_SALT``; it is never written anywhere. Logs
  (stderr and ``DST/ingest.log``) carry counts and output names only, never header values.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medops.datasets import class_order
from medops.deid import PROFILE, deidentify, pseudonym, quiet_pydicom, remap_uid
from medops.deid_pixels import FLAGGED_MODALITIES, MASK_RULE, burned_in_reason, mask_text
from medops.dicom import read_dicom
from medops.errors import ImageReadError
from medops.io import fit_to_model
from medops.nifti import is_nifti, nifti_slices

log = logging.getLogger("medops.ingest")

SALT_ENV = "MEDOPS_DEID_SALT"
UNLABELLED = "unlabelled"
PIXEL_MODES = ("quarantine", "clean", "keep")


@dataclass
class Item:
    image: np.ndarray
    name: str
    label: str
    patient_id: str
    pixels: str = "as_is"


@dataclass
class Result:
    items: int = 0
    files_ok: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    quarantined: list[dict[str, str]] = field(default_factory=list)
    burned_in: list[dict[str, object]] = field(default_factory=list)


class Quarantined(Exception):
    """A file that may carry burned-in text, not ingested under ``--pixels quarantine``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _h(*parts: str, n: int = 10) -> str:
    return hashlib.sha256("|".join(parts).encode("utf-8")).hexdigest()[:n]


def source_key(salt: str, rel: Path) -> str:
    """The salted digest of a source file's path relative to SRC: in its images' names and its report entries."""
    return _h(salt, "file", rel.as_posix(), n=8)


def source_files(src: Path) -> list[Path]:
    """The files under ``src`` in the order ingest numbers them (``file`` in the report, from 1)."""
    return sorted(p for p in src.rglob("*") if p.is_file())


def _entry(number: int, rel: Path, salt: str, reason: str) -> dict[str, object]:
    """A report entry: the source file by number and digest, never by path (see the module docstring)."""
    return {"file": number, "source": source_key(salt, rel), "reason": reason}


def _has_dicom_magic(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _label(rel: Path, mode: str) -> str:
    if mode == "folder" and len(rel.parts) > 1:
        return rel.parts[0]
    return UNLABELLED


def _read_header(path: Path, rel: Path) -> pydicom.Dataset:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, force=path.suffix.lower() == ".dcm")
    except Exception as exc:  # pydicom messages may quote values: type name only
        raise ImageReadError(str(rel), f"corrupt or unreadable DICOM file ({type(exc).__name__})") from None


def _dicom_items(path: Path, rel: Path, label: str, args: argparse.Namespace, dst: Path,
                 result: Result, number: int) -> list[Item]:
    """The frames of one DICOM file; raises :class:`Quarantined` for possible burned-in text under the default mode."""
    ds = _read_header(path, rel)
    has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    reason = burned_in_reason(ds) if has_pixels else None  # no pixels: read_dicom reports the error
    if reason and args.pixels == "quarantine":
        raise Quarantined(reason)
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    pid = pseudonym(str(ds.get("PatientID", "") or ""), args.salt)
    series = _h(remap_uid(str(ds.get("SeriesInstanceUID", "") or ""), args.salt), n=8)
    key = source_key(args.salt, rel)
    stem = f"{pid}_{series}_{key}"
    images, masked = [], []
    for frame in range(max(frames, 1)):
        try:
            img = read_dicom(path, window=args.window, frame=frame if frames > 1 else None)
        except ImageReadError as err:
            raise ImageReadError(str(rel), err.reason) from None
        if reason and args.pixels == "clean":
            img, fraction = mask_text(img)
            masked.append(fraction)
        images.append(Item(img, f"{stem}_{frame:04d}", label, pid, _pixels_state(reason, args.pixels)))
    if reason:
        _record_burned_in(result, _entry(number, rel, args.salt, reason), args.pixels, masked)
    if args.sidecar:
        _write_sidecar(ds, dst / "headers" / f"{stem}.json", args.salt, pixels_cleaned=bool(masked))
    return images


def _pixels_state(reason: str | None, mode: str) -> str:
    if not reason:
        return "as_is"
    return "masked" if mode == "clean" else "kept"


def _record_burned_in(result: Result, entry: dict[str, object], mode: str, masked: list[float]) -> None:
    """One ``pixels.files`` entry of the report, and a log line naming the file by number (never a header value)."""
    name = f"file {entry['file']} (source {entry['source']})"
    if mode == "clean":
        entry.update(action="masked", masked_fraction=round(max(masked, default=0.0), 4))
        log.info("%s: possible burned-in text masked (--pixels clean)", name)
    else:
        entry["action"] = "kept as is (--pixels keep)"
        log.warning("%s: possible burned-in text written unmasked (--pixels keep)", name)
    result.burned_in.append(entry)


def _write_sidecar(ds: pydicom.Dataset, out: Path, salt: str, *, pixels_cleaned: bool = False) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            if keyword in ds:
                delattr(ds, keyword)
        clean = deidentify(ds, salt=salt, pixels_cleaned=pixels_cleaned)
        header = clean.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda _elem: "")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(header, indent=1, sort_keys=True))


def _nifti_items(path: Path, rel: Path, label: str, args: argparse.Namespace) -> list[Item]:
    try:
        slices = nifti_slices(path, axis=args.nifti_axis)
    except ImageReadError as err:
        raise ImageReadError(str(rel), err.reason) from None
    pid = pseudonym("nifti:" + rel.as_posix(), args.salt)
    stem = f"{pid}_{_h(args.salt, 'nifti', rel.as_posix(), n=8)}_{source_key(args.salt, rel)}"
    return [Item(img, f"{stem}_{i:04d}", label, pid) for i, img in enumerate(slices)]


def _split_for(pid: str, fractions: tuple[float, float] | None, salt: str) -> str:
    if fractions is None:
        return ""
    val, test = fractions
    u = int(_h(salt, "split", pid, n=12), 16) / float(16**12)
    return "test" if u < test else "val" if u < test + val else "train"


def _file_items(path: Path, src: Path, dst: Path, args: argparse.Namespace, result: Result, number: int,
                total: int) -> list[Item] | None:
    """The images of one source file; None when it gives none (recorded in ``result`` as skipped or an error)."""
    rel = path.relative_to(src)
    label = _label(rel, args.label_from)
    try:
        if is_nifti(path):
            return _nifti_items(path, rel, label, args)
        if path.suffix.lower() == ".dcm" or _has_dicom_magic(path):
            return _dicom_items(path, rel, label, args, dst, result, number)
    except ImageReadError as err:
        result.errors.append(_entry(number, rel, args.salt, err.reason))
        log.warning("file %d of %d (source %s) could not be ingested (see ingest_report.json)", number, total,
                    source_key(args.salt, rel))
        return None
    except Quarantined as q:
        result.quarantined.append(_entry(number, rel, args.salt, q.reason))
        log.warning("quarantined file %d of %d (source %s): %s; not written (--pixels clean masks text regions, "
                    "--pixels keep writes it)", number, total, source_key(args.salt, rel), q.reason)
        return None
    result.skipped.append(_entry(number, rel, args.salt, "not a DICOM or NIfTI file"))
    return None


def _store_item(item: Item, args: argparse.Namespace, dst: Path, rows: list[dict[str, str]],
                arrays: list[tuple[np.ndarray, str, str, str, str]]) -> None:
    """Write one image as a PNG with its manifest row (``--format png``), or keep it for the .npz."""
    split = _split_for(item.patient_id, args.patient_split, args.salt)
    if args.format == "png":
        out = dst / "images" / f"{item.name}.png"
        Image.fromarray(item.image[:, :, 0] if item.image.shape[2] == 1 else item.image).save(out)
        rows.append({"path": out.relative_to(dst).as_posix(), "label": item.label, "split": split,
                     "patient_id": item.patient_id, "pixels": item.pixels})
    else:
        arrays.append((fit_to_model(item.image, args.size, 1), item.label, item.patient_id, split, item.pixels))


def write_dataset(dst: Path, fmt: str, rows: list[dict[str, str]],
                  arrays: list[tuple[np.ndarray, str, str, str, str]]) -> None:
    """``manifest.csv`` for PNGs, or ``images.npz`` (when any image was read) for ``--format npz``."""
    if fmt == "png":
        with (dst / "manifest.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["path", "label", "split", "patient_id", "pixels"])
            writer.writeheader()
            writer.writerows(rows)
    elif arrays:
        class_names = class_order([a[1] for a in arrays])[0]  # the order a manifest of the same labels gets
        np.savez_compressed(
            dst / "images.npz",
            images=np.stack([a[0] for a in arrays]),
            labels=np.array([class_names.index(a[1]) for a in arrays], dtype=np.int64),
            class_names=np.array(class_names),
            patient_ids=np.array([a[2] for a in arrays]),
            splits=np.array([a[3] for a in arrays]),
            pixels=np.array([a[4] for a in arrays]),
        )


def write_report(dst: Path, files_seen: int, result: Result, fmt: str, pixels: str = "quarantine") -> None:
    """``ingest_report.json``: counts, the unreadable, skipped and quarantined files with their reasons, and how
    the files that may carry burned-in text were handled."""
    report = {
        "files_seen": files_seen,
        "files_ingested": result.files_ok,
        "images_written": result.items,
        "format": fmt,
        "deidentification": PROFILE,
        "errors": result.errors,
        "skipped": result.skipped,
        "quarantined": result.quarantined,
        "pixels": {
            "mode": pixels,
            "flagged": "BurnedInAnnotation YES; or absent with modality " + ", ".join(sorted(FLAGGED_MODALITIES))
                       + ", a secondary capture SOP class or no modality",
            "mask_rule": MASK_RULE if pixels == "clean" else None,
            "files": result.burned_in,
        },
    }
    (dst / "ingest_report.json").write_text(json.dumps(report, indent=2))


def ingest(args: argparse.Namespace) -> Result:
    """Ingest every file under ``args.src`` into ``args.dst`` (see the module docstring)."""
    src, dst = Path(args.src), Path(args.dst)
    files = source_files(src)
    dst.mkdir(parents=True, exist_ok=True)
    result = Result()
    rows: list[dict[str, str]] = []
    arrays: list[tuple[np.ndarray, str, str, str, str]] = []
    if args.pixels == "keep":
        log.warning("--pixels keep: images that may carry burned-in text are written unmasked (listed in the report)")
    if args.format == "png":
        (dst / "images").mkdir(exist_ok=True)
    columns = (TextColumn("ingest"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True, disable=args.no_progress) as progress:
        task = progress.add_task("ingest", total=len(files))
        for number, path in enumerate(files, start=1):
            items = _file_items(path, src, dst, args, result, number, len(files))
            if items is not None:
                result.files_ok += 1
                for item in items:
                    _store_item(item, args, dst, rows, arrays)
                    result.items += 1
            progress.advance(task)
    write_dataset(dst, args.format, rows, arrays)
    write_report(dst, len(files), result, args.format, args.pixels)
    return result


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m datatools.ingest_dicom", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="folder of DICOM / NIfTI files (class sub-folders with --label-from folder)")
    parser.add_argument("dst", nargs="?", help="output folder")
    parser.add_argument("--format", choices=("png", "npz"), default="png")
    parser.add_argument("--window", nargs=2, type=float, metavar=("C", "W"), default=None,
                        help="DICOM window center/width (default: the file's own, else min-max)")
    parser.add_argument("--salt", default=None, help=f"pseudonymisation salt (default: ${SALT_ENV})")
    parser.add_argument("--label-from", choices=("folder", "none"), default="folder")
    parser.add_argument("--nifti-axis", type=int, choices=(0, 1, 2), default=2)
    parser.add_argument("--size", type=int, default=64, help="image size for --format npz")
    parser.add_argument("--sidecar", action="store_true", help="write de-identified DICOM headers as JSON")
    parser.add_argument("--patient-split", nargs=2, type=float, metavar=("VAL", "TEST"), default=None,
                        help="assign whole patients to val/test with these fractions (default: no split column)")
    parser.add_argument("--pixels", choices=PIXEL_MODES, default="quarantine",
                        help="files that may carry burned-in text: not written (quarantine, the default), written "
                             "with text regions masked (clean) or written as they are (keep)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--locate", type=int, nargs="+", metavar="N",
                        help="print the paths under SRC of the report's file numbers N (nothing is ingested)")
    args = parser.parse_args(argv)
    args.salt = args.salt or os.environ.get(SALT_ENV)
    if not Path(args.src).is_dir():
        parser.error("SRC is not a folder")
    if args.locate:
        return args
    if args.dst is None:
        parser.error("DST is required (or --locate N to see which source files a report names)")
    if not args.salt:
        parser.error(f"a salt is required: --salt or ${SALT_ENV}")
    if args.window is not None:
        args.window = tuple(args.window)
    if args.patient_split is not None:
        val, test = args.patient_split
        if val < 0 or test < 0 or val + test >= 1:
            parser.error("--patient-split fractions must be >= 0 and sum to < 1")
        args.patient_split = (val, test)
    return args


@contextmanager
def ingest_logging(dst: Path) -> Iterator[None]:
    """The ingest log on stderr and in ``dst/ingest.log`` (no propagation to the root logger), with pydicom's own
    warnings silenced (they can quote header values); shared by ingest and the PACS pull."""
    dst.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr), logging.FileHandler(dst / "ingest.log")]
    for h in handlers:
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        with quiet_pydicom():
            yield
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()


def locate(src: Path, numbers: list[int], salt: str | None) -> int:
    """Print the path under ``src`` of each report file number (and, with the salt, the digest to check it against
    the report's ``source``): on the operator's terminal only, never into DST."""
    files = source_files(src)
    missing = [n for n in numbers if not 1 <= n <= len(files)]
    for n in numbers:
        if n not in missing:
            rel = files[n - 1].relative_to(src)
            print(f"{n}\t{rel.as_posix()}" + (f"\t{source_key(salt, rel)}" if salt else ""))
    if missing:
        print(f"no file numbered {', '.join(map(str, missing))}: {src} now holds {len(files)} files", file=sys.stderr)
    return 2 if missing else 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.locate:
        return locate(Path(args.src), args.locate, args.salt)
    dst = Path(args.dst)
    with ingest_logging(dst):
        result = ingest(args)
        log.info("%d image(s) from %d file(s) written to %s; %d error(s), %d skipped, %d quarantined "
                 "(see ingest_report.json)", result.items, result.files_ok, dst, len(result.errors),
                 len(result.skipped), len(result.quarantined))
    return 0 if result.items else 1


if __name__ == "__main__":
    sys.exit(main())
