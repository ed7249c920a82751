"""Launchers that start every rank themselves (torchrun, srun): one run folder, one W&B run, rank 0 alone writes;
and the launches that would scatter a run over several Hydra folders are refused. CPU (gloo), real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.deploy.test_slurm import sbatch_env

pytestmark = pytest.mark.slow
SMALL = ("trainer=ddp_sim", "model=smallcnn", "model.net.width=8", "data.md5=false", "trainer.max_epochs=2",
         "callbacks.model_summary=null")


def env() -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "WANDB_API_KEY"}
    return {**base, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "train", *args]


def test_torchrun_two_processes_make_one_run(tmp_path: Path, breastmnist_small: Path) -> None:
    logs, run_dir = tmp_path / "logs", tmp_path / "logs" / "torchrun"
    proc = subprocess.run(torchrun(*SMALL, "logger=default", f"data.path={breastmnist_small}",
                                   f"paths.log_dir={logs}", f"hydra.run.dir={run_dir}"),
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert [p.name for p in logs.iterdir()] == ["torchrun"]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["trainer"]["strategy"] == "ddp"
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_ranks_without_one_run_dir_are_refused(launcher: str, tmp_path: Path, breastmnist_small: Path) -> None:
    logs = tmp_path / "logs"
    args = [*SMALL, "logger=csv", f"data.path={breastmnist_small}", f"paths.log_dir={logs}"]
    if launcher == "torchrun":
        cmd, run_env = torchrun(*args), env()
    else:  # the stand-in srun of test_slurm: 2 tasks with SLURM_PROCID 0 and 1
        cmd = ["srun", sys.executable, "-m", "train", *args]
        run_env = sbatch_env(tmp_path, nodes=1, tasks_per_node=2)
    proc = subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "LaunchError" in out and "give them one with hydra.run.dir=" in out, out[-4000:]
    assert ("TorchElastic" if launcher == "torchrun" else "SLURM") in out
    folders = list((logs / "train" / "runs").iterdir())
    assert len(folders) == 2  # what Hydra made before the job could refuse
    # nothing was trained or recorded; at most rank 0 wrote its data check (it may be stopped before it does)
    assert not any((f / "run.json").exists() or (f / "checkpoints").exists() for f in folders)
    assert sum((f / "data_validation.json").is_file() for f in folders) <= 1


def test_a_sweep_does_not_start_ddp_ranks(tmp_path: Path, breastmnist_small: Path) -> None:
    logs = tmp_path / "logs"
    proc = subprocess.run([sys.executable, "-m", "train", "-m", *SMALL, "logger=csv", f"data.path={breastmnist_small}",
                           f"paths.log_dir={logs}"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "a sweep (-m) cannot start DDP processes itself" in out, out[-4000:]
    assert not list(logs.rglob("run.json"))
