"""Case 1, inference engines: PyTorch eager, onnxruntime in-process and Triton (HTTP, gRPC, gRPC + system shared
memory) on the project's ResNet-18 at several sizes, channel counts, batch sizes and client concurrencies.

Within each repetition every configuration is measured on every engine back to back (interleaved), so the
ratios (onnxruntime / eager, Triton / onnxruntime at the largest batch) compare figures taken minutes apart at
most, and each reported figure is the median over the repetitions. Each row also carries the model's FLOPs and
the fraction of the machine's peak FLOP/s (a float32 matmul, measured in the same run; see
:func:`bench.common.measure_peak_flops`).

Triton runs the project's own Python-backend model (``export/templates/model.py``: onnxruntime inside Triton)
with dynamic batching, started from the nvidia-pytriton bundled server. Each client thread has its own
connection (tritonclient's HTTP client is not thread-safe); requests carry binary tensors.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import medops.input_check as input_check
from bench import common
from medops.model_version import INPUT_CHECK_FILE, INPUT_NAME, METADATA_FILE, METADATA_SCHEMA, OUTPUT_NAME, write_json

IN_PROCESS = ("eager", "onnxruntime")
TRITON = ("triton-http", "triton-grpc", "triton-grpc-shm")
ENGINES = (*IN_PROCESS, *TRITON)
CLASSES = ["class_0", "class_1"]
TEMPLATE = Path(__file__).resolve().parent.parent / "export" / "templates" / "model.py"


@dataclass
class EnginesConfig:
    arch: str = "resnet18"
    channels: list[int] = field(default_factory=lambda: [1, 3])
    sizes: list[int] = field(default_factory=lambda: [28, 64, 224])
    batches: list[int] = field(default_factory=lambda: [1, 32])
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    engines: list[str] = field(default_factory=lambda: list(ENGINES))
    repeats: int = 3
    threads: int = 1
    min_seconds: float = 1.5  # per in-process measurement, and the work per Triton measurement
    min_calls: int = 3
    max_requests: int = 2000
    peak_matmul_size: int = 4096
    peak_repeats: int = 3
    max_batch_size: int = 64  # of the Triton model (dynamic batching forms batches up to this)
    preferred_batch_sizes: list[int] = field(default_factory=lambda: [8, 16, 32])
    max_queue_delay_us: int = 2000
    python_shm_bytes: int = 64 * 2**20  # Triton Python backend's default shared-memory region per model
    served: bool = True  # also the served-efficiency figures with Triton pinned to its own cores (bench/served.py)
    server_cpu_count: int = 1  # CPUs for the pinned server (the last ones); the clients get the others
    export: str | None = None  # an exported version folder (<repository>/<name>/<version>) measured by `served` too

    @classmethod
    def quick(cls, threads: int) -> EnginesConfig:
        return cls(channels=[1], sizes=[28], batches=[1, 4], concurrency=[1, 2], repeats=2, threads=threads,
                   min_seconds=0.2, min_calls=2, peak_matmul_size=512, peak_repeats=3, max_requests=200)

    @property
    def reference_batch(self) -> int:
        return max(self.batches)


@dataclass
class Model:
    name: str
    channels: int
    size: int
    net: Any  # export.onnx_export.ProbabilityModel: the exact graph that is exported
    onnx_path: Path
    flops_per_image: int


# -- models and repository -------------------------------------------------------------------------------------
def build_models(cfg: EnginesConfig, work: Path) -> dict[tuple[int, int], Model]:
    """Export one ONNX model per (channels, size) with the project's exporter into a Triton repository in ``work``."""
    from export.onnx_export import ProbabilityModel, export_onnx
    from medops.triton_config import build_model_config, render_model_config

    repo = work / "model_repository"
    models = {}
    for channels in cfg.channels:
        for size in cfg.sizes:
            name = f"{cfg.arch}_c{channels}_s{size}"
            net = common.resnet(cfg.arch, channels, size, len(CLASSES))
            version = repo / name / "1"
            version.mkdir(parents=True, exist_ok=True)
            onnx_path = export_onnx(net, version / "model.onnx", (channels, size, size), cfg.max_batch_size)
            shutil.copyfile(TEMPLATE, version / "model.py")
            shutil.copyfile(input_check.__file__, version / INPUT_CHECK_FILE)
            config = build_model_config(
                name, "python", channels=channels, image_size=size, num_classes=len(CLASSES),
                max_batch_size=cfg.max_batch_size, preferred_batch_sizes=cfg.preferred_batch_sizes,
                max_queue_delay_us=cfg.max_queue_delay_us, instance_kind="cpu", instance_count=1,
                parameters={"class_names": json.dumps(CLASSES), "ort_intra_op_threads": str(cfg.threads)},
            )
            (repo / name / "config.pbtxt").write_text(render_model_config(config))
            (repo / name / "labels.txt").write_text("\n".join(CLASSES) + "\n")
            meta = {"schema": METADATA_SCHEMA, "name": name, "class_names": CLASSES,
                    "max_batch_size": cfg.max_batch_size,
                    "input": {"name": INPUT_NAME, "channels": channels, "size": size, "window": None}}
            write_json(version / METADATA_FILE, meta)
            models[(channels, size)] = Model(name, channels, size, ProbabilityModel(net).eval(), onnx_path,
                                             common.count_flops(net, (channels, size, size)))
    return models


