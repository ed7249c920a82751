"""Online prediction of image files: read with the model's own input contract, infer, rank the classes.

Used by ``python -m serve predict``. Works with any :class:`serve.contract.Backend` (Triton over HTTP/gRPC, or
onnxruntime in-process), so the same files give the same probabilities whichever backend serves them.

PRIVACY: a file that cannot be read is reported with its path and a technical reason only
(:class:`medops.ImageReadError` never carries DICOM header values; other exceptions are reported by type name),
and results never contain header values: no patient data reaches the output.

Torch-free.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medops import ImageReadError, load_for_model
from serve.contract import Backend, ModelInfo

__all__ = [
    "failed",
    "predict_files",
    "read_input",
    "render_errors",
    "render_json",
    "render_table",
    "top_k_classes",
]


def read_input(path: str | os.PathLike[str], info: ModelInfo) -> np.ndarray:
    """One file -> float32 [C, H, W] in the model's contract (size, channels, DICOM window).

    Raises:
        ImageReadError: the file cannot be read; the reason never contains header values.
    """
    name = os.fspath(path)
    try:
        return load_for_model(name, info.size, info.channels, window=info.window)
    except ImageReadError:
        raise
    except Exception as exc:  # only the type: a library message could quote file contents
        raise ImageReadError(name, f"cannot read image ({type(exc).__name__})") from None


def top_k_classes(probabilities: np.ndarray, class_names: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable classes, most probable first (ties keep class order)."""
    probs = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    k = max(1, min(int(k), len(probs)))
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"class": _class_name(class_names, int(i)), "probability": float(probs[i])} for i in order]


def _class_name(class_names: Sequence[str], index: int) -> str:
    return str(class_names[index]) if index < len(class_names) else str(index)


def predict_files(paths: Iterable[str | os.PathLike[str]], backend: Backend, top_k: int = 3) -> list[dict[str, Any]]:
    """Predict each file with one request per file; one result per path, in order.

    A result is ``{"path", "top": [{"class", "probability"}...], "probabilities", "model", "version",
    "latency_ms"}`` (``latency_ms``: the inference round trip, reading excluded), or ``{"path", "error"}`` for a
    file that cannot be read: the other files are still predicted.

    Raises:
        ServeError: the backend failed (server down, model unloaded): not a problem of one input.
    """
    info = backend.info
    results: list[dict[str, Any]] = []
    for path in paths:
        name = os.fspath(path)
        try:
            image = read_input(name, info)
        except ImageReadError as exc:
            results.append({"path": name, "error": exc.reason})
            continue
        start = time.perf_counter()
        probs = backend.infer(image[None])[0]
        latency_ms = (time.perf_counter() - start) * 1000.0
        results.append({
            "path": name,
            "top": top_k_classes(probs, info.class_names, top_k),
            "probabilities": [float(p) for p in probs],
            "model": info.name,
            "version": str(info.version),
            "latency_ms": round(latency_ms, 3),
        })
        decision = operating_point_decision(probs, info)
        if decision is not None:
            results[-1]["decision"] = decision
    return results


def operating_point_decision(probs: np.ndarray, info: ModelInfo) -> dict[str, Any] | None:
    """The binary decision at the operating point chosen on validation (``evaluation.evaluate``), if there is one."""
    threshold = info.extra.get("threshold")
    if threshold is None or len(info.class_names) != 2:
        return None
    positive = info.class_names.index(info.extra["positive_class"]) if info.extra.get("positive_class") in \
        info.class_names else 1
    chosen = positive if probs[positive] >= threshold else 1 - positive
    return {"class": info.class_names[chosen], "threshold": float(threshold),
            "positive_class": info.class_names[positive]}


def failed(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The error entries of ``results``."""
    return [r for r in results if "error" in r]


def render_json(results: Sequence[dict[str, Any]]) -> str:
    """A JSON array, one object per file (the ``probabilities`` list is kept: it is in class order)."""
    return json.dumps(list(results), indent=2)


def render_table(results: Sequence[dict[str, Any]], info: ModelInfo, backend_label: str = "") -> Table:
    """The predictions as a rich table, one row per file and rank (files that could not be read are left out)."""
    where = f" via {backend_label}" if backend_label else ""
    table = Table(title=f"{info.name} v{info.version}{where}", title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("#", justify="right")
    table.add_column("class")
    table.add_column("probability", justify="right")
    table.add_column("latency ms", justify="right")
    for result in results:
        if "error" in result:  # reported on its own line by render_errors
            continue
        top = result["top"]
        for rank, entry in enumerate(top, start=1):
            first = rank == 1
            table.add_row(
                escape(result["path"]) if first else "",
                str(rank),
                f"[bold]{escape(entry['class'])}[/bold]" if first else escape(entry["class"]),
                f"{entry['probability']:.4f}",
                f"{result['latency_ms']:.1f}" if first else "",
                end_section=rank == len(top),
            )
    return table


def render_errors(results: Sequence[dict[str, Any]], console: Console) -> None:
    """One line per file that could not be read: ``error: <path>: <reason>``."""
    for result in failed(results):
        console.print(f"[red]error[/red]: {escape(result['path'])}: {escape(result['error'])}", soft_wrap=True)
