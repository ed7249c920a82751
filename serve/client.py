"""The Triton client backend (HTTP or gRPC, with timeouts and retries) and :func:`open_backend`, which picks a
backend by name: ``http``/``grpc`` (Triton) or ``local`` (:class:`serve.local_backend.LocalBackend`).

Every backend implements :class:`serve.contract.Backend`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from medops.model_version import OUTPUT_NAME
from serve.contract import (
    Backend,
    ModelInfo,
    ServeError,
    ServerUnreachable,
    check_batch,
    chunks,
    joined,
    ood_threshold_of,
    operating_point_of,
)
from serve.local_backend import LocalBackend

log = logging.getLogger(__name__)
T = TypeVar("T")


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
                error = ServerUnreachable if retryable and _is_unreachable(exc, message) else ServeError
                raise error(f"{what} failed: {message or type(exc).__name__}") from exc
            log.warning("%s failed (%s); retrying in %.1f s", what, message or type(exc).__name__, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _is_connection_error(exc: Exception, status: str, message: str) -> bool:
    text = f"{type(exc).__name__} {status} {message}".lower()
    return any(s in text for s in ("unavailable", "connection", "refused", "timed out", "timeout", "reset by peer",
                                   "broken pipe", "deadline"))


_UNREACHABLE = ("refused", "unreachable", "unavailable", "reset by peer", "broken pipe", "failed to connect",
                "connection closed", "connection aborted", "remote end closed", "no route to host",
                "name or service not known", "connection reset")


def _is_unreachable(exc: BaseException, message: str) -> bool:
    """The server is not there (refused, unreachable, reset, closed, gRPC UNAVAILABLE), as opposed to a slow answer
    (a timeout) or a refusal of the request (4xx): an OSError connection error anywhere in the chain, or its words."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionError):
            return True
        seen = seen.__cause__ or seen.__context__
    status = str(getattr(exc, "status", lambda: "")() or "")
    text = f"{type(exc).__name__} {status} {message}".lower()
    return any(s in text for s in _UNREACHABLE)


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
            extra_outputs = [o["name"] for o in config["output"][1:]]
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
            extra_outputs = [o.name for o in config.output[1:]]
            num_classes = int(config.output[0].dims[0])
        names = json.loads(params["class_names"]) if params.get("class_names") else None
        window = json.loads(params["window"]) if params.get("window") else None
        modalities = json.loads(params["modalities"]) if params.get("modalities") else []
        return ModelInfo(
            name=name, version=str(max(versions, key=lambda v: int(v) if str(v).isdigit() else -1)),
            input_name=in_name, output_name=out_name, channels=int(dims[0]), size=int(dims[1]),
            max_batch_size=max_batch or 1, class_names=names or [str(i) for i in range(num_classes)],
            window=tuple(window) if window else None,
            extra={"backend": f"triton-{self.protocol}", "parameters": params,
                   **operating_point_of({"threshold": params.get("threshold"),
                                         "positive_class": params.get("positive_class"),
                                         "abnormal": {"classes": json.loads(params.get("abnormal_classes") or "[]"),
                                                      "value": params.get("abnormal_threshold")}}),
                   **ood_threshold_of({"threshold": params.get("ood_threshold")})},
            extra_outputs=extra_outputs, modalities=[str(m) for m in modalities],
        )

    def _infer_one(self, part: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
        inp = self.mod.InferInput(self.info.input_name, list(part.shape), "FP32")
        inp.set_data_from_numpy(part)
        outs = [self.mod.InferRequestedOutput(name) for name in names]
        kwargs: dict[str, Any] = {"model_version": self.version, "outputs": outs}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.timeout
        result = with_retries(lambda: self.client.infer(self.info.name, [inp], **kwargs),
                              f"inference on {self.info.name} at Triton {self.url}", self.retries, self.backoff)
        return {name: result.as_numpy(name) for name in names}

    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = check_batch(self.info, batch)
        names = [self.info.output_name, *self.info.extra_outputs]
        parts = [self._infer_one(part, names) for part in chunks(batch, self.info.max_batch_size)]
        result = joined(parts, names, len(self.info.class_names))
        result[OUTPUT_NAME] = result.pop(self.info.output_name, result.get(OUTPUT_NAME))
        return result

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(self.info, batch)
        parts = [self._infer_one(part, [self.info.output_name]) for part in chunks(batch, self.info.max_batch_size)]
        return joined(parts, [self.info.output_name], len(self.info.class_names)).get(
            self.info.output_name, np.zeros((0, len(self.info.class_names)), np.float32))

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