def start_triton(repo: Path, names: list[str], python_shm_bytes: int) -> Any:
    """The bundled Triton on free loopback ports with ``names`` loaded (the caller stops it)."""
    from serve.triton_server import TritonServer, free_port

    server = TritonServer(
        repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), model_control="explicit",
        load_models=names,
        # large batches of 224 px images are tens of MB: size the server<->stub region once instead of growing it
        extra_args=[f"--backend-config=python,shm-default-byte-size={python_shm_bytes}"],
    )
    server.start(timeout=300)
    return server


# -- Triton clients ------------------------------------------------------------------------------------------------
class TritonSender:
    """One client connection (one per thread) sending a fixed batch to one model; ``shm`` puts the input in a
    registered system shared-memory region instead of the request body (gRPC)."""

    def __init__(self, engine: str, server: Any, model: Model, batch: np.ndarray, tag: str) -> None:
        self.engine, self.model, self.batch = engine, model, batch
        self.shm_handle = None
        if engine == "triton-http":
            import tritonclient.http as mod

            self.client = mod.InferenceServerClient(server.http_url, concurrency=1, connection_timeout=600,
                                                    network_timeout=600)
        else:
            import tritonclient.grpc as mod  # type: ignore[no-redef]

            self.client = mod.InferenceServerClient(server.grpc_url)
        self.mod = mod
        if engine == "triton-grpc-shm":
            import tritonclient.utils.shared_memory as shm

            self.shm = shm
            self.region = f"medops_bench_{tag}"
            self.nbytes = batch.nbytes
            self.shm_handle = shm.create_shared_memory_region(self.region, f"/{self.region}", self.nbytes)
            self.client.register_system_shared_memory(self.region, f"/{self.region}", self.nbytes)

    def __call__(self) -> np.ndarray:
        mod, x = self.mod, self.batch
        inp = mod.InferInput(INPUT_NAME, list(x.shape), "FP32")
        if self.shm_handle is not None:
            self.shm.set_shared_memory_region(self.shm_handle, [x])  # the client writes each request's pixels
            inp.set_shared_memory(self.region, self.nbytes)
        elif self.engine == "triton-http":
            inp.set_data_from_numpy(x, binary_data=True)
        else:
            inp.set_data_from_numpy(x)
        if self.engine == "triton-http":
            out = mod.InferRequestedOutput(OUTPUT_NAME, binary_data=True)
        else:
            out = mod.InferRequestedOutput(OUTPUT_NAME)
        return self.client.infer(self.model.name, [inp], outputs=[out]).as_numpy(OUTPUT_NAME)

    def close(self) -> None:
        try:
            if self.shm_handle is not None:
                self.client.unregister_system_shared_memory(self.region)
        finally:
            if self.shm_handle is not None:
                self.shm.destroy_shared_memory_region(self.shm_handle)
                self.shm_handle = None
            self.client.close()


