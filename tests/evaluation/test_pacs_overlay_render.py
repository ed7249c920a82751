"""The PACS overlay's picture: the Grad-CAM map over the enlarged source image with an opacity that follows the
map (transparent where attribution is low, at most HEAT_ALPHA_MAX), so the anatomy under it stays visible."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from evaluation.explain import HEAT_CMAP
from evaluation.pacs_overlay import (
    HEAT_ALPHA_MAX,
    HEAT_FLOOR,
    MIN_WIDTH,
    _enlarged,
    colour_bar,
    heat_opacity,
    readable_overlay,
)


@pytest.fixture
def speckle() -> np.ndarray:
    """A 28 x 28 ultrasound-like image: speckle texture over a dark band (HxWx1 uint8)."""
    rng = np.random.default_rng(0)
    image = rng.integers(40, 220, (28, 28, 1))
    image[18:] //= 3
    return image.astype(np.uint8)


def gaussian_heat(size: int = 28, centre: tuple[int, int] = (10, 14), sigma: float = 4.0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma**2)).astype(np.float32)


def split(out: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The picture part of an overlay, the colour bar under it, and the enlarged source as uint8."""
    base = np.rint(_enlarged(image, MIN_WIDTH) * 255).astype(np.uint8)
    return out[: base.shape[0]], out[base.shape[0]:], base


def test_no_attribution_leaves_the_image_as_it_is(speckle: np.ndarray) -> None:
    out = readable_overlay(speckle, np.zeros((28, 28), np.float32))
    picture, bar, base = split(out, speckle)
    assert picture.shape[1] >= MIN_WIDTH and picture.shape[1] % 28 == 0  # enlarged by an integer factor
    assert np.array_equal(picture, base)
    assert np.array_equal(bar, colour_bar(picture.shape[1]))


def test_opacity_follows_the_map_and_stays_below_the_maximum(speckle: np.ndarray) -> None:
    size = _enlarged(speckle, MIN_WIDTH).shape[0]
    heat = gaussian_heat(size, (size // 3, size // 2), size / 7)  # at the picture's size: used as it is
    picture, _, base = split(readable_overlay(speckle, heat), speckle)
    shown = heat / heat.max()
    change = np.abs(picture.astype(int) - base.astype(int)).max(axis=2)
    assert change.max() <= HEAT_ALPHA_MAX * 255 + 1  # nowhere more opaque than the maximum
    low = shown <= HEAT_FLOOR
    assert low.mean() > 0.3 and change[low].max() == 0  # low attribution: transparent, the pixels are the image's
    assert change[shown > 0.9].mean() > 20  # high attribution: coloured
    peak = np.unravel_index(np.argmax(shown), shown.shape)
    colour = np.array(matplotlib.colormaps[HEAT_CMAP](1.0)[:3]) * 255
    expected = (1 - HEAT_ALPHA_MAX) * base[peak].astype(float) + HEAT_ALPHA_MAX * colour
    assert np.abs(picture[peak].astype(float) - expected).max() <= 1  # the peak: HEAT_ALPHA_MAX of its colour


def test_a_small_map_is_resized_to_the_picture(speckle: np.ndarray) -> None:
    picture, _, base = split(readable_overlay(speckle, gaussian_heat()), speckle)
    assert picture.shape == base.shape
    changed = np.abs(picture.astype(int) - base.astype(int)).max(axis=2) > 0
    rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
    scale = picture.shape[0] // 28  # the 28-pixel map's peak at (10, 14) lands at (10, 14) x scale
    assert rows.min() < 10 * scale < rows.max() and cols.min() < 14 * scale < cols.max()
    assert not changed[-scale:].any()  # far from the peak: untouched


def test_texture_under_the_map_stays_visible(speckle: np.ndarray) -> None:
    """Inside the strongly attributed region the overlay's brightness still follows the image's speckle."""
    heat = gaussian_heat(sigma=6.0)
    picture, _, base = split(readable_overlay(speckle, heat), speckle)
    scale = picture.shape[0] // 28
    high = np.kron(heat / heat.max(), np.ones((scale, scale))) > 0.6
    assert high.mean() > 0.1
    seen = picture.astype(float).mean(axis=2)[high]
    under = base.astype(float).mean(axis=2)[high]
    assert np.corrcoef(seen, under)[0, 1] > 0.9


def test_opacity_ramp() -> None:
    values = np.linspace(0, 1, 101)
    alpha = heat_opacity(values)
    assert alpha[values <= HEAT_FLOOR].max() == 0 and alpha[-1] == pytest.approx(HEAT_ALPHA_MAX)
    assert np.all(np.diff(alpha) >= 0) and alpha.max() <= HEAT_ALPHA_MAX


def test_colour_bar_runs_from_grey_to_the_maximum_colour() -> None:
    bar = colour_bar(532)
    assert bar.shape[1] == 532 and bar.shape[0] >= 16 and bar.dtype == np.uint8
    row = bar[bar.shape[0] // 2].astype(int)
    coloured = np.flatnonzero((row[:, 0] != row[:, 1]) | (row[:, 1] != row[:, 2]))  # the text is white on black
    assert len(coloured) > 150
    assert row[coloured[0] - 5].tolist() == [128, 128, 128]  # below the floor: no colour over mid grey
    top = np.array(matplotlib.colormaps[HEAT_CMAP](1.0)[:3])
    expected = np.rint(((1 - HEAT_ALPHA_MAX) * 0.5 + HEAT_ALPHA_MAX * top) * 255)
    assert np.abs(row[coloured[-1]] - expected).max() <= 1  # the high end: the maximum's colour and opacity
