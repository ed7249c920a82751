"""medops.dicom over every file of pydicom's shipped test corpus, and the colour / LUT paths it needs.

The corpus is the files that the installed pydicom package ships (``pydicom.data.get_testdata_files()``; no
download). Each file either becomes images (every frame) or is reported with a reason that is not a missing decoder;
the images match a reference built in this file from pydicom's own ``Dataset.pixel_array`` (all frames at once) and
its ``apply_color_lut`` / ``apply_modality_lut`` / ``apply_voi_lut``, with MONOCHROME1 inverted and the output range
scaled to 0..255 as PS3.3 C.11 defines it. Tolerance: TOLERANCE grey levels (medops rounds to uint8, the
reference stays float). The reference and medops' results are computed once per file (functools.cache).
"""

from __future__ import annotations

import copy
import functools
import os
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import MPEG2MPML, JPEGLSLossless

from medops import ImageReadError, read_dicom
from medops.deid import quiet_pydicom

ROOT = Path(pydicom.data.__file__).parent / "test_files"
CORPUS = sorted(p for p in get_testdata_files() if os.path.isfile(p))
TOLERANCE = 0.5 + 1e-6  # rounding to uint8 only
# What a file may be reported for: no image in it, or damaged. Never a missing decoder.
ACCEPTABLE = re.compile(r"not a DICOM file|no pixel data|no PhotometricInterpretation|corrupt|truncated|"
                        r"invalid NumberOfFrames")
NO_DECODER = re.compile(r"no decoder|no working|plugin", re.IGNORECASE)


@dataclass
class Outcome:
    """What medops and the pydicom reference make of one corpus file."""

    transfer_syntax: str
    images: list[np.ndarray] = field(default_factory=list)
    reason: str | None = None
    reference: list[np.ndarray] | None = None
    reference_error: str | None = None


def _rel(path: str) -> str:
    return Path(path).relative_to(ROOT).as_posix()


def _header(path: str) -> Dataset | None:
    try:
        with quiet_pydicom():
            return pydicom.dcmread(path, force=True, stop_before_pixels=True)
    except Exception:
        return None


def _ts_name(ds: Dataset | None) -> str:
    uid = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID") if ds is not None else None
    return uid.name if uid is not None and uid.is_transfer_syntax else "(no transfer syntax: not DICOM or no meta)"


def _frames(ds: Dataset | None) -> int:
    try:
        with quiet_pydicom():  # badVR.dcm's NumberOfFrames '1A' warns when read
            return max(int(ds.get("NumberOfFrames") or 1), 1) if ds is not None else 1
    except (TypeError, ValueError):
        return 1


def _voi_range(ds: Dataset) -> tuple[float, float]:
    """The output range of pydicom's windowing (PS3.3 C.11.2.1.2: the range of the modality output)."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, 2.0 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1
    bits = int(ds.BitsStored)
    lo, hi = (0.0, 2.0**bits - 1) if ds.PixelRepresentation == 0 else (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        lo, hi = lo * float(ds.RescaleSlope) + float(ds.RescaleIntercept), hi * float(ds.RescaleSlope) + float(
            ds.RescaleIntercept)
    return lo, hi


def reference_image(ds: Dataset, frame: np.ndarray) -> np.ndarray:
    """pydicom's own pipeline for one decoded frame, scaled to 0..255 (float)."""
    pi = ds.PhotometricInterpretation
    if pi == "PALETTE COLOR":
        return apply_color_lut(frame, ds) * (255.0 / (2 ** ds.RedPaletteColorLookupTableDescriptor[2] - 1))
    if frame.ndim == 3:  # RGB (pydicom converted YBR while decoding)
        return frame * (255.0 / (2 ** int(ds.BitsStored) - 1))
    values = apply_modality_lut(frame, ds).astype(np.float64)
    if ds.get("VOILUTSequence"):
        bits = ds.VOILUTSequence[0].LUTDescriptor[2]
        out = apply_voi_lut(np.floor(values).astype(np.int64), ds) * (255.0 / (2**bits - 1))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        lo, hi = _voi_range(ds)
        out = (apply_voi_lut(values, copy.deepcopy(ds)) - lo) * (255.0 / (hi - lo))
    else:
        lo, hi = values.min(), values.max()
        out = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return 255.0 - out if pi == "MONOCHROME1" else out


