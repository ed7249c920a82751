"""Tests for medops.dicom (real pydicom test files in tests/data, copies built with pydicom)."""

from __future__ import annotations

import logging
import shutil
import traceback
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import JPEGLSLossless

import medops.dicom
from medops import ImageReadError, apply_window, load_for_model, read_dicom, read_image

DATA = Path(__file__).resolve().parents[1] / "data"
CT = DATA / "CT_small.dcm"
MR = DATA / "MR_small.dcm"


def _hu(path: Path = CT) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """Independent restatement of PS3.3 C.11.2.1.2 (three branches) for width > 1."""
    lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    mid = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.rint(np.where(x <= lo, 0, np.where(x > hi, 255, mid))).astype(np.uint8)


def _modified_copy(tmp_path: Path, name: str, src: Path = CT, **changes: object) -> Path:
    ds = pydicom.dcmread(src)
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    out = tmp_path / name
    ds.save_as(out)
    return out


# --- apply_window -----------------------------------------------------------------------------


def test_apply_window_follows_the_standard_breakpoints() -> None:
    center, width = 40.0, 401.0  # lower bound -160.5, upper bound 239.5, midpoint 39.5
    x = np.array([-1000, -160.5, -159.0, 39.5, 239.5, 240.0, 3000])
    out = apply_window(x, center, width)
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 1, 128, 255, 255, 255]
    assert out.tolist() == _linear_window(x, center, width).tolist()


def test_apply_window_width_one_is_a_threshold_and_nan_is_zero() -> None:
    out = apply_window(np.array([9.0, 9.5, 9.6, 10.0, np.nan]), center=10.0, width=1.0)
    assert out.tolist() == [0, 0, 255, 255, 0]


@pytest.mark.parametrize("window", [(0.0, 0.5), (0.0, 0.0), (0.0, -10.0), (float("nan"), 10.0)])
def test_apply_window_rejects_invalid_windows(window: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="window"):
        apply_window(np.zeros(3), *window)


# --- greyscale CT / MR ------------------------------------------------------------------------


def test_ct_reads_as_128x128x1_uint8_min_max_without_header_window() -> None:
    ds = pydicom.dcmread(CT)
    assert "WindowCenter" not in ds  # so min-max applies
    img = read_dicom(CT)
    assert img.shape == (128, 128, 1) and img.dtype == np.uint8
    hu = _hu()
    assert img[..., 0][hu == hu.min()].max() == 0
    assert img[..., 0][hu == hu.max()].min() == 255
    assert np.array_equal(read_image(CT), img)


def test_ct_explicit_window_matches_the_linear_formula_on_hounsfield_units() -> None:
    img = read_dicom(CT, window=(40, 400))
    assert img.shape == (128, 128, 1)
    assert np.array_equal(img[..., 0], _linear_window(_hu(), 40, 400))


def test_ct_hounsfield_units_are_exact_for_a_pixel(tmp_path: Path) -> None:
    ds = pydicom.dcmread(CT)
    assert float(ds.RescaleIntercept) != 0  # the rescale really matters for this file
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    r, c = 64, 64
    t = hu[r, c]
    # width 1 = threshold at (center - 0.5): values <= t -> 0, > t -> 255.
    at_t = read_dicom(CT, window=(t + 0.5, 1))[..., 0]
    below_t = read_dicom(CT, window=(t - 0.5, 1))[..., 0]
    assert at_t[r, c] == 0 and below_t[r, c] == 255  # so the pixel's value is exactly t
    assert np.array_equal(at_t, np.where(hu > t, 255, 0))


def test_header_window_is_used_and_explicit_window_overrides_it(tmp_path: Path) -> None:
    ds = pydicom.dcmread(MR)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    img = read_dicom(MR)
    assert img.shape == (64, 64, 1)
    assert np.array_equal(img, read_dicom(MR, window=(center, width)))
    no_window = _modified_copy(tmp_path, "mr_nowin.dcm", MR, WindowCenter=None, WindowWidth=None)
    assert not np.array_equal(read_dicom(no_window), img)  # min-max differs from the header window
    assert not np.array_equal(read_dicom(MR, window=(300, 200)), img)

    ct_win = _modified_copy(tmp_path, "ct_win.dcm", WindowCenter=["40", "400"], WindowWidth=["400", "2000"])
    assert np.array_equal(read_dicom(ct_win), read_dicom(CT, window=(40, 400)))  # first value used


def test_narrow_window_saturates_more_pixels_than_wide() -> None:
    def saturated(img: np.ndarray) -> int:
        return int(np.count_nonzero((img == 0) | (img == 255)))

    narrow, wide = read_dicom(CT, window=(40, 80)), read_dicom(CT, window=(40, 4000))
    assert saturated(narrow) > saturated(wide)


