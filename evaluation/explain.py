"""Explanations of a classifier's decisions: Grad-CAM and occlusion heatmaps, overlays and example grids.

Networks take float32 NCHW input in [0, 1] (the :mod:`medops` contract); heatmaps come back as float32
``[N, H, W]`` arrays at the input size with values in [0, 1].

* :func:`gradcam` weights the activations of the last convolutional stage (ResNet ``layer4``, the last
  ``Conv2d`` of a SmallCNN's ``features``) by their pooled gradients of the target class score.
* :func:`occlusion` is model-agnostic: the drop in the target class probability when a patch is replaced
  by the image's mean intensity, averaged over the patches covering each pixel (negative drops are 0).

CLI::

    python -m evaluation.explain IMAGE... --run <run dir> [--method gradcam|occlusion|both] [--out heatmap.png]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

METHODS = ("gradcam", "occlusion", "both")
_BATCH = 64


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
    """Grad-CAM heatmaps ``[N, H, W]`` in [0, 1] for NCHW images in [0, 1].

    ``target_class``: None (each image's predicted class), one class for all, or one per image. ``layer``:
    the module (or its dotted name in ``net``) whose output is explained; by default the last conv stage.
    The map is ReLU(sum_k w_k A_k) with w_k the spatial mean of d score / d A_k, bilinearly upsampled to
    the input size and scaled so each map's maximum is 1.
    """
    net = _unwrap(net)
    if isinstance(layer, str):
        layer = net.get_submodule(layer)
    target = layer if layer is not None else find_target_layer(net)
    device = _device_of(net)
    x_all = _as_batch(images, device)
    size = x_all.shape[-2:]
    captured: list[torch.Tensor] = []
    handle = target.register_forward_hook(lambda _m, _i, out: captured.append(out))
    out_maps = []
    try:
        with _EvalMode(net), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            for start in range(0, len(x_all), _BATCH):
                captured.clear()
                x = x_all[start : start + _BATCH].clone().requires_grad_(True)  # grads flow even if weights frozen
                logits = net(x).float()
                if not captured:
                    raise ValueError(f"layer {type(target).__name__} was not called in the forward pass")
                acts = captured[-1]
                cls = _targets(target_class if target_class is None or np.ndim(target_class) == 0
                               else np.asarray(target_class).reshape(-1)[start : start + _BATCH], len(x), logits)
                score = logits.gather(1, cls[:, None]).sum()
                (grads,) = torch.autograd.grad(score, acts)
                weights = grads.mean(dim=(2, 3), keepdim=True)
                cam = F.relu((weights * acts).sum(dim=1, keepdim=True)).detach()
                cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
                out_maps.append(_normalise(F.relu(cam)))
    finally:
        handle.remove()
    return torch.cat(out_maps).cpu().numpy().astype(np.float32)


def _positions(length: int, patch: int, stride: int) -> list[int]:
    starts = list(range(0, max(length - patch, 0) + 1, stride))
    if starts[-1] + patch < length:  # cover the last rows/columns too
        starts.append(length - patch)
    return starts


@torch.no_grad()
def occlusion(
    net: nn.Module,
    images: np.ndarray | torch.Tensor,
    target_class: int | Sequence[int] | np.ndarray | torch.Tensor | None = None,
    patch: int | None = None,
    stride: int | None = None,
) -> np.ndarray:
    """Occlusion sensitivity ``[N, H, W]`` in [0, 1]: the drop in the target class probability.

    Each ``patch`` x ``patch`` square (default: a seventh of the image side, at least 1 px; stride defaults to
    the patch) is replaced by the image's per-channel mean; a pixel's value is the mean drop of the target
    probability over the patches covering it, negative drops (the occlusion helped) counted as 0. Values are
    probability drops, not rescaled.
    """
    net = _unwrap(net)
    device = _device_of(net)
    x_all = _as_batch(images, device)
    n, _c, h, w = x_all.shape
    patch = int(patch) if patch else max(1, min(h, w) // 7)
    stride = int(stride) if stride else patch
    if patch < 1 or stride < 1 or patch > min(h, w):
        raise ValueError(f"patch {patch} / stride {stride} do not fit a {h}x{w} image")
    boxes = [(r, c) for r in _positions(h, patch, stride) for c in _positions(w, patch, stride)]
    maps = torch.zeros(n, h, w, device=device)
    with _EvalMode(net), torch.autocast(device.type, enabled=False):
        base = torch.cat([net(x_all[s : s + _BATCH]).float().softmax(1) for s in range(0, n, _BATCH)])
        cls = _targets(target_class, n, base)
        p0 = base.gather(1, cls[:, None])[:, 0]
        for i in range(n):
            img = x_all[i]
            fill = img.mean(dim=(1, 2), keepdim=True)
            drops = torch.empty(len(boxes), device=device)
            for s in range(0, len(boxes), _BATCH):
                chunk = boxes[s : s + _BATCH]
                batch = img.unsqueeze(0).repeat(len(chunk), 1, 1, 1)
                for j, (r, c) in enumerate(chunk):
                    batch[j, :, r : r + patch, c : c + patch] = fill
                probs = net(batch).float().softmax(1)[:, cls[i]]
                drops[s : s + len(chunk)] = p0[i] - probs
            total = torch.zeros(h, w, device=device)
            count = torch.zeros(h, w, device=device)
            for (r, c), d in zip(boxes, drops.clamp_min(0.0), strict=True):
                total[r : r + patch, c : c + patch] += d
                count[r : r + patch, c : c + patch] += 1
            maps[i] = total / count.clamp_min(1)
    return maps.clamp(0.0, 1.0).cpu().numpy().astype(np.float32)


def overlay(image: np.ndarray | torch.Tensor, heat: np.ndarray | torch.Tensor, alpha: float = 0.45,
            cmap: str = "jet") -> np.ndarray:
    """A heatmap blended over an image: CHW (or HW) in [0, 1] + HxW -> HxWx3 uint8.

    The heatmap is scaled to its maximum (so small occlusion drops stay visible) and resized to the image
    if needed; grey images are shown grey under the colour map.
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
    hm = np.nan_to_num(np.clip(hm, 0.0, None))
    if hm.max() > 0:
        hm = hm / hm.max()
    coloured = matplotlib.colormaps[cmap](hm)[..., :3]
    blend = (1.0 - alpha) * rgb + alpha * coloured
    return np.clip(np.rint(blend * 255.0), 0, 255).astype(np.uint8)


def _heatmaps(net: nn.Module, images: torch.Tensor | np.ndarray, method: str,
              target_class: np.ndarray | None = None) -> dict[str, np.ndarray]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    names = ("gradcam", "occlusion") if method == "both" else (method,)
    out = {}
    for name in names:
        fn = gradcam if name == "gradcam" else occlusion
        out[name] = fn(net, images, target_class=target_class)
    return out


def _show(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    img = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
    return (img[0], "gray") if img.shape[0] == 1 else (img.transpose(1, 2, 0), None)


def _figure(images: np.ndarray, maps: dict[str, np.ndarray], titles: list[str], path: Path,
            suptitle: str | None = None) -> Path:
    """One row per image: the image (titled), then one overlay per method."""
    rows, cols = max(len(images), 1), 1 + len(maps)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.4 * rows), squeeze=False)
    for i in range(len(images)):
        shown, cmap = _show(images[i])
        axes[i, 0].imshow(shown, cmap=cmap, vmin=0, vmax=1)
        axes[i, 0].set_title(titles[i], fontsize=7)
        for j, (name, heat) in enumerate(maps.items(), start=1):
            axes[i, j].imshow(overlay(images[i], heat[i]))
            axes[i, j].set_title(name, fontsize=7)
    if not len(images):
        axes[0, 0].text(0.5, 0.5, "no images", ha="center", va="center")
    for ax in axes.flat:
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def explanation_grid(
    net: nn.Module,
    images: np.ndarray | torch.Tensor,
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    probs: np.ndarray | torch.Tensor,
    class_names: Sequence[str],
    path: str | Path,
    method: str = "gradcam",
    n_correct: int = 4,
    n_wrong: int = 4,
) -> Path:
    """A PNG of the ``n_correct`` most confident correct and ``n_wrong`` most confident wrong predictions.

    One row per image: the image titled with true class, predicted class and its probability, then the
    overlay of each method's heatmap for the predicted class. Fewer rows when there are fewer such images.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    imgs = np.asarray(images.detach().cpu() if isinstance(images, torch.Tensor) else images, dtype=np.float32)
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1).astype(int)
    p = np.asarray(probs.detach().cpu() if isinstance(probs, torch.Tensor) else probs, dtype=np.float64)
    if not (len(imgs) == len(y) == len(p)):
        raise ValueError(f"{len(imgs)} images, {len(y)} labels and {len(p)} probability rows")
    pred = p.argmax(1) if len(p) else np.zeros(0, dtype=int)
    conf = p[np.arange(len(p)), pred] if len(p) else np.zeros(0)
    correct = np.flatnonzero(pred == y)
    wrong = np.flatnonzero(pred != y)
    chosen = [*correct[np.argsort(-conf[correct], kind="stable")][:n_correct],
              *wrong[np.argsort(-conf[wrong], kind="stable")][:n_wrong]]
    sel = np.asarray(chosen, dtype=int)
    maps = _heatmaps(net, imgs[sel], method, target_class=pred[sel]) if len(sel) else {}

    def name(c: int) -> str:
        return class_names[c] if 0 <= c < len(class_names) else str(c)

    titles = [f"{'correct' if pred[i] == y[i] else 'WRONG'}: true {name(y[i])}\npred {name(pred[i])} "
              f"p={conf[i]:.2f}" for i in sel]
    suptitle = f"{len(correct)} correct, {len(wrong)} wrong of {len(y)}; shown: {min(len(correct), n_correct)} " \
               f"correct, {min(len(wrong), n_wrong)} wrong"
    return _figure(imgs[sel], maps, titles, Path(path), suptitle=suptitle)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m evaluation.explain",
                                 description="Grad-CAM / occlusion heatmaps of a training run's best checkpoint.")
    ap.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, TIFF, DICOM, .npy)")
    ap.add_argument("--run", required=True, help="training run folder (or 'latest') whose best checkpoint is used")
    ap.add_argument("--method", choices=METHODS, default="gradcam")
    ap.add_argument("--out", type=Path, default=None,
                    help="one PNG with a row per image; default: <image stem>_<method>.png per image in --out-dir")
    ap.add_argument("--out-dir", type=Path, default=Path("."), help="folder for the per-image PNGs (default: .)")
    ap.add_argument("--log-dir", default="logs", help="where run=latest looks (default: logs)")
    return ap


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
    net = source.module.net.eval()
    with torch.no_grad():
        probs = net(torch.from_numpy(batch)).float().softmax(1).numpy()
    pred = probs.argmax(1)
    names = source.class_names
    maps = _heatmaps(net, batch, args.method, target_class=pred)
    titles = [f"{Path(p).name}\npred {names[c]} p={probs[i, c]:.3f}" for i, (p, c) in enumerate(zip(args.images,
                                                                                                   pred, strict=True))]
    written = []
    if args.out is not None:
        written.append(_figure(batch, maps, titles, args.out, suptitle=f"{args.method}: {source.checkpoint.name}"))
    else:
        for i, p in enumerate(args.images):
            out = args.out_dir / f"{Path(p).stem}_{args.method}.png"
            written.append(_figure(batch[i : i + 1], {k: v[i : i + 1] for k, v in maps.items()}, [titles[i]], out))
    for i, p in enumerate(args.images):
        print(f"{p}: {names[pred[i]]} (p={probs[i, pred[i]]:.3f})")
    for w in dict.fromkeys(written):
        print(f"wrote {w}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