class ClientThreads:
    """Persistent client threads, each owning its connections: tritonclient's HTTP client (gevent) may only be
    used from the thread that created it, so a connection is created on, and only used by, its thread."""

    def __init__(self) -> None:
        self.threads: list[ThreadPoolExecutor] = []
        self.senders: dict[tuple[int, str, str, int, int, int], TritonSender] = {}

    def _thread(self, i: int) -> ThreadPoolExecutor:
        while len(self.threads) <= i:
            self.threads.append(ThreadPoolExecutor(1, thread_name_prefix=f"bench-client-{len(self.threads)}"))
        return self.threads[i]

    def ensure(self, count: int, engine: str, server: Any, model: Model, x: np.ndarray) -> list[TritonSender]:
        """Senders for ``engine``/``model``/batch on threads 0..count-1 (created and warmed up once)."""
        out = []
        for i in range(count):
            key = (i, engine, model.name, model.channels, model.size, len(x))
            if key not in self.senders:
                tag = f"{engine[7:].replace('-', '_')}_{model.name}_{len(x)}_{i}"

                def make(tag: str = tag) -> TritonSender:
                    sender = TritonSender(engine, server, model, x, tag)
                    sender()  # connect and warm the connection up
                    return sender

                self.senders[key] = self._thread(i).submit(make).result()
            out.append(self.senders[key])
        return out

    def call(self, i: int, sender: TritonSender) -> np.ndarray:
        return self._thread(i).submit(sender).result()

    def closed_loop(self, senders: list[TritonSender], n_requests: int, batch: int) -> dict[str, float]:
        """Thread i drives ``senders[i]``; all send requests back to back until ``n_requests`` are done in all."""
        lock = threading.Lock()
        remaining = [n_requests]
        gate = threading.Barrier(len(senders) + 1)

        def loop(send: TritonSender) -> list[float]:
            gate.wait()
            mine = []
            while True:
                with lock:
                    if remaining[0] <= 0:
                        return mine
                    remaining[0] -= 1
                t = time.perf_counter()
                send()
                mine.append(time.perf_counter() - t)

        futures = [self._thread(i).submit(loop, s) for i, s in enumerate(senders)]
        gate.wait()
        start = time.perf_counter()
        try:
            latencies = [t for f in futures for t in f.result()]
        except Exception as exc:
            raise RuntimeError(f"Triton request failed: {exc}") from exc
        wall = time.perf_counter() - start
        return {"images_per_s": batch * len(latencies) / wall, "calls": len(latencies),
                **common.latency_percentiles(latencies)}

    def close(self) -> None:
        for (i, *_), sender in self.senders.items():
            try:
                self._thread(i).submit(sender.close).result()
            except Exception:  # best effort: the server is stopped next anyway
                pass
        self.senders.clear()
        for t in self.threads:
            t.shutdown(wait=True)
        self.threads.clear()


# -- the case ------------------------------------------------------------------------------------------------------
def _inputs(cfg: EnginesConfig) -> dict[tuple[int, int, int], np.ndarray]:
    rng = np.random.default_rng(0)
    return {(c, s, b): rng.random((b, c, s, s), dtype=np.float32)
            for c in cfg.channels for s in cfg.sizes for b in cfg.batches}


def _shm_batches(cfg: EnginesConfig) -> list[int]:
    """Shared memory is measured for the largest request batch only (where request bodies are large)."""
    return [cfg.reference_batch]