def test_invalid_explicit_window_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="width"):
        read_dicom(CT, window=(40, 0))


def test_monochrome1_is_inverted_after_windowing(tmp_path: Path) -> None:
    inverted = _modified_copy(tmp_path, "mono1.dcm", PhotometricInterpretation="MONOCHROME1")
    for window in (None, (40, 400)):
        assert np.array_equal(read_dicom(inverted, window=window), 255 - read_dicom(CT, window=window))


def test_multi_frame_needs_frame_and_selects_it(tmp_path: Path) -> None:
    ds = pydicom.dcmread(CT)
    raw = ds.pixel_array
    flipped = np.ascontiguousarray(raw[::-1])
    ds.NumberOfFrames = 2
    ds.PixelData = raw.tobytes() + flipped.tobytes()
    path = tmp_path / "two_frames.dcm"
    ds.save_as(path)

    with pytest.raises(ImageReadError) as err:
        read_dicom(path)
    assert str(path) in str(err.value) and "2 frames" in err.value.reason and "frame=" in err.value.reason

    frame0 = read_dicom(path, frame=0, window=(40, 400))
    frame1 = read_dicom(path, frame=1, window=(40, 400))
    assert np.array_equal(frame0, read_dicom(CT, window=(40, 400)))
    assert np.array_equal(frame1, frame0[::-1])
    with pytest.raises(ImageReadError, match="out of range"):
        read_dicom(path, frame=2)
    assert load_for_model(path, 32, 1, frame=1).shape == (1, 32, 32)


def test_single_frame_rejects_frame_other_than_zero() -> None:
    assert read_dicom(CT, frame=0).shape == (128, 128, 1)
    with pytest.raises(ImageReadError, match="out of range"):
        read_dicom(CT, frame=1)


# --- colour -----------------------------------------------------------------------------------


def _rgb_dataset(rgb: np.ndarray, photometric: str = "RGB") -> pydicom.Dataset:
    ds = pydicom.dcmread(CT)
    for key in ("RescaleSlope", "RescaleIntercept"):
        delattr(ds, key)
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = photometric
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(rgb).tobytes()
    return ds


def _rgb_test_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(16, 12, 3), dtype=np.uint8)


def test_rgb_dicom_is_three_channels_without_windowing(tmp_path: Path) -> None:
    rgb = _rgb_test_image()
    path = tmp_path / "rgb.dcm"
    _rgb_dataset(rgb).save_as(path)
    out = read_dicom(path, window=(10, 2))  # window must be ignored for colour
    assert out.shape == (16, 12, 3) and out.dtype == np.uint8
    assert np.array_equal(out, rgb)


def test_ybr_full_dicom_is_converted_to_rgb(tmp_path: Path) -> None:
    rgb = _rgb_test_image()
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    path = tmp_path / "ybr.dcm"
    _rgb_dataset(ybr, "YBR_FULL").save_as(path)
    out = read_dicom(path)
    assert out.shape == (16, 12, 3)
    assert np.abs(out.astype(int) - rgb.astype(int)).max() <= 3
    assert np.abs(ybr.astype(int) - rgb.astype(int)).max() > 20  # not just passed through


# --- failures -----------------------------------------------------------------------------------


def test_truncated_copy_raises_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "truncated.dcm"
    data = CT.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert err.value.path == str(path)
    assert str(err.value).startswith(f"{path}: ")
    assert "truncated" in err.value.reason


def test_dicom_magic_without_dcm_suffix_is_read(tmp_path: Path) -> None:
    expected = read_dicom(CT)
    for name in ("scan", "scan.bin", "scan.png"):
        path = tmp_path / name
        shutil.copyfile(CT, path)
        assert np.array_equal(read_image(path), expected)


def test_missing_pixel_data(tmp_path: Path) -> None:
    path = _modified_copy(tmp_path, "nopix.dcm", PixelData=None)
    with pytest.raises(ImageReadError, match="no pixel data") as err:
        read_image(path)
    assert err.value.path == str(path)


def test_empty_file_is_reported_as_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert err.value.reason == "empty file (0 bytes)" and err.value.path == str(path)


def test_corrupt_compressed_pixel_data_is_reported_as_corrupt_not_as_a_missing_decoder(tmp_path: Path) -> None:
    ds = pydicom.dcmread(CT)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8 not really JPEG-LS \xff\xd9"])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "jls.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError, match="compressed pixel data") as err:
        read_image(path)
    assert "JPEG-LS" in err.value.reason and "corrupt" in err.value.reason
    assert "no decoder" not in err.value.reason  # a JPEG-LS decoder (pylibjpeg-libjpeg) is installed


def test_read_dicom_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="file not found") as err:
        read_dicom(tmp_path / "missing.dcm")
    assert err.value.path == str(tmp_path / "missing.dcm")


