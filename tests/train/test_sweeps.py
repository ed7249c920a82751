"""Hydra's Optuna sweeper drives the real training CLI and optimises val AUROC."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_optuna_search_two_trials(tmp_path: Path, breastmnist_small: Path) -> None:
    sweep = tmp_path / "optuna"
    cmd = [sys.executable, "-m", "train", "-m", "hparams_search=breastmnist_optuna", "hydra.sweeper.n_trials=2",
           "hydra.sweeper.sampler.n_startup_trials=1", f"hydra.sweep.dir={sweep}", "logger=csv", "model=smallcnn",
           "trainer=cpu", "trainer.precision=32-true", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
           "callbacks.model_summary=null", f"data.path={breastmnist_small}", "data.md5=false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"WANDB_MODE": "offline", **__import__("os").environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads((sweep / str(i) / "run.json").read_text()) for i in range(2)]
    assert all(r["status"] == "completed" for r in records)
    lrs = {r["config"]["model"]["optimizer"]["lr"] for r in records}
    assert len(lrs) == 2  # the sampler proposed two different trials
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(max(r["val"]["auroc"] for r in records))
