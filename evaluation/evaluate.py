"""``python -m evaluation.evaluate run=<run dir> [split=test] [data=<npz|csv>] ...``: clinical evaluation.

Loads the run's best checkpoint, predicts on the run's validation split and on the evaluated split (the
run's own, or an external MedMNIST ``.npz`` / CSV manifest), chooses the operating point on validation
(and a temperature with ``calibrate=true``), and writes ``evaluation.json``, ``report.html`` (plots
embedded), ``predictions_<split>.csv`` to ``output_dir`` and ``operating_point.json`` into the run folder.
Bad input (unknown classes, mismatched images, missing run) exits with status 2.
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from medops import to_unit_range
from medops.datasets import (
    DataError,
    FolderDataset,
    label_index,
    load_medmnist_npz,
    positive_index,
    read_manifest,
    scan_class_folders,
)
from medops.model_version import METADATA_FILE, ONNX_FILE, ModelVersionError, list_versions, read_metadata
from medops.run_record import write_operating_point

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("evaluation.evaluate")


class EvaluationError(ValueError):
    """Evaluation input that cannot be used; the message says why."""


@dataclass
class EvalData:
    images: np.ndarray  # N x C x H x W uint8
    labels: np.ndarray  # N int64
    source: str
    columns: dict[str, list[str]] = field(default_factory=dict)  # subgroup column -> value per sample
    known_values: dict[str, list[str]] = field(default_factory=dict)  # every value in the source


def _check_labels(labels: np.ndarray, class_names: list[str], source: str) -> None:
    if labels.ndim == 2:  # multi-label: N x K of 0/1, one column per label the model knows
        if labels.shape[1] != len(class_names) or not np.isin(labels, (0, 1)).all():
            raise EvaluationError(f"{source}: multi-label labels of shape {list(labels.shape)} (values "
                                  f"{sorted(np.unique(labels).tolist())[:5]}) do not fit the model's "
                                  f"{len(class_names)} labels {class_names} (0/1 each)")
        return
    bad = (labels < 0) | (labels >= len(class_names))
    if bad.any():
        raise EvaluationError(
            f"{source}: label(s) {sorted(set(labels[bad].tolist()))} are classes the model does not know "
            f"(it was trained on {len(class_names)} classes: {class_names})"
        )


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(fh)]


def _subgroups(rows: list[dict[str, str]], keep: list[int], wanted: list[str]) -> tuple[dict, dict]:
    present = [c for c in wanted if rows and c in rows[0]]
    columns = {c: [rows[i].get(c, "") for i in keep] for c in present}
    known = {c: sorted({r.get(c, "") for r in rows}) for c in present}
    return columns, known


def run_data(source: Any, split: str, wanted: list[str]) -> EvalData:
    """A split of the dataset the run was trained on (subgroup columns when it is a CSV manifest)."""
    from hydra.utils import instantiate

    from datatools.validate_data import run_data_arguments
    from train.datamodules import FolderDataModule

    # as training read it: without the unreadable files it left out (allow_corrupt), in its class order
    data_cfg = run_data_arguments(source.record)
    if not data_cfg:
        raise EvaluationError(f"{source.checkpoint}: the run record has no data config; pass data=<npz or csv>")
    dm = instantiate(data_cfg)
    dm.prepare()
    if split not in dm.datasets:
        raise EvaluationError(f"unknown split {split!r}; use train, val or test")
    ds = dm.datasets[split]
    labels = ds.labels.numpy().astype(np.int64)
    out = EvalData(ds.images.numpy(), labels, f"{dm.summary()['source']} ({split})")
    if isinstance(dm, FolderDataModule) and dm.path.suffix.lower() == ".csv" and dm.scan_result is not None:
        rows = _csv_rows(dm.path)
        by_path = {str((dm.path.parent / r["path"]) if not Path(r["path"]).is_absolute() else Path(r["path"])): i
                   for i, r in enumerate(rows)}
        keep = [by_path[p] for p in dm.scan_result.paths[split] if p in by_path]
        if len(keep) == len(labels):
            out.columns, out.known_values = _subgroups(rows, keep, wanted)
    return out


def external_data(path: str, split: str, source: Any, wanted: list[str]) -> EvalData:
    """An external MedMNIST ``.npz`` (its ``split``), CSV manifest or class-folder tree (its ``split`` rows, else
    every row)."""
    p = Path(path)
    names = source.class_names
    channels, size, _ = source.input_shape
    if p.suffix.lower() == ".npz":
        data = load_medmnist_npz(p)
        if split not in data.images:
            raise EvaluationError(f"{p}: no split {split!r}")
        images, labels = data.images[split], data.labels[split]
        _check_labels(labels, names, f"{p} ({split})")
        if images.shape[-1] != channels or images.shape[1] != size:
            raise EvaluationError(f"{p}: images are {images.shape[1]} px with {images.shape[-1]} channels; the "
                                  f"model expects {size} px with {channels}")
        return EvalData(np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels, f"{p} ({split})")
    if p.is_dir():  # class sub-folders (optionally under train/val/test)
        samples = scan_class_folders(p)
        rows: list[dict[str, str]] = [{} for _ in samples]
    elif p.suffix.lower() == ".csv":
        samples = read_manifest(p)
        rows = _csv_rows(p)
    else:
        raise EvaluationError(f"data={path}: expected a MedMNIST .npz, a CSV manifest or a folder of class folders")
    keep = [i for i, s in enumerate(samples) if s.split == split] if any(s.split for s in samples) else []
    keep = keep or list(range(len(samples)))
    label_values = [samples[i].label for i in keep]
    unknown = sorted(set(label_values) - set(names))
    if unknown:
        raise EvaluationError(f"{p}: label(s) {unknown} are classes the model does not know (it knows {names})")
    labels, _ = label_index(label_values, names, str(p))
    reader = FolderDataset(p, image_size=size, channels=channels, class_names=names, group_column=None)
    images = np.stack([reader.read_sample(samples[i])[1] for i in keep]).transpose(0, 3, 1, 2)
    columns, known = _subgroups(rows, keep, wanted)
    return EvalData(np.ascontiguousarray(images), labels, f"{p} ({len(keep)} rows)", columns, known)


def predict(module: Any, images: np.ndarray, batch_size: int = 256, device: str = "auto") -> np.ndarray:
    """Class probabilities (float64 N x K; softmax, or one sigmoid per label for a multi-label module) of uint8
    N x C x H x W images."""
    import torch

    from train.module import probabilities

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    module = module.to(dev).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(to_unit_range(images[start : start + batch_size])).to(dev)
            out.append(probabilities(module(x), getattr(module, "task", "multiclass")).cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, module.hparams["num_classes"]))


def write_predictions(path: Path, P: np.ndarray, y: np.ndarray, names: list[str]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "label", *[f"p_{n}" for n in names]])
        for i, (row, label) in enumerate(zip(P, y, strict=True)):
            # multi-label: the 0/1 label vector as the names of the labels present, joined by "+"
            text = "+".join(names[k] for k in np.flatnonzero(label)) if np.ndim(label) else int(label)
            w.writerow([i, text, *[repr(float(v)) for v in row]])
    return path


@dataclass
class _Probabilities:
    """Class probabilities on validation and on the evaluated data, raw and after temperature scaling."""

    val_raw: np.ndarray
    raw: np.ndarray
    val: np.ndarray
    ev: np.ndarray
    temperature: float | None = None


def load_model_source(cfg: DictConfig) -> tuple[Any, dict[str, Any] | None]:
    """The training source to evaluate and, for ``model=<exported dir>``, the exported version (else None)."""
    from export.source import load_source

    onnx_model = resolve_exported_model(cfg.exported_model) if cfg.get("exported_model") else None
    if onnx_model is not None:  # an exported version: its run (data, classes) from the lineage, outputs from ONNX
        source = load_source(run=onnx_model["run_dir"], log_dir=cfg.paths.log_dir)
    elif cfg.get("run") or cfg.get("checkpoint"):
        source = load_source(run=cfg.get("run"), checkpoint=cfg.get("checkpoint"), log_dir=cfg.paths.log_dir)
    else:
        raise EvaluationError("nothing to evaluate: pass run=<run dir>, checkpoint=<file.ckpt> or model=<exported dir>")
    return source, onnx_model


def _positive_index(cfg: DictConfig, source: Any, names: list[str]) -> int:
    """The clinically positive class as an index: ``positive_class`` (name or index), else the one the run's data
    declared (``data.positive_class``), else the one training took (the run record's ``data.positive_class``), else
    class 1 (runs recorded before it could be declared)."""
    declared = cfg.positive_class
    if declared is None:
        declared = ((source.record.get("config") or {}).get("data") or {}).get("positive_class")
    if declared is None:
        declared = (source.record.get("data") or {}).get("positive_class")
    try:
        return positive_index(names, declared)
    except DataError as exc:
        raise EvaluationError(str(exc)) from None


def load_datasets(cfg: DictConfig, source: Any, wanted: list[str]) -> tuple[EvalData, EvalData]:
    """The run's validation split and the evaluated data (the run's ``split`` or ``data=``), labels checked."""
    names = source.class_names
    val = run_data(source, "val", wanted)
    _check_labels(val.labels, names, val.source)
    if cfg.dataset:
        ev = external_data(str(cfg.dataset), str(cfg.split), source, wanted)
    else:
        ev = run_data(source, str(cfg.split), wanted)
    _check_labels(ev.labels, names, ev.source)
    if len(ev.labels) == 0:
        raise EvaluationError(f"{ev.source}: no samples to evaluate")
    return val, ev


def predict_both(cfg: DictConfig, source: Any, onnx_model: dict[str, Any] | None, val: EvalData,
                 ev: EvalData) -> tuple[np.ndarray, np.ndarray]:
    """Raw probabilities on validation and on the evaluated data (the exported ONNX graph, else the checkpoint)."""
    log.info("predicting %d validation and %d %s images", len(val.labels), len(ev.labels), cfg.split)
    if onnx_model is not None:
        return predict_onnx(onnx_model["onnx"], val.images), predict_onnx(onnx_model["onnx"], ev.images)
    P_val_raw = predict(source.module, val.images, int(cfg.batch_size), str(cfg.device))
    P_raw = predict(source.module, ev.images, int(cfg.batch_size), str(cfg.device))
    return P_val_raw, P_raw


def calibrate(cfg: DictConfig, P_val_raw: np.ndarray, P_raw: np.ndarray, val: EvalData,
              ev: EvalData, task: str | None = None) -> tuple[_Probabilities, dict[str, Any]]:
    """A temperature fitted on validation (``calibrate=true``), the scaled probabilities and the calibration figures.

    Multi-label: one temperature shared by every label's sigmoid logit, and the figures of every (image, label) pair
    as a binary prediction (:func:`medops.calibration.label_columns`)."""
    from medops.calibration import apply_temperature, label_columns, sigmoid_temperature

    if task == "multilabel":
        (Pv, yv), (Pe, ye) = label_columns(P_val_raw, val.labels), label_columns(P_raw, ev.labels)
        temperature, calibration = _calibration(cfg, Pv, yv, Pe, ye, n_images=len(val.labels))
        scale = sigmoid_temperature
    else:
        temperature, calibration = _calibration(cfg, P_val_raw, val.labels, P_raw, ev.labels)
        scale = apply_temperature
    P_val = scale(P_val_raw, temperature) if temperature else P_val_raw
    P = scale(P_raw, temperature) if temperature else P_raw
    return _Probabilities(P_val_raw, P_raw, P_val, P, temperature), calibration


def _calibration(cfg: DictConfig, P_val_raw: np.ndarray, y_val: np.ndarray, P_raw: np.ndarray,
                 y: np.ndarray, n_images: int | None = None) -> tuple[float | None, dict[str, Any]]:
    """The temperature (or None) and the calibration figures of class probabilities with integer labels."""
    from medops.calibration import (
        apply_temperature,
        ece_consistency,
        expected_calibration_error,
        nll,
        trusted_temperature,
    )

    temperature, refused = trusted_temperature(P_val_raw, y_val, n_images=n_images) if cfg.calibrate else (None, None)
    if refused:
        log.warning("%s", refused)
    P_val = apply_temperature(P_val_raw, temperature) if temperature else P_val_raw
    P = apply_temperature(P_raw, temperature) if temperature else P_raw
    calibration: dict[str, Any] = {"ece": expected_calibration_error(P_raw, y), "nll": nll(P_raw, y),
                                   **({"not_calibrated": refused} if refused else {})}
    if temperature:
        calibration |= {"temperature": temperature, "ece_calibrated": expected_calibration_error(P, y),
                        "nll_calibrated": nll(P, y),
                        "val_nll": nll(P_val_raw, y_val), "val_nll_calibrated": nll(P_val, y_val)}
    consistency = ece_consistency(P, y)  # the ECE a perfectly calibrated model shows on this many images
    calibration |= {"ece_if_calibrated_median": consistency["null_median"],
                    "ece_if_calibrated_p95": consistency["null_p95"], "ece_consistency_p_value": consistency["p_value"]}
    return temperature, calibration


def choose_operating_point(cfg: DictConfig, probs: _Probabilities, val: EvalData, names: list[str],
                           pos: int) -> tuple[float | None, dict[str, Any]]:
    """The decision threshold chosen on validation (binary tasks; else argmax) and its operating-point record."""
    from medops.metrics import choose_threshold, evaluate_predictions

    if len(names) != 2:  # the temperature still goes into the graph: an abnormal threshold is chosen on its output
        return None, {"method": "argmax", "threshold": None, "temperature": probs.temperature, "chosen_on": "val"}
    threshold = choose_threshold(probs.val, val.labels, cfg.threshold.method, float(cfg.threshold.target), pos)
    op = {"method": str(cfg.threshold.method), "target": float(cfg.threshold.target), "threshold": threshold,
          "positive_class": names[pos], "positive_index": pos, "chosen_on": "val",
          "temperature": probs.temperature}
    op["val"] = {m: v["value"] for m, v in evaluate_predictions(
        probs.val, val.labels, names, threshold, pos, n_resamples=0)["metrics"].items()}
    return threshold, op


def abnormal_evaluation(cfg: DictConfig, source: Any, probs: _Probabilities, val: EvalData, ev: EvalData,
                        names: list[str]) -> dict[str, Any] | None:
    """Multi-class runs whose data declared an abnormal set (``data.abnormal_classes``/``data.ordinal_cutoff``):
    the abnormal-vs-normal decision on P(abnormal), threshold chosen on validation (``threshold.method``), every
    metric with bootstrap intervals on the evaluated data. None otherwise."""
    from medops.abnormal import NAMES, abnormal_indices, binary_labels, binary_view, describe
    from medops.metrics import choose_threshold, evaluate_predictions

    data = (source.record.get("config") or {}).get("data") or {}
    indices = abnormal_indices(names, data.get("abnormal_classes"), data.get("ordinal_cutoff"))
    if indices is None:
        return None
    y_val = binary_labels(val.labels, indices)
    threshold = choose_threshold(binary_view(probs.val, indices), y_val, cfg.threshold.method,
                                 float(cfg.threshold.target), 1)
    figures = evaluate_predictions(binary_view(probs.ev, indices), binary_labels(ev.labels, indices), list(NAMES),
                                   threshold, 1, int(cfg.n_resamples), int(cfg.seed), float(cfg.alpha))
    return {**describe(names, indices), "method": str(cfg.threshold.method), "value": threshold,
            "chosen_on": "val", "evaluation": figures}


def compute_metrics(cfg: DictConfig, P: np.ndarray, ev: EvalData, names: list[str], threshold: float | None,
                    pos: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metrics with bootstrap intervals on the evaluated data, and per subgroup when it has subgroup columns."""
    from medops.metrics import evaluate_predictions, subgroup_metrics

    n_res, seed = int(cfg.n_resamples), int(cfg.seed)
    evaluation = evaluate_predictions(P, ev.labels, names, threshold, pos, n_res, seed, float(cfg.alpha))
    subgroups = (subgroup_metrics(P, ev.labels, ev.columns, names, threshold, pos, n_res, seed, evaluation,
                                  ev.known_values) if ev.columns else {})
    return evaluation, subgroups


