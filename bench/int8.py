"""INT8 against FP32 in onnxruntime: images/s at batch 32 of the same graph before and after static quantisation.

Two kinds of model:

* the default export, when ``model_repository/<model>`` holds both an FP32 version and an INT8 one (``python -m
  export ... quantize=int8``; the newest of each, or ``--export`` FP32 and ``--int8-export`` folders): exactly the
  files Triton and ``serve --backend local`` run, the INT8 one having passed export's clinical gate;
* the bench's ResNet-18 (random weights; 1 channel by default, at 28 and 224 px), exported like ``bench engines``
  and quantised with export's own functions (``export/quantize.py``: QDQ, per-channel weights, uint8 activations,
  MinMax on ``calibration_images`` random images, the head kept in float). Random weights make its probabilities
  meaningless; they do not change the speed.

Each run times FP32 and INT8 back to back with the same session settings as serving (``ort_session_options``:
graph optimisation ALL, ``threads`` intra-op threads); a ratio is the median over runs of the per-run ratios.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from medops.model_version import INPUT_NAME

GOAL = 2.0


@dataclass
class Int8Config:
    threads: int = 1
    channels: list[int] = field(default_factory=lambda: [1])
    sizes: list[int] = field(default_factory=lambda: [28, 224])
    batches: list[int] = field(default_factory=lambda: [32])
    repeats: int = 3
    min_seconds: float = 1.5
    min_calls: int = 3
    calibration_images: int = 16
    repository: str = "model_repository"
    model: str = "breastmnist"
    export: str | None = None  # FP32 version folder of the default model
    int8_export: str | None = None  # INT8 version folder

    @classmethod
    def quick(cls, threads: int) -> Int8Config:
        return cls(threads=threads, sizes=[28], batches=[4], repeats=2, min_seconds=0.2, min_calls=2,
                   calibration_images=4)


def find_exports(cfg: Int8Config) -> tuple[Path | None, Path | None]:
    """The default model's FP32 and INT8 version folders (given, else the newest of each precision)."""
    from bench.served import newest_version

    fp32 = Path(cfg.export) if cfg.export else newest_version(cfg.repository, cfg.model, "fp32")
    int8 = Path(cfg.int8_export) if cfg.int8_export else newest_version(cfg.repository, cfg.model, "int8")
    return fp32, int8


def bench_pair(cfg: Int8Config, channels: int, size: int, work: Path) -> tuple[Path, Path]:
    """The bench's ResNet-18 exported to ONNX and quantised with export's functions (head in float)."""
    from export.onnx_export import export_onnx
    from export.quantize import graph_parts, preprocess, quantize_onnx

    fp32 = export_onnx(common.resnet("resnet18", channels, size), work / f"fp32_c{channels}_s{size}.onnx",
                       (channels, size, size), 64)
    prepared = work / f"prepared_c{channels}_s{size}.onnx"
    parts = graph_parts(preprocess(fp32, prepared))
    images = np.random.default_rng(1).random((cfg.calibration_images, channels, size, size), dtype=np.float32)
    int8 = quantize_onnx(prepared, work / f"int8_c{channels}_s{size}.onnx", images, "minmax", ["head"], parts)
    return fp32, int8


def run(cfg: Int8Config, out_dir: Path, info: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    from bench.served import ort_session

    work = Path(tempfile.mkdtemp(prefix="medops-bench-int8-"))
    pairs: list[dict[str, Any]] = []
    try:
        fp32_dir, int8_dir = find_exports(cfg)
        if fp32_dir is not None and int8_dir is not None:
            meta = json.loads((int8_dir / "metadata.json").read_text())
            c, s = int(meta["input"]["channels"]), int(meta["input"]["size"])
            pairs.append({"model": f"export {cfg.model} (v{fp32_dir.name} FP32, v{int8_dir.name} INT8)",
                          "channels": c, "size": s, "fp32": fp32_dir / "model.onnx", "int8": int8_dir / "model.onnx",
                          "gate": (meta.get("precision") or {}).get("gate")})
        else:
            log(f"no FP32 + INT8 pair of {cfg.model!r} in {cfg.repository} (python -m export ... quantize=int8): "
                "only the bench's ResNet-18 is measured")
        for c in cfg.channels:
            for s in cfg.sizes:
                fp32, int8 = bench_pair(cfg, c, s, work)
                pairs.append({"model": f"resnet18 {c} ch {s} px (random weights)", "channels": c, "size": s,
                              "fp32": fp32, "int8": int8, "gate": None})
        rows = _measure(cfg, pairs, ort_session, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    targets = [common.target(f"INT8 / FP32 onnxruntime images/s, batch {r['batch']}, {r['model']}",
                             r["int8_over_fp32"], GOAL) for r in rows if r["batch"] == 32]
    return {**common.header("int8", info, asdict(cfg)), "rows": rows, "targets": targets,
            "exports": {"fp32": str(fp32_dir) if fp32_dir else None, "int8": str(int8_dir) if int8_dir else None}}


def _measure(cfg: Int8Config, pairs: list[dict[str, Any]], session_of: Callable[[Path, int], Any],
             log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Per pair and batch: FP32 and INT8 images/s (median of runs), their ratio, and the probabilities' distance."""
    rng = np.random.default_rng(0)
    rows = []
    for pair in pairs:
        sessions = {k: session_of(pair[k], cfg.threads) for k in ("fp32", "int8")}
        for b in cfg.batches:
            x = rng.random((b, pair["channels"], pair["size"], pair["size"]), dtype=np.float32)
            outs = {k: s.run(None, {INPUT_NAME: x})[0] for k, s in sessions.items()}
            runs: dict[str, list[dict[str, float]]] = {"fp32": [], "int8": []}
            for _ in range(cfg.repeats):
                for k, s in sessions.items():
                    runs[k].append(common.time_calls(lambda s=s, x=x: s.run(None, {INPUT_NAME: x}), b,
                                                     min_calls=cfg.min_calls, min_seconds=cfg.min_seconds))
            row = {"model": pair["model"], "channels": pair["channels"], "size": pair["size"], "batch": b,
                   "fp32": common.combine_runs(runs["fp32"]), "int8": common.combine_runs(runs["int8"]),
                   "int8_over_fp32": common.median_ratio([(a["images_per_s"], f["images_per_s"])
                                                         for a, f in zip(runs["int8"], runs["fp32"], strict=True)]),
                   "max_abs_prob_diff": float(np.abs(outs["int8"] - outs["fp32"]).max()),
                   "int8_bytes": Path(pair["int8"]).stat().st_size, "fp32_bytes": Path(pair["fp32"]).stat().st_size,
                   "gate": pair["gate"]}
            rows.append(row)
            log(f"{pair['model']} batch {b}: FP32 {row['fp32']['images_per_s']:.0f}/s, INT8 "
                f"{row['int8']['images_per_s']:.0f}/s ({row['int8_over_fp32']:.2f}x)")
    return rows
