"""INT8 for CPU and edge: onnxruntime static quantisation of the exported graph, gated by clinical figures.

``python -m export run=... name=... quantize=int8`` exports and parity-checks the FP32 graph as always, then
quantises it with :func:`onnxruntime.quantization.quantize_static` (QDQ format, per-channel int8 weights, uint8
activations: with int8 activations onnxruntime's x86 kernels fuse only some Conv nodes and the graph is no faster),
calibrated on held-out images of the run's dataset (``quantization.calibration_split``, validation by default).
Several candidates are tried, in the order of ``quantization.keep_float`` x ``quantization.methods`` (which parts
stay in float: ``head``, the classifier, temperature, softmax and out-of-distribution score after the global
pooling; ``stem``, the input normalisation and the first convolution; and the calibration method: MinMax, Entropy,
Percentile).

The figures are clinical, not elementwise: against the FP32 graph, the INT8 graph must keep the AUROC of the
positive class (the finding) within ``gate.auroc``, the accuracy within ``gate.accuracy`` and give the same
thresholded decision (:mod:`medops.decision`, the rule export's parity gate also checks: P(positive class) >= the
operating point's threshold; each label's threshold for multi-label; arg-max otherwise) for at least
``gate.decision_agreement`` of the images.

The candidate is *chosen* on the validation split (``quantization.choice_split``, ``val`` by default, where
the calibration images also come from): the first candidate, in the order above, whose validation figures are within
those limits. The chosen candidate alone is then *gated* on the test split (``quantization.split``) with the same
limits; the test split takes no part in the choice, so its figures are an unbiased check of the one candidate
published. No candidate within the limits on validation, or a chosen candidate that fails on test, raises
:class:`QuantizationError` with the figures; export then publishes nothing. ``metadata.json`` ``precision`` keeps
the chosen candidate's validation figures (``choice``), its test figures (``gate``) and every candidate's
validation figures (``candidates``).

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
from medops.decision import DecisionRule, decision_rule
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


def gate_figures(fp32: np.ndarray, int8: np.ndarray, labels: np.ndarray, rule: DecisionRule,
                 limits: DictConfig | dict[str, float]) -> dict[str, Any]:
    """AUROC of the positive class and accuracy of both graphs, their differences, the share of images with the
    same thresholded decision (``rule``), and whether each is within ``limits``."""
    positive = rule.positive_index if fp32.shape[1] == 2 else 1
    a32, a8 = auroc(fp32, labels, positive), auroc(int8, labels, positive)
    acc32, acc8 = summary_metrics(fp32, labels)["acc"], summary_metrics(int8, labels)["acc"]
    agreement = rule.agreement(fp32, int8)
    figures = {"images": len(labels), "auroc_fp32": a32, "auroc_int8": a8, "auroc_diff": a8 - a32,
               "accuracy_fp32": acc32, "accuracy_int8": acc8, "accuracy_diff": acc8 - acc32,
               "decision_agreement": agreement, "decision": rule.describe(),
               "max_abs_prob_diff": float(np.abs(int8 - fp32).max())}
    checks = {"auroc": abs(figures["auroc_diff"]) <= float(limits["auroc"]),
              "accuracy": abs(figures["accuracy_diff"]) <= float(limits["accuracy"]) + 1e-12,
              "decision_agreement": agreement >= float(limits["decision_agreement"])}
    return figures | {"checks": checks, "passed": all(checks.values())}


def compare_outputs(fp32: dict[str, np.ndarray], int8: dict[str, np.ndarray], labels: np.ndarray, rule: DecisionRule,
                    limits: DictConfig | dict[str, float], split: str) -> dict[str, Any]:
    """:func:`gate_figures` of the probabilities on ``split``, plus the agreement of every boolean output (the OOD
    flag: reported, not gated); QuantizationError when the INT8 graph lost an output."""
    missing = set(fp32) - set(int8)
    if missing:
        raise QuantizationError(f"the INT8 graph lost outputs {sorted(missing)}")
    figures = {"split": split} | gate_figures(fp32[OUTPUT_NAME], int8[OUTPUT_NAME], labels, rule, limits)
    for name in sorted(set(int8) - {OUTPUT_NAME}):
        if int8[name].dtype == bool:
            figures[f"{name}_agreement"] = float((int8[name] == fp32[name]).mean())
    return figures


def _figures_line(g: dict[str, Any]) -> str:
    return (f"AUROC {g['auroc_fp32']:.4f} -> {g['auroc_int8']:.4f}, accuracy {g['accuracy_fp32']:.4f} -> "
            f"{g['accuracy_int8']:.4f}, same decision {g['decision_agreement']:.2%}")


def _table(candidates: list[dict[str, Any]], limits: Any, split: str) -> Table:
    table = Table(title=f"INT8 candidates against FP32 on the {split} split, the choice (limits: |AUROC diff| <= "
                        f"{limits.auroc}, |accuracy diff| <= {limits.accuracy}, same decision >= "
                        f"{limits.decision_agreement:.0%})")
    for col in ("calibration", "kept in float", "AUROC FP32 -> INT8", "accuracy FP32 -> INT8", "same decision",
                "within limits"):
        table.add_column(col)
    for c in candidates:
        g = c["val"]
        table.add_row(c["method"], ", ".join(c["keep_float"]) or "-",
                      f"{g['auroc_fp32']:.4f} -> {g['auroc_int8']:.4f} ({g['auroc_diff']:+.4f})",
                      f"{g['accuracy_fp32']:.4f} -> {g['accuracy_int8']:.4f} ({g['accuracy_diff']:+.4f})",
                      f"{g['decision_agreement']:.2%}", "yes" if g["passed"] else "no")
    return table


def _candidates(cfg: DictConfig, onnx_path: Path, tmp: Path, calib: np.ndarray, images: np.ndarray,
                labels: np.ndarray, rule: DecisionRule, split: str, console: Console
                ) -> tuple[list[dict[str, Any]], dict]:
    """Quantise candidates in the configured order and measure each on the choice split (``images``) until one is
    within the limits; returns all tried (figures under ``val``) and the graph parts."""
    qcfg = cfg.quantization
    fp32 = probabilities(onnx_path, images)
    parts = graph_parts(preprocess(onnx_path, tmp / "prepared.onnx"))
    candidates: list[dict[str, Any]] = []
    for keep in qcfg.keep_float:
        for method in qcfg.methods:
            out = quantize_onnx(tmp / "prepared.onnx", tmp / f"int8_{len(candidates)}.onnx", calib, str(method),
                                list(keep), parts, str(qcfg.activation_type))
            figures = compare_outputs(fp32, probabilities(out, images), labels, rule, qcfg.gate, split)
            candidates.append({"method": str(method).lower(), "keep_float": list(keep), "val": figures, "path": out})
            console.print(f"INT8 candidate {method}, float: {', '.join(keep)} on {split}: AUROC "
                          f"{figures['auroc_diff']:+.4f}, accuracy {figures['accuracy_diff']:+.4f}, same decision "
                          f"{figures['decision_agreement']:.2%}: {'within limits' if figures['passed'] else 'no'}")
            if figures["passed"]:
                return candidates, parts
    return candidates, parts


def quantize_version(cfg: DictConfig, source: ExportSource, onnx_path: Path, operating_point: dict[str, Any],
                     console: Console, rule: DecisionRule | None = None) -> dict[str, Any]:
    """Replace the parity-checked FP32 ``onnx_path`` by the INT8 candidate chosen on validation, once it passes the
    gate on test; returns the version's ``precision`` metadata. ``rule``: the served decision (by default the
    operating point's, :func:`medops.decision.decision_rule`). Raises :class:`QuantizationError` (nothing
    replaced) when no candidate is within the limits on validation or the chosen one fails on test."""
    qcfg = cfg.quantization
    rule = rule or decision_rule(operating_point, source.class_names)
    choice_split, test_split = str(qcfg.get("choice_split") or "val"), str(qcfg.split)
    calib, _ = held_out_split(source, qcfg.calibration_split, qcfg.calibration_images, cfg.parity.data)
    val_images, val_labels = held_out_split(source, choice_split, qcfg.max_test_images, cfg.parity.data)
    test_images, labels = held_out_split(source, test_split, qcfg.max_test_images, cfg.parity.data)
    console.print(f"INT8: calibrating on {len(calib)} {qcfg.calibration_split} images; choosing on "
                  f"{len(val_labels)} {choice_split} images, gate on {len(labels)} {test_split} images, against FP32")
    with tempfile.TemporaryDirectory(prefix="medops-int8-") as tmp:
        candidates, parts = _candidates(cfg, onnx_path, Path(tmp), calib, val_images, val_labels, rule,
                                        choice_split, console)
        console.print(_table(candidates, qcfg.gate, choice_split))
        chosen = candidates[-1]
        summary = [{k: v for k, v in c.items() if k != "path"} for c in candidates]
        if not chosen["val"]["passed"]:
            raise QuantizationError(
                f"no INT8 candidate passed the clinical gate's limits on the {choice_split} split (the choice): "
                + "; ".join(f"{c['method']} (float: {', '.join(c['keep_float'])}): {_figures_line(c['val'])}"
                            for c in summary))
        gate = compare_outputs(probabilities(onnx_path, test_images), probabilities(chosen["path"], test_images),
                               labels, rule, qcfg.gate, test_split)
        what = f"{chosen['method']} (float: {', '.join(chosen['keep_float'])})"
        console.print(f"INT8 gate of {what}, chosen on {choice_split}, on {len(labels)} {test_split} images: "
                      f"{_figures_line(gate)}: {'PASS' if gate['passed'] else 'FAIL'}")
        if not gate["passed"]:
            failed = ", ".join(k for k, ok in gate["checks"].items() if not ok)
            raise QuantizationError(
                f"the INT8 candidate chosen on the {choice_split} split, {what}, failed the clinical gate on the "
                f"{test_split} split ({failed}): {_figures_line(gate)} (on {choice_split}: "
                f"{_figures_line(chosen['val'])})")
        onnx.save_model(onnx.load(str(chosen["path"])), str(onnx_path))
    precision = {"precision": "int8", "format": "QDQ", "per_channel": True, "weights": "int8",
                 "activations": str(qcfg.activation_type), "method": chosen["method"],
                 "keep_float": chosen["keep_float"],
                 "kept_float_nodes": sum(len(parts[p]) for p in chosen["keep_float"]),
                 "calibration": {"split": str(qcfg.calibration_split), "images": len(calib)},
                 "limits": {k: float(qcfg.gate[k]) for k in ("auroc", "accuracy", "decision_agreement")},
                 "choice": chosen["val"], "gate": gate, "candidates": summary}
    console.print(precision_line(precision))
    return precision


__all__ = ["QuantizationError", "check_quantize_option", "compare_outputs", "gate_figures", "graph_parts",
           "quantize_onnx", "quantize_version"]
