"""DICOM reading: modality LUT (e.g. Hounsfield units), VOI windowing, 8-bit output.

PRIVACY: nothing raised, warned or logged here may contain header values other than
technical ones (frame counts, photometric interpretation, transfer syntax). pydicom's own
exception messages and warnings can quote element values, so they are never passed on:
errors carry only the exception *type* name, chaining is suppressed (``from None``) and
pydicom warnings are silenced while a file is read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from medops.deid import quiet_pydicom
from medops.errors import ImageReadError

try:  # pydicom >= 3
    from pydicom.pixels import apply_modality_lut as _apply_modality_lut
    from pydicom.pixels import pixel_array as _pixel_array
except ImportError:  # pragma: no cover - pydicom 2.x
    from pydicom.pixel_data_handlers.util import apply_modality_lut as _apply_modality_lut

    _pixel_array = None

__all__ = ["apply_window", "dicom_modality", "modality_warning", "read_dicom"]

_GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
# Defined terms of (0028,0004); only these are ever echoed in an error message.
_KNOWN_PI = _GREY | _COLOUR | {"PALETTE COLOR", "YBR_PARTIAL_420", "YBR_PARTIAL_422", "HSV", "ARGB", "CMYK"}
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear VOI windowing (DICOM PS3.3 C.11.2.1.2) of ``values`` to uint8 0..255.

    ``x <= c - 0.5 - (w-1)/2`` -> 0; ``x > c - 0.5 + (w-1)/2`` -> 255; otherwise
    ``((x - (c - 0.5)) / (w - 1) + 0.5) * 255``, rounded. NaN maps to 0.
    Raises ValueError if ``width < 1`` or either parameter is not finite.
    """
    center, width = _check_window(center, width)
    x = np.asarray(values, dtype=np.float64)
    c0 = center - 0.5
    if width == 1.0:
        y = np.where(x <= c0, 0.0, 255.0)
    else:
        with np.errstate(invalid="ignore"):
            y = np.clip(((x - c0) / (width - 1.0) + 0.5) * 255.0, 0.0, 255.0)
    y = np.where(np.isnan(x), 0.0, y)
    return np.rint(y).astype(np.uint8)


def dicom_modality(path: str | os.PathLike[str]) -> str | None:
    """The Modality (0008,0060) of a DICOM file (``CT``, ``MR``, ``US``...), upper-case; None when the file is not
    DICOM or has none. Reads the header only. Modality is a defined term, not an identifier."""
    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(os.fspath(path), stop_before_pixels=True, specific_tags=["Modality"])
    except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, EOFError):
        return None
    value = str(ds.get("Modality") or "").strip().upper()
    return value if value.isalnum() and len(value) <= 16 else None


def modality_warning(path: str | os.PathLike[str], trained_on: Sequence[str]) -> str | None:
    """A warning when ``path`` is a DICOM file whose Modality is not among the training data's; None otherwise
    (not DICOM, no Modality, or the training modality unknown)."""
    if not trained_on:
        return None
    modality = dicom_modality(path)
    known = sorted({str(m).upper() for m in trained_on})
    if modality is None or modality in known:
        return None
    return f"DICOM Modality {modality} differs from the training data's ({', '.join(known)}): the model was not " \
        "trained on such images"


def read_dicom(
    path: str | os.PathLike[str],
    *,
    window: tuple[float, float] | None = None,
    frame: int | None = None,
) -> np.ndarray:
    """Read a DICOM file as an HxWxC uint8 array (C = 1 for greyscale, 3 for colour).

    Greyscale: modality LUT (RescaleSlope/Intercept, e.g. to Hounsfield units), then
    linear windowing with ``window=(center, width)`` if given, else the file's first
    WindowCenter/WindowWidth, else the image's min-max; MONOCHROME1 is inverted after
    windowing. Colour (RGB, YBR converted to RGB) is returned without windowing.
    Multi-frame files need ``frame`` (0-based). Raises ImageReadError on any failure,
    ValueError for an invalid ``window``.
    """
    if window is not None:
        window = _check_window(*window)
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ImageReadError(name, "file not found" if not os.path.exists(name) else "not a regular file")
    try:
        with quiet_pydicom():  # pydicom's warnings and log records can quote header values
            return _read(name, window, frame)
    except ImageReadError:
        raise
    except Exception as exc:  # never chain: pydicom messages may quote header values
        raise ImageReadError(name, f"cannot interpret DICOM file ({type(exc).__name__})") from None


def _read(path: str, window: tuple[float, float] | None, frame: int | None) -> np.ndarray:
    ds = _dcmread(path)
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise ImageReadError(path, "DICOM file has no pixel data")
    pi = _photometric(path, ds)
    index = _frame_index(path, _number_of_frames(path, ds), frame)
    arr = _decode(path, ds, index)
    if pi in _COLOUR:
        out = _colour_to_uint8(path, ds, arr)
    else:
        if arr.ndim != 2:
            raise ImageReadError(path, f"expected single-sample greyscale pixel data, got shape {arr.shape}")
        values = _modality_lut(ds, arr, index)
        center, width = window or _header_window(ds, index) or _minmax_window(values)
        out = apply_window(values, center, width)
        if pi == "MONOCHROME1":
            out = 255 - out
        out = out[:, :, None]
    if out.ndim != 3 or 0 in out.shape:
        raise ImageReadError(path, f"empty or malformed image (shape {out.shape})")
    return np.ascontiguousarray(out)


