"""Export on a CUDA machine (``pytest -m gpu``): a GPU-trained checkpoint, KIND_GPU, and TensorRT when present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import export.build as pipeline
from tests.conftest import run_cli
from tests.export.test_export import export_cfg

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_export_gpu_trained_run(tmp_path: Path, breastmnist_small: Path) -> None:
    run_dir = tmp_path / "run"
    run_cli("trainer=gpu", "logger=csv", "model=resnet18", "model.net.width=16", "trainer.max_epochs=2",
            f"data.path={breastmnist_small}", "data.md5=false", "callbacks.model_summary=null", run_dir=run_dir)
    repo = tmp_path / "repo"
    meta = pipeline.export_model(export_cfg(run_dir, repo))
    assert meta["parity"][0]["passed"]
    config = text_format.Parse((repo / "breast" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    reason = pipeline.tensorrt_unavailable_reason()
    version = repo / "breast" / "1"
    if reason is None:  # TensorRT present: an FP16 engine was built and passed its own gate
        assert (version / "model.plan").is_file()
        trt = meta["parity"][1]
        assert trt["engine"].startswith("TensorRT") and trt["passed"] and trt["tolerance"] == 1e-2
    else:
        assert meta["tensorrt"] == f"skipped: {reason}" and "tensorrt" in reason.lower()
        assert not (version / "model.plan").exists()
    assert json.loads((version / "metadata.json").read_text())["versions"]["torch"]
