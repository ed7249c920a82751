"""The CUDA path: bf16 mixed precision and channels_last training through the real CLI (``pytest -m gpu``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from train.module import ClassificationModule

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_module_runs_channels_last_bf16_on_cuda() -> None:
    module = ClassificationModule(num_classes=2, in_channels=1, image_size=28, mean=[0.3], std=[0.2],
                                  net={"arch": "resnet18", "width": 16}, channels_last=True).cuda()
    conv = module.net[1].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(8, 1, 28, 28, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.bfloat16 and out.shape == (8, 2) and torch.isfinite(out.float()).all()


def test_gpu_training_cli_bf16_and_checkpoint_loads_on_cpu(tmp_path: Path, breastmnist_small: Path) -> None:
    run_dir = tmp_path / "gpu"
    run_cli("trainer=gpu", "logger=csv", "model=resnet18", "model.net.width=16", "trainer.max_epochs=3",
            f"data.path={breastmnist_small}", "data.md5=false", "callbacks.model_summary=null", run_dir=run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed"
    assert record["trainer"]["accelerator"] == "gpu"
    expected = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    assert record["trainer"]["precision"] == expected
    assert record["environment"]["gpus"] and record["environment"]["cuda"]
    assert set(record["test"]) >= {"auroc", "acc"}

    best = record["checkpoints"]["best"]
    on_cpu = ClassificationModule.load_from_checkpoint(best, map_location="cpu", weights_only=False).eval()
    on_gpu = ClassificationModule.load_from_checkpoint(best, map_location="cuda", weights_only=False).eval()
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        cpu_out = on_cpu(x).softmax(-1)
        gpu_out = on_gpu(x.cuda()).softmax(-1).cpu()
    assert torch.allclose(cpu_out, gpu_out, atol=1e-3)