def _reference(path: str, n_frames: int) -> list[np.ndarray]:
    with quiet_pydicom():
        ds = pydicom.dcmread(path, force=True)
        arr = ds.pixel_array
        frames = list(arr) if n_frames > 1 else [arr]
        return [reference_image(ds, f) for f in frames]


@functools.cache
def outcome(path: str) -> Outcome:
    """medops' images (all frames) or its reason, and the reference (or why pydicom itself cannot make one)."""
    header = _header(path)
    result = Outcome(_ts_name(header))
    n = _frames(header)
    try:
        result.images = [read_dicom(path, frame=i if n > 1 else None) for i in range(n)]
    except ImageReadError as err:
        result.reason = err.reason
    try:
        result.reference = _reference(path, n)
    except Exception as exc:
        result.reference_error = type(exc).__name__
    return result


def test_the_corpus_is_the_installed_pydicoms() -> None:
    assert len(CORPUS) > 150, "pydicom's test files are missing from the installed package"
    assert all(Path(p).is_relative_to(ROOT) for p in CORPUS)


@pytest.mark.parametrize("path", CORPUS, ids=_rel)
def test_each_file_becomes_images_or_has_a_reason_other_than_a_missing_decoder(path: str) -> None:
    out = outcome(path)
    if out.reason is None:
        assert out.images and all(im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] in (1, 3)
                                  for im in out.images)
        return
    assert not NO_DECODER.search(out.reason), f"{_rel(path)}: {out.reason}"
    assert ACCEPTABLE.search(out.reason), f"{_rel(path)}: unexpected reason {out.reason!r}"
    if out.reference is not None:  # pydicom's pipeline makes an image of it: medops must too
        pytest.fail(f"{_rel(path)}: pydicom decodes it but medops says {out.reason!r}")


@pytest.mark.parametrize("path", CORPUS, ids=_rel)
def test_decoded_pixels_match_pydicoms_own_pipeline(path: str) -> None:
    out = outcome(path)
    if out.reason is not None:
        pytest.skip(f"not an image: {out.reason}")
    assert out.reference is not None, f"medops decodes {_rel(path)} but pydicom fails ({out.reference_error})"
    assert len(out.images) == len(out.reference)
    for i, (img, ref) in enumerate(zip(out.images, out.reference, strict=True)):
        ref = ref[:, :, None] if ref.ndim == 2 else ref
        assert img.shape == ref.shape, (i, img.shape, ref.shape)
        diff = np.abs(img.astype(np.float64) - ref)
        assert diff.max() <= TOLERANCE, f"frame {i}: max difference {diff.max():.3f} grey levels"


