"""The parity gate: the exported model must give the checkpoint's answers on real held-out images.

Three checks, all on every image of every batch size: the largest probability difference within the tolerance, the
same arg-max class, and the same decision at the version's operating point (:mod:`medops.decision`: P(positive
class) >= the threshold for a binary task, each label's threshold for multi-label, arg-max otherwise), since a
probability a little off near the threshold can change the call the clinician sees while staying within the
tolerance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from export.onnx_export import activate, output_task
from medops.decision import DecisionRule


class ParityError(RuntimeError):
    """The exported model disagrees with the checkpoint beyond the tolerance."""


@dataclass
class ParityReport:
    engine: str
    images: int
    batch_sizes: list[int]
    max_abs_diff: float
    mean_abs_diff: float
    argmax_agreement: float
    tolerance: float
    decision: str = "arg-max class"  # the rule (DecisionRule.describe)
    decision_agreement: float = 1.0  # share of checked images with the same decision at the operating point
    decision_mismatches: int = 0  # checked images (over all batch sizes) whose decision differs

    @property
    def passed(self) -> bool:
        return (self.max_abs_diff <= self.tolerance and self.argmax_agreement == 1.0
                and self.decision_agreement == 1.0)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "passed": self.passed}

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"parity {self.engine} vs PyTorch on {self.images} held-out images, batch sizes {self.batch_sizes}: "
                f"max |prob diff| {self.max_abs_diff:.2e} (tolerance {self.tolerance:.0e}), mean "
                f"{self.mean_abs_diff:.2e}, argmax agreement {self.argmax_agreement:.2%}, same decision "
                f"({self.decision}) {self.decision_agreement:.2%}{self._flips()} -> {verdict}")

    def _flips(self) -> str:
        if not self.decision_mismatches:
            return ""
        return (f" ({self.decision_mismatches} checked image(s) get a different decision at the operating point "
                f"than the checkpoint)")


def parity_batch_sizes(max_batch_size: int, requested: Sequence[int | str] = (1, 7, "max")) -> list[int]:
    """Batch sizes to test: the requested ones, ``max`` meaning the model's max batch size; always 1 and max."""
    sizes = {max_batch_size if s == "max" else int(s) for s in requested} | {1, max_batch_size}
    return sorted(s for s in sizes if 1 <= s <= max_batch_size)


def torch_probabilities(net: nn.Module, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The checkpoint's probabilities: softmax, or one sigmoid per label for a multi-label network."""
    task = output_task(net)
    net = net.eval().cpu().float()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            out.append(activate(net(torch.from_numpy(images[i : i + batch_size])), task).numpy())
    return np.concatenate(out)


def check_parity(
    reference: np.ndarray,
    run_engine: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    batch_sizes: Sequence[int],
    tolerance: float,
    engine: str,
    rule: DecisionRule | None = None,
) -> ParityReport:
    """Run ``run_engine`` over ``images`` in every batch size and compare with the PyTorch probabilities: their
    difference, the arg-max class and the decision of ``rule`` (the version's operating point; arg-max when None)."""
    rule = rule or DecisionRule("argmax")
    diffs, agree, same, count = [], 0, 0, 0
    for bs in batch_sizes:
        n = (len(images) // bs) * bs or bs
        batch_images = np.resize(images, (n, *images.shape[1:])) if n > len(images) else images[:n]
        expected = np.resize(reference, (n, reference.shape[1])) if n > len(reference) else reference[:n]
        try:
            got = np.concatenate([run_engine(batch_images[i : i + bs]) for i in range(0, n, bs)])
        except Exception as exc:  # an engine that cannot even run the model fails the gate
            raise ParityError(f"{engine} failed on batch size {bs}: {type(exc).__name__}: {exc}") from exc
        diffs.append(np.abs(got.astype(np.float64) - expected))
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
        same += int(rule.same(got, expected).sum())
        count += n
    diff = np.concatenate([d.ravel() for d in diffs])
    return ParityReport(engine, len(images), list(batch_sizes), float(diff.max()), float(diff.mean()),
                        agree / count, tolerance, rule.describe(), same / count, count - same)


def onnxruntime_runner(onnx_path: str, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A CPU onnxruntime session as a function of a float32 NCHW batch."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
