"""What is exported: a training run (its run record and best checkpoint) or a checkpoint file."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medops import to_unit_range
from medops.run_record import SCHEMA, RunRecordError, read_record, record_path
from medops.run_record import latest_run as latest
from train.models import for_export
from train.module import ClassificationModule


class ExportError(RuntimeError):
    """An export that cannot go ahead; the message says why. Nothing has been written."""


@dataclass
class ExportSource:
    """A loaded model with its lineage."""

    module: ClassificationModule
    checkpoint: Path
    record: dict[str, Any] = field(default_factory=dict)
    datamodules: dict[str | None, Any] = field(default_factory=dict, repr=False)  # prepared, by data path

    @property
    def hparams(self) -> dict[str, Any]:
        return dict(self.module.hparams)

    @property
    def class_names(self) -> list[str]:
        names = self.hparams.get("class_names")
        return list(names) if names else [str(i) for i in range(self.hparams["num_classes"])]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        h = self.hparams
        return int(h["in_channels"]), int(h["image_size"]), int(h["image_size"])


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _read(run: str | Path) -> dict[str, Any]:
    """The run record of a run folder, its error as an :class:`ExportError`."""
    try:
        return read_record(run).raw
    except RunRecordError as exc:
        raise ExportError(str(exc)) from None


def _run_record_for(checkpoint: Path) -> dict[str, Any]:
    """The run record of the run folder a checkpoint sits in (``<run>/checkpoints/x.ckpt``), if any."""
    run_dir = checkpoint.resolve().parent.parent
    return _read(run_dir) if record_path(run_dir).is_file() else {}


def latest_run(log_dir: str | Path) -> Path:
    """The most recently finished training run under ``log_dir`` (``run=latest``)."""
    try:
        return latest(log_dir)
    except RunRecordError as exc:
        raise ExportError(f"run=latest: {exc}") from None


WANDB_RUN_PATH = re.compile(r"^[\w.-]+/[\w.-]+/(runs/)?[\w-]+$")


def wandb_source(path: str, api: Any = None) -> tuple[Path, dict[str, Any]]:
    """The best checkpoint and the run record of a W&B run ``entity/project/run_id``.

    The run's ``model-<id>`` artifact (logged by training) gives the checkpoint: a local ``file://`` reference
    (offline runs, or the same machine) is used in place, otherwise the artifact is downloaded. The run
    record is the local ``run.json`` next to the checkpoint when there is one, else rebuilt from the run's
    config and summary.
    """
    try:
        import wandb

        api = api or wandb.Api(timeout=30)
        wb_run = api.run(path.replace("/runs/", "/"))
    except Exception as exc:  # wandb.errors.CommError, ValueError for a malformed path, no API key...
        raise ExportError(f"W&B run {path} cannot be read: {type(exc).__name__}: {exc}") from exc
    models = [a for a in wb_run.logged_artifacts() if a.type == "model"]
    if not models:
        raise ExportError(f"W&B run {path} has no model artifact (was it trained with the wandb logger?)")
    artifact = models[-1]
    ckpt = None
    for entry in artifact.manifest.entries.values():
        ref = getattr(entry, "ref", None) or ""
        if ref.startswith("file://") and Path(ref[7:]).is_file():
            ckpt = Path(ref[7:])
    if ckpt is None:
        folder = Path(artifact.download())
        ckpt = next(folder.glob("*.ckpt"), None)
        if ckpt is None:
            raise ExportError(f"model artifact {artifact.name} of W&B run {path} holds no .ckpt file")
    record = _run_record_for(ckpt)
    if not record:
        config = dict(wb_run.config)
        summary = dict(wb_run.summary)
        record = {
            "schema": SCHEMA, "run_id": wb_run.id, "config": config, "data": config.get("data_summary") or {},
            "git": config.get("git") or {},
            "val": {k[9:]: v for k, v in summary.items() if k.startswith("best_val/")},
            "test": {k[5:]: v for k, v in summary.items() if k.startswith("test/") and isinstance(v, int | float)},
        }
    record["wandb"] = {**(record.get("wandb") or {}), "id": wb_run.id, "path": path}
    return ckpt, record


def resolve_source(
    run: str | None, checkpoint: str | None, log_dir: str | Path = "logs"
) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to export and the run record that goes with it.

    ``run`` is a local run folder, ``latest`` (the newest completed run under ``log_dir``) or a W&B run
    path ``entity/project/run_id``.
    """
    if not run and not checkpoint:
        raise ExportError("nothing to export: pass run=<run directory> or checkpoint=<file.ckpt>")
    if run == "latest":
        run = str(latest_run(log_dir))
    if run and not checkpoint and not Path(run).exists() and WANDB_RUN_PATH.match(run):
        return wandb_source(run)
    if checkpoint:
        ckpt = Path(checkpoint)
        if not ckpt.is_file():
            raise ExportError(f"checkpoint not found: {ckpt}")
        record = _read(run) if run else _run_record_for(ckpt)
        return ckpt, record
    run_dir = Path(run)  # type: ignore[arg-type]
    if not run_dir.is_dir():
        raise ExportError(f"run directory not found: {run_dir}")
    if not record_path(run_dir).is_file():
        raise ExportError(f"{run_dir} has no run.json: not a training run folder")
    try:
        record = read_record(run_dir)
        ckpt = record.best_checkpoint()
    except RunRecordError as exc:
        raise ExportError(str(exc)) from None
    if not ckpt.is_file():
        raise ExportError(f"best checkpoint {ckpt.name} of {run_dir} not found")
    return ckpt, record.raw


