"""The export job: checkpoint -> ONNX (parity-gated) [-> TensorRT] -> a new Triton model version."""

from __future__ import annotations

import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from rich.console import Console

import medops.input_check as input_check
import medops.integrity as integrity
from export.drift_reference import write_drift_reference
from export.model_card import build_card, render_markdown
from export.onnx_export import INPUT_NAME, OUTPUT_NAME, TemperatureScaled, export_onnx, opset_of
from export.ood_profile import check_ood_graph, fit_ood
from export.parity import ParityError, check_parity, onnxruntime_runner, parity_batch_sizes, torch_probabilities
from export.quantize import check_quantize_option, quantize_version
from export.repository import next_version, staged_version, validate_model_name
from export.source import ExportError, ExportSource, held_out_images, load_source, sha256_file
from export.tensorrt import build_engine, tensorrt_runner, tensorrt_unavailable_reason
from medops.datasets import positive_index
from medops.decision import DecisionRule, metadata_rule
from medops.model_version import (
    INPUT_CHECK_FILE,
    INTEGRITY_FILE,
    METADATA_FILE,
    METADATA_SCHEMA,
    MODEL_FILES,
    under_rollout,
    write_json,
)
from medops.ood import OODProfile
from medops.run_record import OPERATING_POINT_FILE, git_info, package_versions, read_operating_point
from medops.triton_config import build_model_config, dynamic_batching_settings, render_model_config

log = logging.getLogger(__name__)
TEMPLATE = Path(__file__).parent / "templates" / "model.py"
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # relative triton.batcher_file paths start here
EXPORT_PACKAGES = ("torch", "onnx", "onnxscript", "onnxruntime", "tensorrt", "tritonclient", "lightning")


def input_contract(source: ExportSource) -> dict[str, Any]:
    c, h, w = source.input_shape
    hp = source.hparams
    return {
        "name": INPUT_NAME, "dtype": "FP32", "layout": "NCHW", "shape": [-1, c, h, w], "channels": c, "size": h,
        "range": "[0, 1] = uint8 intensity / 255 (medops.preprocess)",
        "normalisation": f"inside the graph: (x - {list(hp['mean'])}) / {list(hp['std'])}",
        "output": f"{OUTPUT_NAME} FP32 [-1, {hp['num_classes']}], "
                  + ("one sigmoid per label (multi-label; they do not sum to 1)" if hp.get("task") == "multilabel"
                     else "softmax over classes") + " in labels.txt order",
        "task": hp.get("task") or ("binary" if hp["num_classes"] == 2 else "multiclass"),
        # DICOM windowing used in training ([center, width]); null: each file's own window, else min-max
        "window": ((source.record.get("config") or {}).get("data") or {}).get("window"),
        # DICOM Modality of the training data (declared data.modality, or read from its DICOM files); [] unknown
        "modalities": training_modalities(source.record),
    }


def training_modalities(record: dict[str, Any]) -> list[str]:
    """The DICOM Modality values of the run's training data: ``data.modalities`` of the run record (read from
    the files at training), else the data config's declared ``modality``; ``[]`` when neither is known."""
    found = (record.get("data") or {}).get("modalities")
    declared = ((record.get("config") or {}).get("data") or {}).get("modality")
    values = found or declared or []
    return sorted({str(v).upper() for v in ([values] if isinstance(values, str) else values) if v})


def clinical_evaluation(source: ExportSource) -> tuple[dict[str, Any], dict[str, Any]]:
    """The operating point (threshold, temperature) and evaluation summary that ``evaluation.evaluate`` saved with the
    run, when they belong to the checkpoint being exported."""
    run_dir = source.checkpoint.resolve().parent.parent
    op = read_operating_point(run_dir)
    if op and op.get("checkpoint") not in (None, source.checkpoint.name):
        log.warning("%s/%s is for checkpoint %s, not %s: ignored", run_dir, OPERATING_POINT_FILE, op.get("checkpoint"),
                    source.checkpoint.name)
        op = {}
    if not op:
        return training_operating_point(source.record), {}
    evaluation: dict[str, Any] = {}
    eval_path = Path(op.get("evaluation") or "")
    if eval_path.is_file():
        result = json.loads(eval_path.read_text())
        evaluation = {"split": result.get("split"), "n": result["data"]["n"], "source": result["data"]["source"],
                      "metrics": result["evaluation"]["metrics"], "calibration": result.get("calibration"),
                      "subgroups": result.get("subgroups") or {}}
    return op, evaluation


