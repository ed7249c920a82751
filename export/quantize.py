"""INT8 for CPU and edge: onnxruntime static quantisation of the exported graph, gated by clinical figures.

``python -m export run=... name=... quantize=int8`` exports and parity-checks the FP32 graph as always, then
quantises it with :func:`onnxruntime.quantization.quantize_static` (QDQ format, per-channel int8 weights, uint8
activations: with int8 activations onnxruntime's x86 kernels fuse only some Conv nodes and the graph is no faster),
calibrated on held-out images of the run's dataset (``quantization.calibration_split``, validation by default).
Several candidates are tried, in the order of ``quantization.keep_float`` x ``quantization.methods`` (which parts
stay in float: ``head``, the classifier, temperature, softmax and out-of-distribution score after the global
pooling; ``stem``, the input normalisation and the first convolution; and the calibration method: MinMax, Entropy,
Percentile); the first one whose figures pass the gate replaces ``model.onnx``.

The gate is clinical, not elementwise: on the test split, against the FP32 graph, the INT8 graph must keep the
AUROC of the positive class (the finding) within ``gate.auroc``, the accuracy within ``gate.accuracy`` and give the
same thresholded decision (the operating point for the positive class; arg-max without one) for at least
``gate.decision_agreement`` of the images. A failed gate raises :class:`QuantizationError` with every candidate's
figures; export then publishes nothing.

The graph keeps its outputs (``probabilities``, ``ood_score``, ``ood_flag``), so the same Triton Python-backend
model and ``serve --backend local`` run it unchanged.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from export.model_card import precision_line
from export.source import ExportError, ExportSource, held_out_split
from medops.metrics import auroc, summary_metrics
from medops.model_version import INPUT_NAME, OUTPUT_NAME

MODES = ("int8",)
METHODS = ("minmax", "entropy", "percentile")
PARTS = ("stem", "head")
POOLING = ("GlobalAveragePool", "ReduceMean", "AveragePool", "Flatten", "GlobalMaxPool")


class QuantizationError(ExportError):
    """No quantised candidate passed the clinical gate (the message carries every candidate's figures)."""


def check_quantize_option(cfg: DictConfig) -> str | None:
    """``cfg.quantize`` checked early (before any work): None for FP32, else one of :data:`MODES`."""
    mode = cfg.get("quantize")
    if mode in (None, "", "none", "fp32"):
        return None
    if str(mode) not in MODES:
        raise ExportError(f"quantize={mode!r} is not supported; choose {', '.join(MODES)} (or leave it unset: FP32)")
    if str(cfg.target) == "tensorrt":
        raise ExportError("quantize=int8 is for the onnxruntime targets (python, onnxruntime), not tensorrt")
    qcfg = cfg.quantization
    unknown = [m for m in qcfg.methods if str(m).lower() not in METHODS]
    unknown += [p for parts in qcfg.keep_float for p in parts if p not in PARTS]
    if unknown or not qcfg.methods or not qcfg.keep_float:
        raise ExportError(f"quantization: unknown or missing methods/parts {unknown}; methods from {METHODS}, "
                          f"keep_float lists of {PARTS}")
    return str(mode)


# -- calibration and the graph -------------------------------------------------------------------------------------
class CalibrationImages:
    """onnxruntime's calibration data reader over float32 NCHW images in [0, 1], ``batch`` images per call (default
    one: the histogram calibrators, Entropy and Percentile, stack the batches and need them all the same size)."""

    def __init__(self, images: np.ndarray, batch: int = 1, input_name: str = INPUT_NAME) -> None:
        self.images, self.batch, self.input_name = np.ascontiguousarray(images, np.float32), batch, input_name
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = ({self.input_name: self.images[i:i + self.batch]}
                          for i in range(0, len(self.images), self.batch))
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None


def _descendants(model: onnx.ModelProto, start: Sequence[onnx.NodeProto]) -> list[str]:
    """Names of ``start`` and every node that consumes, directly or not, one of their outputs."""
    found = {n.name for n in start}
    tensors = {t for n in start for t in n.output}
    for node in model.graph.node:  # topological order
        if node.name not in found and any(t in tensors for t in node.input):
            found.add(node.name)
            tensors.update(node.output)
    return [n.name for n in model.graph.node if n.name in found]


def graph_parts(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Node names of the ``stem`` (everything up to and including the first Conv) and the ``head`` (the first
    global pooling after the last Conv and everything after it: classifier, temperature, softmax, OOD score)."""
    nodes = list(model.graph.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    if not convs:
        raise ExportError("the graph has no Conv node: nothing for INT8 quantisation to speed up")
    stem = [n.name for n in nodes[:convs[0] + 1]]
    after_last = set(_descendants(model, [nodes[convs[-1]]]))
    pool = next((n for n in nodes if n.name in after_last and n.op_type in POOLING), None)
    head = _descendants(model, [pool]) if pool is not None else [n for n in after_last if n != nodes[convs[-1]].name]
    return {"stem": stem, "head": head}


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node a unique name (``nodes_to_exclude`` selects nodes by name)."""
    used = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    return model


def preprocess(fp32_path: Path, out_path: Path) -> onnx.ModelProto:
    """``quant_pre_process`` (shape inference, Conv+BatchNorm folding), nodes named; the FP32 graph to quantise."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
    model = name_nodes(onnx.load(str(out_path)))
    onnx.save_model(model, str(out_path))
    return model


def quantize_onnx(prepared: Path, out_path: Path, images: np.ndarray, method: str, keep_float: Sequence[str],
                  parts: dict[str, list[str]], activation_type: str = "uint8") -> Path:
    """One INT8 candidate: QDQ, per-channel weights, ``method`` calibration on ``images``, ``keep_float`` parts
    left in float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method.lower()]
    exclude = sorted({name for part in keep_float for name in parts[part]})
    quantize_static(str(prepared), str(out_path), CalibrationImages(images), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8 if activation_type == "int8" else
                    QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                    calibrate_method=calibrate)
    return out_path


# -- the gate -----------------------------------------------------------------------------------------------------
def probabilities(path: Path, images: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    """Every graph output of ``path`` on ``images`` (onnxruntime CPU), by output name."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    parts = [session.run(names, {session.get_inputs()[0].name: images[i:i + batch]})
             for i in range(0, len(images), batch)]
    return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(names)}


def decisions(probs: np.ndarray, operating_point: dict[str, Any]) -> np.ndarray:
    """The served decision: P(positive class) >= the operating point's threshold, else the arg-max class."""
    if operating_point.get("threshold") is not None and probs.shape[1] == 2:
        return probs[:, int(operating_point["positive_index"])] >= float(operating_point["threshold"])
    return probs.argmax(1)


def gate_figures(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray, operating_point: dict[str, Any],
                 limits: DictConfig | dict[str, float]) -> dict[str, Any]:
    """AUROC of the positive class and accuracy of both graphs, their differences, the share of images with the
    same thresholded decision, and whether each is within ``limits``."""
    positive = int(operating_point.get("positive_index", 1)) if fp32.shape[1] == 2 else 1
    a32, a8 = auroc(fp32, labels, positive), auroc(int8, labels, positive)
    acc32, acc8 = summary_metrics(fp32, labels)["acc"], summary_metrics(int8, labels)["acc"]
    agreement = float((decisions(fp32, operating_point) == decisions(int8, operating_point)).mean())
    figures = {"images": len(labels), "auroc_fp32": a32, "auroc_int8": a8, "auroc_diff": a8 - a32,
               "accuracy_fp32": acc32, "accuracy_int8": acc8, "accuracy_diff": acc8 - acc32,
               "decision_agreement": agreement,
               "decision": (f"P({operating_point.get('positive_class')}) >= {operating_point['threshold']:.4f}"
                            if operating_point.get("threshold") is not None else "arg-max class"),
               "max_abs_prob_diff": float(np.abs(int8 - fp32).max())}
    checks = {"auroc": abs(figures["auroc_diff"]) <= float(limits["auroc"]),
              "accuracy": abs(figures["accuracy_diff"]) <= float(limits["accuracy"]) + 1e-12,
              "decision_agreement": agreement >= float(limits["decision_agreement"])}
    return figures | {"checks": checks, "passed": all(checks.values())}


def _table(candidates: list[dict[str, Any]], limits: Any) -> Table:
    table = Table(title=f"INT8 candidates against FP32 on the test split (gate: |AUROC diff| <= {limits.auroc}, "
                        f"|accuracy diff| <= {limits.accuracy}, same decision >= {limits.decision_agreement:.0%})")
    for col in ("calibration", "kept in float", "AUROC FP32 -> INT8", "accuracy FP32 -> INT8", "same decision",
                "gate"):
        table.add_column(col)
    for c in candidates:
        g = c["gate"]
        table.add_row(c["method"], ", ".join(c["keep_float"]) or "-",
                      f"{g['auroc_fp32']:.4f} -> {g['auroc_int8']:.4f} ({g['auroc_diff']:+.4f})",
                      f"{g['accuracy_fp32']:.4f} -> {g['accuracy_int8']:.4f} ({g['accuracy_diff']:+.4f})",
                      f"{g['decision_agreement']:.2%}", "PASS" if g["passed"] else "fail")
    return table


def _candidates(cfg: DictConfig, onnx_path: Path, tmp: Path, calib: np.ndarray, test_images: np.ndarray,
                labels: np.ndarray, op: dict[str, Any], console: Console) -> tuple[list[dict[str, Any]], dict]:
    """Quantise and gate candidates in the configured order until one passes; returns all tried and the parts."""
    qcfg = cfg.quantization
    fp32 = probabilities(onnx_path, test_images)
    parts = graph_parts(preprocess(onnx_path, tmp / "prepared.onnx"))
    candidates: list[dict[str, Any]] = []
    for keep in qcfg.keep_float:
        for method in qcfg.methods:
            out = quantize_onnx(tmp / "prepared.onnx", tmp / f"int8_{len(candidates)}.onnx", calib, str(method),
                                list(keep), parts, str(qcfg.activation_type))
            outputs = probabilities(out, test_images)
            missing = set(fp32) - set(outputs)
            if missing:
                raise QuantizationError(f"the INT8 graph lost outputs {sorted(missing)}")
            figures = gate_figures(fp32[OUTPUT_NAME], outputs[OUTPUT_NAME], labels, op, qcfg.gate)
            for name in sorted(set(outputs) - {OUTPUT_NAME}):  # the OOD flag: reported, not gated
                if outputs[name].dtype == bool:
                    figures[f"{name}_agreement"] = float((outputs[name] == fp32[name]).mean())
            candidates.append({"method": str(method).lower(), "keep_float": list(keep), "gate": figures, "path": out})
            console.print(f"INT8 candidate {method}, float: {', '.join(keep)}: AUROC {figures['auroc_diff']:+.4f}, "
                          f"accuracy {figures['accuracy_diff']:+.4f}, same decision "
                          f"{figures['decision_agreement']:.2%}: {'PASS' if figures['passed'] else 'fail'}")
            if figures["passed"]:
                return candidates, parts
    return candidates, parts


def quantize_version(cfg: DictConfig, source: ExportSource, onnx_path: Path, operating_point: dict[str, Any],
                     console: Console) -> dict[str, Any]:
    """Replace the parity-checked FP32 ``onnx_path`` by the first INT8 candidate that passes the gate; returns the
    version's ``precision`` metadata. Raises :class:`QuantizationError` (nothing replaced) when none passes."""
    qcfg = cfg.quantization
    calib, _ = held_out_split(source, qcfg.calibration_split, qcfg.calibration_images, cfg.parity.data)
    test_images, labels = held_out_split(source, qcfg.split, qcfg.max_test_images, cfg.parity.data)
    console.print(f"INT8: calibrating on {len(calib)} {qcfg.calibration_split} images; gate on {len(labels)} "
                  f"{qcfg.split} images against FP32")
    with tempfile.TemporaryDirectory(prefix="medops-int8-") as tmp:
        candidates, parts = _candidates(cfg, onnx_path, Path(tmp), calib, test_images, labels,
                                        dict(operating_point or {}), console)
        console.print(_table(candidates, qcfg.gate))
        chosen = candidates[-1]
        summary = [{k: v for k, v in c.items() if k != "path"} for c in candidates]
        if not chosen["gate"]["passed"]:
            raise QuantizationError("no INT8 candidate passed the clinical gate: " + "; ".join(
                f"{c['method']} (float: {', '.join(c['keep_float'])}): AUROC {c['gate']['auroc_fp32']:.4f} -> "
                f"{c['gate']['auroc_int8']:.4f}, accuracy {c['gate']['accuracy_fp32']:.4f} -> "
                f"{c['gate']['accuracy_int8']:.4f}, same decision {c['gate']['decision_agreement']:.2%}"
                for c in summary))
        onnx.save_model(onnx.load(str(chosen["path"])), str(onnx_path))
    precision = {"precision": "int8", "format": "QDQ", "per_channel": True, "weights": "int8",
                 "activations": str(qcfg.activation_type), "method": chosen["method"],
                 "keep_float": chosen["keep_float"],
                 "kept_float_nodes": sum(len(parts[p]) for p in chosen["keep_float"]),
                 "calibration": {"split": str(qcfg.calibration_split), "images": len(calib)},
                 "limits": {k: float(qcfg.gate[k]) for k in ("auroc", "accuracy", "decision_agreement")},
                 "gate": chosen["gate"], "candidates": summary}
    console.print(precision_line(precision))
    return precision


__all__ = ["QuantizationError", "check_quantize_option", "gate_figures", "graph_parts",
           "quantize_onnx", "quantize_version"]
