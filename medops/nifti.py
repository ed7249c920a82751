"""NIfTI-1/-2 volumes (.nii, .nii.gz) as 2D uint8 slices (torch-free; needs nibabel).

nibabel is imported when a file is read, so ``import medops`` keeps working without it.
Errors are :class:`~medops.errors.ImageReadError` with technical reasons only (NIfTI headers
have no patient fields, but the description/aux_file text is never echoed either).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np

from medops.dicom import apply_window, minmax_to_uint8
from medops.errors import ImageReadError

__all__ = ["NIFTI_SUFFIXES", "is_nifti", "nifti_slices", "nifti_volume"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: str | os.PathLike[str]) -> bool:
    """True for a ``.nii`` / ``.nii.gz`` file name."""
    return os.fspath(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_volume(path: str | os.PathLike[str], *, volume: int | None = None) -> np.ndarray:
    """The 3D float64 array (scaled with scl_slope/inter) of a NIfTI file.

    2D images become a one-slice volume; 4D series give volume ``volume`` (default 0). Raises
    ImageReadError for a missing, corrupt or unsupported file or an out-of-range ``volume``.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ImageReadError(name, "file not found" if not os.path.exists(name) else "not a regular file")
    try:
        import nibabel as nib
    except ImportError:  # pragma: no cover - nibabel is a project dependency
        raise ImageReadError(name, "reading NIfTI needs nibabel (pip install nibabel)") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = nib.load(name)
            if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
                raise ImageReadError(name, f"not a NIfTI image ({type(img).__name__})")
            shape = tuple(int(s) for s in img.shape)
            if len(shape) < 2 or len(shape) > 4 and any(s != 1 for s in shape[4:]):
                raise ImageReadError(name, f"unsupported NIfTI dimensionality (shape {shape})")
            data = img.dataobj
            if len(shape) >= 4:
                n = shape[3]
                index = 0 if volume is None else int(volume)
                if not 0 <= index < n:
                    raise ImageReadError(name, f"volume={volume} out of range; the file has {n} volume(s)")
                arr = np.asarray(data[:, :, :, index, ...], dtype=np.float64).reshape(shape[:3])
            else:
                if volume not in (None, 0):
                    raise ImageReadError(name, f"volume={volume} out of range; the file has 1 volume")
                arr = np.asarray(data, dtype=np.float64)
                if arr.ndim == 2:
                    arr = arr[:, :, None]
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(name, f"corrupt or unreadable NIfTI file ({type(exc).__name__})") from None
    if 0 in arr.shape:
        raise ImageReadError(name, f"empty NIfTI volume (shape {arr.shape})")
    return arr


def nifti_slices(
    path: str | os.PathLike[str],
    axis: int = 2,
    indices: None | str | int | Sequence[int] = None,
    normalize: str = "percentile",
    *,
    volume: int | None = None,
) -> list[np.ndarray]:
    """Slices of a NIfTI volume as a list of HxWx1 uint8 arrays.

    Args:
        axis: the voxel axis sliced across (0, 1 or 2; 2 = axial for the usual RAS-ish layout).
            Each slice is rotated 90 degrees (``np.rot90``) so the first remaining axis runs left-right.
        indices: ``None``/``"all"`` every slice, ``"middle"`` the middle one, or an int / list of ints.
        normalize: ``"percentile"`` maps the volume's 1st..99th percentile to 0..255 (clipped);
            ``"minmax"`` its min..max. Computed over the whole volume, so slices are comparable.
        volume: which volume of a 4D series (default the first).
    """
    name = os.fspath(path)
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
    if normalize not in ("percentile", "minmax"):
        raise ValueError(f"normalize must be 'percentile' or 'minmax', got {normalize!r}")
    vol = nifti_volume(name, volume=volume)
    n = vol.shape[axis]
    if indices is None or indices == "all":
        chosen = list(range(n))
    elif indices == "middle":
        chosen = [n // 2]
    elif isinstance(indices, str):
        raise ValueError(f"indices must be None, 'all', 'middle' or ints, got {indices!r}")
    else:
        chosen = [int(indices)] if isinstance(indices, (int, np.integer)) else [int(i) for i in indices]
        bad = [i for i in chosen if not 0 <= i < n]
        if bad:
            raise ImageReadError(name, f"slice index {bad[0]} out of range; axis {axis} has {n} slice(s)")
    scaled = _to_uint8(vol, normalize)
    return [np.ascontiguousarray(np.rot90(np.take(scaled, i, axis=axis)))[:, :, None] for i in chosen]


def _to_uint8(vol: np.ndarray, normalize: str) -> np.ndarray:
    if normalize == "minmax":
        return minmax_to_uint8(vol)
    finite = vol[np.isfinite(vol)]
    if finite.size == 0:
        return np.zeros(vol.shape, dtype=np.uint8)
    lo, hi = (float(v) for v in np.percentile(finite, [1.0, 99.0]))
    if hi <= lo:
        return minmax_to_uint8(vol)
    # the window whose 0 and 255 breakpoints are lo and hi (see medops.dicom.apply_window)
    return apply_window(vol, center=(lo + hi) / 2 + 0.5, width=hi - lo + 1.0)