def test_counts_by_transfer_syntax(capsys: pytest.CaptureFixture[str]) -> None:
    """Counts per transfer syntax (printed: ``pytest -s``), and every compressed syntax in the corpus decodes."""
    table: dict[str, Counter[str]] = defaultdict(Counter)
    reasons: Counter[str] = Counter()
    for path in CORPUS:
        out = outcome(path)
        table[out.transfer_syntax]["files"] += 1
        if out.reason is None:
            table[out.transfer_syntax]["decoded"] += 1
            table[out.transfer_syntax]["images"] += len(out.images)
        else:
            table[out.transfer_syntax]["reported"] += 1
            reasons[re.sub(r" \(.*", "", out.reason)] += 1
    with capsys.disabled():
        print(f"\npydicom {pydicom.__version__} test corpus: {len(CORPUS)} files")
        for ts, c in sorted(table.items()):
            print(f"  {ts:75s} files {c['files']:3d}  decoded {c['decoded']:3d} ({c['images']:3d} images)  "
                  f"reported {c['reported']:3d}")
        for reason, count in reasons.most_common():
            print(f"  reported {count:3d}: {reason}")
    compressed = {ts for ts, c in table.items() if "JPEG" in ts or "RLE" in ts}
    assert {"JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
            "JPEG Extended (Process 2 and 4)", "JPEG-LS Lossless Image Compression",
            "JPEG-LS Lossy (Near-Lossless) Image Compression", "JPEG 2000 Image Compression (Lossless Only)",
            "JPEG 2000 Image Compression", "RLE Lossless"} <= compressed
    for ts in compressed:
        assert table[ts]["decoded"] >= 1, f"no file of {ts} decodes"
    assert sum(c["decoded"] for c in table.values()) + sum(reasons.values()) == len(CORPUS)


# --- the syntaxes the issue named: lossless ones give exactly the uncompressed image -------------------------


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"])
def test_lossless_compressed_copies_equal_the_uncompressed_image(name: str) -> None:
    expected = read_dicom(get_testdata_file("MR_small.dcm"))
    assert np.array_equal(read_dicom(get_testdata_file(name)), expected)


def test_jpeg_extended_12_bit_and_jpeg_lossless_sv1_decode_to_their_content() -> None:
    ext = read_dicom(get_testdata_file("JPGExtended.dcm"))  # a 12-bit whole-body bone scan, 1024 x 256
    assert ext.shape == (1024, 256, 1) and ext.max() == 255 and ext.min() == 0
    body, border = ext[100:900, 60:200].mean(), ext[:, :10].mean()
    assert body > border + 5  # the patient is brighter than the empty border
    sv1 = read_dicom(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))  # JPEG Lossless SV1 of pydicom's RGB test pattern
    assert np.array_equal(sv1, read_dicom(get_testdata_file("SC_rgb_rle.dcm")))  # the same pattern, RLE lossless


