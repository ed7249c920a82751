"""Image file -> model input. THE preprocessing contract, defined once.

The model takes float32 NCHW tensors with values in [0, 1] (= uint8 intensity / 255) at a
fixed square size and channel count. Mean/std normalisation lives inside the model graph.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from medops.dicom import minmax_to_uint8, read_dicom
from medops.errors import ImageReadError

__all__ = ["SUPPORTED_SUFFIXES", "fit_to_model", "load_for_model", "preprocess", "read_image", "refuse_blank", "resize",
           "to_channels", "to_unit_range"]

SUPPORTED_SUFFIXES: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".npy"}
)
_PILLOW_SUFFIXES = SUPPORTED_SUFFIXES - {".dcm", ".npy"}
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601


def read_image(
    path: str | os.PathLike[str],
    *,
    window: tuple[float, float] | None = None,
    frame: int | None = None,
) -> np.ndarray:
    """Read an image file as an HxWxC uint8 array, C in {1, 3}.

    PNG/JPEG/BMP/TIFF via Pillow, ``.npy`` via numpy, ``.dcm`` (or any file with the
    DICOM 'DICM' magic, whatever its suffix) via :func:`medops.dicom.read_dicom`.
    Float arrays already in [0, 1] (the model's own range) are taken as they are (x 255);
    other 16-bit/float/integer greyscale is min-max scaled per image to 0..255; NaN or Inf
    values are refused; alpha is dropped. ``window`` applies to DICOM only. ``frame`` selects a frame of a multi-frame
    DICOM or multi-page TIFF (required for those); for single-frame images it must be
    None or 0. Every failure raises ImageReadError naming the path.
    """
    name = os.fspath(path)
    p = Path(name)
    if not p.exists():
        raise ImageReadError(name, "file not found")
    if not p.is_file():
        raise ImageReadError(name, "not a regular file")
    suffix = p.suffix.lower()
    if suffix == ".dcm" or _has_dicom_magic(name):
        return read_dicom(name, window=window, frame=frame)
    if suffix == ".npy":
        img = _read_npy(name, frame)
    elif suffix in _PILLOW_SUFFIXES:
        img = _read_pillow(name, frame)
    else:
        allowed = ", ".join(sorted(SUPPORTED_SUFFIXES))
        raise ImageReadError(name, f"unsupported file type {suffix or '(no suffix)'!r}; expected {allowed}")
    return _check_read(name, img)


def to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """Convert an HxWxC uint8 image to ``channels`` channels.

    1 -> 3 repeats the channel; 3 -> 1 is ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B),
    rounded; same count -> returned unchanged. Anything else raises ValueError.
    """
    _check_hwc(img)
    have = img.shape[2]
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if have == channels:
        return img
    if have == 1:
        return np.repeat(img, 3, axis=2)
    luma = np.rint(img.astype(np.float64) @ _LUMA)
    return np.clip(luma, 0, 255).astype(np.uint8)[:, :, None]


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Resize an HxWxC uint8 image to ``size`` x ``size`` (aspect ratio not kept).

    Pillow BOX (area averaging) when both sides shrink, BILINEAR otherwise (Pillow's
    bilinear is antialiased on any side it shrinks). No-op when already that size.
    """
    _check_hwc(img)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    h, w, c = img.shape
    if h == size and w == size:
        return img
    resample = Image.Resampling.BOX if size <= h and size <= w else Image.Resampling.BILINEAR
    src = Image.fromarray(np.ascontiguousarray(img[:, :, 0] if c == 1 else img))
    out = np.array(src.resize((int(size), int(size)), resample=resample), dtype=np.uint8)
    return out.reshape(int(size), int(size), c)


def fit_to_model(img: np.ndarray, size: int, channels: int) -> np.ndarray:
    """HxWxC uint8 image -> the model's geometry, still uint8 HxWxC: :func:`to_channels`, then :func:`resize`.

    Training keeps its datasets in this form (uint8 is a quarter of the memory of float32).
    """
    return resize(to_channels(img, channels), size)


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 intensities (any shape) -> float32 in [0, 1]: the model's value range (``/ 255``)."""
    if images.dtype != np.uint8:
        raise ValueError(f"the model-input contract scales uint8 images, got {images.dtype}")
    return images.astype(np.float32) / np.float32(255.0)


def preprocess(img: np.ndarray, size: int, channels: int) -> np.ndarray:
    """HxWxC uint8 -> float32 CxHxW in [0, 1]: :func:`fit_to_model`, channels first, :func:`to_unit_range`.

    Every path that feeds a model goes through these functions: the training loaders, evaluation, the export
    parity gate, ``serve predict``/``batch`` and drift checks (``tests/medops/test_preprocess_paths.py``).
    """
    return to_unit_range(np.ascontiguousarray(fit_to_model(img, size, channels).transpose(2, 0, 1)))


