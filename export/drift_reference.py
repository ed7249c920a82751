"""The drift reference profile stored with every exported version (``drift_reference.npz``).

Computed on the validation split with the exported ONNX graphs themselves (the numbers serving will see): per-image
intensity and channel statistics, the predicted probabilities and class, the pooled pixel histogram and the
penultimate-layer embeddings (``embedding.onnx``, exported next to the model). ``medops/drift.py`` is copied into
the version as ``drift_core.py`` so the Triton Python backend computes the same features online.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

import medops.drift as drift_core
from export.onnx_export import export_embedding_onnx
from export.parity import onnxruntime_runner
from medops.model_version import DRIFT_REFERENCE_FILE as PROFILE_FILE
from medops.model_version import EMBEDDING_FILE

log = logging.getLogger(__name__)
CORE_FILE = "drift_core.py"


def batched(run: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([run(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def write_drift_reference(version_dir: Path, net: nn.Module, images: np.ndarray, class_names: list[str], *,
                          max_batch_size: int, opset: int, embeddings: bool = True, source: str = "val"
                          ) -> dict[str, Any]:
    """Write ``drift_reference.npz`` (+ ``embedding.onnx`` and ``drift_core.py``) into ``version_dir``.

    ``images`` are float32 N x C x H x W in [0, 1] from the reference split; ``net`` is the trained network (its
    last linear layer is cut off for the embeddings). Returns the summary stored in the version's metadata.
    """
    batch = min(max_batch_size, 64)
    probs = batched(onnxruntime_runner(str(version_dir / "model.onnx")), images, batch)
    features = {**drift_core.image_features(images), **drift_core.prediction_features(probs, class_names),
                **drift_core.size_features(np.tile(images.shape[2:], (len(images), 1)))}
    emb = None
    embedding_note = "disabled (drift.embeddings=false)"
    if embeddings:
        try:
            export_embedding_onnx(net, version_dir / EMBEDDING_FILE, tuple(images.shape[1:]), max_batch_size, opset)
            emb = batched(onnxruntime_runner(str(version_dir / EMBEDDING_FILE)), images, batch)
            embedding_note = f"{emb.shape[1]}-d penultimate features ({EMBEDDING_FILE})"
        except Exception as exc:  # embeddings are optional: the intensity/prediction tests still run
            (version_dir / EMBEDDING_FILE).unlink(missing_ok=True)
            embedding_note = f"skipped: {type(exc).__name__}: {exc}"
            log.warning("drift embeddings %s", embedding_note)
    drift_core.save_profile(str(version_dir / PROFILE_FILE), features, class_names=class_names,
                            pixel_histogram=drift_core.pixel_histogram(images), embeddings=emb, source=source)
    shutil.copyfile(drift_core.__file__, version_dir / CORE_FILE)
    return {"reference": source, "n": int(len(images)), "features": sorted(features), "embeddings": embedding_note,
            "file": PROFILE_FILE}
