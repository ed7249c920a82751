"""Inference backends with one interface: Triton over HTTP or gRPC, or onnxruntime in-process (``local``).

Both take float32 NCHW batches in the model-input contract (:func:`medops.preprocess`) and return class
probabilities, so ``predict`` and ``batch`` run the same code path whichever backend serves them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from medops.model_version import (
    ONNX_FILE,
    OUTPUT_NAME,
    ModelVersionError,
    VersionMetadata,
    read_metadata,
    version_dir,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


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


def _chunks(batch: np.ndarray, size: int) -> list[np.ndarray]:
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
    return np.ascontiguousarray(batch)


def with_retries(call: Callable[[], T], what: str, retries: int, backoff: float) -> T:
    """Call, retrying connection failures with exponential backoff; input errors are not retried."""
    delay = backoff
    for attempt in range(retries + 1):
        try:
            return call()
        except ServeError:
            raise
        except Exception as exc:  # tritonclient raises its own exception types for both transports
            status = str(getattr(exc, "status", lambda: "")() or "")
            message = str(exc)
            retryable = _is_connection_error(exc, status, message)
            if not retryable or attempt == retries:
                raise ServeError(f"{what} failed: {message or type(exc).__name__}") from exc
            log.warning("%s failed (%s); retrying in %.1f s", what, message or type(exc).__name__, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _is_connection_error(exc: Exception, status: str, message: str) -> bool:
    text = f"{type(exc).__name__} {status} {message}".lower()
    return any(s in text for s in ("unavailable", "connection", "refused", "timed out", "timeout", "reset by peer",
                                   "broken pipe", "deadline"))


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
        meta = read_version_metadata(folder)
        self.session = ort.InferenceSession(str(folder / ONNX_FILE), ort_session_options(),
                                            providers=["CPUExecutionProvider"])
        self._run_lock = threading.Lock()
        contract = meta.input
        self.info = ModelInfo(
            name=name, version=meta.version, input_name=contract.name, output_name=OUTPUT_NAME,
            channels=contract.channels, size=contract.size, max_batch_size=meta.max_batch_size,
            class_names=meta.class_names, window=contract.window,
            extra={"backend": "local", "metadata": meta.raw, **operating_point_of(meta.operating_point)},
        )

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(self.info, batch)
        parts = _chunks(batch, self.info.max_batch_size)
        with self._run_lock:
            outs = [self.session.run(None, {self.info.input_name: part})[0] for part in parts]
        return np.concatenate(outs) if outs else np.zeros((0, len(self.info.class_names)), np.float32)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


class TritonBackend:
    """A model served by Triton, over HTTP (``host:port`` of the HTTP endpoint) or gRPC."""

    def __init__(self, url: str, name: str, version: str | int | None = None, protocol: str = "http",
                 timeout: float = 30.0, retries: int = 3, backoff: float = 0.5, concurrency: int = 4) -> None:
        if protocol not in ("http", "grpc"):
            raise ServeError(f"protocol must be http or grpc, got {protocol!r}")
        self.protocol, self.url, self.timeout = protocol, url, timeout
        self.retries, self.backoff = retries, backoff
        if protocol == "http":
            import tritonclient.http as client_mod

            self.client = client_mod.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout,
                                                           concurrency=concurrency)
        else:
            import tritonclient.grpc as client_mod  # type: ignore[no-redef]

            self.client = client_mod.InferenceServerClient(url)
        self.mod = client_mod
        self.version = "" if version is None else str(version)
        live = with_retries(self.client.is_server_live, f"connecting to Triton at {url}", retries, backoff)
        if not live:
            raise ServeError(f"Triton at {url} is not live")
        ready = with_retries(lambda: self.client.is_model_ready(name, self.version), f"checking model {name}",
                             retries, backoff)
        if not ready:
            raise ServeError(f"model {name!r} (version {self.version or 'latest'}) is not ready on Triton at {url}")
        self.info = self._model_info(name)

    def _model_info(self, name: str) -> ModelInfo:
        if self.protocol == "http":
            config = self.client.get_model_config(name, self.version)
            params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
            inp, out = config["input"][0], config["output"][0]
            dims = [int(d) for d in inp["dims"]]
            max_batch = int(config.get("max_batch_size", 0))
            meta = self.client.get_model_metadata(name, self.version)
            versions = meta.get("versions") or [self.version]
            in_name, out_name = inp["name"], out["name"]
            num_classes = int(out["dims"][0])
        else:
            response = self.client.get_model_config(name, self.version)
            config = response.config
            params = {k: v.string_value for k, v in config.parameters.items()}
            dims = list(config.input[0].dims)
            max_batch = int(config.max_batch_size)
            versions = list(self.client.get_model_metadata(name, self.version).versions) or [self.version]
            in_name, out_name = config.input[0].name, config.output[0].name
            num_classes = int(config.output[0].dims[0])
        names = json.loads(params["class_names"]) if params.get("class_names") else None
        window = json.loads(params["window"]) if params.get("window") else None
        return ModelInfo(
            name=name, version=str(max(versions, key=lambda v: int(v) if str(v).isdigit() else -1)),
            input_name=in_name, output_name=out_name, channels=int(dims[0]), size=int(dims[1]),
            max_batch_size=max_batch or 1, class_names=names or [str(i) for i in range(num_classes)],
            window=tuple(window) if window else None,
            extra={"backend": f"triton-{self.protocol}", "parameters": params,
                   **operating_point_of({"threshold": params.get("threshold"),
                                         "positive_class": params.get("positive_class")})},
        )

    def _infer_one(self, part: np.ndarray) -> np.ndarray:
        inp = self.mod.InferInput(self.info.input_name, list(part.shape), "FP32")
        inp.set_data_from_numpy(part)
        out = self.mod.InferRequestedOutput(self.info.output_name)
        kwargs: dict[str, Any] = {"model_version": self.version, "outputs": [out]}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout
        result = with_retries(lambda: self.client.infer(self.info.name, [inp], **kwargs),
                              f"inference on {self.info.name}", self.retries, self.backoff)
        return result.as_numpy(self.info.output_name)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(self.info, batch)
        outs = [self._infer_one(part) for part in _chunks(batch, self.info.max_batch_size)]
        return np.concatenate(outs) if outs else np.zeros((0, len(self.info.class_names)), np.float32)

    def close(self) -> None:
        self.client.close()


def open_backend(backend: str, *, url: str = "127.0.0.1:8000", model: str, version: str | int | None = None,
                 model_repository: str | Path = "model_repository", **kwargs: Any) -> Backend:
    """``local`` (onnxruntime in-process), ``http`` or ``grpc`` (Triton)."""
    if backend == "local":
        return LocalBackend(model_repository, model, version)
    if backend in ("http", "grpc"):
        return TritonBackend(url, model, version, protocol=backend, **kwargs)
    raise ServeError(f"unknown backend {backend!r}; choose local, http or grpc")