def _dcmread(path: str) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        if not path.lower().endswith(".dcm"):
            raise ImageReadError(path, "not a DICOM file") from None
    except Exception as exc:
        raise ImageReadError(path, f"corrupt or truncated DICOM file ({type(exc).__name__})") from None
    try:  # .dcm without preamble/'DICM' magic (e.g. old ACR-NEMA style files)
        return pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise ImageReadError(path, f"not a readable DICOM file ({type(exc).__name__})") from None


def _photometric(path: str, ds: Dataset) -> str:
    pi = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if pi in _GREY or pi in _COLOUR:
        return pi
    shown = repr(pi) if pi in _KNOWN_PI else ("missing" if not pi else "unrecognised")
    raise ImageReadError(path, f"unsupported PhotometricInterpretation ({shown})")


def _number_of_frames(path: str, ds: Dataset) -> int:
    value = ds.get("NumberOfFrames")
    if value is None or value == "":
        return 1
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ImageReadError(path, "invalid NumberOfFrames") from None
    if n < 1:
        raise ImageReadError(path, f"invalid NumberOfFrames ({n})")
    return n


def _frame_index(path: str, n_frames: int, frame: int | None) -> int:
    if frame is None:
        if n_frames > 1:
            raise ImageReadError(
                path, f"multi-frame DICOM with {n_frames} frames; pass frame=0..{n_frames - 1}"
            )
        return 0
    if not 0 <= frame < n_frames:
        raise ImageReadError(path, f"frame={frame} out of range; the file has {n_frames} frame(s)")
    return frame


def _decode(path: str, ds: Dataset, index: int) -> np.ndarray:
    try:
        if _pixel_array is not None:
            return _pixel_array(ds, index=index)  # decodes only that frame; YBR_FULL* -> RGB
        return _decode_pydicom2(ds, index)  # pragma: no cover
    except Exception as exc:
        ts = _transfer_syntax(ds)
        if ts is not None and ts[1]:
            reason = (
                f"cannot decode compressed pixel data ({ts[0]}): no working decoder plugin "
                f"(e.g. pylibjpeg, gdcm) or corrupt data ({type(exc).__name__})"
            )
        else:
            reason = f"cannot decode pixel data: corrupt or truncated ({type(exc).__name__})"
        raise ImageReadError(path, reason) from None


def _decode_pydicom2(ds: Dataset, index: int) -> np.ndarray:  # pragma: no cover - pydicom 2.x only
    from pydicom.pixel_data_handlers.util import convert_color_space

    pi = str(ds.PhotometricInterpretation)
    arr = ds.pixel_array
    if _number_of_frames("", ds) > 1:
        arr = arr[index]
    if pi.startswith("YBR_FULL") and str(ds.PhotometricInterpretation).startswith("YBR_FULL"):
        arr = convert_color_space(arr, pi, "RGB")
    return arr


def _transfer_syntax(ds: Dataset) -> tuple[str, bool] | None:
    """(name, is_compressed) of a *standard* transfer syntax; None if absent/unknown."""
    uid = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID")
    try:
        if uid is None or not uid.is_transfer_syntax:
            return None
        return str(uid.name), bool(uid.is_compressed)
    except Exception:
        return None


def _functional_items(ds: Dataset, index: int, sequence: str) -> list[Dataset]:
    """``ds`` itself, then the enhanced multi-frame per-frame and shared group items."""
    items = [ds]
    for groups, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and len(seq) > i and seq[i].get(sequence):
            items.append(seq[i].get(sequence)[0])
    return items


def _modality_lut(ds: Dataset, arr: np.ndarray, index: int) -> np.ndarray:
    if ds.get("ModalityLUTSequence"):
        return np.asarray(_apply_modality_lut(arr, ds), dtype=np.float64)
    for item in _functional_items(ds, index, "PixelValueTransformationSequence"):
        slope, intercept = item.get("RescaleSlope"), item.get("RescaleIntercept")
        if slope not in (None, "") and intercept not in (None, ""):
            return arr.astype(np.float64) * float(slope) + float(intercept)
    return arr.astype(np.float64)


def _header_window(ds: Dataset, index: int) -> tuple[float, float] | None:
    for item in _functional_items(ds, index, "FrameVOILUTSequence"):
        center, width = _first(item.get("WindowCenter")), _first(item.get("WindowWidth"))
        if center is None or width is None:
            continue
        try:
            return _check_window(float(center), float(width))
        except (TypeError, ValueError):
            continue
    return None


def _first(value: object) -> object:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return value[0] if len(value) else None
    return None if value == "" else value


def _minmax_window(values: np.ndarray) -> tuple[float, float]:
    """The window that maps the finite min to 0 and the finite max to 255."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.5, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return (lo + hi) / 2 + 0.5, hi - lo + 1.0


def minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    """Min-max scale any real array to uint8 0..255 (constant or all-NaN -> zeros)."""
    values = np.asarray(values, dtype=np.float64)
    return apply_window(values, *_minmax_window(values))


def _colour_to_uint8(path: str, ds: Dataset, arr: np.ndarray) -> np.ndarray:
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageReadError(path, f"expected 3-sample colour pixel data, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind != "u":
        raise ImageReadError(path, f"unsupported colour pixel dtype {arr.dtype}")
    bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    scaled = np.rint(arr.astype(np.float64) * (255.0 / (2**bits - 1)))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _check_window(center: float, width: float) -> tuple[float, float]:
    center, width = float(center), float(width)
    if not (math.isfinite(center) and math.isfinite(width)) or width < 1.0:
        raise ValueError(f"invalid window (center={center}, width={width}); width must be >= 1")
    return center, width
