"""What every serving backend shares: the user-facing error, the model's input contract and the backend interface.

A backend (Triton over HTTP/gRPC in :mod:`serve.client`, onnxruntime in-process in :mod:`serve.local_backend`)
takes float32 NCHW batches in the model-input contract (:func:`medops.preprocess`) and returns class probabilities,
so ``predict`` and ``batch`` run the same code path whichever backend serves them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from medops.input_check import value_problem
from medops.model_version import OUTPUT_NAME, ModelVersionError, VersionMetadata, read_metadata, version_dir


class ServeError(RuntimeError):
    """A clear, user-facing failure: server down, model missing, bad input."""


class ServerUnreachable(ServeError):
    """The server could not be reached (connection refused, host unreachable, connection reset, gRPC UNAVAILABLE),
    after the retries: the server is down, not a problem of one input. The message names the URL."""


@dataclass
class ModelInfo:
    """What a client needs to know about a served model: its input contract and classes."""

    name: str
    version: str
    input_name: str
    output_name: str
    channels: int
    size: int
    max_batch_size: int
    class_names: list[str]
    window: tuple[float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    extra_outputs: list[str] = field(default_factory=list)  # e.g. ood_score, ood_flag (medops.ood)
    modalities: list[str] = field(default_factory=list)  # DICOM Modality of the training data; [] unknown


class Backend(Protocol):
    info: ModelInfo

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities [N, classes] for a float32 [N, C, H, W] batch (N may exceed max_batch_size)."""
        ...

    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the model by name: ``probabilities`` and, when the version has them, ``ood_score``
        [N, 1] and ``ood_flag`` [N, 1]."""
        ...

    def close(self) -> None: ...


def infer_outputs(backend: Backend, batch: np.ndarray) -> dict[str, np.ndarray]:
    """``backend.infer_outputs(batch)``; only ``probabilities`` for a backend without that method."""
    method = getattr(backend, "infer_outputs", None)
    return method(batch) if method is not None else {OUTPUT_NAME: backend.infer(batch)}


def joined(parts: list[dict[str, np.ndarray]], names: list[str], num_classes: int) -> dict[str, np.ndarray]:
    """The per-chunk outputs concatenated by name (an empty batch: empty probabilities)."""
    if not parts:
        return {OUTPUT_NAME: np.zeros((0, num_classes), np.float32)}
    return {name: np.concatenate([part[name] for part in parts]) for name in names}


def chunks(batch: np.ndarray, size: int) -> list[np.ndarray]:
    return [batch[i : i + size] for i in range(0, len(batch), max(1, size))]


def check_batch(info: ModelInfo, batch: np.ndarray) -> np.ndarray:
    """Refuse a batch that does not match the model's input contract, with the reason."""
    expected = (info.channels, info.size, info.size)
    if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
        raise ServeError(
            f"input has shape {list(batch.shape)}, model {info.name} expects [N, {', '.join(map(str, expected))}]"
        )
    if batch.dtype != np.float32:
        raise ServeError(f"input dtype is {batch.dtype}, model {info.name} expects float32")
    problem = value_problem(batch)
    if problem:
        raise ServeError(f"model {info.name}: {problem}")
    return np.ascontiguousarray(batch)


def operating_point_of(op: dict[str, Any]) -> dict[str, Any]:
    """``threshold`` (float) and ``positive_class`` of an exported operating point (binary tasks), and
    ``abnormal_classes``/``abnormal_threshold`` of a multi-class task's declared abnormal set; nothing else."""
    out: dict[str, Any] = {}
    if op.get("threshold") not in (None, ""):
        out |= {"threshold": float(op["threshold"]), "positive_class": op.get("positive_class")}
    abnormal = op.get("abnormal") or {}
    if abnormal.get("value") not in (None, "") and abnormal.get("classes"):
        out |= {"abnormal_classes": [str(c) for c in abnormal["classes"]],
                "abnormal_threshold": float(abnormal["value"])}
    return out


def ood_threshold_of(ood: dict[str, Any]) -> dict[str, Any]:
    """``ood_threshold`` (float) of a version's out-of-distribution score, or nothing."""
    value = ood.get("threshold") if ood else None
    return {} if value in (None, "") else {"ood_threshold": float(value)}


def model_version_dir(repository: str | Path, name: str, version: str | int | None = None) -> Path:
    """:func:`medops.model_version.version_dir`, its error as a :class:`ServeError`."""
    try:
        return version_dir(repository, name, version)
    except ModelVersionError as exc:
        raise ServeError(str(exc)) from None


def read_version_metadata(folder: Path) -> VersionMetadata:
    """:func:`medops.model_version.read_metadata`, its error as a :class:`ServeError`."""
    try:
        return read_metadata(folder)
    except ModelVersionError as exc:
        raise ServeError(str(exc)) from None
