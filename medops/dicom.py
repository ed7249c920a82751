"""DICOM reading: decoding of every common transfer syntax, colour, modality LUT, VOI LUT, 8-bit output.

Decoding is pydicom's (:func:`pydicom.pixels.get_decoder`, one frame at a time) with the pixel-data plugins that
pyproject.toml declares (pylibjpeg with libjpeg and openjpeg: JPEG baseline/extended 12-bit/lossless, JPEG-LS,
JPEG 2000; RLE is pydicom's own). The image pipeline follows PS3.3 C.11 with pydicom's functions:

* colour: RGB as is; YBR_FULL / YBR_FULL_422 are converted to RGB by pydicom 3 while decoding and YBR_ICT /
  YBR_RCT by the JPEG 2000 decoder (the decoder reports the colour space it returns, so nothing is converted
  twice); PALETTE COLOR through :func:`pydicom.pixels.apply_color_lut`; more than 8 bits scaled to 0..255;
* greyscale: Modality LUT (:func:`pydicom.pixels.apply_modality_lut`: the Modality LUT Sequence or Rescale
  Slope/Intercept, also from an enhanced multi-frame file's functional groups), then VOI
  (:func:`pydicom.pixels.apply_voi_lut`): the caller's ``window=`` if given (LINEAR), else the file's VOI LUT
  Sequence, else its first Window Center/Width with its VOI LUT Function (LINEAR, LINEAR_EXACT, SIGMOID), else
  the image's min-max; the VOI output range is 0..255; MONOCHROME1 is inverted after VOI.

PRIVACY: nothing raised, warned or logged here may contain header values other than
technical ones (frame counts, photometric interpretation, transfer syntax). pydicom's own
exception messages and warnings can quote element values, so they are never passed on:
errors carry only the exception *type* name, chaining is suppressed (``from None``) and
pydicom warnings are silenced while a file is read.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    as_pixel_options,
    convert_color_space,
    get_decoder,
)
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medops.deid import quiet_pydicom
from medops.errors import ImageReadError

__all__ = ["VOI_FUNCTIONS", "apply_window", "dicom_modality", "modality_warning", "read_dicom"]

_GREY = frozenset({"MONOCHROME1", "MONOCHROME2"})
_COLOUR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
_PALETTE = "PALETTE COLOR"
# Defined terms of (0028,0004); only these are ever echoed in an error message.
_KNOWN_PI = _GREY | _COLOUR | {_PALETTE, "YBR_PARTIAL_420", "YBR_PARTIAL_422", "HSV", "ARGB", "CMYK"}
_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")  # (0028,1056) defined terms; absent or other: LINEAR


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """VOI windowing (DICOM PS3.3 C.11.2.1.2) of ``values`` to uint8 0..255, by pydicom's ``apply_voi_lut``.

    LINEAR: ``x <= c - 0.5 - (w-1)/2`` -> 0; ``x > c - 0.5 + (w-1)/2`` -> 255; otherwise
    ``((x - (c - 0.5)) / (w - 1) + 0.5) * 255``, rounded. LINEAR_EXACT: the same with ``c`` and ``w``;
    SIGMOID: ``255 / (1 + exp(-4 (x - c) / w))``; any other ``function`` is LINEAR (the standard's default).
    NaN maps to 0. Raises ValueError if the width is below 1 (LINEAR) or not positive (the others), or either
    parameter is not finite.
    """
    function = function if function in VOI_FUNCTIONS else "LINEAR"
    center, width = _check_window(center, width, function)
    x = np.asarray(values, dtype=np.float64)
    view = Dataset()  # VOI output range 0..255: unsigned 8-bit, no rescale (PS3.3 C.11.2.1.2)
    view.PhotometricInterpretation, view.BitsStored, view.PixelRepresentation = "MONOCHROME2", 8, 0
    view.WindowCenter, view.WindowWidth, view.VOILUTFunction = center, width, function
    with np.errstate(invalid="ignore", over="ignore"):
        y = apply_voi_lut(x, view, prefer_lut=False)
    y = np.where(np.isnan(x), 0.0, y)
    return np.rint(np.clip(y, 0.0, 255.0)).astype(np.uint8)


# Modality (0008,0060) defined terms, DICOM PS3.3 C.7.3.1.1.1, current and retired. Written out here because
# pydicom ships no such list; a value outside it is free text a site typed, which may identify someone, so it is
# never repeated back (``UNRECOGNISED`` instead).
MODALITY_TERMS = frozenset(
    "ANN AR ASMT AU BDUS BI BMD CFM CR CT CTPROTOCOL DG DMS DOC DX ECG EEG EMG EOG EPS ES FID GM HC HD IO IOL IVOCT "
    "IVUS KER KO LEN LS M3D MG MR NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PA PLAN POS PR PT PX REG RESP RF RG "
    "RTDOSE RTIMAGE RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA "
    "XA XAPROTOCOL XC "
    "AS CD CF CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF".split())  # the last line: retired terms
UNRECOGNISED_MODALITY = "UNRECOGNISED"


def modality_term(value: object) -> str:
    """A Modality value as it may be shown: the defined term (upper case), ``UNRECOGNISED`` for anything else
    (free text a site typed), ``""`` for none."""
    text = str(value or "").strip().upper()
    if not text:
        return ""
    return text if text in MODALITY_TERMS else UNRECOGNISED_MODALITY


def dicom_modality(path: str | os.PathLike[str]) -> str | None:
    """The Modality (0008,0060) of a DICOM file (``CT``, ``MR``, ``US``...), upper-case; None when the file is not
    DICOM or has none, ``UNRECOGNISED`` for a value that is not a DICOM defined term (free text is never passed
    on). Reads the header only."""
    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(os.fspath(path), stop_before_pixels=True, specific_tags=["Modality"])
    except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError, EOFError):
        return None
    return modality_term(ds.get("Modality")) or None


def modality_warning(path: str | os.PathLike[str], trained_on: Sequence[str]) -> str | None:
    """A warning when ``path`` is a DICOM file whose Modality is not among the training data's; None otherwise
    (not DICOM, no Modality, or the training modality unknown)."""
    if not trained_on:
        return None
    modality = dicom_modality(path)
    known = sorted({str(m).upper() for m in trained_on})
    if modality is None or modality in known:
        return None
    shown = "a value that is not a DICOM defined term" if modality == UNRECOGNISED_MODALITY else modality
    return f"DICOM Modality {shown} differs from the training data's ({', '.join(known)}): the model was not " \
        "trained on such images"


def read_dicom(
    path: str | os.PathLike[str],
    *,
    window: tuple[float, float] | None = None,
    frame: int | None = None,
) -> np.ndarray:
    """Read a DICOM file as an HxWxC uint8 array (C = 1 for greyscale, 3 for colour).

    Greyscale: Modality LUT (e.g. to Hounsfield units), then VOI: ``window=(center, width)`` (LINEAR) if given,
    else the file's VOI LUT Sequence, else its first WindowCenter/WindowWidth with its VOILUTFunction, else the
    image's min-max; MONOCHROME1 is inverted after VOI. Colour (RGB; YBR and PALETTE COLOR converted to RGB) is
    returned without windowing. Multi-frame files need ``frame`` (0-based; only that frame is decoded).
    Raises ImageReadError on any failure, ValueError for an invalid ``window``.
    """
    if window is not None:
        window = _check_window(*window)
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ImageReadError(name, "file not found" if not os.path.exists(name) else "not a regular file")
    if os.path.getsize(name) == 0:  # else pydicom reads an empty dataset: "no pixel data" would mislead
        raise ImageReadError(name, "empty file (0 bytes)")
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
    arr, decoded_pi = _decode(path, ds, index)
    if pi == _PALETTE:
        out = _palette_to_uint8(path, ds, arr)
    elif pi in _COLOUR:
        out = _colour_to_uint8(path, ds, arr, decoded_pi)
    else:
        if arr.ndim != 2:
            raise ImageReadError(path, f"expected single-sample greyscale pixel data, got shape {arr.shape}")
        out = _voi_to_uint8(ds, _modality_lut(ds, arr, index), index, window)
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
    if pi in _GREY or pi in _COLOUR or pi == _PALETTE:
        return pi
    if not pi:
        raise ImageReadError(path, "no PhotometricInterpretation: pixel data without an Image Pixel module")
    shown = repr(pi) if pi in _KNOWN_PI else "unrecognised"
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


def _pixel_array(ds: Dataset, *, index: int) -> tuple[np.ndarray, str]:
    """Frame ``index`` decoded by pydicom (YBR_FULL* converted to RGB), and the photometric interpretation of what
    the decoder returned (``RGB`` after a YBR conversion or a JPEG 2000 multiple-component transform)."""
    if not getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID"):  # no meta (ACR-NEMA style): as read
        implicit, little = ds.original_encoding
        ds.file_meta = getattr(ds, "file_meta", FileMetaDataset())
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    arr, props = decoder.as_array(ds, index=index, validate=True, **as_pixel_options(ds))
    return arr, str(props.get("photometric_interpretation", ds.PhotometricInterpretation))


def _decode(path: str, ds: Dataset, index: int) -> tuple[np.ndarray, str]:
    ts = _transfer_syntax(ds)
    if ts is not None and ts[1]:
        _check_decoder(path, ds, ts[0])
    try:
        return _pixel_array(ds, index=index)
    except Exception as exc:
        if ts is not None and ts[1]:
            reason = (f"cannot decode compressed pixel data ({ts[0]}): corrupt, or a variant the installed "
                      f"decoders reject ({type(exc).__name__})")
        else:
            reason = f"cannot decode pixel data: corrupt or truncated ({type(exc).__name__})"
        raise ImageReadError(path, reason) from None


def _check_decoder(path: str, ds: Dataset, ts_name: str) -> None:
    """An error naming what is missing when no decoder for the (compressed) transfer syntax is installed."""
    try:
        decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    except NotImplementedError:
        raise ImageReadError(path, f"cannot decode compressed pixel data ({ts_name}): pydicom has no decoder "
                                   "for this transfer syntax") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin registered"
        raise ImageReadError(path, f"cannot decode compressed pixel data ({ts_name}): no decoder plugin installed "
                                   f"(pyproject.toml declares them; pydicom: {missing})")


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
    """Stored values -> modality values (float64) by pydicom: the Modality LUT Sequence, else the first Rescale
    Slope/Intercept of the dataset or of its functional groups for this frame, else unchanged."""
    if ds.get("ModalityLUTSequence"):
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    for item in _functional_items(ds, index, "PixelValueTransformationSequence"):
        slope, intercept = item.get("RescaleSlope"), item.get("RescaleIntercept")
        if slope not in (None, "") and intercept not in (None, ""):
            return np.asarray(apply_modality_lut(arr, item), dtype=np.float64)
    return arr.astype(np.float64)


def _voi_to_uint8(ds: Dataset, values: np.ndarray, index: int, window: tuple[float, float] | None) -> np.ndarray:
    """VOI in the order of :func:`read_dicom`'s docstring; header windows that are not valid are skipped."""
    if window is not None:
        return apply_window(values, *window)
    if ds.get("VOILUTSequence"):
        return _voi_lut_sequence(ds, values)
    for item in _functional_items(ds, index, "FrameVOILUTSequence"):
        center, width = _first(item.get("WindowCenter")), _first(item.get("WindowWidth"))
        function = str(item.get("VOILUTFunction") or "LINEAR").strip().upper()
        if center is None or width is None:
            continue
        try:
            return apply_window(values, float(center), float(width), function)
        except (TypeError, ValueError):
            continue
    return apply_window(values, *_minmax_window(values))


def _voi_lut_sequence(ds: Dataset, values: np.ndarray) -> np.ndarray:
    """The first VOI LUT of the VOI LUT Sequence by pydicom's ``apply_voi_lut``, its output (0..2**bits - 1, bits
    the LUT Descriptor's third value) scaled to 0..255.

    pydicom 3.0 indexes an 8-bit LUT with an 8-bit array, so entries past 255 wrap; the copy given to it declares
    16 bits (the LUT data, one entry per value, is read the same way) so that every entry is reachable.
    """
    item = copy.deepcopy(ds.VOILUTSequence[0])
    descriptor = [int(v) for v in item.LUTDescriptor]
    bits = descriptor[2]
    item.LUTDescriptor = [descriptor[0], descriptor[1], 16 if bits == 8 else bits]
    view = Dataset()
    view.VOILUTSequence = [item]
    view.file_meta = getattr(ds, "file_meta", Dataset())
    view.set_original_encoding(*ds.original_encoding)
    mapped = apply_voi_lut(np.floor(values).astype(np.int64), view)  # LUT input: integer modality values
    return np.rint(np.clip(mapped.astype(np.float64) * (255.0 / (2**bits - 1)), 0, 255)).astype(np.uint8)


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


def _colour_to_uint8(path: str, ds: Dataset, arr: np.ndarray, decoded_pi: str) -> np.ndarray:
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageReadError(path, f"expected 3-sample colour pixel data, got shape {arr.shape}")
    if decoded_pi in ("YBR_FULL", "YBR_FULL_422"):  # pydicom 3 converts while decoding; kept for safety
        arr = convert_color_space(arr, decoded_pi, "RGB")
    elif decoded_pi != "RGB":  # YBR_ICT/YBR_RCT left as they are: only valid inside JPEG 2000
        shown = decoded_pi if decoded_pi in _KNOWN_PI else "unrecognised"
        raise ImageReadError(path, f"{shown} colour outside JPEG 2000 pixel data is not supported")
    return _scale_unsigned(path, arr, int(ds.get("BitsStored") or arr.dtype.itemsize * 8))


def _palette_to_uint8(path: str, ds: Dataset, arr: np.ndarray) -> np.ndarray:
    """PALETTE COLOR -> RGB by pydicom's ``apply_color_lut`` (segmented LUTs included), scaled from the LUT
    Descriptor's bit depth to 0..255."""
    if arr.ndim != 2:
        raise ImageReadError(path, f"expected single-sample palette pixel data, got shape {arr.shape}")
    if "RedPaletteColorLookupTableDescriptor" not in ds:
        raise ImageReadError(path, "PALETTE COLOR without palette colour lookup tables")
    rgb = apply_color_lut(arr, ds)
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    return _scale_unsigned(path, rgb, bits)


def _scale_unsigned(path: str, arr: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned samples of ``bits`` bits -> uint8 0..255 (uint8 8-bit data unchanged)."""
    if arr.dtype == np.uint8 and bits <= 8:
        return arr
    if arr.dtype.kind != "u":
        raise ImageReadError(path, f"unsupported colour pixel dtype {arr.dtype}")
    scaled = np.rint(arr.astype(np.float64) * (255.0 / (2**bits - 1)))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _check_window(center: float, width: float, function: str = "LINEAR") -> tuple[float, float]:
    center, width = float(center), float(width)
    least = "width must be >= 1" if function == "LINEAR" else "width must be > 0"
    too_narrow = width < 1.0 if function == "LINEAR" else width <= 0.0
    if not (math.isfinite(center) and math.isfinite(width)) or too_narrow:
        raise ValueError(f"invalid window (center={center}, width={width}); {least}")
    return center, width
