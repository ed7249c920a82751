"""Explanations of a classifier's decisions: Grad-CAM and occlusion on the class logit, figures, arrays and the
model-randomisation sanity check.

Networks take float32 NCHW input in [0, 1] (the :mod:`medops` contract: uint8 intensity / 255) and output logits
(the softmax is applied outside the network), so every map here explains the **logit** of the target class, never
its probability: through a saturated softmax the gradient and the probability change of a confident prediction
vanish, and so would the map. Both methods come from [captum](https://captum.ai):

* :func:`gradcam` -- ``captum.attr.LayerGradCam`` on the last convolutional stage (:func:`find_target_layer`:
  a ResNet's ``layer4``, the last ``Conv2d`` of a SmallCNN's ``features``), ReLU of the gradient-weighted
  activations, upsampled bilinearly with ``LayerAttribution.interpolate`` and scaled to a maximum of 1 per image.
* :func:`occlusion` -- ``captum.attr.Occlusion``: the drop of the target logit when a square patch is replaced by
  the baseline, averaged over the patches covering each pixel, in logit units (signed: negative where hiding the
  patch raised the logit). Patch and stride follow the input size (:func:`occlusion_geometry`); the baseline is
  the image's own mean intensity per channel (see :func:`occlusion` for why not black).

:func:`sanity_check` is the model-randomisation test of Adebayo et al., "Sanity Checks for Saliency Maps"
(NeurIPS 2018): the same maps for a copy of the network with every trainable layer re-initialised
(``reset_parameters()``; the :class:`~train.models.Normalize` layer kept) should look different, so the Spearman
rank correlation between trained and randomised maps should be low. |rho| < 0.5 passes; a map that survives
randomisation explains the image (edges, brightness), not the model.

:func:`explanation_grid` (used by ``python -m evaluation.evaluate``) draws the most confident correct and wrong
predictions and writes, beside the PNG, a ``.npz`` with the arrays (see :meth:`Explanations.save`).

CLI::

    python -m evaluation.explain IMAGE... --run <run dir> [--method gradcam|occlusion|both] [--out heatmaps.png]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from captum.attr import LayerAttribution, LayerGradCam, Occlusion  # noqa: E402
from torch import nn  # noqa: E402

from medops import to_unit_range  # noqa: E402

METHODS = ("gradcam", "occlusion", "both")
SANITY_THRESHOLD = 0.5  # |Spearman rho| between trained and randomised maps below this passes
MEAN_BASELINE = "mean"
HEAT_CMAP, HEAT_ALPHA = "jet", 0.4  # overlay(): the heat blended over the grey image at this opacity
PANEL_ALPHA = (0.15, 0.7)  # figure panels: opacity from no evidence to the maximum, so the anatomy shows through
PANEL_TITLES = {"gradcam": "Grad-CAM\n(logit of {cls})", "occlusion": "Occlusion\n(logit drop of {cls})"}
_BATCH = 64
_EVALS_PER_FORWARD = 256  # occluded images per forward pass


def _unwrap(net: nn.Module) -> nn.Module:
    """The bare network of a :class:`~train.module.ClassificationModule` (its ``.net``), else ``net``."""
    inner = getattr(net, "net", None)
    return inner if isinstance(inner, nn.Module) else net


def find_target_layer(net: nn.Module) -> nn.Module:
    """The last convolutional stage: a ResNet's ``layer4``, else the last Conv2d of ``features``, else any."""
    net = _unwrap(net)
    for module in net.modules():
        stage = getattr(module, "layer4", None)
        if isinstance(stage, nn.Module):
            return stage
    for module in net.modules():
        features = getattr(module, "features", None)
        if isinstance(features, nn.Module):
            convs = [m for m in features.modules() if isinstance(m, nn.Conv2d)]
            if convs:
                return convs[-1]
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(net).__name__} has no Conv2d layer for Grad-CAM; pass layer= explicitly")
    return convs[-1]


