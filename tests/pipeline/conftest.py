"""Tiny settings for pipeline runs: a small CNN for two epochs on the BreastMNIST slice, a fresh model repository."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import FAST

TINY_TRAIN = [*FAST, "trainer.max_epochs=2"]


def tiny_overrides(data: Path, tmp: Path, *extra: str) -> list[str]:
    """``--set`` entries for a tiny pipeline run on ``data`` writing into ``tmp`` (repository, records, cache)."""
    return [f"data={data}", f"gate.eval_data={data}", f"model_repository={tmp / 'model_repository'}",
            f"records_dir={tmp / 'records'}", f"local.pipeline_root={tmp / 'kfp'}", "n_resamples=50",
            "data_overrides=[data.md5=false]", f"train_overrides=[{','.join(TINY_TRAIN)}]",
            "export_overrides=[drift.embeddings=false]", *extra]


import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402

from tests.conftest import REPO  # noqa: E402


def pipeline_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def record_of(tmp: Path, run_id: str) -> dict:
    return json.loads((tmp / "records" / run_id / "pipeline.json").read_text())


@dataclass
class PipelineRuns:
    tmp: Path
    data: Path
    failed: subprocess.CompletedProcess
    retried: subprocess.CompletedProcess

    @property
    def repository(self) -> Path:
        return self.tmp / "model_repository"

    def overrides(self, *extra: str) -> list[str]:
        return tiny_overrides(self.data, self.tmp, *extra)


@pytest.fixture(scope="session")
def pipeline_runs(tmp_path_factory: pytest.TempPathFactory, breastmnist_small: Path) -> PipelineRuns:
    """Two real local pipeline runs sharing one kfp cache: the first fails at export (a TensorRT export asked of a
    machine without TensorRT), the second, with the export fixed, reuses validate/train/evaluate from the cache and
    goes through gate and promotion (no production version yet: v1 becomes production)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    data = tmp / "data" / "breast_small.npz"  # tracked by DVC here: `dvc add` leaves breast_small.npz.dvc beside it
    data.parent.mkdir()
    data.write_bytes(breastmnist_small.read_bytes())
    md5 = hashlib.md5(data.read_bytes()).hexdigest()
    (tmp / "data" / "breast_small.npz.dvc").write_text(
        f"outs:\n- md5: {md5}\n  size: {data.stat().st_size}\n  hash: md5\n  path: breast_small.npz\n")
    base = tiny_overrides(data, tmp)
    failed = pipeline_cli("run", "--run-id", "ct-failed", *sets(base),
                          "--set", "export_overrides=[drift.embeddings=false,target=tensorrt]")
    retried = pipeline_cli("run", "--run-id", "ct-retried", *sets(base))
    return PipelineRuns(tmp, data, failed, retried)
