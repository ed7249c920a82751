"""Online prediction of image files: read with the model's own input contract, infer, rank the classes.

Used by ``python -m serve predict``. Works with any :class:`serve.contract.Backend` (Triton over HTTP/gRPC, or
onnxruntime in-process), so the same files give the same probabilities whichever backend serves them.

PRIVACY: a file that cannot be read is reported with its path and a technical reason only
(:class:`medops.ImageReadError` never carries DICOM header values; other exceptions are reported by type name),
and results never contain header values: no patient data reaches the output.

Torch-free.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from medops import ImageReadError, load_for_model
from medops.decision import DecisionRule
from medops.dicom import modality_warning
from medops.model_version import OOD_FLAG_OUTPUT, OOD_SCORE_OUTPUT, OUTPUT_NAME
from serve.contract import Backend, ModelInfo, infer_outputs

__all__ = [
    "decision_text",
    "failed",
    "label_thresholds",
    "predict_files",
    "read_input",
    "render_errors",
    "render_json",
    "render_table",
    "rule_text",
    "serving_rule",
    "top_k_classes",
]


def read_input(path: str | os.PathLike[str], info: ModelInfo) -> np.ndarray:
    """One file -> float32 [C, H, W] in the model's contract (size, channels, DICOM window).

    Raises:
        ImageReadError: the file cannot be read; the reason never contains header values.
    """
    name = os.fspath(path)
    try:
        return load_for_model(name, info.size, info.channels, window=info.window)
    except ImageReadError:
        raise
    except Exception as exc:  # only the type: a library message could quote file contents
        raise ImageReadError(name, f"cannot read image ({type(exc).__name__})") from None


def top_k_classes(probabilities: np.ndarray, class_names: Sequence[str], k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable classes, most probable first (ties keep class order)."""
    probs = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    k = max(1, min(int(k), len(probs)))
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"class": _class_name(class_names, int(i)), "probability": float(probs[i])} for i in order]


def _class_name(class_names: Sequence[str], index: int) -> str:
    return str(class_names[index]) if index < len(class_names) else str(index)


def model_task(info: ModelInfo) -> str:
    """The task the served model was trained for (``binary``, ``multiclass``, ``ordinal`` or ``multilabel``): from
    the version's metadata (local backend) or its Triton ``task`` parameter; by class count when neither says."""
    meta = info.extra.get("metadata") or {}
    params = info.extra.get("parameters") or {}
    task = ((meta.get("input") or {}).get("task") or (meta.get("metrics") or {}).get("task")
            or (meta.get("data") or {}).get("task") or params.get("task"))
    return str(task) if task else ("binary" if len(info.class_names) == 2 else "multiclass")


def label_thresholds(info: ModelInfo) -> dict[str, float] | None:
    """A multi-label model's threshold per label, chosen on validation: by ``evaluation.evaluate`` (the version's
    operating point) or else at training (``labels.thresholds`` of the run), from the metadata or the Triton
    ``label_thresholds`` parameter; 0.5 for a label without one. ``None`` for other tasks."""
    if model_task(info) != "multilabel":
        return None
    meta = info.extra.get("metadata") or {}
    chosen = ((meta.get("operating_point") or {}).get("label_thresholds")
              or ((meta.get("metrics") or {}).get("labels") or {}).get("thresholds"))
    if not chosen and (info.extra.get("parameters") or {}).get("label_thresholds"):
        chosen = json.loads(info.extra["parameters"]["label_thresholds"])
    chosen = chosen or {}
    return {str(name): float(chosen.get(str(name), 0.5)) for name in info.class_names}


def label_decision(probs: np.ndarray, thresholds: dict[str, float]) -> dict[str, Any]:
    """A multi-label result: every label's probability against its threshold, and the labels at or above it."""
    rows = [{"label": name, "probability": float(p), "threshold": t, "present": bool(p >= t)}
            for (name, t), p in zip(thresholds.items(), probs, strict=True)]
    return {"labels": [r["label"] for r in rows if r["present"]], "per_label": rows}


def serving_rule(info: ModelInfo) -> DecisionRule:
    """The decision the served version makes (:mod:`medops.decision`): each label against its threshold
    (multi-label), P(positive class) >= the operating point (binary with one), the arg-max class plus
    P(abnormal) >= its threshold (multi-class with a declared abnormal set), else the arg-max class."""
    thresholds = label_thresholds(info)
    if thresholds is not None:
        return DecisionRule("labels", label_thresholds=tuple(thresholds.values()))
    names = list(info.class_names)
    if info.extra.get("abnormal_classes") and len(names) > 2:
        abnormal = [names.index(c) for c in info.extra["abnormal_classes"] if c in names]
        return DecisionRule("argmax", abnormal_indices=tuple(abnormal),
                            abnormal_threshold=float(info.extra["abnormal_threshold"]))
    threshold = info.extra.get("threshold")
    if threshold is not None and len(names) == 2:
        positive = names.index(info.extra["positive_class"]) if info.extra.get("positive_class") in names else 1
        return DecisionRule("threshold", threshold=float(threshold), positive_index=positive,
                            positive_class=names[positive])
    return DecisionRule("argmax")