def unit_images(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Images as the network sees them: float32 (N)CHW in [0, 1].

    uint8 is scaled by 1/255 (:func:`medops.to_unit_range`); floats must already be in [0, 1] (a 0-255 float
    array would be shown white and would saturate the network).
    """
    arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if arr.dtype == np.uint8:
        return to_unit_range(arr)
    arr = arr.astype(np.float32)
    if arr.size and (float(arr.min()) < -1e-6 or float(arr.max()) > 1.0 + 1e-6):
        raise ValueError(f"float images must be in [0, 1] (uint8 / 255), got values in [{arr.min():.3g}, "
                         f"{arr.max():.3g}]; pass uint8 images or scale them")
    return arr


def _as_batch(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"images must be NCHW (or one CHW image), got shape {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.float32)


def _device_of(net: nn.Module) -> torch.device:
    for p in net.parameters():
        return p.device
    for b in net.buffers():
        return b.device
    return torch.device("cpu")


def _targets(target_class: int | Sequence[int] | np.ndarray | torch.Tensor | None, n: int,
             logits: torch.Tensor) -> torch.Tensor:
    if target_class is None:
        return logits.argmax(dim=1)
    t = torch.as_tensor(np.asarray(target_class) if not isinstance(target_class, torch.Tensor) else target_class)
    t = t.to(device=logits.device, dtype=torch.long).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ValueError(f"target_class has {t.numel()} entries for {n} images")
    if int(t.min()) < 0 or int(t.max()) >= logits.shape[1]:
        raise ValueError(f"target_class out of range for {logits.shape[1]} classes")
    return t


class _EvalMode:
    """Put a network in eval mode for the duration, restoring each module's training flag afterwards."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.net.modules()]
        self.net.eval()
        return self.net

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.flags:
            m.training = flag


@torch.no_grad()
def _logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not len(x):
        return x.new_zeros((0, 0))
    with _EvalMode(net), torch.autocast(x.device.type, enabled=False):
        return torch.cat([net(x[s : s + _BATCH]).float() for s in range(0, len(x), _BATCH)])


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """Per-map division by the maximum (maps are >= 0); an all-zero map stays zero."""
    peak = maps.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return (maps / peak).clamp(0.0, 1.0)


def gradcam(
    net: nn.Module,
    images: np.ndarray | torch.Tensor,
    target_class: int | Sequence[int] | np.ndarray | torch.Tensor | None = None,
    layer: nn.Module | str | None = None,
) -> np.ndarray:
    """Grad-CAM heatmaps ``[N, H, W]`` in [0, 1] of the target class **logit**, for NCHW images in [0, 1].

    ``target_class``: None (each image's predicted class), one class for all, or one per image. ``layer``:
    the module (or its dotted name in ``net``) whose output is explained; by default :func:`find_target_layer`.
    ``captum.attr.LayerGradCam`` gives ReLU(sum_k w_k A_k), w_k the spatial mean of d logit / d A_k; it is
    upsampled bilinearly to the input size (``LayerAttribution.interpolate``) and divided by its maximum, so
    each map's maximum is 1 (a map with no positive evidence stays 0).

    A deep ensemble (:class:`train.models.Ensemble`; its logit is the mean of the members' logits) gets the mean of
    its members' gradient-weighted maps before the ReLU: the Grad-CAM of the mean logit, each member explained on
    the image as given (not its mirror) at its own last stage, and the target the ensemble's predicted class.
    """
    net = _unwrap(net)
    if isinstance(layer, str):
        layer = net.get_submodule(layer)
    device = _device_of(net)
    x_all = _as_batch(images, device)
    cls_all = _targets(target_class, len(x_all), _logits(net, x_all))
    ensemble = net[1] if isinstance(net, nn.Sequential) and len(net) == 2 and hasattr(net[1], "member_logits") \
        else None
    if not len(x_all):
        return np.zeros((0, *x_all.shape[-2:]), np.float32)
    if ensemble is None or layer is not None:
        cams = _gradcam_maps(net, layer if layer is not None else find_target_layer(net), x_all, cls_all)
    else:
        members = [nn.Sequential(net[0], member) for member in ensemble.members]
        cams = torch.stack([_gradcam_maps(m, find_target_layer(m), x_all, cls_all) for m in members]).mean(0)
    cams = LayerAttribution.interpolate(F.relu(cams), tuple(x_all.shape[-2:]), "bilinear")
    return _normalise(F.relu(cams[:, 0])).cpu().numpy().astype(np.float32)


def _gradcam_maps(net: nn.Module, layer: nn.Module, x_all: torch.Tensor, cls_all: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps ``[N, 1, h, w]`` of ``layer`` at its own resolution, before the ReLU."""
    explainer = LayerGradCam(net, layer)
    out_maps = []
    with _EvalMode(net), torch.enable_grad(), torch.autocast(x_all.device.type, enabled=False):
        for start in range(0, len(x_all), _BATCH):
            x = x_all[start : start + _BATCH].clone().requires_grad_(True)  # grads flow even if weights frozen
            cam = explainer.attribute(x, target=cls_all[start : start + _BATCH], relu_attributions=False)
            out_maps.append(cam.detach().float())
    return torch.cat(out_maps)


def occlusion_geometry(height: int, width: int) -> tuple[int, int]:
    """The occlusion patch and stride for an input size: patch = round(short side / 7), at least 2 px (a
    lesion-sized square: 4 px at 28 px, 32 px at 224 px); stride = patch // 2 (each pixel covered by ~4
    patches, so the map is smoother than the patch grid), at least 1 px."""
    patch = min(max(2, round(min(height, width) / 7)), min(height, width))
    return patch, max(1, patch // 2)


def _baseline_tensor(x: torch.Tensor, baseline: str | float) -> torch.Tensor:
    if baseline == MEAN_BASELINE:
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()
    if isinstance(baseline, str):
        raise ValueError(f"baseline must be {MEAN_BASELINE!r} or an intensity in [0, 1], got {baseline!r}")
    return torch.full_like(x, float(baseline))


def occlusion(
    net: nn.Module,
    images: np.ndarray | torch.Tensor,
    target_class: int | Sequence[int] | np.ndarray | torch.Tensor | None = None,
    patch: int | None = None,
    stride: int | None = None,
    baseline: str | float = MEAN_BASELINE,
) -> np.ndarray:
    """Occlusion sensitivity ``[N, H, W]`` float32: the drop of the target class **logit** (``captum.attr.Occlusion``).

    Each ``patch`` x ``patch`` square (stepped by ``stride``; defaults from :func:`occlusion_geometry`) is
    replaced by ``baseline``; a pixel's value is the mean logit drop ``logit(x) - logit(x occluded)`` over the
    patches covering it, in logit units and signed (negative: hiding the patch made the class more likely).
    Not rescaled; :func:`explanation_grid` shows the positive part scaled per image.

    The default baseline ``"mean"`` is the image's own mean intensity per channel, not 0 (black): in
    ultrasound (and in CT/X-ray background) a black square is itself a finding -- it looks like an anechoic
    cyst or a hypoechoic mass, the very evidence the model is asked about -- so a black patch adds a lesion
    where it removes tissue. The mean intensity removes the patch's structure without adding a dark or bright
    object. Pass a number in [0, 1] for a constant baseline (``0.0`` = black).
    """
    net = _unwrap(net)
    device = _device_of(net)
    x_all = _as_batch(images, device)
    n, c, h, w = x_all.shape
    patch = int(patch) if patch else occlusion_geometry(h, w)[0]
    stride = int(stride) if stride else max(1, patch // 2)
    if patch < 1 or stride < 1 or stride > patch or patch > min(h, w):
        raise ValueError(f"patch {patch} / stride {stride} do not fit a {h}x{w} image (stride <= patch <= side)")
    cls_all = _targets(target_class, n, _logits(net, x_all))
    explainer = Occlusion(net)
    out = []
    with _EvalMode(net), torch.no_grad(), torch.autocast(device.type, enabled=False):
        for s in range(0, n, _BATCH):
            x = x_all[s : s + _BATCH]
            attr = explainer.attribute(x, sliding_window_shapes=(c, patch, patch), strides=(c, stride, stride),
                                       baselines=_baseline_tensor(x, baseline), target=cls_all[s : s + _BATCH],
                                       perturbations_per_eval=max(1, _EVALS_PER_FORWARD // len(x)))
            out.append(attr.float().mean(dim=1))  # the window spans all channels: every channel holds the same drop
    return torch.cat(out).cpu().numpy().astype(np.float32) if out else np.zeros((0, h, w), np.float32)


def randomised_copy(net: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``net`` with every trainable layer re-initialised (``reset_parameters()``: convolutions, batch
    norms with their running statistics, linear layers); parameter-free layers such as ``Normalize`` (the
    training-split mean and std) are kept. Seeded, and the global random state is left as it was."""
    rand = copy.deepcopy(_unwrap(net))
    device = _device_of(rand)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for module in rand.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and any(True for _ in module.parameters(recurse=False)):
                reset()
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
    return rand


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties given their mean rank (as ``scipy.stats.rankdata``)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.arange(values.size, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def rank_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rho between ``a[i]`` and ``b[i]`` (flattened) for each i; NaN where a map is constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"maps of shapes {a.shape} and {b.shape}")
    out = np.full(len(a), np.nan)
    for i, (u, v) in enumerate(zip(a.reshape(len(a), -1), b.reshape(len(b), -1), strict=True)):
        ru, rv = _ranks(u) - (u.size - 1) / 2, _ranks(v) - (v.size - 1) / 2
        denom = np.sqrt((ru * ru).sum() * (rv * rv).sum())
        if denom > 0:
            out[i] = float((ru * rv).sum() / denom)
    return out


def _rho_summary(rho: np.ndarray) -> dict[str, Any]:
    defined = rho[np.isfinite(rho)]
    mean = float(defined.mean()) if len(defined) else None
    passed = mean is not None and abs(mean) < SANITY_THRESHOLD
    return {"randomisation_spearman": mean, "per_sample": [None if not np.isfinite(r) else float(r) for r in rho],
            "undefined": int(len(rho) - len(defined)), "passed": bool(passed),
            "verdict": ("passed" if passed else "FAILED") + (f" (|rho| {abs(mean):.2f} "
                       f"{'<' if passed else '>='} {SANITY_THRESHOLD})" if mean is not None else
                       " (undefined: constant maps)")}


def _compute(net: nn.Module, name: str, x: np.ndarray, target: np.ndarray, patch: int, stride: int,
             baseline: str | float) -> np.ndarray:
    if name == "gradcam":
        return gradcam(net, x, target_class=target)
    return occlusion(net, x, target_class=target, patch=patch, stride=stride, baseline=baseline)


def _baseline_name(baseline: str | float) -> str:
    return "image mean intensity per channel" if baseline == MEAN_BASELINE else f"constant {float(baseline):g}"


@dataclass
class Explanations:
    """Maps of a batch of images, with what they explain and the randomisation sanity check."""

    images: np.ndarray  # N x C x H x W float32 in [0, 1]
    maps: dict[str, np.ndarray]  # method -> N x H x W float32
    target_class: np.ndarray  # N, the explained class
    predicted_class: np.ndarray  # N
    probability: np.ndarray  # N, of the explained class
    class_names: list[str]
    patch: int
    stride: int
    baseline: str
    labels: np.ndarray | None = None
    randomised: dict[str, np.ndarray] = field(default_factory=dict)  # method -> maps of the re-initialised net
    sanity: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> _rho_summary

    def class_name(self, c: int) -> str:
        return self.class_names[c] if 0 <= c < len(self.class_names) else str(c)

    def summary(self) -> dict[str, Any]:
        """The JSON summary (``evaluation.json`` ``explanations``): per method the sanity check, and the setup."""
        out: dict[str, Any] = {name: dict(self.sanity.get(name) or {}) for name in self.maps}
        for name, maps in self.maps.items():
            out[name]["flat_maps"] = int((maps.reshape(len(maps), -1).std(axis=1) == 0).sum()) if len(maps) else 0
        out |= {"samples": int(len(self.images)), "target": "predicted class", "quantity": "class logit",
                "patch": self.patch, "stride": self.stride, "baseline": self.baseline,
                "randomisation": "all trainable layers re-initialised (reset_parameters), Normalize kept",
                "sanity_threshold": SANITY_THRESHOLD,
                "sanity_passed": bool(self.sanity) and all(s["passed"] for s in self.sanity.values())}
        return out

    def save(self, path: str | Path) -> Path:
        """A ``.npz``: ``image`` (N x C x H x W float32), one N x H x W float32 array per method (``gradcam``,
        ``occlusion``) and its ``<method>_randomised``, ``target_class``, ``predicted_class``, ``probability`` (of
        the target class), ``label`` when known, ``class_names`` and ``summary`` (JSON text); no pickles."""
        arrays: dict[str, np.ndarray] = {"image": self.images.astype(np.float32),
                                         "target_class": self.target_class.astype(np.int64),
                                         "predicted_class": self.predicted_class.astype(np.int64),
                                         "probability": self.probability.astype(np.float32),
                                         "class_names": np.asarray(self.class_names, dtype=str),
                                         "summary": np.asarray(json.dumps(self.summary()))}
        arrays |= {name: maps.astype(np.float32) for name, maps in self.maps.items()}
        arrays |= {f"{name}_randomised": maps.astype(np.float32) for name, maps in self.randomised.items()}
        if self.labels is not None:
            arrays["label"] = self.labels.astype(np.int64)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)
        return path


