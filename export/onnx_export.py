"""PyTorch -> ONNX with a dynamic batch axis; the graph holds normalisation and the output activation: the softmax
over the classes, or for a multi-label network (``net.task == "multilabel"``, set by :mod:`train.module`) one sigmoid
per label. Either way the output is ``probabilities`` FP32 [N, K]."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from medops.model_version import EMBEDDING_OUTPUT as EMBEDDING_NAME
from medops.model_version import INPUT_NAME, OOD_OUTPUTS, OUTPUT_NAME
from medops.ood import OODProfile

log = logging.getLogger(__name__)
for _noisy in ("onnx_ir", "onnxscript", "torch.onnx", "torch._export", "torch.export"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)


def output_task(net: nn.Module) -> str:
    """The task ``net`` was trained for: its ``task`` attribute (set by :class:`train.module.ClassificationModule`),
    looked up through wrappers such as :class:`TemperatureScaled`; ``multiclass`` (softmax) when none says."""
    current: nn.Module | None = net
    while current is not None:
        task = getattr(current, "task", None)
        if isinstance(task, str):
            return task
        current = getattr(current, "net", None)
    return "multiclass"


def activate(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Probabilities of logits: one sigmoid per label for ``multilabel``, else the softmax over the classes."""
    return logits.float().sigmoid() if task == "multilabel" else logits.float().softmax(dim=-1)


class ProbabilityModel(nn.Module):
    """The exported graph: raw [0, 1] image -> normalisation -> network -> class probabilities (multi-label: one
    sigmoid per label)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.output_task = output_task(net)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return activate(self.net(image), self.output_task)


class TemperatureScaled(nn.Module):
    """Logits divided by a temperature fitted on validation (``evaluation.evaluate calibrate=true``)."""

    def __init__(self, net: nn.Module, temperature: float) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("inv_temperature", torch.tensor(1.0 / float(temperature)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image).float() * self.inv_temperature


class ScoredModel(nn.Module):
    """Probabilities and the out-of-distribution score (:mod:`medops.ood`) from one forward pass.

    The network is split at its last linear layer: the penultimate features feed both the classifier head and
    the Mahalanobis distance to the nearest training-class mean. Outputs: ``probabilities`` [N, K],
    ``ood_score`` [N, 1] and ``ood_flag`` [N, 1] (score above the threshold set on validation).
    """

    def __init__(self, net: nn.Module, profile: OODProfile) -> None:
        super().__init__()
        scale = 1.0
        if isinstance(net, TemperatureScaled):
            net, scale = net.net, float(net.inv_temperature)
        self.output_task = output_task(net)
        self.body, self.head = without_last_linear(net), last_linear(net)
        self.register_buffer("inv_temperature", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("factor", torch.tensor(profile.factor, dtype=torch.float32))
        self.register_buffer("centres", torch.tensor(profile.means @ profile.factor, dtype=torch.float32))
        self.register_buffer("threshold", torch.tensor(profile.threshold, dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.body(image).float().flatten(1)
        probs = activate(self.head(features).float() * self.inv_temperature, self.output_task)
        z = features @ self.factor
        squared = ((z.unsqueeze(1) - self.centres.unsqueeze(0)) ** 2).sum(dim=-1)
        score = squared.min(dim=1, keepdim=True).values.sqrt()
        return probs, score, score > self.threshold


def export_onnx(net: nn.Module, path: Path, input_shape: tuple[int, int, int], max_batch_size: int,
                opset: int = 18, optimize: bool = True, ood: OODProfile | None = None) -> Path:
    """Export ``net`` (float32, CPU, eval) to ``path``; input ``image`` [batch, C, H, W], output ``probabilities``
    (and ``ood_score``, ``ood_flag`` with an ``ood`` profile: :class:`ScoredModel`).

    ``optimize`` runs the ONNX optimiser of the exporter (constant folding, redundant-node removal, pattern
    rewrites): the simplification step.
    """
    model, outputs = (ProbabilityModel(net), [OUTPUT_NAME]) if ood is None else \
        (ScoredModel(net, ood), [OUTPUT_NAME, *OOD_OUTPUTS])
    _export_dynamic_batch(model, path, input_shape, max_batch_size, opset, outputs, optimize)
    check_onnx(path, input_shape, outputs)
    return path


def _export_dynamic_batch(model: nn.Module, path: Path, input_shape: tuple[int, int, int], max_batch_size: int,
                          opset: int, output_names: list[str], optimize: bool) -> None:
    """torch.onnx (dynamo) export of ``model`` with input ``image`` [batch 1..max, C, H, W], weights inlined."""
    model = model.eval().cpu().float()
    example = torch.rand(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch_size))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=output_names, dynamic_shapes={INPUT_NAME: {0: batch}}, optimize=optimize, verbose=False,
        )
    inline_weights(path)


def inline_weights(path: Path) -> None:
    """Store the weights inside the .onnx file (one file to ship) unless the model exceeds protobuf's 2 GB."""
    data_files = list(path.parent.glob(path.name + ".data"))
    if not data_files:
        return
    model = onnx.load(str(path))  # pulls the external tensors in
    if model.ByteSize() < 2**31 - 2**20:
        onnx.save_model(model, str(path), save_as_external_data=False)
        for f in data_files:
            f.unlink()


def check_onnx(path: Path, input_shape: tuple[int, int, int], outputs: list[str] | None = None) -> onnx.ModelProto:
    """``onnx.checker`` (full) plus the I/O contract: one float input [batch, C, H, W], the named outputs
    (default: ``probabilities`` only)."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    (inp,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    if inp.name != INPUT_NAME or not isinstance(dims[0], str) or tuple(dims[1:]) != input_shape:
        raise ValueError(f"{path}: unexpected input {inp.name} {dims}; expected {INPUT_NAME} [batch, *{input_shape}]")
    expected = outputs or [OUTPUT_NAME]
    if [o.name for o in model.graph.output] != expected:
        raise ValueError(f"{path}: outputs {[o.name for o in model.graph.output]}, expected {expected}")
    return model


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))




class EmbeddingModel(nn.Module):
    """The network without its last linear layer: raw [0, 1] image -> penultimate features (for drift checks)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = without_last_linear(net)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image).float().flatten(1)


def last_linear(net: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of ``net`` in module order (the classifier head)."""
    linears = [module for module in net.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError("the network has no nn.Linear layer")
    return linears[-1]


def without_last_linear(net: nn.Module) -> nn.Module:
    """A copy of ``net`` whose last ``nn.Linear`` (in module order) is replaced by ``nn.Identity``."""
    import copy

    clone = copy.deepcopy(net)
    names = [name for name, module in clone.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError("the network has no nn.Linear layer to cut off")
    parent_name, _, child = names[-1].rpartition(".")
    parent = clone.get_submodule(parent_name) if parent_name else clone
    setattr(parent, child, nn.Identity())
    return clone


def export_embedding_onnx(net: nn.Module, path: Path, input_shape: tuple[int, int, int], max_batch_size: int,
                          opset: int = 18) -> Path:
    """Export the penultimate-layer features of ``net``: input ``image`` [batch, C, H, W], output ``embedding``."""
    _export_dynamic_batch(EmbeddingModel(net), path, input_shape, max_batch_size, opset, [EMBEDDING_NAME], True)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path