def rule_text(rule: DecisionRule, class_names: Sequence[str]) -> str:
    """The rule in words for a person: ``P(malignant) >= 0.2016``, ``each label at or above its own threshold``,
    ``arg-max class; abnormal when P(b + c) >= 0.3000`` or ``arg-max class (no operating point)``."""
    if rule.kind == "threshold":
        return f"P({rule.positive_class}) >= {rule.threshold:.4f}"
    if rule.kind == "labels":
        return "each label at or above its own threshold"
    if rule.abnormal_indices and rule.abnormal_threshold is not None:
        abnormal = " + ".join(_class_name(class_names, i) for i in rule.abnormal_indices)
        return f"arg-max class; abnormal when P({abnormal}) >= {rule.abnormal_threshold:.4f}"
    return "arg-max class (no operating point)"


def predict_files(paths: Iterable[str | os.PathLike[str]], backend: Backend, top_k: int = 3) -> list[dict[str, Any]]:
    """Predict each file with one request per file; one result per path, in order.

    A result is ``{"path", "top": [{"class", "probability"}...], "probabilities", "model", "version",
    "latency_ms", "decision"}`` (``latency_ms``: the inference round trip, reading excluded; ``decision``: what the
    version decides, at its operating point when it has one, with the ``rule`` in words), ``ood_score``/``ood_flag``
    when the version computes them (:mod:`medops.ood`) and ``warnings`` (e.g. a DICOM whose Modality the model was
    not trained on); or ``{"path", "error"}`` for a file that cannot be read: the other files are still predicted.

    Raises:
        ServeError: the backend failed (server down, model unloaded): not a problem of one input.
    """
    info = backend.info
    results: list[dict[str, Any]] = []
    for path in paths:
        name = os.fspath(path)
        try:
            image = read_input(name, info)
        except ImageReadError as exc:
            results.append({"path": name, "error": exc.reason})
            continue
        start = time.perf_counter()
        outputs = infer_outputs(backend, image[None])
        latency_ms = (time.perf_counter() - start) * 1000.0
        results.append(prediction_result(name, outputs, info, latency_ms, top_k))
    return results


def prediction_result(path: str, outputs: dict[str, np.ndarray], info: ModelInfo, latency_ms: float,
                      top_k: int) -> dict[str, Any]:
    """The result of one file from the model's outputs for it (batch of one)."""
    probs = outputs[OUTPUT_NAME][0]
    result: dict[str, Any] = {
        "path": path,
        "top": top_k_classes(probs, info.class_names, top_k),
        "probabilities": [float(p) for p in probs],
        "model": info.name,
        "version": str(info.version),
        "latency_ms": round(latency_ms, 3),
    }
    thresholds = label_thresholds(info)
    decision = label_decision(probs, thresholds) if thresholds else operating_point_decision(probs, info)
    if decision is None:  # no operating point: the arg-max class, said so by the rule
        decision = {"class": _class_name(info.class_names, int(np.argmax(probs)))}
    decision["rule"] = rule_text(serving_rule(info), info.class_names)
    result["decision"] = decision
    result |= ood_fields(outputs, 0)
    warnings = [w for w in (modality_warning(path, info.modalities),) if w]
    if result.get("ood_flag"):
        warnings.append(f"out of distribution: ood_score {result['ood_score']:.2f} > threshold "
                        f"{info.extra.get('ood_threshold', float('nan')):.2f}; do not rely on this answer")
    if warnings:
        result["warnings"] = warnings
    return result


def ood_fields(outputs: dict[str, np.ndarray], row: int) -> dict[str, Any]:
    """``ood_score`` (float) and ``ood_flag`` (bool) of one row, when the model returns them."""
    if OOD_SCORE_OUTPUT not in outputs:
        return {}
    fields: dict[str, Any] = {"ood_score": round(float(np.asarray(outputs[OOD_SCORE_OUTPUT])[row].reshape(-1)[0]), 4)}
    if OOD_FLAG_OUTPUT in outputs:
        fields["ood_flag"] = bool(np.asarray(outputs[OOD_FLAG_OUTPUT])[row].reshape(-1)[0])
    return fields


def operating_point_decision(probs: np.ndarray, info: ModelInfo) -> dict[str, Any] | None:
    """The binary decision at the operating point chosen on validation (``evaluation.evaluate``), if there is one."""
    if info.extra.get("abnormal_classes") and len(info.class_names) > 2:
        return abnormal_decision(probs, info)
    threshold = info.extra.get("threshold")
    if threshold is None or len(info.class_names) != 2:
        return None
    positive = info.class_names.index(info.extra["positive_class"]) if info.extra.get("positive_class") in \
        info.class_names else 1
    chosen = positive if probs[positive] >= threshold else 1 - positive
    return {"class": info.class_names[chosen], "threshold": float(threshold),
            "positive_class": info.class_names[positive]}


