"""medops.plots: what the reliability diagram shows a reader (axes, legend, images per bin)."""

from __future__ import annotations

import numpy as np

from medops.calibration import expected_calibration_error, positive_class_bins
from medops.plots import plot_reliability, reliability_figure


def _close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_binary_diagram_is_the_positive_class_calibration_plot():
    rng = np.random.default_rng(0)
    p_malignant = rng.beta(0.7, 1.5, 300)
    y = np.where(rng.random(300) < p_malignant, 0, 1)  # class 0 is the finding, as in BreastMNIST
    P = np.c_[p_malignant, 1 - p_malignant]
    fig = reliability_figure({"model": (P, y)}, title="Calibration, test", positive=(0, "malignant"))
    ax, hist = fig.axes
    assert ax.get_title() == "Calibration, test"
    assert hist.get_xlabel() == "predicted P(malignant)" and ax.get_ylabel() == "observed share malignant"
    expected = positive_class_bins(p_malignant, y == 0)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[1] == f"model (ECE of P(malignant) {expected['error']:.3f})"
    line = ax.get_lines()[1]
    filled = expected["count"] > 0
    np.testing.assert_allclose(line.get_ydata(), expected["observed"][filled])  # the share of the finding
    np.testing.assert_allclose(line.get_xdata(), expected["predicted"][filled])
    counts = hist.patches[0].get_data().values
    assert counts.sum() == 300 and len(counts) == 10
    _close(fig)


def test_multiclass_diagram_keeps_top_label_confidence_and_the_tables_ece():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (200, 3))
    P = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = rng.integers(0, 3, 200)
    fig = reliability_figure({"model": (P, y), "T=1.20": (P ** 0.9 / (P ** 0.9).sum(1, keepdims=True), y)})
    ax, hist = fig.axes
    assert hist.get_xlabel() == "confidence (top-label probability)" and ax.get_ylabel() == "accuracy (share correct)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[1] == f"model (ECE {expected_calibration_error(P, y):.3f})" and legend[2].startswith("T=1.20 (ECE ")
    assert [s.get_data().values.sum() for s in hist.patches] == [200, 200]
    assert len(hist.patches[0].get_data().values) == 15
    _close(fig)


def test_plot_reliability_writes_a_png(tmp_path):
    from PIL import Image

    P = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    path = plot_reliability({"model": (P, np.array([0, 1, 1, 1]))}, tmp_path / "r.png", positive=(1, "pneumonia"))
    with Image.open(path) as image:
        assert image.size == (480, 600)
        assert np.asarray(image.convert("L")).std() > 10  # drawn, not blank


def test_an_empty_split_draws_an_empty_diagram():
    fig = reliability_figure({"model": (np.zeros((0, 2)), np.zeros(0, dtype=int))}, positive=(1, "pneumonia"))
    assert fig.axes[1].patches[0].get_data().values.sum() == 0
    assert fig.axes[0].get_legend().get_texts()[1].get_text() == "model (ECE of P(pneumonia) nan)"
    _close(fig)