def explain(
    net: nn.Module,
    images: np.ndarray | torch.Tensor,
    class_names: Sequence[str],
    method: str = "both",
    target_class: Sequence[int] | np.ndarray | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    probs: np.ndarray | None = None,
    sanity: bool = True,
) -> Explanations:
    """Maps of ``method`` for ``images`` (uint8, or float in [0, 1]) on the logit of ``target_class`` (default:
    the predicted class), with the randomisation sanity check (``sanity=False`` skips it). ``probs``: the
    probabilities to report (e.g. temperature-scaled ones); default the network's softmax."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    net = _unwrap(net)
    x = unit_images(images)
    x = x[None] if x.ndim == 3 else x
    logits = _logits(net, _as_batch(x, _device_of(net))).cpu()
    p = np.asarray(probs, np.float64) if probs is not None else logits.softmax(1).numpy().astype(np.float64)
    pred = p.argmax(1) if len(p) else np.zeros(0, np.int64)
    target = _targets(target_class, len(x), logits).numpy() if target_class is not None else pred
    patch, stride = occlusion_geometry(*x.shape[-2:])
    baseline = MEAN_BASELINE
    names = ("gradcam", "occlusion") if method == "both" else (method,)
    maps = {name: _compute(net, name, x, target, patch, stride, baseline) if len(x) else
            np.zeros((0, *x.shape[-2:]), np.float32) for name in names}
    out = Explanations(x, maps, target, pred, p[np.arange(len(p)), target] if len(p) else np.zeros(0),
                       list(class_names), patch, stride, _baseline_name(baseline),
                       None if labels is None else np.asarray(labels).reshape(-1).astype(np.int64))
    if sanity and len(x):
        rand = randomised_copy(net)
        out.randomised = {name: _compute(rand, name, x, target, patch, stride, baseline) for name in names}
        out.sanity = {name: _rho_summary(rank_correlation(maps[name], out.randomised[name])) for name in names}
    return out


def sanity_check(net: nn.Module, images: np.ndarray | torch.Tensor, method: str = "both",
                 target_class: Sequence[int] | np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """The model-randomisation check alone: per method the mean Spearman rho between the maps of ``net`` and of
    :func:`randomised_copy` (``randomisation_spearman``), per sample, and whether |rho| < 0.5 (``passed``)."""
    return explain(net, images, [], method, target_class=target_class).sanity


def overlay(image: np.ndarray | torch.Tensor, heat: np.ndarray | torch.Tensor, alpha: float = HEAT_ALPHA,
            cmap: str = HEAT_CMAP) -> np.ndarray:
    """A heatmap blended over an image: CHW (or HW) in [0, 1] + HxW -> HxWx3 uint8.

    The heatmap's positive part is scaled to its maximum and resized to the image if needed; grey images are
    shown grey (0 black, 1 white) under the colour map.
    """
    img = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float32)
    if img.ndim == 2:
        img = img[None]
    if img.ndim != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"image must be CHW with 1 or 3 channels, got shape {img.shape}")
    rgb = np.repeat(img, 3, axis=0) if img.shape[0] == 1 else img
    rgb = np.clip(rgb.transpose(1, 2, 0), 0.0, 1.0)
    hm = np.asarray(heat.detach().cpu() if isinstance(heat, torch.Tensor) else heat, dtype=np.float32)
    if hm.ndim != 2:
        raise ValueError(f"heat must be HxW, got shape {hm.shape}")
    if hm.shape != rgb.shape[:2]:
        hm = F.interpolate(torch.from_numpy(hm)[None, None], size=rgb.shape[:2], mode="bilinear",
                           align_corners=False)[0, 0].numpy()
    coloured = matplotlib.colormaps[cmap](display_map(hm))[..., :3]
    blend = (1.0 - alpha) * rgb + alpha * coloured
    return np.clip(np.rint(blend * 255.0), 0, 255).astype(np.uint8)


def display_map(heat: np.ndarray) -> np.ndarray:
    """What a panel shows: the positive part of a map divided by its maximum (0..1 per image; all 0 if none)."""
    hm = np.nan_to_num(np.clip(np.asarray(heat, dtype=np.float32), 0.0, None))
    return hm / hm.max() if hm.size and hm.max() > 0 else np.zeros_like(hm)


def _show(image: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """An image panel's data and imshow arguments: grey at fixed 0..1 (black..white), RGB as is."""
    img = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
    if img.shape[0] == 1:
        return img[0], {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}
    return img.transpose(1, 2, 0), {}