def training_operating_point(record: dict[str, Any]) -> dict[str, Any]:
    """The operating point training chose (Youden's J on the calibrated validation split, for the positive class)
    and its temperature, as an operating point record; ``{}`` for runs that recorded neither."""
    threshold = record.get("threshold") or {}
    temperature = (record.get("calibration") or {}).get("temperature")
    if threshold.get("value") is None and not temperature and not record.get("abnormal"):
        return {}
    op: dict[str, Any] = {"method": "argmax", "threshold": None, "temperature": temperature, "chosen_on": "val",
                          "source": "training run record"}
    if record.get("abnormal"):  # multi-class: the declared abnormal set's decision on P(abnormal)
        op["abnormal"] = dict(record["abnormal"])
    if threshold.get("value") is not None:
        names = list((record.get("data") or {}).get("class_names") or [])
        positive = threshold.get("positive_index", positive_index(names, threshold.get("positive_class")))
        op |= {"method": "youden", "threshold": float(threshold["value"]), "positive_index": positive,
               "positive_class": threshold.get("positive_class") or names[positive], "val": threshold.get("val")}
    return op


def lineage(source: ExportSource, cfg: DictConfig) -> dict[str, Any]:
    record = source.record
    return {
        "run_id": record.get("run_id"),
        "run_dir": record.get("output_dir"),
        "training_git_commit": (record.get("git") or {}).get("commit"),
        "export_git_commit": git_info()["commit"],
        "dataset_fingerprint": (record.get("data") or {}).get("fingerprint"),
        "checkpoint": str(source.checkpoint.resolve()),
        "checkpoint_sha256": sha256_file(source.checkpoint),
        "wandb_run": (record.get("wandb") or {}).get("id"),
    }


def triton_parameters(meta: dict[str, Any]) -> dict[str, str]:
    """Lineage and headline metrics as Triton model-config parameters (strings)."""
    lin, test = meta["lineage"], meta["metrics"].get("test") or {}
    params = {k: str(v) for k, v in lin.items() if v is not None and k not in ("run_dir", "checkpoint")}
    params |= {f"test_{k}": f"{test[k]:.4f}" for k in ("auroc", "acc") if k in test}
    params |= {"medops_version": str(meta["version"]), "created": meta["created"],
               "class_names": json.dumps(meta["class_names"]), "input_range": meta["input"]["range"]}
    op = meta.get("operating_point") or {}
    if op.get("threshold") is not None:
        params |= {"threshold": f"{op['threshold']:.6f}", "positive_class": str(op["positive_class"]),
                   "threshold_method": str(op["method"])}
    if op.get("temperature"):
        params["temperature"] = f"{op['temperature']:.6f}"
    abnormal = op.get("abnormal") or {}
    if abnormal.get("value") is not None:
        params |= {"abnormal_classes": json.dumps(abnormal["classes"]),
                   "abnormal_threshold": f"{abnormal['value']:.6f}"}
    params["task"] = str(meta["input"].get("task") or "")
    labels = op.get("label_thresholds") or (meta["metrics"].get("labels") or {}).get("thresholds")
    if labels:  # multi-label: each label's threshold chosen on validation (evaluation's, else training's)
        params["label_thresholds"] = json.dumps(labels)
    if meta["input"].get("window"):
        params["window"] = json.dumps(list(meta["input"]["window"]))
    if meta["input"].get("modalities"):
        params["modalities"] = json.dumps(meta["input"]["modalities"])
    ood = meta.get("ood") or {}
    if ood.get("threshold") is not None:
        params |= {"ood_threshold": f"{ood['threshold']:.6f}", "ood_method": str(ood["method"]),
                   "ood_pass_rate": str(ood["pass_rate"])}
    drift = meta.get("drift") or {}
    params |= {f"drift_{k}": str(v) for k, v in (drift.get("thresholds") or {}).items() if k != "min_window"}
    params |= {f"drift_{k}": str(v) for k, v in (drift.get("online") or {}).items()}
    return params


