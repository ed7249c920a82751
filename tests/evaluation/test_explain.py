"""Explanations: Grad-CAM and occlusion of the class logit find the evidence of a network (synthetic ones built for it,
one trained in-process, the tiny BreastMNIST run), the figure shows the image, the arrays are saved, the
model-randomisation sanity check is computed and reported, and the CLI."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from html import escape
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from evaluation.explain import (
    PANEL_TITLES,
    Explanations,
    _figure,
    _rho_summary,
    explain,
    explanation_grid,
    explanation_summary,
    find_target_layer,
    gradcam,
    main,
    occlusion,
    occlusion_geometry,
    overlay,
    randomised_copy,
    rank_correlation,
    sanity_check,
    unit_images,
)
from tests.conftest import BREASTMNIST, REPO
from train.models import build_network

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIZE, SQUARE = 48, 8  # at 32 px the last SmallCNN stage sees the whole image and Grad-CAM cannot localise
SHARE = SQUARE * SQUARE / (SIZE * SIZE)


def squares(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise images in [0, 0.5]; class 1 has a bright 8x8 square at a random position. Returns x, y, corners."""
    x = rng.uniform(0.0, 0.5, (n, 1, SIZE, SIZE)).astype(np.float32)
    y = rng.integers(0, 2, n)
    corners = rng.integers(0, SIZE - SQUARE + 1, (n, 2))
    for i in np.flatnonzero(y == 1):
        r, c = corners[i]
        x[i, 0, r : r + SQUARE, c : c + SQUARE] = 1.0
    return x, y, corners