def _figure(expl: Explanations, titles: list[str], path: Path,
            suptitle: str | None = None) -> tuple[Path, list[dict[str, list[Any]]]]:
    """One row per image: the image (titled), then per method the image in grey with the map over it.

    Returns the PNG and, per row, the ``AxesImage`` objects drawn (``"image"``: [image]; a method: [image, heat]).
    """
    n, methods = len(expl.images), list(expl.maps)
    rows, cols = max(n, 1), 1 + len(methods)
    fig, axes = plt.subplots(rows, cols, figsize=(2.5 * cols, 2.6 * rows + 0.9), squeeze=False, layout="constrained")
    panels: list[dict[str, list[Any]]] = []
    for i in range(n):
        shown, kw = _show(expl.images[i])
        row = {"image": [axes[i, 0].imshow(shown, interpolation="nearest", **kw)]}
        axes[i, 0].set_title(titles[i], fontsize=7)
        for j, name in enumerate(methods, start=1):
            base = axes[i, j].imshow(shown, interpolation="nearest", **kw)
            shown_map = display_map(expl.maps[name][i])
            heat = axes[i, j].imshow(shown_map, cmap=HEAT_CMAP, vmin=0.0, vmax=1.0, interpolation="nearest",
                                     alpha=PANEL_ALPHA[0] + (PANEL_ALPHA[1] - PANEL_ALPHA[0]) * shown_map)
            row[name] = [base, heat]
            axes[i, j].set_title(PANEL_TITLES[name].format(cls=expl.class_name(int(expl.target_class[i]))), fontsize=7)
        panels.append(row)
    if not n:
        axes[0, 0].text(0.5, 0.5, "no images", ha="center", va="center")
    for ax in axes.flat:
        ax.axis("off")
    if n and methods:
        bar = fig.colorbar(matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 1), cmap=HEAT_CMAP),
                           ax=axes.ravel().tolist(), location="bottom", shrink=0.6, aspect=30, pad=0.02)
        bar.set_label("evidence for the class (positive part),\nnormalised per image: 1 = that image's maximum",
                      fontsize=7)
        bar.ax.tick_params(labelsize=6)
    if suptitle:
        fig.suptitle(suptitle, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, panels


def sanity_line(expl: Explanations) -> str:
    """The randomisation check, a line per method, e.g. ``Grad-CAM rho=0.12 passed (|rho| 0.12 < 0.5)``."""
    parts = []
    for name, s in expl.sanity.items():
        rho = s["randomisation_spearman"]
        label = "Grad-CAM" if name == "gradcam" else "occlusion"
        parts.append(f"{label} rho={'n/a' if rho is None else f'{rho:.2f}'} {s['verdict']}")
    return "randomisation sanity check (Spearman, trained vs re-initialised net):\n" + "\n".join(parts) \
        if parts else "randomisation sanity check: not run"


def _selection(y: np.ndarray, p: np.ndarray, n_correct: int, n_wrong: int) -> tuple[np.ndarray, int, int]:
    pred = p.argmax(1) if len(p) else np.zeros(0, dtype=int)
    conf = p[np.arange(len(p)), pred] if len(p) else np.zeros(0)
    correct, wrong = np.flatnonzero(pred == y), np.flatnonzero(pred != y)
    chosen = [*correct[np.argsort(-conf[correct], kind="stable")][:n_correct],
              *wrong[np.argsort(-conf[wrong], kind="stable")][:n_wrong]]
    return np.asarray(chosen, dtype=int), len(correct), len(wrong)


def explanation_grid(
    net: nn.Module,
    images: np.ndarray | torch.Tensor,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    probs: np.ndarray | torch.Tensor,
    class_names: Sequence[str],
    path: str | Path,
    method: str = "both",
    n_correct: int = 4,
    n_wrong: int = 4,
) -> Path:
    """A PNG of the ``n_correct`` most confident correct and ``n_wrong`` most confident wrong predictions, and
    beside it a ``.npz`` of the maps (:meth:`Explanations.save`; its ``summary`` is :func:`explanation_summary`).

    ``images``: uint8 N x C x H x W (scaled by 1/255) or float in [0, 1]. One row per image: the image titled with
    true class, predicted class and its probability (from ``probs``), then each method's map of the predicted
    class's logit over the grey image. Fewer rows when there are fewer such images.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    imgs = unit_images(images)
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1).astype(int)
    p = np.asarray(probs.detach().cpu() if isinstance(probs, torch.Tensor) else probs, dtype=np.float64)
    if not (len(imgs) == len(y) == len(p)):
        raise ValueError(f"{len(imgs)} images, {len(y)} labels and {len(p)} probability rows")
    sel, n_ok, n_bad = _selection(y, p, n_correct, n_wrong)
    expl = explain(net, imgs[sel], class_names, method, labels=y[sel], probs=p[sel])
    titles = [f"{'correct' if expl.predicted_class[k] == y[i] else 'WRONG'}: true {expl.class_name(y[i])}\n"
              f"pred {expl.class_name(int(expl.predicted_class[k]))} (p={expl.probability[k]:.2f})"
              for k, i in enumerate(sel)]
    suptitle = (f"{n_ok} correct, {n_bad} wrong of {len(y)} at the arg-max class; shown: {min(n_ok, n_correct)} "
                f"correct, {min(n_bad, n_wrong)} wrong\n(the maps explain the arg-max class; a binary operating point "
                f"can decide otherwise)\n{sanity_line(expl)}")
    png, _ = _figure(expl, titles, Path(path), suptitle=suptitle)
    expl.save(png.with_suffix(".npz"))
    return png


def explanation_summary(path: str | Path) -> dict[str, Any]:
    """The summary stored in the ``.npz`` beside an explanation PNG (``path``: the PNG or the ``.npz``)."""
    with np.load(Path(path).with_suffix(".npz"), allow_pickle=False) as data:
        return {**json.loads(str(data["summary"])), "file": Path(path).with_suffix(".npz").name}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m evaluation.explain",
                                 description="Grad-CAM / occlusion maps (of the class logit) of a training run's best "
                                             "checkpoint, with the model-randomisation sanity check.")
    ap.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, TIFF, DICOM, .npy)")
    ap.add_argument("--run", required=True, help="training run folder (or 'latest') whose best checkpoint is used")
    ap.add_argument("--method", choices=METHODS, default="both")
    ap.add_argument("--out", type=Path, default=None,
                    help="one PNG with a row per image (and its .npz beside it); default: <image stem>_<method>.png "
                         "(and .npz) per image in --out-dir")
    ap.add_argument("--out-dir", type=Path, default=Path("."), help="folder for the per-image PNGs (default: .)")
    ap.add_argument("--log-dir", default="logs", help="where run=latest looks (default: logs)")
    return ap


def _write(expl: Explanations, names: list[str], args: argparse.Namespace, checkpoint: str) -> list[Path]:
    titles = [f"{Path(p).name}\npred {expl.class_name(int(c))} (p={expl.probability[i]:.3f})"
              for i, (p, c) in enumerate(zip(names, expl.predicted_class, strict=True))]
    if args.out is not None:
        png, _ = _figure(expl, titles, args.out, suptitle=f"{args.method}: {checkpoint}\n{sanity_line(expl)}")
        return [png, expl.save(png.with_suffix(".npz"))]
    written = []
    for i, p in enumerate(names):
        one = Explanations(expl.images[i : i + 1], {k: v[i : i + 1] for k, v in expl.maps.items()},
                           expl.target_class[i : i + 1], expl.predicted_class[i : i + 1], expl.probability[i : i + 1],
                           expl.class_names, expl.patch, expl.stride, expl.baseline,
                           randomised={k: v[i : i + 1] for k, v in expl.randomised.items()},
                           sanity={k: _rho_summary(np.asarray([s["per_sample"][i]], dtype=np.float64))
                                   for k, s in expl.sanity.items()})
        png, _ = _figure(one, [titles[i]], args.out_dir / f"{Path(p).stem}_{args.method}.png",
                         suptitle=f"{checkpoint}\n{sanity_line(one)}")
        written += [png, one.save(png.with_suffix(".npz"))]
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from export.source import ExportError, load_source
    from medops import ImageReadError, load_for_model

    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        for p in missing:
            print(f"error: image not found: {p}", file=sys.stderr)
        return 2
    try:
        source = load_source(run=args.run, log_dir=args.log_dir)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    channels, size, _ = source.input_shape
    try:
        batch = np.stack([load_for_model(p, size, channels) for p in args.images])
    except ImageReadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    expl = explain(source.module.net.eval(), batch, source.class_names, args.method)
    written = _write(expl, list(args.images), args, source.checkpoint.name)
    for i, p in enumerate(args.images):
        print(f"{p}: {expl.class_name(int(expl.predicted_class[i]))} (p={expl.probability[i]:.3f})")
    print(sanity_line(expl))
    print(f"occlusion: patch {expl.patch} px, stride {expl.stride} px, baseline {expl.baseline}")
    for w in dict.fromkeys(written):
        print(f"wrote {w}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
