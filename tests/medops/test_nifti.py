"""Tests for medops.nifti on nibabel's test volumes in tests/data/nifti."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medops import ImageReadError
from medops.nifti import is_nifti, nifti_slices, nifti_volume

NIFTI = Path(__file__).resolve().parents[1] / "data" / "nifti"
ANAT = NIFTI / "anatomical.nii"  # NIfTI-1, 33 x 41 x 25
NIFTI2 = NIFTI / "example_nifti2.nii.gz"  # NIfTI-2, 32 x 20 x 12 x 2


def test_3d_volume_slices_along_each_axis() -> None:
    assert nib.load(ANAT).shape == (33, 41, 25)
    for axis, (n, shape) in {0: (33, (25, 41, 1)), 1: (41, (25, 33, 1)), 2: (25, (41, 33, 1))}.items():
        slices = nifti_slices(ANAT, axis=axis)
        assert len(slices) == n
        assert all(s.shape == shape and s.dtype == np.uint8 and s.flags.c_contiguous for s in slices)


def test_nifti2_4d_uses_the_first_volume_unless_told() -> None:
    img = nib.load(NIFTI2)
    assert isinstance(img, nib.Nifti2Image) and img.shape == (32, 20, 12, 2)
    first = nifti_slices(NIFTI2)
    assert len(first) == 12 and first[0].shape == (20, 32, 1) and first[0].dtype == np.uint8
    assert nifti_volume(NIFTI2).shape == (32, 20, 12)
    data = np.asarray(img.dataobj, dtype=np.float64)
    np.testing.assert_array_equal(nifti_volume(NIFTI2, volume=1), data[..., 1])
    with pytest.raises(ImageReadError, match="volume=2 out of range"):
        nifti_slices(NIFTI2, volume=2)


def test_indices_and_normalisation() -> None:
    middle = nifti_slices(ANAT, indices="middle")
    assert len(middle) == 1
    np.testing.assert_array_equal(middle[0], nifti_slices(ANAT)[12])
    assert [s.shape for s in nifti_slices(ANAT, axis=0, indices=[0, 32])] == [(25, 41, 1)] * 2
    vol = nifti_volume(ANAT)
    mm = np.concatenate([s.ravel() for s in nifti_slices(ANAT, normalize="minmax")])
    assert mm.min() == 0 and mm.max() == 255
    # the minimum voxel maps to 0 under min-max; the middle slice as rotated voxel data
    raw = np.rot90(vol[:, :, 12])
    got = nifti_slices(ANAT, indices=12, normalize="minmax")[0][:, :, 0]
    assert np.array_equal(np.argsort(raw.ravel(), kind="stable")[:1], np.argsort(got.ravel(), kind="stable")[:1])
    pct = np.concatenate([s.ravel() for s in nifti_slices(ANAT)])
    assert (pct == 255).mean() >= 0.005  # the top 1 % saturates
    with pytest.raises(ImageReadError, match="out of range"):
        nifti_slices(ANAT, indices=[25])
    with pytest.raises(ValueError, match="axis"):
        nifti_slices(ANAT, axis=3)
    with pytest.raises(ValueError, match="normalize"):
        nifti_slices(ANAT, normalize="zscore")


def test_corrupt_truncated_and_missing_files_raise_image_read_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.nii"
    garbage.write_bytes(b"not a nifti file at all" * 10)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(gzip.decompress(NIFTI2.read_bytes())[:600]))
    for path in (garbage, truncated, tmp_path / "missing.nii"):
        with pytest.raises(ImageReadError) as info:
            nifti_slices(path)
        assert info.value.path == str(path)
        assert info.value.__cause__ is None


def test_is_nifti() -> None:
    assert is_nifti("a/b.nii") and is_nifti("B.NII.GZ") and not is_nifti("x.gz") and not is_nifti("x.dcm")
