"""Case 4, GPU (when one is present): training images/s of ResNet-18/50 at 224 px in bf16 with channels_last, with
and without ``torch.compile``; whether a real DataLoader keeps the GPU busy; inference through PyTorch, the
onnxruntime CUDA / TensorRT execution providers and TensorRT engines when those are installed.

Without a CUDA GPU the case writes its JSON with a ``skipped`` reason and says so plainly. Each stage saves the
JSON as it finishes (``partial: true`` until the end), so a run cut short still leaves its figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from medops.model_version import INPUT_NAME

DEVICE = "cuda"  # the tests' dry run of this code on a CPU sets it to "cpu"


@dataclass
class GpuConfig:
    archs: list[str] = field(default_factory=lambda: ["resnet18", "resnet50"])
    size: int = 224
    num_classes: int = 2
    batch_size: int = 256
    compile: list[bool] = field(default_factory=lambda: [False, True])
    warmup_steps: int = 5
    steps: int = 20
    repeats: int = 3
    loader_images: int = 4096
    loader_workers: int = 8
    loader_steps: int = 30
    inference_batch: int = 256
    inference_steps: int = 20
    peak_matmul_size: int = 8192
    threads: int = 1

    @classmethod
    def quick(cls, threads: int) -> GpuConfig:
        return cls(archs=["resnet18"], size=64, batch_size=16, compile=[False], warmup_steps=1, steps=3, repeats=1,
                   loader_images=64, loader_workers=2, loader_steps=3, inference_batch=16, inference_steps=3,
                   peak_matmul_size=1024, threads=threads)


def skip_reason() -> str | None:
    """Why the GPU case cannot run here, or None when it can."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        built = torch.version.cuda
        return ("no CUDA GPU: torch.cuda.is_available() is False "
                f"(this torch {'was built with CUDA ' + built if built else 'is a CPU-only build'})")
    return None


