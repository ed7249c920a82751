"""``python -m serve drift``: does a batch of new images look like the data the model was validated on?

Compares new images (folder, CSV manifest, file list, or a MedMNIST ``.npz`` split) with the reference profile
exported with the model version (``drift_reference.npz``, validation split): per-image intensity/channel statistics,
raw image sizes, the predicted probabilities and classes (the model runs in-process with onnxruntime on the
version's ``model.onnx``) and, when the version has ``embedding.onnx``, penultimate-layer embeddings (MMD test).
The statistics live in :mod:`medops.drift`, the same code the served model runs online.

Torch-free. Unreadable files are reported with their path and skipped; the others are still compared.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

import medops
from medops import drift as core
from medops.model_version import DRIFT_REFERENCE_FILE, EMBEDDING_FILE
from serve.contract import ServeError, model_version_dir, read_version_metadata
from serve.inputs import InputItem, iter_inputs
from serve.local_backend import LocalBackend

log = logging.getLogger(__name__)


@dataclass
class DriftReport:
    result: core.DriftResult
    model: str
    version: str
    input: str
    failed: list[tuple[str, str]] = field(default_factory=list)
    profile: dict[str, Any] = field(default_factory=dict)
    current: dict[str, np.ndarray] = field(default_factory=dict)
    current_histogram: np.ndarray | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "input": self.input,
                "reference": {"source": self.profile.get("source"), "n": self.result.n_reference},
                **self.result.as_dict(), "failed": [{"path": p, "error": e} for p, e in self.failed]}

    def table(self) -> Table:
        th = self.result.thresholds
        table = Table(title=f"drift of {self.input} vs {self.model} v{self.version} reference "
                            f"({self.profile.get('source')}, n={self.result.n_reference}; current n="
                            f"{self.result.n_current})")
        for column in ("feature", "ref mean", "cur mean", "PSI", "test", "p-value", "drift"):
            table.add_column(column, justify="left" if column in ("feature", "test") else "right", no_wrap=True)
        for f in self.result.features:
            table.add_row(f.feature, f"{f.reference_mean:.4g}", f"{f.current_mean:.4g}", f"{f.psi:.3f}", f.test,
                          f"{f.p_value:.2e}", "[bold red]yes[/]" if f.drifted else "no")
        if self.result.embedding:
            e = self.result.embedding
            table.add_row(f"embedding {e['dim']}-d", "", "", f"{e['mmd2']:.3f}", "MMD²", f"{e['p_value']:.2e}",
                          "[bold red]yes[/]" if e["drifted"] else "no")
        table.caption = (f"a feature drifts when p < {th.alpha}/{max(1, len(self.result.features))} (Bonferroni) "
                         f"and PSI >= {th.psi_threshold}; embeddings when MMD p < {th.mmd_alpha}")
        return table


def version_dir(model_repository: str | Path, name: str, version: str | int | None) -> Path:
    """The version folder whose drift reference a check uses (the latest version by default)."""
    folder = model_version_dir(model_repository, name, version)
    if not (folder / DRIFT_REFERENCE_FILE).is_file():
        raise ServeError(f"{folder} has no drift_reference.npz (exported with drift.enabled=false or before drift "
                         "monitoring existed); re-export the model")
    return folder


def read_images(items: list[InputItem], size: int, channels: int, window: tuple[float, float] | None
                ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Model-input batch, raw (height, width) of every readable item, and (path, error) of the others."""
    arrays, sizes, failed = [], [], []
    for item in items:
        where = item.path if item.path is not None else item.key
        try:
            if item.array is not None:
                raw = item.array[..., None] if item.array.ndim == 2 else item.array
            else:
                raw = medops.read_image(str(item.path), window=window)
            arrays.append(medops.preprocess(raw, size, channels))
            sizes.append(raw.shape[:2])
        except (medops.ImageReadError, ValueError, OSError) as exc:
            failed.append((str(where), str(exc)))
    batch = np.stack(arrays) if arrays else np.zeros((0, channels, size, size), np.float32)
    return batch, np.asarray(sizes, dtype=np.float64).reshape(-1, 2), failed