def test_garbage_with_dcm_suffix(tmp_path: Path) -> None:
    path = tmp_path / "garbage.dcm"
    path.write_bytes(b"this is not dicom at all" * 20)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert err.value.path == str(path)


def test_unsupported_photometric_interpretation(tmp_path: Path) -> None:
    path = _modified_copy(tmp_path, "hsv.dcm", PhotometricInterpretation="HSV")  # retired
    with pytest.raises(ImageReadError, match="unsupported PhotometricInterpretation \\('HSV'\\)"):
        read_image(path)
    path = _modified_copy(tmp_path, "pal.dcm", PhotometricInterpretation="PALETTE COLOR")  # without its tables
    with pytest.raises(ImageReadError, match="PALETTE COLOR without palette colour lookup tables"):
        read_image(path)


# --- privacy ------------------------------------------------------------------------------------


def _identifiers() -> list[str]:
    ds = pydicom.dcmread(CT)
    ids = [str(ds.PatientName), str(ds.PatientID), str(ds.InstitutionName), str(ds.StudyDate)]
    assert all(ids) and "CompressedSamples^CT1" in ids  # the fixture really has fake identifiers
    return ids


def _assert_private(exc: BaseException, records: list, caplog: pytest.LogCaptureFixture) -> None:
    text = "".join(traceback.format_exception(exc))  # includes any chained cause/context
    text += "".join(str(w.message) for w in records) + caplog.text
    for ident in _identifiers():
        assert ident not in text
        assert ident.replace("^", " ") not in text


@pytest.mark.parametrize("fraction", [0.3, 0.75, 0.95])
def test_errors_on_corrupted_copy_leak_no_identifiers(
    tmp_path: Path, fraction: float, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "corrupt.dcm"
    data = bytearray(CT.read_bytes())
    data = data[: int(len(data) * fraction)]
    path.write_bytes(bytes(data))
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as records, pytest.raises(ImageReadError) as err:
        warnings.simplefilter("always")
        read_image(path)
    assert str(path) in str(err.value)
    _assert_private(err.value, records, caplog)


def test_chatty_decoder_errors_and_warnings_are_not_passed_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A library message quoting header values must not reach the caller."""
    path = tmp_path / "copy.dcm"
    shutil.copyfile(CT, path)

    def chatty(ds: pydicom.Dataset, **kwargs: object) -> np.ndarray:
        warnings.warn(f"odd value for patient {ds.PatientName} / {ds.PatientID}", stacklevel=1)
        msg = f"cannot decode pixels of {ds.PatientName} ({ds.PatientID}) from {ds.InstitutionName}"
        raise ValueError(msg)

    monkeypatch.setattr(medops.dicom, "_pixel_array", chatty)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as records, pytest.raises(ImageReadError) as err:
        warnings.simplefilter("always")
        read_image(path)
    assert "cannot decode pixel data" in err.value.reason and "ValueError" in err.value.reason
    assert err.value.__cause__ is None and err.value.__suppress_context__
    _assert_private(err.value, records, caplog)


def test_modality_is_read_from_the_header_only_for_dicom(tmp_path) -> None:
    from PIL import Image

    from medops.dicom import dicom_modality, modality_warning

    ct, mr = DATA / "CT_small.dcm", DATA / "MR_small.dcm"
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    assert (dicom_modality(ct), dicom_modality(mr), dicom_modality(png)) == ("CT", "MR", None)
    assert modality_warning(ct, ["US"]) == ("DICOM Modality CT differs from the training data's (US): the model was "
                                            "not trained on such images")
    assert modality_warning(ct, ["ct", "MR"]) is None  # the training modality, any case
    assert modality_warning(ct, []) is None and modality_warning(png, ["US"]) is None  # unknown / not DICOM


def test_a_modality_that_is_not_a_defined_term_is_never_repeated(tmp_path) -> None:
    """Modality is a defined term (CT, MR, US...); a site's free text there may name someone, so it is neither
    printed in the warning nor taken as the training data's modality."""
    from medops.dicom import UNRECOGNISED_MODALITY, dicom_modality, modality_warning

    ds = pydicom.dcmread(DATA / "CT_small.dcm")
    ds.Modality = "SENT93731MOD"
    odd = tmp_path / "odd.dcm"
    ds.save_as(odd)
    assert dicom_modality(odd) == UNRECOGNISED_MODALITY
    warning = modality_warning(odd, ["US"])
    assert "SENT93731" not in warning and warning.startswith("DICOM Modality a value that is not a DICOM defined term")
    ds.Modality = "us"  # a defined term in the wrong case is still that term
    ds.save_as(odd)
    assert dicom_modality(odd) == "US" and modality_warning(odd, ["US"]) is None