@pytest.fixture(scope="module")
def square_net() -> nn.Module:
    """A SmallCNN trained in-process (a few seconds on the CPU) to tell images with a square from those without."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = build_network("smallcnn", 1, 2, SIZE, [0.5], [0.25], width=8)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(200):
        x, y, _ = squares(16, rng)
        loss = nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x, y, _ = squares(200, np.random.default_rng(1))
    with torch.no_grad():
        acc = (net(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
    assert acc > 0.9, f"the synthetic task was not learnt (accuracy {acc:.2f})"
    return net


@pytest.fixture(scope="module")
def positives() -> tuple[np.ndarray, np.ndarray]:
    x, y, corners = squares(120, np.random.default_rng(2))
    keep = np.flatnonzero(y == 1)[:30]
    return x[keep], corners[keep]


def mass_inside(heat: np.ndarray, corners: np.ndarray) -> np.ndarray:
    out = []
    for h, (r, c) in zip(heat, corners, strict=True):
        total = h.sum()
        out.append(h[r : r + SQUARE, c : c + SQUARE].sum() / total if total > 0 else 0.0)
    return np.asarray(out)


def test_gradcam_puts_its_mass_on_the_square(square_net, positives):
    x, corners = positives
    heat = gradcam(square_net, x)  # predicted class: 1 for these images
    assert heat.shape == (len(x), SIZE, SIZE) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1 and np.allclose(heat.reshape(len(x), -1).max(1), 1)
    mass = mass_inside(heat, corners)
    assert mass.mean() > 2 * SHARE, f"Grad-CAM mass in the square {mass.mean():.3f} vs area share {SHARE:.3f}"


def test_occlusion_puts_its_mass_on_the_square(square_net, positives):
    x, corners = positives
    drop = occlusion(square_net, x[:12], target_class=1)  # signed logit drops
    assert drop.shape == (12, SIZE, SIZE) and drop.dtype == np.float32 and np.isfinite(drop).all()
    heat = np.clip(drop, 0, None)  # the evidence for the class
    mass = mass_inside(heat, corners[:12])
    assert mass.mean() > 4 * SHARE, f"occlusion mass in the square {mass.mean():.3f} vs area share {SHARE:.3f}"


def test_gradcam_of_a_linear_gap_model_is_its_class_activation_map():
    """conv(1x1, weight 1) -> global average -> linear: Grad-CAM of a class with weight +1 is ReLU(input)."""
    conv = nn.Conv2d(1, 1, 1, bias=False)
    head = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
    net = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    x = torch.rand(3, 1, 8, 8)
    heat = gradcam(net, x, target_class=1)
    np.testing.assert_allclose(heat, (x[:, 0] / x.flatten(1).amax(1).view(-1, 1, 1)).numpy(), atol=1e-5)
    assert np.all(gradcam(net, x, target_class=0) == 0)  # evidence against: nothing left after the ReLU


def test_target_layers_and_shapes_for_resnet_and_modules():
    net = build_network("resnet18", 3, 3, 28, [0.5] * 3, [0.25] * 3, width=8)
    assert find_target_layer(net) is net[1].layer4
    small = build_network("smallcnn", 1, 2, 28, [0.5], [0.25], width=8)
    assert find_target_layer(small) is [m for m in small[1].features if isinstance(m, nn.Conv2d)][-1]
    net.train()
    x = np.random.default_rng(0).random((5, 3, 28, 28), dtype=np.float32)
    heat = gradcam(net, x, target_class=[0, 1, 2, 0, 1])
    assert heat.shape == (5, 28, 28) and 0 <= heat.min() and heat.max() <= 1
    assert net.training, "the network's training flag is restored"
    occ = occlusion(net, x[:2], patch=7, stride=7)
    assert occ.shape == (2, 28, 28) and np.isfinite(occ).all() and occ.std() > 0
    with pytest.raises(ValueError, match="stride"):
        occlusion(net, x[:1], patch=4, stride=5)
    with pytest.raises(ValueError, match="target_class"):
        gradcam(net, x, target_class=[0, 1])


def test_overlay_is_rgb_uint8_for_grey_and_colour_images():
    rng = np.random.default_rng(0)
    heat = rng.random((16, 16))
    grey = overlay(rng.random((1, 16, 16)), heat)
    colour = overlay(torch.rand(3, 16, 16), torch.from_numpy(heat))
    for out in (grey, colour):
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    resized = overlay(rng.random((1, 32, 32)), heat)  # the heatmap is resized to the image
    assert resized.shape == (32, 32, 3)
    # hot pixels are red-ish and cold ones blue-ish (jet)
    one_hot = np.zeros((16, 16))
    one_hot[0, 0] = 1
    out = overlay(np.zeros((1, 16, 16)), one_hot).astype(int)
    assert out[0, 0, 0] > out[0, 0, 2] and out[-1, -1, 2] > out[-1, -1, 0]


def test_explanation_grid_writes_a_png_and_its_arrays(square_net, tmp_path):
    x, y, _ = squares(20, np.random.default_rng(3))
    with torch.no_grad():
        probs = square_net(torch.from_numpy(x)).softmax(1).numpy()
    y[:3] = 1 - probs[:3].argmax(1)  # three wrong predictions
    for method, keys in (("gradcam", {"gradcam"}), ("both", {"gradcam", "occlusion"})):
        path = explanation_grid(square_net, x, y, probs, ["empty", "square"], tmp_path / f"grid_{method}.png",
                                method=method, n_correct=3, n_wrong=2)
        assert path.read_bytes()[:8] == PNG_MAGIC
        with np.load(path.with_suffix(".npz")) as data:
            assert keys <= set(data.files) and ({"gradcam", "occlusion"} - keys).isdisjoint(data.files)
            assert len(data["image"]) == 5 and (data["label"] != data["predicted_class"]).sum() == 2
    with pytest.raises(ValueError, match="method"):
        explanation_grid(square_net, x, y, probs, ["a", "b"], tmp_path / "x.png", method="lime")
    none = explanation_grid(square_net, x, y, probs, ["a", "b"], tmp_path / "none.png", n_correct=0, n_wrong=0)
    assert none.read_bytes()[:8] == PNG_MAGIC and explanation_summary(none)["samples"] == 0
    # the bug behind the blank white input column: 0..255 intensities as floats are refused, uint8 is scaled
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        explanation_grid(square_net, x * 255, y, probs, ["a", "b"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    as_uint8 = np.rint(x * 255).astype(np.uint8)
    np.testing.assert_array_equal(unit_images(as_uint8), as_uint8.astype(np.float32) / 255)


# ---------------------------------------------------------------- networks built so the answer is known

H = W = 28


class TopRightSum(nn.Module):
    """logit 0 = the sum of the top-right quadrant, logit 1 = its negative: nothing else matters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, :, : H // 2, W // 2 :].sum(dim=(1, 2, 3))
        return torch.stack([s, -s], dim=1)