def draw_figures(cfg: DictConfig, source: Any, ev: EvalData, names: list[str], probs: _Probabilities,
                 evaluation: dict[str, Any], threshold: float | None, pos: int, out_dir: Path) -> dict[str, Path]:
    """The report's figures (ROC, reliability, confusion, explanations) written to ``out_dir``, by title."""
    from evaluation.explain import explanation_grid
    from medops.plots import plot_confusion, plot_reliability, plot_roc

    P, temperature = probs.ev, probs.temperature
    binary = len(names) == 2 and threshold is not None
    rule = f"P({names[pos]}) ≥ {threshold:.3f}" if binary else "arg-max decision"
    return {
        "ROC with operating point": plot_roc(P, ev.labels, names, out_dir / "roc.png", f"ROC, {cfg.split}",
                                             threshold, pos),
        "Calibration (reliability diagram and images per bin)": plot_reliability(
            {"model": (probs.raw, ev.labels), **({f"T={temperature:.2f}": (P, ev.labels)} if temperature else {})},
            out_dir / "reliability.png", title=f"Calibration, {cfg.split}",
            positive=(pos, names[pos]) if binary else None),
        "Confusion matrix": plot_confusion(np.array(evaluation["confusion_matrix"]), names,
                                           out_dir / "confusion.png", f"Confusion, {cfg.split}\n{rule}"),
        "Explanations (Grad-CAM and occlusion of the class logit) of correct and wrong predictions": explanation_grid(
            source.module.net, to_unit_range(ev.images), ev.labels, P, names, out_dir / "explanations.png",
            method="both"),  # also writes explanations.npz (maps, images, randomisation sanity check)
    }