def load_source(run: str | None = None, checkpoint: str | None = None, log_dir: str | Path = "logs") -> ExportSource:
    """Load the model of a run or checkpoint, checking it is the network the run record describes."""
    ckpt, record = resolve_source(run, checkpoint, log_dir)
    try:
        raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ExportError(f"{ckpt}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(raw, dict) or "state_dict" not in raw or "hyper_parameters" not in raw:
        raise ExportError(f"{ckpt}: not a medops training checkpoint (no Lightning state_dict/hyper_parameters)")
    hp = raw["hyper_parameters"]
    missing = [k for k in ("num_classes", "in_channels", "image_size", "mean", "std") if k not in hp]
    if missing:
        raise ExportError(f"{ckpt}: checkpoint hyper-parameters lack {missing}: not a medops classifier")
    ckpt_arch = (hp.get("net") or {}).get("arch", "resnet18")
    run_arch = ((record.get("config") or {}).get("model") or {}).get("net", {}).get("arch")
    if run_arch and run_arch != ckpt_arch:
        raise ExportError(f"{ckpt}: checkpoint is a {ckpt_arch} but the run record describes a {run_arch}")
    try:
        module = ClassificationModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    except Exception as exc:  # shapes that do not fit the architecture, missing keys...
        raise ExportError(f"{ckpt}: weights do not fit a {ckpt_arch} network ({type(exc).__name__}: {exc})") from exc
    module.eval()
    module.net = fused_network(module.net, (int(hp["in_channels"]), int(hp["image_size"]), int(hp["image_size"])))
    return ExportSource(module, ckpt, record)


def fused_network(net: torch.nn.Module, input_shape: tuple[int, int, int], tolerance: float = 1e-4) -> torch.nn.Module:
    """An ensemble network (:class:`train.models.Ensemble`) in the one-head form export needs (its last linear layer
    is the ensemble's head, its penultimate features the members' averaged features), checked to give the same
    logits as the trained form; other networks unchanged."""
    fused = for_export(net)
    if fused is net:
        return net
    x = torch.rand(8, *input_shape)
    with torch.no_grad():
        diff = float((net.eval()(x).float() - fused.eval()(x).float()).abs().max())
    if diff > tolerance:
        raise ExportError(f"the fused ensemble differs from the trained one by {diff:.2e} (> {tolerance:g})")
    return fused


def held_out_images(source: ExportSource, split: str = "test", limit: int = 256,
                    data_path: str | None = None) -> np.ndarray:
    """Real images from the run's dataset (``split``), float32 NCHW in [0, 1]: the parity-check inputs."""
    return held_out_split(source, split, limit, data_path)[0]


def held_out_split(source: ExportSource, split: str = "test", limit: int = 256,
                   data_path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` images (float32 NCHW in [0, 1]) and labels of a split of the run's dataset."""
    dm = source_datamodule(source, data_path)
    dataset = dm.datasets[split]
    return to_unit_range(dataset.images[:limit].numpy()), dataset.labels[:limit].numpy()


def source_datamodule(source: ExportSource, data_path: str | None = None) -> Any:
    """The run's DataModule, prepared once per export (``data_path``: a MedMNIST .npz instead)."""
    from hydra.utils import instantiate

    from datatools.validate_data import run_data_arguments
    from medops.datasets import DataError

    cache = getattr(source, "datamodules", None)
    if cache is not None and data_path in cache:
        return cache[data_path]
    # as training read it: without the unreadable files it left out (allow_corrupt), in its class order
    data_cfg = run_data_arguments(source.record)
    if data_path:
        data_cfg = {"_target_": "train.datamodules.MedMNISTDataModule", "path": data_path, "md5": False}
    if not data_cfg:
        raise ExportError(
            f"{source.checkpoint}: no run record with a data config next to the checkpoint; "
            "pass parity.data=<MedMNIST .npz> for the parity images"
        )
    dm = instantiate(data_cfg)
    try:
        dm.prepare()
    except DataError as exc:  # a clear refusal, not a traceback
        raise ExportError(f"the run's data cannot be read for the parity images: {exc}") from None
    if (dm.channels, dm.image_size) != source.input_shape[:2]:
        raise ExportError(
            f"parity data {dm.summary()['source']} has {dm.channels} channels at {dm.image_size} px, the model "
            f"expects {source.input_shape[0]} at {source.input_shape[1]} px"
        )
    if cache is not None:
        cache[data_path] = dm
    return dm