def run_drift(source: str | Path, model_repository: str | Path, name: str, *, version: str | int | None = None,
              split: str = "test", thresholds: core.DriftThresholds | None = None, seed: int = 0,
              limit: int | None = None) -> DriftReport:
    """Compare the images of ``source`` with the reference profile of ``name`` (latest version by default)."""
    folder = version_dir(model_repository, name, version)
    meta = read_version_metadata(folder)
    profile = core.load_profile(str(folder / DRIFT_REFERENCE_FILE))
    if thresholds is None:
        thresholds = core.DriftThresholds.from_mapping(meta.drift.get("thresholds"))
    backend = LocalBackend(model_repository, name, folder.name)
    try:
        info = backend.info
        items, _ = iter_inputs(source, split=split, class_names=info.class_names)
        if limit:
            items = items[:limit]
        batch, sizes, failed = read_images(items, info.size, info.channels, info.window)
        for path, error in failed:
            log.warning("skipped %s: %s", path, error)
        probs = backend.infer(batch) if len(batch) else np.zeros((0, len(info.class_names)), np.float32)
    finally:
        backend.close()
    current = {**core.image_features(batch), **core.prediction_features(probs, info.class_names),
               **core.size_features(sizes)}
    current_emb = embeddings(folder, batch) if profile["embeddings"] is not None and len(batch) else None
    result = core.compare(profile["features"], current, num_classes=len(info.class_names), thresholds=thresholds,
                          reference_embeddings=profile["embeddings"], current_embeddings=current_emb, seed=seed)
    return DriftReport(result, name, folder.name, str(source), failed, profile, current,
                       core.pixel_histogram(batch) if len(batch) else None)


def embeddings(folder: Path, batch: np.ndarray) -> np.ndarray | None:
    """Penultimate-layer features of ``batch`` from the version's ``embedding.onnx`` (None when absent)."""
    path = folder / EMBEDDING_FILE
    if not path.is_file():
        return None
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: batch[i:i + 64]})[0] for i in range(0, len(batch), 64)]
    return np.concatenate(parts)


def plot(report: DriftReport, path: Path) -> Path:
    """One panel per feature (reference vs current histograms) plus the pooled pixel-intensity histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    feats = [f for f in report.result.features if not f.feature.startswith("image_")]
    panels = len(feats) + 1
    cols = min(4, panels)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    ref = report.profile["features"]
    for ax, f in zip(axes.flat, feats, strict=False):
        r, c = np.asarray(ref[f.feature]), np.asarray(report.current[f.feature])
        lo, hi = float(min(r.min(), c.min())), float(max(r.max(), c.max()))
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 21)
        ax.hist(r, bins=bins, density=True, alpha=0.5, label="reference")
        ax.hist(c, bins=bins, density=True, alpha=0.5, label="current")
        ax.set_title(f"{f.feature}\nPSI {f.psi:.2f}, p {f.p_value:.1e}", fontsize=9,
                     color="red" if f.drifted else "black")
    ax = axes.flat[len(feats)]
    grid = np.linspace(0, 1, len(report.profile["pixel_histogram"]) + 1)[:-1]
    ax.step(grid, report.profile["pixel_histogram"], where="post", label="reference")
    if report.current_histogram is not None:
        ax.step(grid, report.current_histogram, where="post", label="current")
    ax.set_title("pixel intensities (all pixels)", fontsize=9)
    ax.legend(fontsize=8)
    for extra in list(axes.flat)[panels:]:
        extra.axis("off")
    fig.suptitle(f"{report.model} v{report.version}: {report.result.verdict}", fontsize=11,
                 color="red" if report.result.drifted else "green")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(report: DriftReport, out_dir: str | Path | None, log_dir: str | Path = "logs") -> Path:
    """``drift.json`` and ``drift.png`` in ``out_dir`` (default ``<log_dir>/drift/<model>-v<version>-<time>``)."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    folder = Path(out_dir) if out_dir else Path(log_dir) / "drift" / f"{report.model}-v{report.version}-{stamp}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "drift.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    plot(report, folder / "drift.png")
    return folder


