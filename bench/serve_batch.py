"""Case 2, batch inference pipeline: ``serve batch`` over a folder of PNG files and one of DICOM files, end to end
(reading, decoding, preprocessing, requests, the CSV; not the folder listing or process start-up), against the
model-only throughput of the same backend.

The files are synthetic, written for the run from BreastMNIST images (no patient data): 8-bit greyscale PNGs and
16-bit MONOCHROME2 DICOM files (12 bits stored, no window in the header: medops applies min-max windowing), at
the model's input size. The end-to-end figure is :func:`serve.batch.run_batch`, the function behind the
``python -m serve batch`` command, with the CLI's defaults for workers, requests in flight and batch size. Model
only sends the same images, already decoded and stacked, through the same backend with the same batch size and
requests in flight. Decode is timed separately: every file through :func:`serve.inputs.load_item` on one thread.

* ``end_to_end_over_model_only``: median over runs of the per-run ratio of images/s;
* ``decode_share``: decode time / (decode time + model-only time), the share of the pipeline's work that is
  reading and preprocessing (0 would mean free decoding; the pipeline overlaps it with inference, but on a CPU
  backend both need the same cores).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from bench.engines import EnginesConfig, build_models, start_triton

DATA = Path(__file__).resolve().parent.parent / "data" / "breastmnist.npz"
FORMATS = ("png", "dicom")
BACKENDS = ("local", "grpc")


@dataclass
class PipelineConfig:
    arch: str = "resnet18"
    sizes: list[int] = field(default_factory=lambda: [28, 224])
    channels: int = 1
    images: int = 512
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    backends: list[str] = field(default_factory=lambda: list(BACKENDS))
    batch_size: int = 16  # the `serve batch` defaults
    workers: int = 2
    in_flight: int = 4
    repeats: int = 3
    threads: int = 1
    data: str = str(DATA)

    @classmethod
    def quick(cls, threads: int) -> PipelineConfig:
        return cls(sizes=[28], images=32, repeats=1, threads=threads)


# -- synthetic input files -------------------------------------------------------------------------------------
def source_images(path: str, n: int, size: int) -> np.ndarray:
    """``n`` BreastMNIST images (all splits, cycled), resized to ``size`` (uint8, N x size x size)."""
    from PIL import Image

    with np.load(path) as data:
        pool = np.concatenate([data[f"{s}_images"] for s in ("train", "val", "test")])
    images = pool[np.arange(n) % len(pool)]
    if images.shape[1] != size:
        images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR))
                           for im in images])
    return images


def write_png(folder: Path, images: np.ndarray) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"img_{i:05d}.png")
    return folder


def write_dicom(folder: Path, images: np.ndarray) -> Path:
    """Synthetic 16-bit secondary-capture DICOM files (12 bits stored, explicit VR little endian, no patient data)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality = "OT"
        ds.PatientID = "SYNTHETIC"
        ds.Rows, ds.Columns = im.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = (im.astype(np.uint16) * 16).tobytes()
        ds.save_as(folder / f"img_{i:05d}.dcm", enforce_file_format=True)
    return folder


# -- the case ------------------------------------------------------------------------------------------------------
def _model_only(backend: Any, arrays: list[np.ndarray], batch_size: int, in_flight: int) -> float:
    """images/s of the backend alone: pre-decoded, pre-stacked batches, ``in_flight`` requests at a time."""
    batches = [np.stack(arrays[i : i + batch_size]) for i in range(0, len(arrays), batch_size)]
    with ThreadPoolExecutor(in_flight) as pool:
        backend.infer(batches[0])  # warm
        t = time.perf_counter()
        done = sum(len(p) for p in pool.map(backend.infer, batches))
        seconds = time.perf_counter() - t
    return done / seconds


