"""Triton ``config.pbtxt`` files built as protobuf messages, so what we write always parses.

The batch dimension is the classic trap: with ``max_batch_size > 0`` Triton prepends an implicit, variable batch
dimension, so ``dims`` must describe ONE sample (``[C, H, W]`` for the input, ``[num_classes]`` for the output).
Writing ``[-1, C, H, W]`` there makes every request fail with a shape mismatch. :func:`build_model_config` owns
that rule so nobody has to remember it.

No torch here: this module is used by export *and* by torch-free serving tooling.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from medops.model_version import INPUT_NAME, OOD_FLAG_OUTPUT, OOD_SCORE_OUTPUT, OUTPUT_NAME

__all__ = [
    "INSTANCE_KINDS",
    "TARGETS",
    "build_model_config",
    "dynamic_batching_settings",
    "parse_model_config",
    "render_model_config",
]

TARGETS = ("python", "onnxruntime", "tensorrt")
INSTANCE_KINDS = ("auto", "cpu", "gpu")

# target -> (backend, platform, default_model_filename); "" means "leave the field unset".
_TARGET_FIELDS: dict[str, tuple[str, str, str]] = {
    "python": ("python", "", ""),
    "onnxruntime": ("", "onnxruntime_onnx", "model.onnx"),
    "tensorrt": ("", "tensorrt_plan", "model.plan"),
}


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_model(name: str, target: str, instance_kind: str) -> None:
    """Raise ValueError for an unknown target or instance kind, or an invalid model name."""
    if target not in TARGETS:
        raise ValueError(f"unknown Triton target {target!r}; expected one of {', '.join(TARGETS)}")
    if instance_kind not in INSTANCE_KINDS:
        raise ValueError(f"unknown instance_kind {instance_kind!r}; expected one of {', '.join(INSTANCE_KINDS)}")
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"invalid Triton model name {name!r}")


def _check_positive(**values: int) -> None:
    """Raise ValueError naming the first of ``values`` that is not a positive integer."""
    for field, value in values.items():
        _positive(field, value)


def _check_batching(max_batch_size: int, max_queue_delay_us: int, preferred_batch_sizes: Sequence[int]) -> list[int]:
    """The preferred batch sizes up to ``max_batch_size``, sorted; ValueError for unusable batching settings."""
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(
            f"max_batch_size must be >= 1, got {max_batch_size!r}: these configs always batch, with the batch "
            "dimension implicit (not part of dims)"
        )
    if max_queue_delay_us < 0:
        raise ValueError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
    for size in preferred_batch_sizes:
        _positive("each preferred batch size", size)
    preferred = sorted({int(s) for s in preferred_batch_sizes if s <= max_batch_size})
    if preferred_batch_sizes and not preferred:
        raise ValueError(
            f"all preferred batch sizes {list(preferred_batch_sizes)} exceed max_batch_size={max_batch_size}"
        )
    return preferred


def _set_target(config: model_config_pb2.ModelConfig, target: str) -> None:
    """Backend or platform and default model file of ``target``."""
    backend, platform, model_filename = _TARGET_FIELDS[target]
    if backend:
        config.backend = backend
    if platform:
        config.platform = platform
    if model_filename:
        config.default_model_filename = model_filename


def _add_tensors(config: model_config_pb2.ModelConfig, input_name: str, input_dims: list[int], output_name: str,
                 num_classes: int, label_filename: str, ood_outputs: bool) -> None:
    """The FP32 image input and probabilities output, per-sample dims (the batch dimension is implicit); with
    ``ood_outputs`` also ``ood_score`` (FP32 [1]) and ``ood_flag`` (BOOL [1])."""
    config.input.add(name=input_name, data_type=model_config_pb2.TYPE_FP32, dims=input_dims)
    output = config.output.add(name=output_name, data_type=model_config_pb2.TYPE_FP32, dims=[num_classes])
    if label_filename:
        output.label_filename = label_filename
    if ood_outputs:
        config.output.add(name=OOD_SCORE_OUTPUT, data_type=model_config_pb2.TYPE_FP32, dims=[1])
        config.output.add(name=OOD_FLAG_OUTPUT, data_type=model_config_pb2.TYPE_BOOL, dims=[1])


def _add_instance_group(config: model_config_pb2.ModelConfig, target: str, instance_kind: str, count: int) -> None:
    """``count`` instances on GPU or CPU (``auto``: GPU for TensorRT, CPU otherwise)."""
    kind = instance_kind if instance_kind != "auto" else ("gpu" if target == "tensorrt" else "cpu")
    group = model_config_pb2.ModelInstanceGroup
    config.instance_group.add(kind=group.KIND_GPU if kind == "gpu" else group.KIND_CPU, count=count)


def _set_parameters(config: model_config_pb2.ModelConfig, parameters: Mapping[str, str] | None) -> None:
    """Free-form string parameters; ValueError for an empty or non-string name or a non-string value."""
    for key, value in (parameters or {}).items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"parameter names must be non-empty strings, got {key!r}")
        if not isinstance(value, str):
            raise ValueError(f"parameter {key!r} must be a string (json.dumps structured values), got {type(value)}")
        config.parameters[key].string_value = value


def _add_warmup(config: model_config_pb2.ModelConfig, input_name: str, input_dims: list[int]) -> None:
    """A one-sample all-zeros warm-up request."""
    sample = config.model_warmup.add(name="zeros", batch_size=1)
    sample.inputs[input_name].data_type = model_config_pb2.TYPE_FP32
    sample.inputs[input_name].dims.extend(input_dims)
    sample.inputs[input_name].zero_data = True


def build_model_config(
    name: str,
    target: str,
    *,
    channels: int,
    image_size: int,
    num_classes: int,
    max_batch_size: int = 64,
    preferred_batch_sizes: Sequence[int] = (8, 16, 32),
    max_queue_delay_us: int = 2000,
    instance_kind: str = "auto",
    instance_count: int = 1,
    versions_to_serve: int = 1,
    parameters: Mapping[str, str] | None = None,
    input_name: str = INPUT_NAME,
    output_name: str = OUTPUT_NAME,
    label_filename: str = "labels.txt",
    warmup: bool = True,
    ood_outputs: bool = False,
) -> model_config_pb2.ModelConfig:
    """Return the Triton model configuration of an image classifier.

    Args:
        name: Triton model name (the folder name in the model repository).
        target: one of :data:`TARGETS`: ``python`` (Python backend running onnxruntime), ``onnxruntime``
            (platform ``onnxruntime_onnx``) or ``tensorrt`` (platform ``tensorrt_plan``).
        channels, image_size, num_classes: per-sample shapes; the batch dimension is implicit.
        max_batch_size: largest batch Triton may form (>= 1; batching is always on).
        preferred_batch_sizes: dynamic-batcher targets; sizes above ``max_batch_size`` are dropped.
        max_queue_delay_us: how long the dynamic batcher may wait to fill a batch.
        instance_kind: ``auto`` (GPU for TensorRT, CPU otherwise), ``cpu`` or ``gpu``.
        instance_count: model instances per device.
        versions_to_serve: serve the latest N versions (``version_policy { latest { num_versions: N } }``).
        parameters: free-form string parameters (lineage: run id, git commit, dataset fingerprint, metrics).
        label_filename: class names file next to ``config.pbtxt``; empty string for none.
        warmup: add a one-sample all-zeros warm-up request so the first real request is not slow.
        ood_outputs: the graph also returns ``ood_score`` and ``ood_flag`` (:mod:`medops.ood`).

    Raises:
        ValueError: unknown target or instance kind, non-positive sizes, an empty name, or preferred batch
            sizes that are all larger than ``max_batch_size``.
    """
    _check_model(name, target, instance_kind)
    _check_positive(channels=channels, image_size=image_size, num_classes=num_classes, instance_count=instance_count,
                    versions_to_serve=versions_to_serve)
    preferred = _check_batching(max_batch_size, max_queue_delay_us, preferred_batch_sizes)
    if not input_name or not output_name:
        raise ValueError("input_name and output_name must be non-empty")
    config = model_config_pb2.ModelConfig(name=name, max_batch_size=max_batch_size)
    _set_target(config, target)
    input_dims = [channels, image_size, image_size]
    _add_tensors(config, input_name, input_dims, output_name, num_classes, label_filename, ood_outputs)
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    _add_instance_group(config, target, instance_kind, instance_count)
    config.version_policy.latest.num_versions = versions_to_serve
    _set_parameters(config, parameters)
    if warmup:
        _add_warmup(config, input_name, input_dims)
    return config


DEFAULT_PREFERRED_BATCH_SIZES = (8, 16, 32)
DEFAULT_MAX_QUEUE_DELAY_US = 2000


def dynamic_batching_settings(preferred_batch_sizes: Sequence[int] | None, max_queue_delay_us: int | None,
                              batcher_file: str | Path | None = None) -> tuple[list[int], int, str]:
    """The dynamic batcher's preferred batch sizes and queue delay export writes, and where they came from.

    A value given explicitly wins; a ``None`` is taken from ``batcher_file`` (the JSON ``python -m bench latency
    --write-config`` writes from its latency-under-load sweep) when that file exists, else the defaults
    (``[8, 16, 32]``, 2000 us). Raises ValueError for a batcher file without usable values.
    """
    chosen: dict[str, object] = {}
    source = "defaults"
    if (preferred_batch_sizes is None or max_queue_delay_us is None) and batcher_file and Path(batcher_file).is_file():
        try:
            chosen = json.loads(Path(batcher_file).read_text())
            delay = chosen["max_queue_delay_us"]
            sizes = chosen["preferred_batch_sizes"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{batcher_file}: not a dynamic batcher choice ({type(exc).__name__}: {exc})") from None
        if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0 or not isinstance(sizes, list) or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"{batcher_file}: max_queue_delay_us must be an integer >= 0 and preferred_batch_sizes "
                             f"a list of positive integers, got {delay!r} and {sizes!r}")
        source = f"{batcher_file} ({chosen.get('chosen_by') or 'python -m bench latency'})"
    sizes_out = list(preferred_batch_sizes) if preferred_batch_sizes is not None else list(
        chosen.get("preferred_batch_sizes", DEFAULT_PREFERRED_BATCH_SIZES))  # type: ignore[call-overload]
    delay_out = int(max_queue_delay_us) if max_queue_delay_us is not None else int(
        chosen.get("max_queue_delay_us", DEFAULT_MAX_QUEUE_DELAY_US))  # type: ignore[call-overload]
    if preferred_batch_sizes is not None and max_queue_delay_us is not None:
        source = "export config"
    return sizes_out, delay_out, source


def render_model_config(config: model_config_pb2.ModelConfig) -> str:
    """``config.pbtxt`` text of ``config`` (protobuf text format)."""
    return text_format.MessageToString(config)


def parse_model_config(text: str) -> model_config_pb2.ModelConfig:
    """Parse ``config.pbtxt`` text; raises ValueError naming the offending line and column."""
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ValueError(f"invalid Triton model config (config.pbtxt): {exc}") from exc
    return config
