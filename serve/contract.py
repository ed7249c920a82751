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
from medops.model_version import ModelVersionError, VersionMetadata, read_metadata, version_dir


class ServeError(RuntimeError):
    """A clear, user-facing failure: server down, model missing, bad input."""


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


class Backend(Protocol):
    info: ModelInfo

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities [N, classes] for a float32 [N, C, H, W] batch (N may exceed max_batch_size)."""
        ...

    def close(self) -> None: ...


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
    """``threshold`` (float) and ``positive_class`` of an exported operating point, or nothing."""
    if op.get("threshold") in (None, ""):
        return {}
    return {"threshold": float(op["threshold"]), "positive_class": op.get("positive_class")}


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