def run(cfg: PipelineConfig, out_dir: Path, info: dict[str, Any],
        log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    from serve.batch import run_batch
    from serve.client import TritonBackend
    from serve.inputs import iter_inputs, load_item
    from serve.local_backend import LocalBackend

    started = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    bad = (set(cfg.formats) - set(FORMATS)) | (set(cfg.backends) - set(BACKENDS))
    if bad:
        raise ValueError(f"unknown formats/backends {sorted(bad)}; formats {FORMATS}, backends {BACKENDS}")
    work = Path(tempfile.mkdtemp(prefix="medops-bench-pipeline-"))
    server = None
    backends: dict[tuple[str, int], Any] = {}
    try:
        ecfg = EnginesConfig(arch=cfg.arch, channels=[cfg.channels], sizes=cfg.sizes, threads=cfg.threads)
        log(f"exporting {len(cfg.sizes)} model(s) and writing {cfg.images} PNG and DICOM files per size ...")
        models = build_models(ecfg, work)
        repo = work / "model_repository"
        folders: dict[tuple[str, int], Path] = {}
        for size in cfg.sizes:
            images = source_images(cfg.data, cfg.images, size)
            if "png" in cfg.formats:
                folders[("png", size)] = write_png(work / f"png_{size}", images)
            if "dicom" in cfg.formats:
                folders[("dicom", size)] = write_dicom(work / f"dicom_{size}", images)
        if "grpc" in cfg.backends:
            server = start_triton(repo, [m.name for m in models.values()], ecfg.python_shm_bytes)
        for size in cfg.sizes:
            name = models[(cfg.channels, size)].name
            for kind in cfg.backends:
                backends[(kind, size)] = (LocalBackend(repo, name) if kind == "local" else
                                          TritonBackend(server.grpc_url, name, protocol="grpc", timeout=600))

        items = {key: iter_inputs(folder)[0] for key, folder in folders.items()}
        arrays = {key: [load_item(it, backends[(cfg.backends[0], key[1])].info) for it in its]
                  for key, its in items.items()}
        runs: dict[tuple[str, str, int], list[dict[str, float]]] = {}
        for rep in range(cfg.repeats):
            for size in cfg.sizes:
                # decode alone, one thread (the same work the pipeline's readers do)
                decode = {}
                for fmt in cfg.formats:
                    its = items[(fmt, size)]
                    info0 = backends[(cfg.backends[0], size)].info
                    t = time.perf_counter()
                    for it in its:
                        load_item(it, info0)
                    decode[fmt] = (time.perf_counter() - t) / len(its)
                for kind in cfg.backends:
                    backend = backends[(kind, size)]
                    for fmt in cfg.formats:
                        model_ips = _model_only(backend, arrays[(fmt, size)], cfg.batch_size, cfg.in_flight)
                        csv = work / f"pred_{kind}_{fmt}_{size}_{rep}.csv"
                        summary = run_batch(items[(fmt, size)], backend, csv, workers=cfg.workers,
                                            in_flight=cfg.in_flight, batch_size=cfg.batch_size, resume=False,
                                            progress=False)
                        if summary.errors:
                            raise RuntimeError(f"serve batch failed on {summary.errors} {fmt} inputs")
                        model_s = 1.0 / model_ips
                        runs.setdefault((kind, fmt, size), []).append({
                            "end_to_end_images_per_s": summary.images_per_s, "model_only_images_per_s": model_ips,
                            "ratio": summary.images_per_s / model_ips, "decode_s_per_image": decode[fmt],
                            "decode_share": decode[fmt] / (decode[fmt] + model_s),
                            "p50_ms": summary.latency_ms["p50"], "p95_ms": summary.latency_ms["p95"],
                            "p99_ms": summary.latency_ms["p99"]})
                        r = runs[(kind, fmt, size)][-1]
                        log(f"run {rep + 1}/{cfg.repeats} {kind} {fmt} {size}px: end to end "
                            f"{r['end_to_end_images_per_s']:.1f}/s, model only {model_ips:.1f}/s "
                            f"({r['ratio']:.2f}), decode {1e3 * decode[fmt]:.2f} ms/image")
        rows = []
        for (kind, fmt, size), values in runs.items():
            med = {k: common.median([v[k] for v in values]) for k in values[0]}
            rows.append({"backend": kind, "format": fmt, "size": size, "channels": cfg.channels, "runs": len(values),
                         "images": cfg.images,
                         "end_to_end_images_per_s": med["end_to_end_images_per_s"],
                         "model_only_images_per_s": med["model_only_images_per_s"],
                         "end_to_end_over_model_only": med["ratio"],
                         "decode_ms_per_image": 1e3 * med["decode_s_per_image"],
                         "decode_share": med["decode_share"],
                         "p50_ms": med["p50_ms"], "p95_ms": med["p95_ms"], "p99_ms": med["p99_ms"],
                         "end_to_end_images_per_s_runs": [v["end_to_end_images_per_s"] for v in values],
                         "model_only_images_per_s_runs": [v["model_only_images_per_s"] for v in values]})
        result = {
            **common.header("pipeline", info, asdict(cfg)),
            "rows": rows,
            "targets": [common.target(f"serve batch end to end / model only, {r['backend']}, {r['format']}, "
                                      f"{r['size']} px", r["end_to_end_over_model_only"], 0.8) for r in rows],
        }
    finally:
        for backend in backends.values():
            backend.close()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = time.perf_counter() - started
    return result


__all__ = ["PipelineConfig", "run", "source_images", "write_dicom", "write_png"]
