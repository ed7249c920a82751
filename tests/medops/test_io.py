"""Tests for medops.io and medops.errors (files are written to tmp_path)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medops import (
    SUPPORTED_SUFFIXES,
    ImageReadError,
    load_for_model,
    preprocess,
    read_image,
    resize,
    to_channels,
)

RNG = np.random.default_rng(1234)
GREY = RNG.integers(0, 256, size=(20, 30), dtype=np.uint8)
RGB = RNG.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
CT = Path(__file__).resolve().parents[1] / "data" / "CT_small.dcm"


def _save(tmp_path: Path, name: str, image: Image.Image, **kwargs: object) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def _assert_error(path: Path, match: str = "") -> ImageReadError:
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert err.value.path == str(path)
    assert str(path) in str(err.value)
    assert match.lower() in err.value.reason.lower()
    return err.value


# --- errors -----------------------------------------------------------------------------------


def test_image_read_error_format_and_pickling() -> None:
    err = ImageReadError(Path("/x/y.png"), "file not found")
    assert isinstance(err, ValueError)
    assert (err.path, err.reason, str(err)) == ("/x/y.png", "file not found", "/x/y.png: file not found")
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.path, clone.reason, str(clone)) == (err.path, err.reason, str(err))


def test_package_is_torch_free() -> None:
    code = (
        "import sys, medops\n"
        "bad = [m for m in ('torch', 'torchvision', 'lightning') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)


def test_supported_suffixes() -> None:
    assert SUPPORTED_SUFFIXES == {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".npy"}
    assert isinstance(SUPPORTED_SUFFIXES, frozenset)


# --- Pillow formats ---------------------------------------------------------------------------


def test_png_grey(tmp_path: Path) -> None:
    img = read_image(_save(tmp_path, "g.png", Image.fromarray(GREY)))
    assert img.shape == (20, 30, 1) and img.dtype == np.uint8
    assert np.array_equal(img[..., 0], GREY)


def test_png_rgb_and_bmp_and_tiff(tmp_path: Path) -> None:
    for name in ("c.png", "c.bmp", "c.tif", "c.TIFF"):
        img = read_image(_save(tmp_path, name, Image.fromarray(RGB)))
        assert img.shape == (20, 30, 3) and img.dtype == np.uint8
        assert np.array_equal(img, RGB), name


def test_png_rgba_and_la_drop_alpha(tmp_path: Path) -> None:
    alpha = np.full((20, 30, 1), 7, dtype=np.uint8)
    rgba = read_image(_save(tmp_path, "a.png", Image.fromarray(np.concatenate([RGB, alpha], axis=2))))
    assert rgba.shape == (20, 30, 3) and np.array_equal(rgba, RGB)
    la = Image.fromarray(np.stack([GREY, alpha[..., 0]], axis=2), mode="LA")
    grey = read_image(_save(tmp_path, "la.png", la))
    assert grey.shape == (20, 30, 1) and np.array_equal(grey[..., 0], GREY)


def test_palette_png_becomes_rgb(tmp_path: Path) -> None:
    pal = Image.fromarray(RGB).quantize(colors=16)
    img = read_image(_save(tmp_path, "p.png", pal))
    assert img.shape == (20, 30, 3)
    assert np.array_equal(img, np.asarray(pal.convert("RGB")))


def test_png_16_bit_is_min_max_scaled(tmp_path: Path) -> None:
    arr = np.linspace(1000, 40000, 20 * 30).reshape(20, 30).astype(np.uint16)
    src = Image.fromarray(arr)
    assert src.mode.startswith("I;16")
    img = read_image(_save(tmp_path, "g16.png", src))
    assert img.shape == (20, 30, 1) and img.dtype == np.uint8
    assert img.min() == 0 and img.max() == 255
    assert img[0, 0, 0] == 0 and img[-1, -1, 0] == 255
    assert np.all(np.diff(img.ravel().astype(int)) >= 0)  # monotonic like the source


def test_float_tiff_is_min_max_scaled(tmp_path: Path) -> None:
    arr = np.array([[-1.0, 0.0], [1.0, 3.0]], dtype=np.float32)
    img = read_image(_save(tmp_path, "f.tif", Image.fromarray(arr, mode="F")))
    assert img[..., 0].tolist() == [[0, 64], [128, 255]]


def test_jpeg(tmp_path: Path) -> None:
    smooth = np.tile(np.linspace(0, 255, 30), (20, 1)).astype(np.uint8)
    for name, arr in (("g.jpg", smooth), ("c.jpeg", np.stack([smooth] * 3, axis=2))):
        img = read_image(_save(tmp_path, name, Image.fromarray(arr), quality=95))
        channels = 1 if arr.ndim == 2 else 3
        assert img.shape == (20, 30, channels) and img.dtype == np.uint8
        assert np.abs(img.astype(int) - arr.reshape(img.shape).astype(int)).mean() < 3


def test_multipage_tiff_needs_frame(tmp_path: Path) -> None:
    path = tmp_path / "stack.tif"
    pages = [Image.fromarray(GREY), Image.fromarray(255 - GREY)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    err = _assert_error(path, "2 pages")
    assert "frame=" in err.reason
    assert np.array_equal(read_image(path, frame=1)[..., 0], 255 - GREY)
    with pytest.raises(ImageReadError, match="out of range"):
        read_image(path, frame=2)


def test_single_frame_png_frame_argument(tmp_path: Path) -> None:
    path = _save(tmp_path, "g.png", Image.fromarray(GREY))
    assert read_image(path, frame=0).shape == (20, 30, 1)
    with pytest.raises(ImageReadError, match="out of range"):
        read_image(path, frame=1)


# --- .npy -------------------------------------------------------------------------------------


def test_npy_uint8_passes_through(tmp_path: Path) -> None:
    for name, arr, shape in (("g.npy", GREY, (20, 30, 1)), ("c.npy", RGB, (20, 30, 3))):
        np.save(tmp_path / name, arr)
        img = read_image(tmp_path / name)
        assert img.shape == shape and img.dtype == np.uint8
        assert np.array_equal(img.reshape(arr.shape), arr)


def test_npy_float_and_int16_are_min_max_scaled(tmp_path: Path) -> None:
    np.save(tmp_path / "f.npy", np.array([[-2.0, 0.0], [2.0, 1.0]], dtype=np.float64))
    assert read_image(tmp_path / "f.npy")[..., 0].tolist() == [[0, 128], [255, 191]]
    np.save(tmp_path / "i.npy", np.array([[-1000, 1000]], dtype=">i2"))
    assert read_image(tmp_path / "i.npy")[..., 0].tolist() == [[0, 255]]


def test_float_in_the_unit_range_is_the_model_range_not_stretched(tmp_path: Path) -> None:
    """The same pixels give the same input whether they come as an 8-bit PNG or as floats in [0, 1]."""
    pixels = np.array([[60, 100], [140, 180]], dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "p.png")
    np.save(tmp_path / "u.npy", pixels.astype(np.float32) / 255.0)
    Image.fromarray(pixels.astype(np.float32) / 255.0, mode="F").save(tmp_path / "u.tif")
    expected = read_image(tmp_path / "p.png")
    assert read_image(tmp_path / "u.npy").tolist() == expected.tolist() == read_image(tmp_path / "u.tif").tolist()
    assert expected[..., 0].tolist() == pixels.tolist()


def test_nan_or_inf_pixels_are_refused_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nan.npy"
    np.save(path, np.array([[0.2, np.nan], [0.5, np.inf]]))
    with pytest.raises(ImageReadError, match="2 NaN or Inf pixel values") as err:
        read_image(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(("name", "arr", "value"), [
    ("const.npy", np.full((4, 4), 3.5), 0),  # min-max scaled first: a constant float array is all zeros
    ("black.npy", np.zeros((4, 4), dtype=np.uint8), 0),
    ("white.png", np.full((4, 4), 255, dtype=np.uint8), 255),
])
def test_a_blank_image_is_refused_for_inference(tmp_path: Path, name: str, arr: np.ndarray, value: int) -> None:
    """Nothing to classify, yet a network answers (an all-black image got P(malignant) 0.88): inference refuses it,
    naming the file; reading it for a training set still works (the data check reports it there)."""
    path = tmp_path / name
    np.save(path, arr) if name.endswith(".npy") else Image.fromarray(arr).save(path)
    with pytest.raises(ImageReadError, match=f"blank image: every pixel has the value {value} ") as err:
        load_for_model(path, 28, 1)
    assert str(path) in str(err.value)
    assert read_image(path).shape == (4, 4, 1)
    almost = np.full((4, 4), value, np.uint8)
    almost[0, 0] = 1 if value == 0 else 254  # one pixel of contrast is an image
    np.save(tmp_path / "almost.npy", almost)
    assert load_for_model(tmp_path / "almost.npy", 28, 1).shape == (1, 28, 28)


@pytest.mark.parametrize(
    ("arr", "match"),
    [
        (np.zeros(5, dtype=np.uint8), "shape"),
        (np.zeros((4, 4, 4), dtype=np.uint8), "shape"),
        (np.zeros((2, 4, 4, 1), dtype=np.uint8), "shape"),
        (np.zeros((0, 5), dtype=np.uint8), "empty"),
        (np.zeros((3, 3), dtype=np.complex64), "dtype"),
    ],
)
def test_npy_bad_arrays(tmp_path: Path, arr: np.ndarray, match: str) -> None:
    np.save(tmp_path / "bad.npy", arr)
    _assert_error(tmp_path / "bad.npy", match)


def test_npy_object_and_npz_are_rejected(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _assert_error(tmp_path / "obj.npy", "npy")
    with open(tmp_path / "z.npy", "wb") as f:
        np.savez(f, a=GREY)
    _assert_error(tmp_path / "z.npy")


# --- failures ---------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    _assert_error(tmp_path / "nope.png", "not found")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "d.png").mkdir()
    _assert_error(tmp_path / "d.png", "not a regular file")


def test_unknown_suffix(tmp_path: Path) -> None:
    for name in ("x.gif", "x"):
        (tmp_path / name).write_bytes(b"GIF89a" + bytes(200))
        err = _assert_error(tmp_path / name, "unsupported file type")
        assert ".png" in err.reason


def test_zero_size_files(tmp_path: Path) -> None:
    for name in ("empty.png", "empty.jpg", "empty.npy", "empty.dcm"):
        (tmp_path / name).write_bytes(b"")
        _assert_error(tmp_path / name)


def test_garbage_and_truncated_png(tmp_path: Path) -> None:
    (tmp_path / "garbage.png").write_bytes(bytes(range(256)) * 8)
    _assert_error(tmp_path / "garbage.png", "not a recognised image")
    good = _save(tmp_path, "good.png", Image.fromarray(RGB)).read_bytes()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    _assert_error(tmp_path / "cut.png", "cannot decode")


# --- to_channels / resize / preprocess ---------------------------------------------------------


def test_to_channels() -> None:
    grey = GREY[:, :, None]
    three = to_channels(grey, 3)
    assert three.shape == (20, 30, 3) and three.dtype == np.uint8
    assert all(np.array_equal(three[..., i], GREY) for i in range(3))
    assert to_channels(grey, 1) is grey and to_channels(RGB, 3) is RGB

    primaries = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [10, 10, 10]]], np.uint8)
    luma = to_channels(primaries, 1)
    assert luma.shape == (1, 5, 1) and luma.dtype == np.uint8
    assert luma.ravel().tolist() == [76, 150, 29, 255, 10]  # round(0.299/0.587/0.114 * 255)


@pytest.mark.parametrize(
    ("img", "channels"),
    [(RGB, 2), (RGB, 4), (GREY, 3), (RGB.astype(np.float32), 1), (np.zeros((4, 4, 4), np.uint8), 3)],
)
def test_to_channels_rejects(img: np.ndarray, channels: int) -> None:
    with pytest.raises(ValueError):
        to_channels(img, channels)


def test_resize_shape_dtype_and_noop() -> None:
    for img in (GREY[:, :, None], RGB):
        for size in (8, 64):
            out = resize(img, size)
            assert out.shape == (size, size, img.shape[2]) and out.dtype == np.uint8
    square = RGB[:20, :20]
    assert resize(square, 20) is square
    with pytest.raises(ValueError):
        resize(RGB, 0)


def test_resize_down_averages_a_checkerboard() -> None:
    board = (np.indices((16, 16)).sum(axis=0) % 2 * 255).astype(np.uint8)[:, :, None]
    out = resize(board, 4)
    assert out.shape == (4, 4, 1)
    assert out.min() >= 127 and out.max() <= 128  # area average, not point sampling


def test_resize_up_keeps_a_constant_and_interpolates() -> None:
    assert np.all(resize(np.full((3, 3, 1), 77, np.uint8), 9) == 77)
    ramp = np.array([[0, 255]], dtype=np.uint8).repeat(2, axis=0)[:, :, None]
    out = resize(ramp, 8)[0, :, 0]
    assert out[0] == 0 and out[-1] == 255
    assert 0 < out[3] < 255 and np.all(np.diff(out.astype(int)) >= 0)


def test_preprocess_contract() -> None:
    x = preprocess(RGB, 16, 3)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32 and x.flags.c_contiguous
    assert 0.0 <= x.min() and x.max() <= 1.0
    same = RGB[:16, :16]
    exact = preprocess(same, 16, 3)
    assert np.array_equal(exact, same.transpose(2, 0, 1).astype(np.float32) / np.float32(255))
    assert preprocess(np.full((5, 5, 1), 255, np.uint8), 5, 1).ravel().tolist() == [1.0] * 25
    assert preprocess(RGB, 16, 1).shape == (1, 16, 16)
    assert preprocess(GREY[:, :, None], 16, 3).shape == (3, 16, 16)


def test_load_for_model(tmp_path: Path) -> None:
    path = _save(tmp_path, "c.png", Image.fromarray(RGB))
    x = load_for_model(path, 24, 1)
    assert x.shape == (1, 24, 24) and x.dtype == np.float32
    assert np.array_equal(x, preprocess(read_image(path), 24, 1))
    ct = load_for_model(CT, 32, 3, window=(40, 400))
    assert ct.shape == (3, 32, 32) and 0.0 <= ct.min() and ct.max() <= 1.0
    with pytest.raises(ImageReadError):
        load_for_model(tmp_path / "missing.png", 24, 1)