def abnormal_decision(probs: np.ndarray, info: ModelInfo) -> dict[str, Any]:
    """Multi-class with a declared abnormal set: P(abnormal) (the sum over the set) against its threshold."""
    abnormal = [c for c in info.extra["abnormal_classes"] if c in info.class_names]
    p_abnormal = float(sum(probs[info.class_names.index(c)] for c in abnormal))
    threshold = float(info.extra["abnormal_threshold"])
    return {"class": info.class_names[int(np.argmax(probs))], "abnormal": p_abnormal >= threshold,
            "p_abnormal": round(p_abnormal, 6), "threshold": threshold, "abnormal_classes": abnormal}


def failed(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The error entries of ``results``."""
    return [r for r in results if "error" in r]


def render_json(results: Sequence[dict[str, Any]]) -> str:
    """A JSON array, one object per file (the ``probabilities`` list is kept: it is in class order)."""
    return json.dumps(list(results), indent=2)


def render_table(results: Sequence[dict[str, Any]], info: ModelInfo, backend_label: str = "") -> Table:
    """The predictions as a rich table: per file its decision (in bold, at the version's operating point when it has
    one; the caption states the rule) and one row per class with its probability (files that could not be read
    are left out)."""
    where = f" via {backend_label}" if backend_label else ""
    table = Table(title=f"{info.name} v{info.version}{where}", title_justify="left",
                  caption=_rule_caption(info), caption_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("decision")
    table.add_column("#", justify="right")
    table.add_column("class")
    table.add_column("probability", justify="right")
    table.add_column("latency ms", justify="right")
    has_ood = any("ood_score" in r for r in results)
    if has_ood:
        table.add_column("OOD score", justify="right")
    multilabel = any("per_label" in (r.get("decision") or {}) for r in results)
    if multilabel:  # every label with its threshold; the labels at or above it are marked present
        table.add_column("threshold", justify="right")
        table.add_column("present")
    for result in results:
        if "error" not in result:  # errors are reported on their own lines by render_errors
            _add_file_rows(table, result, has_ood, multilabel)
    return table


def _rule_caption(info: ModelInfo) -> str:
    """What the decision column means: the rule, and where it comes from."""
    rule = serving_rule(info)
    text = rule_text(rule, info.class_names)
    if rule.kind == "threshold":
        return f"decision at {text} (the version's operating point, chosen on validation); class rows: probabilities"
    if rule.kind == "labels":
        return "decision: the labels at or above their own thresholds (chosen on validation)"
    if rule.abnormal_indices:
        return f"decision: {text} (the version's operating point); class rows: probabilities"
    return (f"decision: the arg-max class ({info.name} v{info.version} has no operating point); "
            "class rows: probabilities")


def _add_file_rows(table: Table, result: dict[str, Any], has_ood: bool, multilabel: bool) -> None:
    """One file: the decision on its first row, then its classes (or labels) by probability."""
    top = _table_entries(result)
    for rank, entry in enumerate(top, start=1):
        first = rank == 1
        cells = [
            escape(result["path"]) if first else "",
            f"[bold]{escape(decision_text(result))}[/bold]" if first else "",
            str(rank),
            f"[bold]{escape(entry['class'])}[/bold]" if entry.get("present") else escape(entry["class"]),
            f"{entry['probability']:.4f}",
            f"{result['latency_ms']:.1f}" if first else "",
        ]
        if has_ood:
            cells.append(ood_cell(result) if first else "")
        if multilabel:
            cells += [f"{entry['threshold']:.4f}" if "threshold" in entry else "",
                      ("yes" if entry["present"] else "no") if "present" in entry else ""]
        table.add_row(*cells, end_section=rank == len(top))


def decision_text(result: dict[str, Any]) -> str:
    """A result's decision in a few words: the class, the labels present (``+``-joined, ``(none)``), or the class
    and the abnormal call; the top class for a result without a decision."""
    decision = result.get("decision") or {}
    if "labels" in decision:
        return "+".join(decision["labels"]) or "(none)"
    name = decision.get("class") or (result.get("top") or [{}])[0].get("class", "")
    if "abnormal" in decision:
        return f"{name}, {'abnormal' if decision['abnormal'] else 'not abnormal'}"
    return str(name)


def _table_entries(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of one file: its top classes, or for a multi-label model every label, most probable first."""
    per_label = (result.get("decision") or {}).get("per_label")
    if not per_label:
        return list(result["top"])
    rows = [{"class": r["label"], "probability": r["probability"], "threshold": r["threshold"],
             "present": r["present"]} for r in per_label]
    return sorted(rows, key=lambda r: -r["probability"])


def ood_cell(result: dict[str, Any]) -> str:
    if "ood_score" not in result:
        return ""
    score = f"{result['ood_score']:.2f}"
    return f"[bold red]{score} OOD[/bold red]" if result.get("ood_flag") else score


def render_errors(results: Sequence[dict[str, Any]], console: Console) -> None:
    """One line per file that could not be read: ``error: <path>: <reason>``; one per warning of a prediction:
    ``warning: <path>: <warning>``."""
    for result in failed(results):
        console.print(f"[red]error[/red]: {escape(result['path'])}: {escape(result['error'])}", soft_wrap=True)
    for result in results:
        for warning in result.get("warnings") or []:
            console.print(f"[yellow]warning[/yellow]: {escape(result['path'])}: {escape(warning)}", soft_wrap=True)