def load_for_model(
    path: str | os.PathLike[str],
    size: int,
    channels: int,
    *,
    window: tuple[float, float] | None = None,
    frame: int | None = None,
) -> np.ndarray:
    """:func:`read_image` + :func:`preprocess`: a file -> float32 CxHxW in [0, 1] (a blank image is refused,
    :func:`refuse_blank`)."""
    return preprocess(refuse_blank(path, read_image(path, window=window, frame=frame)), size, channels)


def _has_dicom_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError as exc:
        raise ImageReadError(path, f"cannot open file ({type(exc).__name__})") from exc


def _frame_index(path: str, n_frames: int, frame: int | None, *, explicit: bool) -> int:
    """Validate ``frame``; ``explicit`` means a multi-frame file requires it."""
    if frame is None:
        if explicit and n_frames > 1:
            msg = f"multi-page image with {n_frames} pages; pass frame=0..{n_frames - 1}"
            raise ImageReadError(path, msg)
        return 0
    if not 0 <= frame < n_frames:
        raise ImageReadError(path, f"frame={frame} out of range; the file has {n_frames} frame(s)")
    return frame


def _read_npy(path: str, frame: int | None) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ImageReadError(path, f"cannot read .npy file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(arr, np.ndarray):
        close = getattr(arr, "close", None)  # an NpzFile keeps its file open
        if close is not None:
            close()
        raise ImageReadError(path, "not a single .npy array (is it an .npz archive?)")
    _frame_index(path, 1, frame, explicit=False)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ImageReadError(path, f"expected an HxW or HxWx{{1,3}} array, got shape {arr.shape}")
    if 0 in arr.shape:
        raise ImageReadError(path, f"empty image (shape {arr.shape})")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind not in "biuf":
        raise ImageReadError(path, f"unsupported array dtype {arr.dtype}")
    return _to_uint8(path, arr)


def _to_uint8(path: str, arr: np.ndarray) -> np.ndarray:
    """A non-uint8 array as uint8: a float array in [0, 1] is already in the model's range (x 255, not stretched,
    so the same pixels give the same answer as their 8-bit file); anything else min-max scaled per image."""
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            raise ImageReadError(path, f"{int((~finite).sum())} NaN or Inf pixel values")
        if arr.min() >= 0.0 and arr.max() <= 1.0:
            return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)
    return minmax_to_uint8(arr)


def _read_pillow(path: str, frame: int | None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            n_frames = int(getattr(im, "n_frames", 1))
            index = _frame_index(path, n_frames, frame, explicit=im.format == "TIFF")
            if index:
                im.seek(index)
            im.load()
            return _pil_to_array(path, ImageOps.exif_transpose(im))
    except ImageReadError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise ImageReadError(path, "not a recognised image file (corrupt, empty or wrong suffix)") from exc
    except Exception as exc:
        raise ImageReadError(path, f"cannot decode image ({type(exc).__name__}: {exc})") from exc


def _pil_to_array(path: str, im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "L" or mode == "RGB":
        arr = np.array(im)
    elif mode in ("I", "F") or mode.startswith("I;16"):
        arr = _to_uint8(path, np.array(im))
    elif mode in ("1", "LA", "La"):
        arr = np.array(im.convert("L"))
    elif mode in ("P", "PA"):
        arr = np.array(im.convert("RGBA").convert("RGB"))
    else:  # RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV...: drop alpha / convert colour space
        arr = np.array(im.convert("RGB"))
    return arr[:, :, None] if arr.ndim == 2 else arr


def _check_read(path: str, img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in (1, 3):
        raise ImageReadError(path, f"unsupported image layout (dtype {img.dtype}, shape {img.shape})")
    if 0 in img.shape:
        raise ImageReadError(path, f"empty image (shape {img.shape})")
    return np.ascontiguousarray(img)


def refuse_blank(path: str | os.PathLike[str], img: np.ndarray) -> np.ndarray:
    """``img``, or ImageReadError naming ``path`` when every pixel has the same value: there is nothing to classify,
    yet a network still answers (an all-black input gets a confident class). Inference inputs only: a training set
    with blank images is the data check's business (``datatools.validate_data``)."""
    if img.size and img.min() == img.max():
        value = img.flat[0]
        shown = int(value) if img.dtype == np.uint8 else float(value)
        raise ImageReadError(os.fspath(path), f"blank image: every pixel has the value {shown} (nothing to classify)")
    return img


def _check_hwc(img: np.ndarray) -> None:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 numpy array, got {getattr(img, 'dtype', type(img))}")
    if img.ndim != 3 or img.shape[2] not in (1, 3):
        raise ValueError(f"expected an HxWxC image with C in {{1, 3}}, got shape {img.shape}")