class TopRightMask(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(x)
        mask[:, :, : H // 2, W // 2 :] = 1
        return x * mask


def top_right_convnet() -> nn.Module:
    """mask (only the top-right quadrant passes) -> stride-2 conv (14x14 maps, the Grad-CAM layer) -> GAP -> linear."""
    conv = nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=False)
    head = nn.Linear(4, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.rand(4, 1, 3, 3) + 0.1)
        head.weight.copy_(torch.tensor([[1.0, 2.0, 1.0, 0.5], [-1.0, -1.0, -1.0, -1.0]]))
        head.bias.zero_()
    return nn.Sequential(TopRightMask(), conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def spot_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Dim noise with a bright 3x3 spot inside the top-right quadrant (not on its diagonal: a transposed map fails)."""
    x = rng.uniform(0.0, 0.2, (n, 1, H, W)).astype(np.float32)
    spots = []
    for i in range(n):
        r, c = int(rng.integers(1, H // 2 - 4)), int(rng.integers(W // 2 + 1, W - 4))
        x[i, 0, r : r + 3, c : c + 3] = 1.0
        spots.append((r + 1, c + 1))
    return x, spots


def in_top_right(heat: np.ndarray) -> np.ndarray:
    rows, cols = np.unravel_index(heat.reshape(len(heat), -1).argmax(1), heat.shape[1:])
    return (rows < H // 2) & (cols >= W // 2)


@pytest.mark.parametrize("baseline", ["mean", 0.0])
def test_occlusion_finds_the_only_region_the_logit_depends_on(baseline):
    x, spots = spot_images(6, np.random.default_rng(0))
    drop = occlusion(TopRightSum(), x, target_class=0, baseline=baseline)
    patch, stride = occlusion_geometry(H, W)
    assert (patch, stride) == (4, 2)
    assert in_top_right(drop).all()
    for heat, (r, c) in zip(drop, spots, strict=True):
        peak = np.unravel_index(heat.argmax(), heat.shape)
        assert abs(peak[0] - r) <= patch and abs(peak[1] - c) <= patch, (peak, (r, c))
    # the logit never sees the rest: patches that do not touch the quadrant change nothing
    assert np.all(drop[:, H // 2 + patch :, :] == 0) and np.all(drop[:, :, : W // 2 - patch] == 0)
    # the map is the logit drop itself: the top-right corner pixel lies in one patch only, and a black patch
    # removes exactly its pixel sum from the logit
    if baseline == 0.0:
        np.testing.assert_allclose(drop[:, 0, W - 1], x[:, 0, :patch, W - patch :].sum((1, 2)), rtol=1e-4)


def test_gradcam_finds_the_only_region_the_logit_depends_on():
    torch.manual_seed(0)
    net = top_right_convnet()
    x, spots = spot_images(6, np.random.default_rng(1))
    heat = gradcam(net, x, target_class=0)
    assert heat.shape == (6, H, W) and in_top_right(heat).all()
    assert heat[:, H // 2 + 2 :, :].max() < 0.05 and heat[:, :, : W // 2 - 2].max() < 0.05
    for h, (r, c) in zip(heat, spots, strict=True):
        peak = np.unravel_index(h.argmax(), h.shape)
        assert abs(peak[0] - r) <= 3 and abs(peak[1] - c) <= 3
    assert np.all(gradcam(net, x, target_class=1) == 0)  # only evidence against class 1: nothing after the ReLU


# ---------------------------------------------------------------- the tiny trained BreastMNIST run


@pytest.fixture(scope="module")
def trained(trained_run, breastmnist_small):
    """The trained run's network, its test images (uint8 N x 1 x 28 x 28), labels, probabilities and class names."""
    from export.source import load_source

    source = load_source(run=str(trained_run))
    net = source.module.net.eval()
    data = np.load(breastmnist_small)
    images = np.ascontiguousarray(data["test_images"][:, None])
    labels = data["test_labels"].reshape(-1).astype(int)
    with torch.no_grad():
        probs = net(torch.from_numpy(unit_images(images))).softmax(1).numpy()
    return net, images, labels, probs, source.class_names


@pytest.fixture(scope="module")
def trained_explanations(trained):
    """Explanations of 4 correct and 4 wrong test predictions (most confident first)."""
    net, images, labels, probs, names = trained
    pred = probs.argmax(1)
    correct, wrong = np.flatnonzero(pred == labels)[:4], np.flatnonzero(pred != labels)[:4]
    assert len(correct) and len(wrong), "the tiny model has both correct and wrong test predictions"
    sel = np.concatenate([correct, wrong])
    return sel, explain(net, images[sel], names, labels=labels[sel])


def test_maps_of_the_trained_model_are_not_flat_for_correct_or_wrong_predictions(trained, trained_explanations):
    _net, images, labels, probs, _names = trained
    sel, expl = trained_explanations
    wrong = expl.predicted_class != labels[sel]
    assert wrong.any() and (~wrong).any()
    np.testing.assert_array_equal(expl.target_class, probs[sel].argmax(1))
    for name in ("gradcam", "occlusion"):
        spread = expl.maps[name].reshape(len(sel), -1).std(axis=1)
        assert (spread[wrong] > 0).all() and (spread[~wrong] > 0).all(), (name, spread, wrong)
        assert expl.summary()[name]["flat_maps"] == 0
    assert expl.maps["occlusion"].max() > 0, "some patch lowers the predicted logit"


def scaled_head(net: nn.Module, factor: float) -> nn.Module:
    """A copy whose final Linear layer (weights and bias) is multiplied by ``factor``: logits x factor."""
    out = copy.deepcopy(net)
    last = [m for m in out.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(factor)
        last.bias.mul_(factor)
    return out


def test_maps_are_of_the_logit_so_a_saturated_softmax_does_not_flatten_them(trained):
    from captum.attr import LayerGradCam

    net, images, _labels, _probs, _names = trained
    x = unit_images(images[:8])
    with torch.no_grad():
        logits = net(torch.from_numpy(x))
    pred = logits.argmax(1)
    margin = float((logits.max(1).values - logits.min(1).values).min())
    factor = max(50.0, 150.0 / margin)  # a logit margin >= 150: the softmax is exactly 1.0 in float32
    hot = scaled_head(net, factor)
    with torch.no_grad():
        hot_logits = hot(torch.from_numpy(x))
    assert torch.all(hot_logits.softmax(1).max(1).values == 1.0)
    # the saturated softmax has no gradient left: Grad-CAM of the probability is all zero ...
    layer = find_target_layer(hot)
    prob_cam = LayerGradCam(lambda t: hot(t).softmax(1), layer).attribute(torch.from_numpy(x), target=pred)
    assert float(prob_cam.detach().abs().max()) == 0.0
    # ... while the logit map is unchanged by the scale (Grad-CAM is positively homogeneous in the logit)
    ours = gradcam(hot, x, target_class=pred)
    assert (ours.reshape(8, -1).std(1) > 0).all()
    np.testing.assert_allclose(ours, gradcam(net, x, target_class=pred), atol=1e-4)
    # occlusion measures the logit drop: it scales with the logits instead of vanishing with the probability
    np.testing.assert_allclose(occlusion(hot, x[:3], target_class=pred[:3]),
                               factor * occlusion(net, x[:3], target_class=pred[:3]), rtol=1e-2, atol=1e-3 * factor *
                               float(np.abs(occlusion(net, x[:3], target_class=pred[:3])).max()))


def test_randomised_copy_reinitialises_trainable_layers_and_keeps_normalize(trained):
    net = trained[0]
    state = torch.random.get_rng_state()
    rand = randomised_copy(net, seed=3)
    assert torch.equal(state, torch.random.get_rng_state()), "the global random state is left alone"
    assert torch.equal(rand[0].mean, net[0].mean) and torch.equal(rand[0].std, net[0].std)
    convs = [(a, b) for a, b in zip(net.modules(), rand.modules(), strict=True) if isinstance(a, nn.Conv2d)]
    assert convs and all(not torch.equal(a.weight, b.weight) for a, b in convs)
    again = randomised_copy(net, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(rand.parameters(), again.parameters(), strict=True)), "seeded"


def test_rank_correlation_is_spearman():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.random((4, 10, 10))
    b = a + rng.normal(0, 0.3, a.shape)
    b[1] = np.round(b[1], 1)  # ties
    expected = [stats.spearmanr(u.ravel(), v.ravel()).statistic for u, v in zip(a, b, strict=True)]
    np.testing.assert_allclose(rank_correlation(a, b), expected, atol=1e-12)
    np.testing.assert_allclose(rank_correlation(a, a), 1.0)
    assert np.isnan(rank_correlation(a[:1], np.zeros((1, 10, 10))))[0]  # a constant map has no rank correlation
    failed = _rho_summary(np.array([0.9, 0.8, np.nan]))
    assert not failed["passed"] and failed["verdict"].startswith("FAILED") and failed["undefined"] == 1


def test_randomisation_sanity_check_of_the_trained_model(trained, trained_explanations):
    _sel, expl = trained_explanations
    for name in ("gradcam", "occlusion"):
        check = expl.sanity[name]
        rho = check["randomisation_spearman"]
        itself = rank_correlation(expl.maps[name], expl.maps[name])
        np.testing.assert_allclose(itself, 1.0)
        assert rho is not None and abs(rho) < itself.mean(), (name, rho)
        assert check["passed"] == (abs(rho) < 0.5) and len(check["per_sample"]) == len(expl.images)
        print(f"{name}: Spearman(trained, randomised) = {rho:.3f} ({check['verdict']})")
        assert expl.randomised[name].shape == expl.maps[name].shape
        assert not np.array_equal(expl.randomised[name], expl.maps[name])
    only = sanity_check(trained[0], trained[1][:2], "gradcam")
    assert set(only) == {"gradcam"} and len(only["gradcam"]["per_sample"]) == 2


def test_trained_model_grid_npz_and_figure_show_the_image(trained, tmp_path):
    from PIL import Image

    net, images, labels, probs, names = trained
    png = explanation_grid(net, images, labels, probs, names, tmp_path / "explanations.png")
    with np.load(png.with_suffix(".npz"), allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    n = len(arrays["image"])
    assert n == 8
    assert {"image", "gradcam", "occlusion", "target_class", "predicted_class", "probability", "label"} <= set(arrays)
    assert arrays["image"].shape == (n, 1, 28, 28) and arrays["image"].dtype == np.float32
    for name in ("gradcam", "occlusion"):
        assert arrays[name].shape == (n, 28, 28) and arrays[name].dtype == np.float32
    flat = unit_images(images).reshape(len(images), -1)
    for k, img in enumerate(arrays["image"]):  # each saved image is an input image / 255, with its facts
        j = int(np.flatnonzero((flat == img.ravel()).all(axis=1))[0])
        assert arrays["label"][k] == labels[j] and arrays["predicted_class"][k] == probs[j].argmax()
        assert arrays["target_class"][k] == arrays["predicted_class"][k]
        assert arrays["probability"][k] == pytest.approx(probs[j, arrays["target_class"][k]], abs=1e-6)
    summary = explanation_summary(png)
    assert summary["samples"] == n and summary["patch"] == 4 and summary["stride"] == 2
    assert "mean" in summary["baseline"] and summary["file"] == "explanations.npz"
    assert isinstance(summary["gradcam"]["randomisation_spearman"], float)
    # the PNG's image column is not blank: most of the left third is grey anatomy, not white paper
    grey = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    left = grey[:, : grey.shape[1] // 3]
    assert (left < 240).mean() > 0.4 and left.std() > 30


def test_figure_panels_show_the_input_at_fixed_intensity_scale(trained_explanations, tmp_path):
    _sel, expl = trained_explanations
    titles = [f"case {i}" for i in range(len(expl.images))]
    png, panels = _figure(expl, titles, tmp_path / "fig.png")
    assert png.read_bytes()[:8] == PNG_MAGIC and len(panels) == len(expl.images)
    for i, row in enumerate(panels):
        (image,) = row["image"]
        np.testing.assert_array_equal(image.get_array(), expl.images[i, 0])
        assert image.get_clim() == (0.0, 1.0) and image.get_cmap().name == "gray"
        for name in ("gradcam", "occlusion"):
            base, heat = row[name]
            np.testing.assert_array_equal(base.get_array(), expl.images[i, 0])  # the anatomy under the map
            assert base.get_clim() == (0.0, 1.0) and base.get_cmap().name == "gray"
            assert heat.get_clim() == (0.0, 1.0) and float(np.max(heat.get_alpha())) < 1.0
            cls = expl.class_names[int(expl.target_class[i])]
            assert heat.axes.get_title() == PANEL_TITLES[name].format(cls=cls)
    assert "Grad-CAM\n(logit of" in PANEL_TITLES["gradcam"] and "logit drop" in PANEL_TITLES["occlusion"]
    rgb = Explanations(np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32),
                       {"gradcam": np.random.default_rng(1).random((1, 8, 8), dtype=np.float32)}, np.array([0]),
                       np.array([0]), np.array([0.9]), ["a", "b"], 2, 1, "mean")
    _, (row,) = _figure(rgb, ["rgb"], tmp_path / "rgb.png")
    np.testing.assert_array_equal(row["image"][0].get_array(), rgb.images[0].transpose(1, 2, 0))  # RGB as is


def run_explain(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "evaluation.explain", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_explains_breastmnist_images_of_a_trained_run(trained_run, tmp_path):
    from PIL import Image

    images = np.load(BREASTMNIST)["test_images"]
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"case{i}.png")
        Image.fromarray(images[i]).save(paths[-1])
    fig = tmp_path / "out" / "heatmaps.png"
    proc = run_explain(*map(str, paths), "--run", str(trained_run), "--method", "both", "--out", str(fig))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert fig.read_bytes()[:8] == PNG_MAGIC
    for p in paths:
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(f"{p}: "))
        assert "(p=" in line
    assert "randomisation sanity check" in proc.stdout and "patch 4 px, stride 2 px" in proc.stdout
    assert any(ln.strip().startswith("Grad-CAM rho=") for ln in proc.stdout.splitlines())
    with np.load(fig.with_suffix(".npz"), allow_pickle=False) as data:
        np.testing.assert_array_equal(data["image"][:, 0], images[:2].astype(np.float32) / 255)
        assert data["gradcam"].shape == data["occlusion"].shape == (2, 28, 28) and "label" not in data.files
    # in-process (same code path, no second interpreter start): one PNG and one npz per image by default
    assert main([str(paths[0]), "--run", str(trained_run), "--out-dir", str(tmp_path / "each")]) == 0
    assert (tmp_path / "each" / "case0_both.png").read_bytes()[:8] == PNG_MAGIC
    with np.load(tmp_path / "each" / "case0_both.npz") as data:
        assert data["image"].shape == (1, 1, 28, 28) and data["gradcam"].shape == (1, 28, 28)


def test_evaluation_json_and_report_carry_the_sanity_check(trained_run, tmp_path):
    """``python -m evaluation.evaluate``: explanations.npz beside explanations.png, the check in JSON and HTML."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # evaluation writes operating_point.json into the run folder
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "evaluation.evaluate", f"hydra.run.dir={tmp_path / 'log'}",
                           f"run={run}", f"output_dir={out}", "n_resamples=20", "wandb=off"], cwd=REPO,
                          env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "evaluation.json").read_text())
    expl = result["explanations"]
    assert expl["samples"] == 8 and expl["patch"] == 4 and expl["stride"] == 2 and expl["file"] == "explanations.npz"
    for name in ("gradcam", "occlusion"):
        rho = expl[name]["randomisation_spearman"]
        assert -1 <= rho <= 1 and expl[name]["passed"] == (abs(rho) < 0.5)
        assert f"{name} randomisation sanity check {expl[name]['verdict']}" in proc.stdout
    with np.load(out / "explanations.npz", allow_pickle=False) as data:
        assert data["image"].max() <= 1.0 and data["image"].std() > 0.05  # [0, 1] images, not 0..255
        assert json.loads(str(data["summary"]))["gradcam"] == expl["gradcam"]
    html = (out / "report.html").read_text()
    assert "Explanations: sanity check" in html and "Spearman rho (trained vs randomised)" in html
    assert f"{expl['gradcam']['randomisation_spearman']:.3f}" in html
    assert escape(expl["occlusion"]["verdict"]) in html
    assert Path(out / "explanations.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_missing_image_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "nope.png"
    assert main([str(missing), "--run", str(tmp_path)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "nothing written"


def test_gradcam_of_an_ensemble_is_the_members_mean_before_the_relu() -> None:
    """The ensemble's map is the Grad-CAM of its mean logit: the members' gradient-weighted maps averaged, then
    the ReLU, so it differs from any single member's map and is computed without the mirror view."""
    import torch.nn.functional as F
    from captum.attr import LayerAttribution, LayerGradCam

    from evaluation.explain import gradcam
    from train.models import build_network

    torch.manual_seed(3)
    net = build_network("resnet18", 1, 2, 28, [0.5], [0.25], members=2, tta="hflip", width=8).eval()
    x = torch.rand(3, 1, 28, 28)
    got = gradcam(net, x.numpy(), target_class=1)
    coarse = []
    for member in net[1].members:
        single = torch.nn.Sequential(net[0], member).eval()
        coarse.append(LayerGradCam(single, member.layer4).attribute(x.clone().requires_grad_(True), target=1,
                                                                    relu_attributions=False).detach())
    expected = LayerAttribution.interpolate(F.relu(torch.stack(coarse).mean(0)), (28, 28), "bilinear")[:, 0]
    expected = expected / expected.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    assert got.shape == (3, 28, 28) and np.allclose(got, expected.numpy(), atol=1e-5)