def resolve_instance_kind(kind: str, target: str) -> str:
    if kind != "auto":
        return kind
    return "gpu" if target == "tensorrt" or torch.cuda.is_available() else "cpu"


def write_version(model_stage: Path, version_stage: Path, meta: dict[str, Any], cfg: DictConfig,
                  class_names: list[str]) -> None:
    """config.pbtxt and labels.txt (model root, a copy of the config in the version), metadata and model card."""
    c, h, _ = meta["input"]["shape"][1:]
    tcfg = cfg.triton
    # from the latency-under-load sweep (triton.batcher_file, python -m bench latency --write-config) unless set
    batcher = tcfg.get("batcher_file")
    batcher = CONF_DIR / batcher if batcher and not Path(batcher).is_absolute() else batcher
    preferred, delay, _ = dynamic_batching_settings(tcfg.get("preferred_batch_sizes"),
                                                    tcfg.get("max_queue_delay_us"), batcher)
    config = build_model_config(
        meta["name"], meta["target"], channels=c, image_size=h, num_classes=len(class_names),
        max_batch_size=cfg.max_batch_size, preferred_batch_sizes=preferred,
        max_queue_delay_us=delay, instance_kind=resolve_instance_kind(tcfg.instance_kind,
                                                                                        meta["target"]),
        instance_count=tcfg.instance_count, versions_to_serve=tcfg.versions_to_serve,
        parameters=triton_parameters(meta), input_name=INPUT_NAME, output_name=OUTPUT_NAME,
        ood_outputs=(meta.get("ood") or {}).get("threshold") is not None,
    )
    text = render_model_config(config)
    (model_stage / "config.pbtxt").write_text(text)
    (version_stage / "config.pbtxt").write_text(text)
    (model_stage / "labels.txt").write_text("\n".join(class_names) + "\n")
    (version_stage / "labels.txt").write_text("\n".join(class_names) + "\n")
    card = build_card(meta)
    (version_stage / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    (version_stage / "MODEL_CARD.md").write_text(render_markdown(card))
    # last: the SHA-256 of every file written above (and their HMAC with MEDOPS_MODEL_SIGNING_KEY), see medops.integrity
    write_json(version_stage / METADATA_FILE, integrity.seal(version_stage, meta, os.environ.get(integrity.KEY_ENV)))


def drift_profile(cfg: DictConfig, source: ExportSource, version_stage: Path, console: Console) -> dict[str, Any]:
    """The drift reference of this version (validation split) and the online-monitoring settings."""
    dcfg = cfg.drift
    images = held_out_images(source, split=dcfg.split, limit=dcfg.max_images, data_path=cfg.parity.data)
    summary = write_drift_reference(version_stage, source.module.net, images, source.class_names,
                                    max_batch_size=cfg.max_batch_size, opset=cfg.opset,
                                    embeddings=bool(dcfg.embeddings), source=str(dcfg.split))
    summary["thresholds"] = {k: dcfg[k] for k in ("alpha", "psi_threshold", "min_window", "mmd_alpha")}
    summary["online"] = {k: dcfg.online[k] for k in dcfg.online}
    console.print(f"drift reference: {summary['n']} {dcfg.split} images, {len(summary['features'])} features, "
                  f"embeddings {summary['embeddings']}")
    return summary


def check_destination(cfg: DictConfig) -> tuple[str, str, Path, int, str | None]:
    """The model name, target, repository and new version, and why TensorRT is unavailable (None when it is).

    Raises ExportError for an unknown target, and for ``target=tensorrt`` without TensorRT."""
    name = validate_model_name(str(cfg.name))
    target = str(cfg.target)
    if target not in MODEL_FILES:
        raise ExportError(f"unknown target {target!r}; choose one of {', '.join(MODEL_FILES)}")
    repository = Path(cfg.model_repository)
    version = next_version(repository, name, cfg.get("version"))
    trt_reason = tensorrt_unavailable_reason()
    if target == "tensorrt" and trt_reason:
        raise ExportError(f"target=tensorrt needs TensorRT, which is not available here: {trt_reason}")
    return name, target, repository, version, trt_reason


def resolve_source(cfg: DictConfig, console: Console) -> ExportSource:
    """The training run or checkpoint to export (``run=latest``: the newest finished run under the log dir)."""
    log_dir = cfg.paths.log_dir if cfg.get("run") == "latest" else "logs"  # resolved only when needed
    source = load_source(cfg.get("run"), cfg.get("checkpoint"), log_dir)
    console.print(f"exporting run {source.record.get('run_id')} ({source.record.get('output_dir')})")
    return source


def graph_network(source: ExportSource, operating_point: dict[str, Any], console: Console) -> torch.nn.Module:
    """The network to export: temperature-scaled when the operating point carries a fitted temperature."""
    net = source.module.net
    if operating_point.get("temperature"):  # calibrated probabilities: the temperature goes into the graph
        net = TemperatureScaled(net, operating_point["temperature"])
        console.print(f"temperature scaling T={operating_point['temperature']:.3f} (fitted on validation)")
    return net


def build_metadata(cfg: DictConfig, source: ExportSource, name: str, version: int, target: str,
                   operating_point: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    """The version's metadata before export: input contract, metrics, lineage, package versions, operating point."""
    record = source.record
    return {
        "schema": METADATA_SCHEMA, "name": name, "version": version, "target": target,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "class_names": source.class_names, "input": input_contract(source),
        "model": {"arch": source.hparams.get("net", {}).get("arch"),
                  "parameters": sum(p.numel() for p in source.module.net.parameters()),
                  "members": int(source.hparams.get("net", {}).get("members", 1)),
                  "tta": source.hparams.get("net", {}).get("tta", "none")},
        "data": record.get("data") or {},
        "metrics": {k: record.get(k) for k in ("task", "val", "test", "confusion_matrix", "threshold", "calibration",
                                               "abnormal", "labels")},
        "lineage": lineage(source, cfg),
        "versions": package_versions(EXPORT_PACKAGES),
        "max_batch_size": cfg.max_batch_size,
        "operating_point": operating_point or None,
        "evaluation": evaluation or None,
    }


def _checked_parity(reference: Any, runner: Any, images: Any, sizes: list[int], atol: float, label: str,
                    console: Console, rule: DecisionRule | None = None) -> dict[str, Any]:
    """The parity report of ``runner`` against the PyTorch reference (probabilities, arg-max and the decision at the
    operating point, ``rule``); ParityError when it fails."""
    report = check_parity(reference, runner, images, sizes, atol, label, rule)
    console.print(report.summary())
    if not report.passed:
        raise ParityError(report.summary())
    return report.as_dict()


def write_onnx(cfg: DictConfig, net: torch.nn.Module, source: ExportSource, version_stage: Path, reference: Any,
               images: Any, meta: dict[str, Any], console: Console, ood: OODProfile | None = None
               ) -> tuple[Path, list[int]]:
    """``model.onnx`` exported and parity-checked with onnxruntime (opset and parity go into ``meta``); returns its
    path and the parity batch sizes. With ``ood``, the graph also returns the out-of-distribution score, checked
    against :mod:`medops.ood` on the same images."""
    onnx_path = version_stage / "model.onnx"
    console.print(f"exporting {source.checkpoint} to ONNX (opset {cfg.opset}, batch 1..{cfg.max_batch_size})")
    export_onnx(net, onnx_path, source.input_shape, cfg.max_batch_size, cfg.opset, cfg.optimize, ood=ood)
    if ood is not None:
        meta["ood"]["graph_max_abs_diff"] = check_ood_graph(onnx_path, ood, source.module.net, images)
    import onnx

    meta["opset"] = opset_of(onnx.load(str(onnx_path)))
    sizes = parity_batch_sizes(cfg.max_batch_size, list(cfg.parity.batch_sizes))
    meta["parity"] = [_checked_parity(reference, onnxruntime_runner(str(onnx_path)), images, sizes, cfg.parity.atol,
                                      "onnxruntime (CPU, FP32)", console, metadata_rule(meta))]
    return onnx_path, sizes


def write_tensorrt(cfg: DictConfig, onnx_path: Path, version_stage: Path, source: ExportSource, reference: Any,
                   images: Any, sizes: list[int], console: Console, rule: DecisionRule | None = None
                   ) -> dict[str, Any]:
    """``model.plan`` built from the ONNX graph and parity-checked (FP16 tolerance with fp16, the same decisions at
    the operating point ``rule``); returns the report."""
    plan = build_engine(onnx_path, version_stage / "model.plan", source.input_shape, cfg.max_batch_size,
                        fp16=cfg.tensorrt.fp16, workspace_gb=cfg.tensorrt.workspace_gb)
    tol = cfg.tensorrt.atol if cfg.tensorrt.fp16 else cfg.parity.atol
    return _checked_parity(reference, tensorrt_runner(plan), images, sizes, tol,
                           "TensorRT FP16" if cfg.tensorrt.fp16 else "TensorRT FP32", console, rule)


def _announce(console: Console, repository: Path, name: str, version: int, target: str, meta: dict[str, Any]) -> None:
    """Print where the version went and, under rollout control, that it waits for promotion."""
    console.print(f"[bold green]wrote {repository / name / str(version)}[/] ({target}; "
                  f"test AUROC {((meta['metrics'].get('test') or {}).get('auroc') or float('nan')):.4f})")
    if under_rollout(repository, name):
        console.print(f"{name} is under rollout control: v{version} is not served until promoted "
                      f"(python -m serve promote {name} {version} --eval-data <labelled set>)")


def export_model(cfg: DictConfig, console: Console | None = None) -> dict[str, Any]:
    """Run one export as configured; returns the version's metadata. Raises before anything is published."""
    console = console or Console()
    name, target, repository, version, trt_reason = check_destination(cfg)
    quantize = check_quantize_option(cfg)  # None (FP32) or int8
    source = resolve_source(cfg, console)
    images = held_out_images(source, split=cfg.parity.split, limit=cfg.parity.max_images, data_path=cfg.parity.data)
    operating_point, evaluation = clinical_evaluation(source)
    net = graph_network(source, operating_point, console)
    reference = torch_probabilities(net, images)
    meta = build_metadata(cfg, source, name, version, target, operating_point, evaluation)
    ood, meta["ood"] = fit_ood(cfg, source, console) if cfg.ood.enabled else (None, {"skipped": "ood.enabled=false"})

    with staged_version(repository, name, version) as (model_stage, version_stage):
        onnx_path, sizes = write_onnx(cfg, net, source, version_stage, reference, images, meta, console, ood)
        if target == "tensorrt" or (cfg.tensorrt.enabled in ("auto", True) and trt_reason is None and not quantize):
            meta["parity"].append(write_tensorrt(cfg, onnx_path, version_stage, source, reference, images, sizes,
                                                 console, metadata_rule(meta)))
        else:
            why = trt_reason or ('quantize=int8' if quantize else 'tensorrt.enabled=false')
            meta["tensorrt"] = f"skipped: {why}"
            console.print(f"TensorRT skipped: {why}")
        # the clinical INT8 gate (export/quantize.py) replaces the parity-checked FP32 model.onnx, or raises
        meta["precision"] = (quantize_version(cfg, source, onnx_path, operating_point, console, metadata_rule(meta))
                             if quantize else {"precision": "fp32"})
        if cfg.drift.enabled:
            meta["drift"] = drift_profile(cfg, source, version_stage, console)
        if target == "python":
            shutil.copyfile(TEMPLATE, version_stage / "model.py")
            shutil.copyfile(input_check.__file__, version_stage / INPUT_CHECK_FILE)  # the value checks it runs
            shutil.copyfile(integrity.__file__, version_stage / INTEGRITY_FILE)  # the file checks it runs at load
        elif target == "onnxruntime":
            pass  # Triton's onnxruntime backend reads model.onnx directly
        write_version(model_stage, version_stage, meta, cfg, source.class_names)
    _announce(console, repository, name, version, target, meta)
    return meta


__all__ = ["ExportError", "ParityError", "export_model"]
