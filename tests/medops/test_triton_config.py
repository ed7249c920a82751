"""Triton config.pbtxt generation: every target renders to text that parses back to the same message."""

from __future__ import annotations

import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from medops.triton_config import TARGETS, build_model_config, parse_model_config, render_model_config

SHAPE = {"channels": 3, "image_size": 28, "num_classes": 7}
LINEAGE = {
    "run_id": "run-42",
    "git_commit": "0123abcd",
    "dataset_fingerprint": "sha256:feed",
    "metrics": json.dumps({"val_auroc": 0.91}),
}
EXPECTED = {
    "python": ("python", "", ""),
    "onnxruntime": ("", "onnxruntime_onnx", "model.onnx"),
    "tensorrt": ("", "tensorrt_plan", "model.plan"),
}


def _parsed(target: str, **kwargs) -> mc.ModelConfig:
    config = build_model_config("classifier", target, **{**SHAPE, **kwargs})
    text = render_model_config(config)
    parsed = mc.ModelConfig()
    text_format.Parse(text, parsed)  # Triton's own schema, independent of parse_model_config
    assert parsed == config
    return parsed


@pytest.mark.parametrize("target", TARGETS)
def test_round_trip_and_target_fields(target: str) -> None:
    config = _parsed(target, parameters=LINEAGE)
    backend, platform, filename = EXPECTED[target]
    assert (config.backend, config.platform, config.default_model_filename) == (backend, platform, filename)
    assert config.name == "classifier"
    assert parse_model_config(render_model_config(config)) == config


@pytest.mark.parametrize("target", TARGETS)
def test_dims_exclude_the_batch_dimension(target: str) -> None:
    config = _parsed(target, max_batch_size=16)
    assert config.max_batch_size == 16
    (inp,) = config.input
    (out,) = config.output
    assert (inp.name, inp.data_type, list(inp.dims)) == ("image", mc.TYPE_FP32, [3, 28, 28])
    assert (out.name, out.data_type, list(out.dims)) == ("probabilities", mc.TYPE_FP32, [7])
    assert out.label_filename == "labels.txt"
    assert -1 not in inp.dims


@pytest.mark.parametrize("target", TARGETS)
def test_dynamic_batching_filters_preferred_sizes(target: str) -> None:
    config = _parsed(target, max_batch_size=16, preferred_batch_sizes=(32, 4, 16, 8), max_queue_delay_us=500)
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    default = _parsed(target)
    assert default.max_batch_size == 64
    assert list(default.dynamic_batching.preferred_batch_size) == [8, 16, 32]


@pytest.mark.parametrize(
    ("target", "kind", "expected"),
    [
        ("python", "auto", mc.ModelInstanceGroup.KIND_CPU),
        ("onnxruntime", "auto", mc.ModelInstanceGroup.KIND_CPU),
        ("tensorrt", "auto", mc.ModelInstanceGroup.KIND_GPU),
        ("python", "gpu", mc.ModelInstanceGroup.KIND_GPU),
        ("onnxruntime", "gpu", mc.ModelInstanceGroup.KIND_GPU),
        ("tensorrt", "cpu", mc.ModelInstanceGroup.KIND_CPU),
    ],
)
def test_instance_group_kind(target: str, kind: str, expected: int) -> None:
    config = _parsed(target, instance_kind=kind, instance_count=3)
    (group,) = config.instance_group
    assert group.kind == expected
    assert group.count == 3


@pytest.mark.parametrize("target", TARGETS)
def test_version_policy_parameters_and_warmup(target: str) -> None:
    config = _parsed(target, versions_to_serve=2, parameters=LINEAGE)
    assert config.version_policy.WhichOneof("policy_choice") == "latest"
    assert config.version_policy.latest.num_versions == 2
    assert {k: v.string_value for k, v in config.parameters.items()} == LINEAGE
    assert "EXECUTION_ENV_PATH" not in config.parameters

    (sample,) = config.model_warmup
    assert (sample.name, sample.batch_size) == ("zeros", 1)
    assert set(sample.inputs) == {"image"}
    warm = sample.inputs["image"]
    assert warm.data_type == mc.TYPE_FP32
    assert list(warm.dims) == [3, 28, 28]
    assert warm.WhichOneof("input_data_type") == "zero_data" and warm.zero_data


def test_custom_names_no_labels_no_warmup() -> None:
    config = _parsed("onnxruntime", input_name="x", output_name="y", label_filename="", warmup=False)
    assert config.input[0].name == "x" and config.output[0].name == "y"
    assert config.output[0].label_filename == ""
    assert len(config.model_warmup) == 0
    assert len(config.parameters) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": "torchscript"}, "python, onnxruntime, tensorrt"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"max_batch_size": 4, "preferred_batch_sizes": (8, 16)}, "exceed max_batch_size"),
        ({"preferred_batch_sizes": (0, 8)}, "preferred batch size"),
        ({"channels": 0}, "channels"),
        ({"num_classes": -2}, "num_classes"),
        ({"image_size": 2.5}, "image_size"),
        ({"instance_kind": "tpu"}, "instance_kind"),
        ({"instance_count": 0}, "instance_count"),
        ({"versions_to_serve": 0}, "versions_to_serve"),
        ({"max_queue_delay_us": -1}, "max_queue_delay_us"),
        ({"parameters": {"metrics": {"auroc": 1.0}}}, "must be a string"),
        ({"name": ""}, "model name"),
    ],
)
def test_invalid_inputs_raise(kwargs: dict, match: str) -> None:
    args = {"name": "classifier", "target": "python", **SHAPE, **kwargs}
    name, target = args.pop("name"), args.pop("target")
    with pytest.raises(ValueError, match=match):
        build_model_config(name, target, **args)


def test_parse_error_is_a_clear_value_error() -> None:
    with pytest.raises(ValueError, match=r"invalid Triton model config.*max_batch_sise"):
        parse_model_config('name: "m"\nmax_batch_sise: 8\n')
    assert parse_model_config('name: "m"\nmax_batch_size: 8\n').max_batch_size == 8