def run(cfg: EnginesConfig, out_dir: Path, info: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """The engines case: in-process and shared-core Triton figures, then the pinned served-efficiency figures.

    Longer than 60 lines: one try/finally owns the Triton server, the client threads and the work folder, so that
    every exit path stops and removes them; splitting it would spread that ownership over several functions.
    """
    import onnxruntime as ort
    import torch

    from serve.local_backend import ort_session_options

    started = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    unknown = set(cfg.engines) - set(ENGINES)
    if unknown:
        raise ValueError(f"unknown engines {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    work = Path(tempfile.mkdtemp(prefix="medops-bench-engines-"))
    server = None
    clients = ClientThreads()
    try:
        log(f"exporting {len(cfg.channels) * len(cfg.sizes)} {cfg.arch} model(s) to ONNX ...")
        models = build_models(cfg, work)
        sessions = {key: ort.InferenceSession(str(m.onnx_path), ort_session_options(cfg.threads),
                                              providers=["CPUExecutionProvider"]) for key, m in models.items()}
        inputs = _inputs(cfg)
        triton_engines = [e for e in cfg.engines if e in TRITON]
        if triton_engines:
            log(f"starting Triton with {len(models)} model(s) ...")
            server = start_triton(work / "model_repository", [m.name for m in models.values()], cfg.python_shm_bytes)

        def measure_in_process(engine: str, model: Model, x: np.ndarray) -> dict[str, float]:
            if engine == "eager":
                xt = torch.from_numpy(x)

                def call() -> Any:
                    with torch.inference_mode():
                        return model.net(xt)
            else:
                session = sessions[(model.channels, model.size)]

                def call() -> Any:
                    return session.run(None, {INPUT_NAME: x})
            return common.time_calls(call, len(x), min_calls=cfg.min_calls, min_seconds=cfg.min_seconds)

        # correctness: every engine returns the eager probabilities (to float32 noise)
        agreement: dict[str, float] = {}
        for (c, s), model in models.items():
            x = inputs[(c, s, cfg.reference_batch)]
            with torch.inference_mode():
                ref = model.net(torch.from_numpy(x)).numpy()
            outs = {"onnxruntime": sessions[(c, s)].run(None, {INPUT_NAME: x})[0]}
            for engine in triton_engines:
                outs[engine] = clients.call(0, clients.ensure(1, engine, server, model, x)[0])
            for engine, y in outs.items():
                agreement[engine] = max(agreement.get(engine, 0.0), float(np.abs(y - ref).max()))

        per_rep: dict[tuple[str, int, int, int, int], list[dict[str, float]]] = {}
        peaks: list[dict[str, Any]] = []
        for rep in range(cfg.repeats):
            peak = common.measure_peak_flops(cfg.threads, cfg.peak_matmul_size, cfg.peak_repeats)
            peaks.append(peak)
            log(f"run {rep + 1}/{cfg.repeats}: peak {peak['peak_flops'] / 1e9:.1f} GFLOP/s ({peak['peak_library']})")
            for (c, s), model in models.items():
                ort_ips: dict[int, float] = {}
                for b in cfg.batches:
                    x = inputs[(c, s, b)]
                    for engine in (e for e in IN_PROCESS if e in cfg.engines):
                        result = measure_in_process(engine, model, x)
                        result["rep"] = rep
                        per_rep.setdefault((engine, c, s, b, 1), []).append(result)
                        if engine == "onnxruntime":
                            ort_ips[b] = result["images_per_s"]
                estimate = max(ort_ips.values(), default=0.0) or 50.0
                for b in cfg.batches:
                    for conc in cfg.concurrency:
                        work_requests = math.ceil(cfg.min_seconds * estimate / b)
                        n = min(cfg.max_requests, max(conc, work_requests))
                        n = math.ceil(n / conc) * conc
                        for engine in triton_engines:
                            if engine == "triton-grpc-shm" and b not in _shm_batches(cfg):
                                continue
                            pool = clients.ensure(conc, engine, server, model, inputs[(c, s, b)])
                            result = clients.closed_loop(pool, n, b)
                            result["rep"] = rep
                            per_rep.setdefault((engine, c, s, b, conc), []).append(result)
                log(f"  {model.name}: " + ", ".join(
                    f"{e} b{b} {per_rep[(e, c, s, b, 1)][-1]['images_per_s']:.1f}/s"
                    for b in cfg.batches for e in cfg.engines if (e, c, s, b, 1) in per_rep))
        rows, ratios = _rows(cfg, models, per_rep, peaks)
        served = None
        server_args = list(server.command[1:]) if server else None  # the shared-core server, before it stops
        if cfg.served:
            clients.close()
            if server is not None:
                server.stop()
                server = None
            served = _served(cfg, models, work, log)
        result = {
            **common.header("engines", info, asdict(cfg)),
            "peak": {"peak_flops": common.median([p["peak_flops"] for p in peaks]), "runs": peaks,
                     "method": f"float32 {cfg.peak_matmul_size}x{cfg.peak_matmul_size} matmul through torch, numpy "
                               "and onnxruntime, interleaved; the best library's median, one figure per run"},
            "models": [{"name": m.name, "channels": m.channels, "size": m.size, "flops_per_image": m.flops_per_image,
                        "onnx_bytes": m.onnx_path.stat().st_size} for m in models.values()],
            "max_abs_diff_vs_eager": agreement,
            "rows": rows,
            "ratios": ratios,
            "targets": _targets(cfg, rows, ratios) + _served_targets(served),
            "served": served,
            "triton": {"server_args": server_args,
                       "dynamic_batching": {"max_batch_size": cfg.max_batch_size,
                                            "preferred_batch_sizes": cfg.preferred_batch_sizes,
                                            "max_queue_delay_us": cfg.max_queue_delay_us}},
        }
    finally:
        clients.close()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = time.perf_counter() - started
    return result


def _served(cfg: EnginesConfig, models: dict[tuple[int, int], Model], work: Path,
            log: Callable[[str], None]) -> dict[str, Any]:
    """Served efficiency (``bench/served.py``) of the bench's models and, with ``cfg.export``, an exported version."""
    from bench import served

    repo = work / "model_repository"
    chosen = [served.ServedModel(m.name, f"{cfg.arch} {m.channels} ch {m.size} px", m.channels, m.size, m.onnx_path)
              for m in models.values()]
    if cfg.export:
        chosen.insert(0, served.export_model_copy(Path(cfg.export), repo))
    return served.run_served(chosen, repo, cfg, log)


def _served_targets(served: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Served ÷ in-process >= 0.90 with the server on its own cores, per model and request size."""
    if not served or served.get("pinned_skipped"):
        return []
    cpus = (f"server CPU {','.join(map(str, served['server_cpus']))}, clients "
            f"{','.join(map(str, served['client_cpus']))}")
    return [common.target(f"Triton served / in-process onnxruntime b{served['reference_batch']} ({cpus}), "
                          f"requests of {r['request_batch']}, {r.get('in_flight', served['concurrency'])} in flight, "
                          f"{r['model']}{_ceiling(r)}",
                          r["served_over_in_process"], 0.90)
            for r in served["rows"] if r["layout"] == "pinned"]


def _ceiling(row: dict[str, Any]) -> str:
    """'; at most 0.92 (the Python backend's floor)' where the floor was measured (bench/serving_cost.py)."""
    best = row.get("best_ratio")
    return "" if best is None else f"; at most {best:.2f} (the Python backend's floor)"


def _rows(cfg: EnginesConfig, models: dict[tuple[int, int], Model],
          per_rep: dict[tuple[str, int, int, int, int], list[dict[str, float]]], peaks: list[dict[str, Any]]
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows, ratios = [], []
    ref_b = cfg.reference_batch
    for (engine, c, s, b, conc), runs in per_rep.items():
        model = models[(c, s)]
        fractions = [r["images_per_s"] * model.flops_per_image / peaks[r["rep"]]["peak_flops"] for r in runs]
        row = {"engine": engine, "model": model.name, "channels": c, "size": s, "batch": b, "concurrency": conc,
               **common.combine_runs(runs), "flops_per_image": model.flops_per_image}
        row["achieved_flops"] = row["images_per_s"] * model.flops_per_image
        row["peak_flops"] = common.median([p["peak_flops"] for p in peaks])
        row["fraction_of_peak"] = common.median(fractions)
        reference = per_rep.get(("onnxruntime", c, s, ref_b, 1)) if engine in TRITON else (
            per_rep.get(("eager", c, s, b, 1)) if engine == "onnxruntime" else None)
        if reference is not None:
            by_rep = {r["rep"]: r["images_per_s"] for r in reference}
            row["ratio_to"] = f"onnxruntime batch {ref_b}" if engine in TRITON else f"eager batch {b}"
            row["ratio"] = common.median_ratio([(r["images_per_s"], by_rep[r["rep"]]) for r in runs
                                                if r["rep"] in by_rep])
        else:
            row["ratio_to"], row["ratio"] = None, None
        rows.append(row)
        if row["ratio"] is not None:
            ratios.append({"name": f"{engine} / {row['ratio_to']}", "engine": engine, "channels": c, "size": s,
                           "batch": b, "concurrency": conc, "ratio": row["ratio"]})
    return rows, ratios


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def _targets(cfg: EnginesConfig, rows: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for this case, per channel count; a target whose configuration was not measured has
    value None."""
    out = []
    b = 32
    for c in cfg.channels:
        for size, threshold in ((224, 1.8), (28, 2.0)):
            row = _find(rows, engine="onnxruntime", channels=c, size=size, batch=b)
            out.append(common.target(f"onnxruntime / eager, {size} px, {c} ch, batch {b}",
                                     row["ratio"] if row else None, threshold))
        for size, threshold in ((224, 0.85), (28, 0.70)):
            candidates = [r for r in rows if r["engine"] in TRITON and r["channels"] == c and r["size"] == size
                          and r["concurrency"] == 16 and r.get("ratio") is not None]
            for request_batch in (32, 1):
                best = max((r for r in candidates if r["batch"] == request_batch), key=lambda r: r["ratio"],
                           default=None)
                name = (f"Triton c16 (requests of {request_batch}) / onnxruntime batch {b}, {size} px, {c} ch"
                        + (f" [{best['engine']}]" if best else ""))
                out.append(common.target(name, best["ratio"] if best else None, threshold))
        row = _find(rows, engine="onnxruntime", channels=c, size=224, batch=b)
        out.append(common.target(f"onnxruntime fraction of peak FLOP/s, 224 px, {c} ch, batch {b}",
                                 row["fraction_of_peak"] if row else None, 0.85, unit="of peak"))
    return out