def test_jpeg_ls_near_lossless_stays_within_its_error_bound() -> None:
    ref = read_dicom(get_testdata_file("SC_rgb_rle.dcm"))  # the uncompressed pattern
    for name in ("SC_rgb_jls_lossy_line.dcm", "SC_rgb_jls_lossy_sample.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        assert "Near-Lossless" in ds.file_meta.TransferSyntaxUID.name
        img = read_dicom(get_testdata_file(name))
        diff = np.abs(img.astype(int) - ref.astype(int))
        assert 0 < diff.max() <= 3  # really lossy, within a near-lossless NEAR bound of a few levels


def test_compressed_syntaxes_are_decoded_by_the_declared_plugins() -> None:
    for path in CORPUS:
        ts = getattr(_header(path), "file_meta", Dataset()).get("TransferSyntaxUID")
        if ts is not None and ts.is_transfer_syntax and ts.is_compressed and ts.name != "RLE Lossless":
            decoder = get_decoder(ts)
            assert decoder.is_available and "pylibjpeg" in decoder.available_plugins, ts.name


def test_a_syntax_pydicom_cannot_decode_is_reported_as_such(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00\x00\x01\xb3 not really MPEG"])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "video.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError, match="pydicom has no decoder for this transfer syntax") as err:
        read_dicom(path)
    assert "MPEG2" in err.value.reason


# --- colour --------------------------------------------------------------------------------------------------


def test_palette_color_goes_through_the_palette() -> None:
    path = get_testdata_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    img = read_dicom(path)
    assert img.shape == (ds.Rows, ds.Columns, 3)
    lut = np.stack([np.asarray(ds[f"{c}PaletteColorLookupTableData"].value) for c in ("Red", "Green", "Blue")])
    lut = np.frombuffer(lut.tobytes(), "<u2").reshape(3, -1) if lut.dtype == object else lut
    index = ds.pixel_array
    assert not np.array_equal(img[..., 0], img[..., 2])  # really colour, not the indices repeated
    assert np.array_equal(img[..., 0], np.rint(np.asarray(apply_color_lut(index, ds))[..., 0] / 257.0))


def test_ybr_rct_jpeg2000_is_rgb_and_not_converted_twice() -> None:
    img = read_dicom(get_testdata_file("examples_jpeg2k.dcm"))
    assert img.shape == (480, 640, 3)
    # the power-Doppler colour map is red/orange/yellow: red >= green >= blue where saturated colour shows
    saturated = (img.max(axis=2).astype(int) - img.min(axis=2)) > 100
    assert saturated.sum() > 1000
    r, g, b = (img[..., c][saturated].astype(int) for c in range(3))
    assert (r >= g).mean() > 0.95 and (g >= b).mean() > 0.95


# --- greyscale LUTs built on MR_small ------------------------------------------------------------------------

MR = get_testdata_file("MR_small.dcm")


def _copy(tmp_path: Path, name: str, edit: Callable[[Dataset], None]) -> tuple[Path, Dataset]:
    ds = pydicom.dcmread(MR)
    for key in ("WindowCenter", "WindowWidth"):
        if key in ds:
            delattr(ds, key)
    edit(ds)
    path = tmp_path / name
    ds.save_as(path)
    return path, pydicom.dcmread(path)


def _lut_item(entries: list[int], first: int, bits: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(entries), first, bits]
    item.add_new("LUTData", "US", entries)
    return item


def _matches_reference(path: Path, ds: Dataset) -> np.ndarray:
    img = read_dicom(path)
    ref = reference_image(ds, ds.pixel_array)
    assert np.abs(img[..., 0].astype(float) - ref).max() <= TOLERANCE
    return img


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_function_is_honoured(tmp_path: Path, function: str) -> None:
    def edit(ds: Dataset) -> None:
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 600, 500, function

    path, ds = _copy(tmp_path, f"{function}.dcm", edit)
    img = _matches_reference(path, ds)[..., 0].astype(float)
    x = ds.pixel_array.astype(float)
    if function == "SIGMOID":  # PS3.3 C.11.2.1.3.1, restated
        expected = 255 / (1 + np.exp(-4 * (x - 600) / 500))
    else:  # C.11.2.1.3.2
        expected = np.clip((x - 600) / 500 + 0.5, 0, 1) * 255
    assert np.abs(img - expected).max() <= TOLERANCE
    assert not np.array_equal(img, read_dicom(MR, window=(600, 500))[..., 0])  # differs from LINEAR


def test_voi_lut_sequence_wins_over_the_window_and_window_override_wins_over_both(tmp_path: Path) -> None:
    entries = [min(65535, (i * 37) % 65536) for i in range(4096)]  # non-monotonic: a LUT, not a window

    def edit(ds: Dataset) -> None:
        ds.VOILUTSequence = [_lut_item(entries, 0, 16)]
        ds.WindowCenter, ds.WindowWidth = 600, 500

    path, ds = _copy(tmp_path, "voilut16.dcm", edit)
    img = _matches_reference(path, ds)[..., 0]
    x = np.clip(ds.pixel_array.astype(int), 0, 4095)
    assert np.array_equal(img, np.rint(np.take(entries, x) * 255 / 65535).astype(np.uint8))
    assert np.array_equal(read_dicom(path, window=(600, 500)), read_dicom(MR, window=(600, 500)))


def test_8_bit_voi_lut_with_more_than_256_entries_reaches_every_entry(tmp_path: Path) -> None:
    entries = [min(255, i // 8) for i in range(4096)]  # 12-bit in, 8-bit out

    def edit(ds: Dataset) -> None:
        ds.VOILUTSequence = [_lut_item(entries, 0, 8)]

    path, ds = _copy(tmp_path, "voilut8.dcm", edit)
    x = np.clip(ds.pixel_array.astype(int), 0, 4095)
    assert x.max() > 255  # so an 8-bit index would wrap
    assert np.array_equal(read_dicom(path)[..., 0], np.take(entries, x).astype(np.uint8))


def test_modality_lut_sequence_then_window(tmp_path: Path) -> None:
    entries = [4095 - i for i in range(4096)]  # inverts the stored values

    def edit(ds: Dataset) -> None:
        ds.ModalityLUTSequence = [_lut_item(entries, 0, 16)]
        ds.ModalityLUTSequence[0].ModalityLUTType = "US"
        ds.WindowCenter, ds.WindowWidth = 3500, 1000

    path, ds = _copy(tmp_path, "modlut.dcm", edit)
    img = _matches_reference(path, ds)[..., 0].astype(int)
    x = 4095 - np.clip(ds.pixel_array.astype(int), 0, 4095)
    lo, hi = 3500 - 0.5 - 999 / 2, 3500 - 0.5 + 999 / 2
    expected = np.where(x <= lo, 0, np.where(x > hi, 255, np.rint(((x - 3499.5) / 999 + 0.5) * 255)))
    assert np.abs(img - expected).max() <= 1 and len(np.unique(img)) > 20


def test_frame_voi_lut_sequence_of_an_enhanced_file_is_used(tmp_path: Path) -> None:
    def edit(ds: Dataset) -> None:
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth, voi.VOILUTFunction = 600, 500, "SIGMOID"
        group = Dataset()
        group.FrameVOILUTSequence = [voi]
        ds.SharedFunctionalGroupsSequence = [group]

    path, _ = _copy(tmp_path, "enhanced.dcm", edit)
    x = pydicom.dcmread(MR).pixel_array.astype(float)
    expected = 255 / (1 + np.exp(-4 * (x - 600) / 500))
    assert np.abs(read_dicom(path)[..., 0] - expected).max() <= TOLERANCE


def test_monochrome1_cr_is_inverted_after_voi() -> None:
    path = str(ROOT / "dicomdirtests/77654033/CR1/6154")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and "WindowCenter" in ds
    img = read_dicom(path)[..., 0].astype(float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference_image(ds, ds.pixel_array)
    assert np.abs(img - ref).max() <= TOLERANCE
    raw = apply_modality_lut(ds.pixel_array, ds)
    assert img[raw == raw.max()].mean() < img[raw == raw.min()].mean()  # high values are dark in MONOCHROME1


def test_a_file_without_file_meta_is_decoded_with_the_encoding_it_was_read_in(tmp_path: Path) -> None:
    ds = pydicom.dcmread(MR)
    ds.preamble = None
    del ds.file_meta
    path = tmp_path / "acr_nema_style.dcm"  # no preamble, no 'DICM', no transfer syntax: read with force
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert path.read_bytes()[128:132] != b"DICM"
    assert np.array_equal(read_dicom(path), read_dicom(MR))


def test_a_missing_plugin_is_named_as_such() -> None:
    """With the JPEG-LS plugin taken out of pydicom's decoder (its public plugin API), the reason says so."""
    decoder = get_decoder(JPEGLSLossless)
    removed = list(decoder.available_plugins)
    # the declared plugin (pyjpegls too where highdicom brought it); put back below as pydicom itself registers them
    assert "pylibjpeg" in removed and set(removed) <= {"pylibjpeg", "pyjpegls"}
    for label in removed:
        decoder.remove_plugin(label)
    try:
        with pytest.raises(ImageReadError, match="no decoder plugin installed") as err:
            read_dicom(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
        # the syntax, and what pydicom says of the plugins it still knows and which are missing
        assert "JPEG-LS Lossless" in err.value.reason and "pydicom: " in err.value.reason
    finally:
        for label in removed:
            decoder.add_plugin(label, (f"pydicom.pixels.decoders.{label}", "_decode_frame"))
    assert decoder.is_available
