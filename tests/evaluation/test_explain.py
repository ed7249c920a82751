"""Explanations: Grad-CAM and occlusion of the class logit find the evidence of a network (synthetic ones built for it,
one trained in-process, the tiny BreastMNIST run), the figure shows the image, the arrays are saved, the
model-randomisation sanity check is computed and reported, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from evaluation.explain import (
    explanation_grid,
    find_target_layer,
    gradcam,
    main,
    occlusion,
    overlay,
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


def test_explanation_grid_writes_a_png(square_net, tmp_path):
    x, y, _ = squares(20, np.random.default_rng(3))
    with torch.no_grad():
        probs = square_net(torch.from_numpy(x)).softmax(1).numpy()
    y[:3] = 1 - probs[:3].argmax(1)  # three wrong predictions
    for method in ("gradcam", "both"):
        path = explanation_grid(square_net, x, y, probs, ["empty", "square"], tmp_path / f"grid_{method}.png",
                                method=method, n_correct=3, n_wrong=2)
        assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="method"):
        explanation_grid(square_net, x, y, probs, ["a", "b"], tmp_path / "x.png", method="lime")


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
    fig = tmp_path / "out" / "heatmap.png"
    proc = run_explain(*map(str, paths), "--run", str(trained_run), "--method", "both", "--out", str(fig))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert fig.read_bytes()[:8] == PNG_MAGIC
    for p in paths:
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(f"{p}: "))
        assert "(p=" in line
    # in-process (same code path, no second interpreter start): one PNG per image by default
    assert main([str(paths[0]), "--run", str(trained_run), "--out-dir", str(tmp_path / "each")]) == 0
    assert (tmp_path / "each" / "case0_gradcam.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_missing_image_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "nope.png"
    assert main([str(missing), "--run", str(tmp_path)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not list(tmp_path.iterdir()), "nothing written"
