"""The in-process backend: the exported ``model.onnx`` run by onnxruntime on this machine's CPU cores.

Also the onnxruntime session settings every serving path uses (the Triton model takes the same thread count from its
config), and the physical-core count they are sized by.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from medops.model_version import ONNX_FILE, OUTPUT_NAME
from serve.contract import (
    ModelInfo,
    ServeError,
    check_batch,
    chunks,
    joined,
    model_version_dir,
    ood_threshold_of,
    operating_point_of,
    read_version_metadata,
)
from serve.verify import check_version, signing_key

log = logging.getLogger(__name__)


def physical_cores() -> int:
    """Physical CPU cores this process may run on (hyper-threads not counted); at least 1.

    Linux: distinct (package, core) pairs in ``/proc/cpuinfo`` among the CPUs of this process's affinity mask;
    elsewhere, or when that fails, ``os.cpu_count()``.
    """
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = set(range(os.cpu_count() or 1))
    try:
        cores, cpu, package = set(), None, "0"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "processor":
                cpu, package = int(value), "0"
            elif key == "physical id":
                package = value
            elif key == "core id" and cpu in allowed:
                cores.add((package, value))
        if cores:
            return len(cores)
    except (OSError, ValueError):
        pass
    return max(1, len(allowed))


def ort_session_options(threads: int | None = None) -> Any:
    """onnxruntime session options for CPU inference of a CNN, used wherever serving creates a session.

    Graph optimisation level ALL (constant folding, Conv+BN/activation fusion, NCHWc layout on AVX2/AVX-512);
    ``threads`` intra-op threads (default: ``$MEDOPS_ORT_THREADS``, else one per physical core), one inter-op
    thread and sequential execution (the network is a chain of ops: a second pool only competes for the cores).
    """
    import onnxruntime as ort

    if threads is None:
        threads = int(os.environ.get("MEDOPS_ORT_THREADS") or 0) or physical_cores()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


class LocalBackend:
    """onnxruntime in-process on ``<repository>/<name>/<version>/model.onnx`` (the CPU fallback).

    Thread-safe; runs are serialised: each already uses one thread per physical core, and concurrent runs
    (``serve batch`` keeps several requests in flight) only oversubscribe the cores (about 15% fewer images/s
    for 2 to 4 concurrent batches of 16 on 2 cores, measured with ``python -m bench pipeline``).
    """

    def __init__(self, model_repository: str | Path, name: str, version: str | int | None = None) -> None:
        import onnxruntime as ort

        folder = model_version_dir(model_repository, name, version)
        if not (folder / ONNX_FILE).is_file():
            raise ServeError(f"{folder / ONNX_FILE} not found")
        check = check_version(model_repository, name, int(folder.name), signing_key(), allow_unsealed=True)
        if not check.ok:
            log.error("%s v%s refused: %s", name, folder.name, "; ".join(check.problems))
            raise ServeError(f"{name} v{folder.name} refused: {'; '.join(check.problems)} (re-export the version)")
        if not check.sealed:
            log.warning("%s v%s: not verifiable (exported before versions were signed)", name, folder.name)
        meta = read_version_metadata(folder)
        self.session = ort.InferenceSession(str(folder / ONNX_FILE), ort_session_options(),
                                            providers=["CPUExecutionProvider"])
        self._run_lock = threading.Lock()
        contract = meta.input
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.info = ModelInfo(
            name=name, version=meta.version, input_name=contract.name, output_name=OUTPUT_NAME,
            channels=contract.channels, size=contract.size, max_batch_size=meta.max_batch_size,
            class_names=meta.class_names, window=contract.window,
            extra={"backend": "local", "metadata": meta.raw, **operating_point_of(meta.operating_point),
                   **ood_threshold_of(meta.ood)},
            extra_outputs=self.outputs[1:], modalities=meta.modalities,
        )

    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = check_batch(self.info, batch)
        parts = chunks(batch, self.info.max_batch_size)
        with self._run_lock:
            outs = [dict(zip(self.outputs, self.session.run(self.outputs, {self.info.input_name: part}),
                             strict=True)) for part in parts]
        return joined(outs, self.outputs, len(self.info.class_names))  # export names the first "probabilities"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.infer_outputs(batch)[OUTPUT_NAME]

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
