"""Fit the out-of-distribution score of a version (:mod:`medops.ood`) on the run's own data.

Class means and the shared covariance come from the penultimate features of the training split (up to
``ood.max_images``, a seeded sample); the threshold from the validation split, so that ``ood.pass_rate`` of
images like the ones the model was validated on pass. Export then puts the fitted score into the ONNX graph
(:class:`export.onnx_export.ScoredModel`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from rich.console import Console

from export.onnx_export import EmbeddingModel
from export.source import ExportSource, source_datamodule
from medops.io import to_unit_range
from medops.ood import OODProfile, fit_profile

log = logging.getLogger(__name__)


@torch.no_grad()
def embed(net: torch.nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Penultimate features [N, D] of float32 NCHW images in [0, 1] (CPU, eval mode)."""
    model = EmbeddingModel(net).eval().cpu().float()
    parts = [model(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size]))).numpy()
             for i in range(0, len(images), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def sample_split(source: ExportSource, split: str, limit: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """At most ``limit`` images (seeded sample, in [0, 1]) and their labels from a split of the run's data."""
    dataset = source_datamodule(source).datasets[split]
    n = len(dataset.labels)
    index = np.arange(n) if n <= limit else np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))
    images = dataset.images[torch.from_numpy(index)].numpy()
    return to_unit_range(images), dataset.labels[torch.from_numpy(index)].numpy()


def fit_ood(cfg: DictConfig, source: ExportSource, console: Console) -> tuple[OODProfile | None, dict[str, Any]]:
    """The fitted profile and its summary for the version's metadata; ``(None, {"skipped": reason})`` when the
    run's data cannot be read or the network has no linear head."""
    ocfg = cfg.ood
    try:
        train_x, train_y = sample_split(source, str(ocfg.fit_split), int(ocfg.max_images))
        val_x, _ = sample_split(source, str(ocfg.threshold_split), int(ocfg.max_images))
        net = source.module.net
        profile, summary = fit_profile(embed(net, train_x), train_y, embed(net, val_x), float(ocfg.pass_rate))
    except Exception as exc:  # the score is an addition: a version without it still serves
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("out-of-distribution score skipped: %s", reason)
        console.print(f"[yellow]out-of-distribution score skipped[/]: {reason}")
        return None, {"skipped": reason}
    summary |= {"fit_split": str(ocfg.fit_split), "threshold_split": str(ocfg.threshold_split)}
    console.print(f"out-of-distribution score: Mahalanobis on {summary['dimensions']}-d features of "
                  f"{summary['fitted_on']} {ocfg.fit_split} images; threshold {summary['threshold']:.2f} passes "
                  f"{1 - summary['val_flagged']:.1%} of {summary['threshold_on']} {ocfg.threshold_split} images")
    return profile, summary


def check_ood_graph(onnx_path: Any, profile: OODProfile, net: torch.nn.Module, images: np.ndarray) -> float:
    """The largest |difference| between the exported graph's ``ood_score`` and :mod:`medops.ood` on the same
    images (PyTorch features); ValueError when it exceeds 1e-3 of the threshold."""
    import onnxruntime as ort

    from medops.model_version import OOD_SCORE_OUTPUT

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    graph = np.concatenate([
        session.run([OOD_SCORE_OUTPUT], {name: np.ascontiguousarray(images[i:i + 64])})[0].reshape(-1)
        for i in range(0, len(images), 64)])
    expected = profile.scores(embed(net, images))
    diff = float(np.abs(graph - expected).max()) if len(images) else 0.0
    if diff > 1e-3 * max(1.0, profile.threshold):
        raise ValueError(f"the exported ood_score differs from medops.ood by {diff:.3g} (threshold "
                         f"{profile.threshold:.3g})")
    return diff