def single_label_evaluation(cfg: DictConfig, source: Any, probs: _Probabilities, val: EvalData, ev: EvalData,
                            pos: int, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Path],
                                                                dict[str, Any], dict[str, Any] | None]:
    """Binary, multi-class and ordinal models: the evaluation (ordinal: plus ``qwk`` and ``mae`` with bootstrap
    intervals), operating point, figures, subgroups and the declared abnormal set."""
    names = source.class_names
    threshold, op = choose_operating_point(cfg, probs, val, names, pos)
    evaluation, subgroups = compute_metrics(cfg, probs.ev, ev, names, threshold, pos)
    if getattr(source.module, "task", None) == "ordinal":
        evaluation["metrics"] |= ordinal_entries(cfg, probs.ev, ev.labels)
    abnormal = abnormal_evaluation(cfg, source, probs, val, ev, names)
    if abnormal:
        op["abnormal"] = {k: abnormal[k] for k in ("classes", "indices", "normal_classes", "method", "value")}
    plots = draw_figures(cfg, source, ev, names, probs, evaluation, threshold, pos, out_dir)
    return evaluation, op, plots, subgroups, abnormal


def ordinal_entries(cfg: DictConfig, P: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Ordinal models: the quadratic-weighted kappa ``qwk`` and mean absolute grade error ``mae`` at the arg-max
    grade, each with a stratified bootstrap interval."""
    from medops.metrics import bootstrap_ci, ordinal_metrics

    out: dict[str, Any] = {}
    for name in ("qwk", "mae"):
        value = ordinal_metrics(P, y)[name]
        ci, reason = bootstrap_ci(P, y, lambda p, t, n=name: ordinal_metrics(p, t)[n], n_resamples=int(cfg.n_resamples),
                                  seed=int(cfg.seed), alpha=float(cfg.alpha), return_reason=True)
        out[name] = {"value": None if np.isnan(value) else float(value), "ci_low": ci[0] if ci else None,
                     "ci_high": ci[1] if ci else None, "note": None if ci else reason}
    return out


def multilabel_evaluation(cfg: DictConfig, probs: _Probabilities, val: EvalData, ev: EvalData, names: list[str],
                          out_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Path]]:
    """Multi-label models: one threshold per label chosen on validation (``threshold.method``), the macro metrics
    with image-level bootstrap intervals and the per-label figures at those thresholds, the per-label ROC and the
    reliability diagram of every (image, label) pair. No confusion matrix, subgroups or explanation maps."""
    from medops.calibration import label_columns
    from medops.metrics import evaluate_multilabel, label_thresholds
    from medops.plots import plot_reliability, plot_roc

    thresholds = label_thresholds(probs.val, val.labels, str(cfg.threshold.method), float(cfg.threshold.target))
    evaluation = evaluate_multilabel(probs.ev, ev.labels, names, thresholds, int(cfg.n_resamples), int(cfg.seed),
                                     float(cfg.alpha))
    op = {"method": f"{cfg.threshold.method}_per_label", "threshold": None, "chosen_on": "val",
          "label_thresholds": dict(zip(names, evaluation["thresholds"], strict=True)),
          "temperature": probs.temperature}
    curves = {"model": label_columns(probs.raw, ev.labels)}
    if probs.temperature:
        curves[f"T={probs.temperature:.2f}"] = label_columns(probs.ev, ev.labels)
    plots = {"ROC per label": plot_roc(probs.ev, ev.labels, names, out_dir / "roc.png", f"ROC per label, {cfg.split}"),
             "Reliability diagram (every image and label)": plot_reliability(
                 curves, out_dir / "reliability.png", title=f"Calibration, {cfg.split}, every image and label",
                 positive=(1, "label present"))}
    return evaluation, op, plots


def write_outputs(result: dict[str, Any], plots: dict[str, Path], P: np.ndarray, ev: EvalData, source: Any,
                  run_dir: Path, out_dir: Path, onnx_model: dict[str, Any] | None) -> None:
    """``predictions_<split>.csv``, ``evaluation.json``, ``report.html`` and (checkpoints only) the run's
    ``operating_point.json``."""
    from evaluation.report import write_html_report

    names = result["class_names"]
    write_predictions(out_dir / f"predictions_{result['split']}.csv", P, ev.labels, names)
    (out_dir / "evaluation.json").write_text(json.dumps(result, indent=2, default=str))
    write_html_report(result, plots, out_dir / "report.html")
    op_record = {**result["operating_point"], "class_names": names, "checkpoint": source.checkpoint.name,
                 "evaluation": str(out_dir / "evaluation.json")}
    if onnx_model is None:  # an operating point belongs to the checkpoint it was chosen for
        write_operating_point(run_dir, op_record)


def evaluate_run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate a run's checkpoint or an exported model (see the module docstring); returns ``evaluation.json``."""
    source, onnx_model = load_model_source(cfg)
    run_dir = source.checkpoint.resolve().parent.parent
    out_dir = Path(cfg.output_dir) if cfg.output_dir else run_dir / "evaluation"
    out_dir.mkdir(parents=True, exist_ok=True)
    names = source.class_names
    wanted = [str(c).lower() for c in (cfg.subgroup_columns or [])]
    pos = _positive_index(cfg, source, names)
    val, ev = load_datasets(cfg, source, wanted)
    P_val_raw, P_raw = predict_both(cfg, source, onnx_model, val, ev)
    task = getattr(source.module, "task", None) or ("binary" if len(names) == 2 else "multiclass")
    probs, calibration = calibrate(cfg, P_val_raw, P_raw, val, ev, task)
    if task == "multilabel":
        evaluation, op, plots = multilabel_evaluation(cfg, probs, val, ev, names, out_dir)
        subgroups, abnormal, explanations = {}, None, None
    else:
        evaluation, op, plots, subgroups, abnormal = single_label_evaluation(cfg, source, probs, val, ev, pos, out_dir)
        from evaluation.explain import explanation_summary

        explanations = explanation_summary(out_dir / "explanations.npz")
    result = {
        "run": str(run_dir), "checkpoint": str(source.checkpoint), "split": str(cfg.split), "task": task,
        "model": onnx_model and {k: str(v) for k, v in onnx_model.items()},
        "data": {"source": ev.source, "external": bool(cfg.dataset), "n": int(len(ev.labels)),
                 "val_source": val.source, "n_val": int(len(val.labels))},
        "class_names": names, "operating_point": op, "evaluation": evaluation, "calibration": calibration,
        "abnormal": abnormal,
        "subgroups": subgroups, "plots": {name: p.name for name, p in plots.items()},
        "explanations": explanations,
        "config": OmegaConf.to_container(cfg, resolve=False),
    }
    write_outputs(result, plots, probs.ev, ev, source, run_dir, out_dir, onnx_model)
    if cfg.wandb == "on" or (cfg.wandb == "auto" and source.record.get("wandb")):
        result["wandb"] = log_to_wandb(result, source.record, out_dir)
        (out_dir / "evaluation.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def resolve_exported_model(path: str) -> dict[str, Any]:
    """``<repository>/<name>`` (newest version) or ``<repository>/<name>/<version>`` of an export."""
    folder = Path(path)
    if folder.is_dir() and not (folder / ONNX_FILE).is_file():
        versions = list_versions(folder)
        folder = folder / str(versions[-1]) if versions else folder
    if not (folder / ONNX_FILE).is_file():
        raise EvaluationError(f"{path}: not an exported model version (needs {ONNX_FILE} and {METADATA_FILE})")
    try:
        run_dir = read_metadata(folder).lineage.get("run_dir")
    except ModelVersionError as exc:
        raise EvaluationError(str(exc)) from None
    if not run_dir or not Path(run_dir).is_dir():
        raise EvaluationError(f"{folder}: the training run of this export ({run_dir}) is not available here")
    return {"onnx": folder / "model.onnx", "version_dir": folder, "run_dir": run_dir}


def predict_onnx(onnx_path: Path, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Probabilities of the exported graph (onnxruntime, CPU) for uint8 N x C x H x W images."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = [session.run(None, {name: to_unit_range(images[i : i + batch_size])})[0]
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float64)


def log_to_wandb(result: dict[str, Any], record: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """An ``evaluation`` W&B run (offline without an API key) with the metrics, intervals and the report."""
    import wandb

    from train.loggers import wandb_mode

    wb = record.get("wandb") or {}
    mode = wandb_mode()
    run = wandb.init(project=wb.get("project") or "medops", group="evaluation", job_type="evaluation",
                     name=f"eval-{record.get('run_id')}-{result['split']}", dir=str(out_dir), mode=mode,
                     config={"training_run": record.get("run_id"), "training_wandb_run": wb.get("id"),
                             "split": result["split"], "data": result["data"],
                             "operating_point": result["operating_point"]}, reinit="finish_previous")
    summary: dict[str, Any] = {}
    for name, m in result["evaluation"]["metrics"].items():
        summary[f"eval/{name}"] = m["value"]
        if m.get("ci_low") is not None:
            summary[f"eval/{name}_ci_low"], summary[f"eval/{name}_ci_high"] = m["ci_low"], m["ci_high"]
    summary |= {f"eval/calibration/{k}": v for k, v in result["calibration"].items()}
    run.log({k: v for k, v in summary.items() if v is not None})
    artifact = wandb.Artifact(f"evaluation-{record.get('run_id')}", type="evaluation")
    for name in ("report.html", "evaluation.json"):
        artifact.add_file(str(out_dir / name), name=name)
    run.log_artifact(artifact)
    info = {"id": run.id, "mode": mode, "dir": str(Path(run.dir).parent)}
    run.finish()
    return info


def print_result(result: dict[str, Any]) -> None:
    ev = result["evaluation"]
    op = result["operating_point"]
    print(f"evaluation of {result['checkpoint']} on {result['data']['source']} (n={ev['n']})")
    if op.get("threshold") is not None:
        print(f"operating point: {op['method']} on val, threshold {op['threshold']:.4f} on P({op['positive_class']})")
    for name, m in ev["metrics"].items():
        ci = f"[{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if m["ci_low"] is not None else (m["note"] or "")
        value = "n/a" if m["value"] is None else f"{m['value']:.4f}"
        print(f"  {name:<18} {value}  {ci}")
    print(f"  ECE {result['calibration']['ece']:.4f}" + (
        f" -> {result['calibration']['ece_calibrated']:.4f} (T={result['calibration']['temperature']:.3f})"
        if "temperature" in result["calibration"] else f" ({result['calibration']['not_calibrated']})"
        if "not_calibrated" in result["calibration"] else ""))
    for method in ("gradcam", "occlusion"):
        check = (result.get("explanations") or {}).get(method) or {}
        if check:
            print(f"  explanations: {method} randomisation sanity check {check['verdict']}")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from export.source import ExportError
    from medops.datasets import DataError

    try:
        result = evaluate_run(cfg)
    except (EvaluationError, DataError, ExportError) as exc:
        log.error("cannot evaluate: %s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print_result(result)


GROUP_NAMED_KEYS = {"data=": "dataset=", "model=": "exported_model="}


def _rewrite_data_override(argv: list[str]) -> list[str]:
    """``data=<path>`` -> ``dataset=<path>`` and ``model=<dir>`` -> ``exported_model=<dir>``: ``data`` and ``model``
    are config groups (conf/data, conf/model), so Hydra would read them as group choices."""
    out = []
    for arg in argv:
        prefix = next((p for p in GROUP_NAMED_KEYS if arg.startswith(p)), None)
        out.append(GROUP_NAMED_KEYS[prefix] + arg[len(prefix):] if prefix else arg)
    return out


if __name__ == "__main__":
    sys.argv = [sys.argv[0], *_rewrite_data_override(sys.argv[1:])]
    main()
