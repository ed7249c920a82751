"""Shared by the benchmark cases: the machine, timing statistics, peak FLOP/s, FLOP counts, models and output."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from serve.local_backend import physical_cores

SCHEMA = "medops.bench/1"
PACKAGES = ("torch", "torchvision", "onnxruntime", "onnxruntime-gpu", "lightning", "tritonclient", "nvidia-pytriton",
            "numpy", "tensorrt")


# -- the machine -----------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def gpu_name() -> str | None:
    """The first CUDA device's name, or None (also when torch is not importable)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_name(0))


def machine_info(threads: int) -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, memory, OS, package versions, GPU, load at the start."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "memory_gib": memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "gpu": gpu_name(),
        "load_average_at_start": load,
        "hostname": platform.node(),
    }


def machine_line(info: dict[str, Any]) -> str:
    """One line naming the machine, printed with every table (and checked by the tests)."""
    pkgs = info.get("packages") or {}
    parts = [f"{info['cpu']}, {info['physical_cores']} physical cores / {info['logical_cpus']} logical CPUs"]
    if info.get("memory_gib"):
        parts[0] += f", {info['memory_gib']:g} GiB"
    parts.append(f"{info['threads']} threads used")
    parts.append(f"GPU: {info.get('gpu') or 'none'}")
    parts.append(f"{info['os']}, Python {info['python']}")
    parts.append(", ".join(f"{k} {pkgs[k]}" for k in ("torch", "onnxruntime", "onnxruntime-gpu", "tritonclient")
                           if k in pkgs))
    if info.get("load_average_at_start") is not None:
        parts.append(f"load average at start {info['load_average_at_start'][0]:g}")
    return "machine: " + "; ".join(parts)


# -- statistics --------------------------------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def latency_percentiles(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99 in milliseconds of per-call times in seconds (linear interpolation, as numpy)."""
    p50, p95, p99 = (float(v) for v in np.percentile(np.asarray(seconds, dtype=np.float64) * 1e3, [50, 95, 99]))
    return {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99}


def combine_runs(runs: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Median over runs of images/s and of each latency percentile, with the per-run values kept.

    The median of per-run p50s is <= that of p95s <= that of p99s, since the order holds in every run.
    """
    out: dict[str, Any] = {"runs": len(runs)}
    for key in ("images_per_s", "p50_ms", "p95_ms", "p99_ms"):
        out[key] = median([r[key] for r in runs])
    out["images_per_s_runs"] = [round(r["images_per_s"], 3) for r in runs]
    out["calls"] = int(sum(r.get("calls", 0) for r in runs))
    return out


def time_calls(fn: Callable[[], object], batch: int, *, min_calls: int, min_seconds: float,
               max_calls: int = 10_000) -> dict[str, float]:
    """Call ``fn`` back to back (after one untimed call) until both ``min_calls`` and ``min_seconds`` are reached."""
    fn()
    latencies: list[float] = []
    start = time.perf_counter()
    while len(latencies) < min_calls or (time.perf_counter() - start < min_seconds and len(latencies) < max_calls):
        t = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    return {"images_per_s": batch * len(latencies) / total, "calls": len(latencies), **latency_percentiles(latencies)}


def ratio(a: float, b: float) -> float | None:
    return a / b if b and b > 0 and math.isfinite(a) and math.isfinite(b) else None


def median_ratio(pairs: Sequence[tuple[float, float]]) -> float | None:
    """Median over runs of the per-run ratio a/b (each pair measured in the same run)."""
    values = [r for a, b in pairs if (r := ratio(a, b)) is not None]
    return median(values) if values else None


# -- peak FLOP/s and FLOP counts -----------------------------------------------------------------------------------
def _onnx_matmul_session(n: int, threads: int) -> Any:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "matmul",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def measure_peak_flops(threads: int, size: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """The machine's measured float32 peak: a ``size``-square matmul through three BLAS libraries, interleaved.

    torch (MKL), numpy (OpenBLAS) and onnxruntime (MLAS) are each timed ``repeats`` times, one call of each per
    round; each library's figure is its median, and ``peak_flops`` is the best library's median (the
    libraries' kernels differ per CPU: MKL, for one, does not use AVX-512 on AMD processors).
    """
    import torch

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    a = rng.random((size, size), dtype=np.float32)
    b = rng.random((size, size), dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    session = _onnx_matmul_session(size, threads)
    impls: dict[str, Callable[[], object]] = {
        "torch": lambda: torch.mm(ta, tb),
        "numpy": lambda: a @ b,
        "onnxruntime": lambda: session.run(None, {"A": a, "B": b}),
    }
    times: dict[str, list[float]] = {k: [] for k in impls}
    for fn in impls.values():
        fn()
    for _ in range(repeats):
        for name, fn in impls.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    flops = 2.0 * size**3
    per_impl = {name: flops / median(ts) for name, ts in times.items()}
    best = max(per_impl, key=per_impl.__getitem__)
    return {"matmul_size": size, "repeats": repeats, "threads": threads, "per_library_flops": per_impl,
            "peak_flops": per_impl[best], "peak_library": best}


def count_flops(model: Any, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass on one image (multiply-add = 2 FLOPs), by ``torch.utils.flop_counter``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    return int(counter.get_total_flops())


# -- models --------------------------------------------------------------------------------------------------
def resnet(arch: str, channels: int, size: int, num_classes: int = 2) -> Any:
    """A freshly initialised project network (normalisation inside, stem adapted to the size); weights are random:
    they do not change the speed."""
    import torch

    from train.models import build_network

    torch.manual_seed(0)
    return build_network(arch, channels, num_classes, size, [0.5] * channels, [0.25] * channels).eval()


# -- output ------------------------------------------------------------------------------------------------------
def default_out_dir(root: str | Path = "logs/bench") -> Path:
    return Path(root) / datetime.now().strftime("%Y%m%d-%H%M%S")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    return path


def header(case: str, info: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The fields every case's JSON starts with."""
    return {"schema": SCHEMA, "case": case, "created": datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]]),
            "machine": info, "machine_line": machine_line(info), "config": config}


def target(name: str, value: float | None, threshold: float, *, higher_is_better: bool = True,
           unit: str = "x") -> dict[str, Any]:
    """One target of the issue, evaluated on a measured figure (None: not measured)."""
    met = None if value is None else (value >= threshold if higher_is_better else value < threshold)
    return {"name": name, "value": value, "target": threshold, "comparison": ">=" if higher_is_better else "<",
            "unit": unit, "met": met}