def run(cfg: GpuConfig, out_dir: Path, info: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    result: dict[str, Any] = {**common.header("gpu", info, asdict(cfg))}
    reason = skip_reason()
    if reason is not None:
        log(f"GPU case skipped: {reason}")
        result.update(skipped=reason, training=[], dataloader=[], inference=[], targets=[
            common.target("ResNet-50 224 px bf16 training images/s on one GPU", None, 3000.0, unit="images/s")])
        return result
    started = time.perf_counter()
    path = out_dir / "gpu.json"
    result.update(skipped=None, partial=True, training=[], dataloader=[], inference=[])
    _gpu_run(cfg, result, path, log)
    result["partial"] = False
    result["targets"] = _targets(result)
    result["seconds"] = time.perf_counter() - started
    return result


def dry_run(cfg: GpuConfig, out_dir: Path, info: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """The GPU code path on the CPU (tiny sizes, for tests on machines without a GPU): no figure means anything."""
    global DEVICE
    previous, DEVICE = DEVICE, "cpu"
    try:
        result: dict[str, Any] = {**common.header("gpu", info, asdict(cfg)), "skipped": None, "partial": True,
                                  "training": [], "dataloader": [], "inference": []}
        _gpu_run(cfg, result, out_dir / "gpu-dry-run.json", log)
        result["partial"] = False
        result["targets"] = _targets(result)
        return result
    finally:
        DEVICE = previous


# -- the GPU measurements (run only when CUDA is available) -------------------------------------------------------
def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _sync_time(fn: Callable[[], object], steps: int) -> float:
    _sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync()
    return time.perf_counter() - t


class _Span:
    """Device time of a span of queued work: CUDA events on a GPU, wall time (synchronous) on a CPU."""

    def __init__(self) -> None:
        import torch

        self.events = ((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                       if DEVICE == "cuda" else None)
        self.t0 = self.t1 = 0.0

    def start(self) -> None:
        if self.events:
            self.events[0].record()
        else:
            self.t0 = time.perf_counter()

    def end(self) -> None:
        if self.events:
            self.events[1].record()
        else:
            self.t1 = time.perf_counter()

    def seconds(self) -> float:
        return self.events[0].elapsed_time(self.events[1]) / 1e3 if self.events else self.t1 - self.t0


def _bf16_peak(n: int, repeats: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    return 2.0 * n**3 * repeats / _sync_time(lambda: a @ b, repeats)


def _train_step(arch: str, cfg: GpuConfig, compiled: bool) -> tuple[Callable[..., Any], Any, int]:
    import torch
    import torch.nn.functional as F

    net = common.resnet(arch, 3, cfg.size, cfg.num_classes).train().to(DEVICE, memory_format=torch.channels_last)
    flops = common.count_flops(common.resnet(arch, 3, cfg.size, cfg.num_classes), (3, cfg.size, cfg.size))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
    model = torch.compile(net) if compiled else net

    def step(x: Any, y: Any) -> Any:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step, net, flops


def _gpu_run(cfg: GpuConfig, result: dict[str, Any], path: Path, log: Callable[[str], None]) -> None:
    import torch

    if DEVICE != "cuda":
        result["dry_run_device"] = DEVICE
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    result["gpu"] = {"name": torch.cuda.get_device_name(0) if DEVICE == "cuda" else f"dry run on {DEVICE}",
                     "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version(), "torch": torch.__version__}
    peak = _bf16_peak(cfg.peak_matmul_size)
    result["peak_bf16_flops"] = peak
    log(f"GPU {result['gpu']['name']}: bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
    common.write_json(path, result)

    # training on device-resident synthetic batches: the model's own speed; one architecture at a time, so a run
    # cut short keeps the architectures done
    x = torch.rand(cfg.batch_size, 3, cfg.size, cfg.size, device=DEVICE).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=DEVICE)
    fastest: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {}
    for arch in cfg.archs:
        steps: dict[bool, tuple[Callable[..., Any], int]] = {}
        for compiled in cfg.compile:
            step, _, flops = _train_step(arch, cfg, compiled)
            t = time.perf_counter()
            _sync_time(lambda step=step: step(x, y), cfg.warmup_steps)  # compiles on the first call
            log(f"{arch} {'compiled' if compiled else 'eager'}: warm-up {time.perf_counter() - t:.1f} s")
            steps[compiled] = (step, flops)
        runs: dict[bool, list[float]] = {k: [] for k in steps}
        for _ in range(cfg.repeats):
            for compiled, (step, _) in steps.items():
                seconds = _sync_time(lambda step=step: step(x, y), cfg.steps)
                runs[compiled].append(cfg.batch_size * cfg.steps / seconds)
        rows = {}
        for compiled, values in runs.items():
            ips = common.median(values)
            flops = steps[compiled][1]
            rows[compiled] = {"arch": arch, "size": cfg.size, "batch": cfg.batch_size, "precision": "bf16-mixed",
                              "channels_last": True, "compiled": compiled, "images_per_s": ips,
                              "images_per_s_runs": values, "flops_per_image_forward": flops,
                              # forward + backward ~ 3x the forward FLOPs
                              "fraction_of_bf16_peak": 3 * flops * ips / peak}
            log(f"train {arch} {'compiled' if compiled else 'eager'}: {ips:.0f} images/s")
        if True in rows and False in rows:
            rows[True]["ratio_to_eager"] = common.median_ratio(list(zip(runs[True], runs[False], strict=True)))
        result["training"].extend(rows.values())
        best = max(rows, key=lambda k: rows[k]["images_per_s"])
        fastest[arch] = (steps[best][0], rows[best])
        common.write_json(path, result)

    # a real DataLoader (uint8 images in host memory, worker processes, pinned memory) feeding the fastest step
    for arch in cfg.archs:
        step, best = fastest[arch]
        result["dataloader"].append(_loader_run(cfg, arch, best, step))
        log(f"data loader + {arch}: {result['dataloader'][-1]['images_per_s']:.0f} images/s, GPU busy "
            f"{result['dataloader'][-1]['gpu_busy_share']:.0%}")
        common.write_json(path, result)
    del fastest, steps
    if DEVICE == "cuda":
        torch.cuda.empty_cache()

    result["inference"] = _inference(cfg, log)
    common.write_json(path, result)


def _loader_run(cfg: GpuConfig, arch: str, best: dict[str, Any], step: Callable[..., Any]) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    n = max(cfg.loader_images, cfg.batch_size)
    images = torch.randint(0, 256, (n, 3, cfg.size, cfg.size), dtype=torch.uint8)
    labels = torch.randint(0, cfg.num_classes, (n,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        num_workers=cfg.loader_workers, pin_memory=DEVICE == "cuda",
                        persistent_workers=cfg.loader_workers > 0,
                        prefetch_factor=4 if cfg.loader_workers > 0 else None)

    def batches() -> Any:
        while True:
            yield from loader

    it = batches()
    for _ in range(2):  # workers up, first batches in flight
        xb, yb = next(it)
        step(xb.to(DEVICE, non_blocking=True).contiguous(memory_format=torch.channels_last).float().div_(255),
             yb.to(DEVICE, non_blocking=True))
    spans = []
    _sync()
    t = time.perf_counter()
    for _ in range(cfg.loader_steps):
        xb, yb = next(it)
        xb = xb.to(DEVICE, non_blocking=True).contiguous(memory_format=torch.channels_last).float().div_(255)
        span = _Span()
        span.start()
        step(xb, yb.to(DEVICE, non_blocking=True))
        span.end()
        spans.append(span)
    _sync()
    wall = time.perf_counter() - t
    busy = sum(span.seconds() for span in spans)
    return {"arch": arch, "compiled": best["compiled"], "batch": cfg.batch_size, "workers": cfg.loader_workers,
            "images_per_s": cfg.batch_size * cfg.loader_steps / wall, "gpu_busy_share": min(1.0, busy / wall),
            "synthetic_images_per_s": best["images_per_s"]}


def _inference(cfg: GpuConfig, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """ResNet-50 (last arch) inference: PyTorch bf16, onnxruntime CUDA / TensorRT providers, a TensorRT engine."""
    import tempfile

    import onnxruntime as ort
    import torch

    from export.onnx_export import ProbabilityModel, export_onnx
    from export.tensorrt import build_engine, tensorrt_runner, tensorrt_unavailable_reason

    arch = cfg.archs[-1]
    shape = (3, cfg.size, cfg.size)
    b = cfg.inference_batch
    rows: list[dict[str, Any]] = []
    net = common.resnet(arch, 3, cfg.size, cfg.num_classes)
    x_np = np.random.default_rng(0).random((b, *shape), dtype=np.float32)

    def timed(engine: str, fn: Callable[[], object], **extra: Any) -> None:
        for _ in range(3):
            fn()
        values = [b * cfg.inference_steps / _sync_time(fn, cfg.inference_steps) for _ in range(cfg.repeats)]
        rows.append({"engine": engine, "arch": arch, "size": cfg.size, "batch": b,
                     "images_per_s": common.median(values), "images_per_s_runs": values, **extra})
        log(f"inference {engine}: {rows[-1]['images_per_s']:.0f} images/s")

    model = ProbabilityModel(net).eval().to(DEVICE, memory_format=torch.channels_last)
    x_gpu = torch.from_numpy(x_np).to(DEVICE).contiguous(memory_format=torch.channels_last)

    def torch_bf16() -> Any:
        with torch.inference_mode(), torch.autocast(DEVICE, dtype=torch.bfloat16):
            return model(x_gpu)

    timed("torch-bf16 (GPU-resident input)", torch_bf16)
    with tempfile.TemporaryDirectory(prefix="medops-bench-gpu-") as tmp:
        onnx_path = export_onnx(net, Path(tmp) / "model.onnx", shape, max(64, b))
        available = ort.get_available_providers()
        for provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
            if provider not in available:
                rows.append({"engine": f"onnxruntime {provider}", "skipped": f"not in this onnxruntime's providers "
                             f"{available} (install onnxruntime-gpu)"})
                log(f"inference onnxruntime {provider}: skipped (not available)")
                continue
            session = ort.InferenceSession(str(onnx_path), providers=[provider, "CPUExecutionProvider"])
            timed(f"onnxruntime {provider} (host input)", lambda s=session: s.run(None, {INPUT_NAME: x_np}))
        reason = tensorrt_unavailable_reason() if DEVICE == "cuda" else "dry run without a GPU"
        if reason:
            rows.append({"engine": "TensorRT engine FP16", "skipped": reason})
            log(f"inference TensorRT engine: skipped ({reason})")
        else:
            plan = build_engine(onnx_path, Path(tmp) / "model.plan", shape, max(64, b), fp16=True)
            runner = tensorrt_runner(plan)
            timed("TensorRT engine FP16 (host input)", lambda: runner(x_np))
    return rows


def _targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [r for r in result["training"] if r["arch"] == "resnet50" and r["size"] == 224]
    best = max(rows, key=lambda r: r["images_per_s"], default=None)
    name = "ResNet-50 224 px bf16 training images/s on one GPU" + (
        f" [{'compiled' if best['compiled'] else 'eager'}]" if best else "")
    return [common.target(name, best["images_per_s"] if best else None, 3000.0, unit="images/s")]
