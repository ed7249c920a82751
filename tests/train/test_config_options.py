"""Every option of every config group runs through the real CLI at tiny size, so a documented command cannot rot.

Like lightning-hydra-template's sweep tests: one ``python -m train -m <group>=a,b,c`` multirun per group (one
interpreter, one job per option), each job checked for a completed run record. The options are read from
``conf/<group>/*.yaml``, so a new option is tested without touching this file; the few that cannot run here say
where they are tested instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

CONF = REPO / "conf"
# tiny settings every job gets (they come after the group's own settings, so they win)
TINY = ("model.net.width=4", "trainer.max_epochs=1", "++trainer.limit_train_batches=2", "++trainer.limit_val_batches=1",
        "++trainer.limit_test_batches=1", "data.batch_size=16", "++callbacks.model_summary=null")
# options that cannot run in a multirun on this machine, and where they are tested instead
ELSEWHERE = {
    ("trainer", "gpu"): "needs a CUDA GPU: tests/train/test_gpu.py (pytest -m gpu)",
    ("trainer", "ddp"): "needs CUDA GPUs (pytest -m gpu); DDP on CPU: trainer=ddp_sim in tests/deploy",
    ("trainer", "ddp_sim"): "starts 2 processes, which a multirun refuses: tests/train/test_cli.py::test_ddp_*",
}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def sweep(group: str, values: list[str], tmp_path: Path, data: Path, *extra: str) -> list[dict]:
    """Run one multirun over ``group`` and return the run records of its jobs, in option order."""
    sweep_dir = tmp_path / group
    base = () if group == "model" else ("model=smallcnn",)
    base += () if group == "logger" else ("logger=csv",)
    base += () if group == "trainer" else ("trainer=cpu", "trainer.precision=32-true")
    cmd = [sys.executable, "-m", "train", "-m", f"{group}={','.join(values)}", *base, *TINY,
           f"data.path={data}", "data.md5=false", f"hydra.sweep.dir={sweep_dir}", *extra]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    records = []
    for job, value in enumerate(values):
        path = sweep_dir / str(job) / "run.json"
        assert path.is_file(), f"{group}={value}: no run record ({proc.stderr[-3000:]})"
        record = json.loads(path.read_text())
        assert record["status"] == "completed", (group, value, record["status"])
        records.append(record)
    return records


@pytest.mark.slow
@pytest.mark.parametrize("group", ["logger", "callbacks", "model", "debug", "trainer"])
def test_every_option_of_a_group_runs(group: str, tmp_path: Path, breastmnist_small: Path) -> None:
    values = [v for v in options(group) if (group, v) not in ELSEWHERE]
    if group == "trainer" and torch.cuda.is_available():
        values += ["gpu"]
    assert values, f"conf/{group} has no options"
    records = sweep(group, values, tmp_path, breastmnist_small)
    for value, record in zip(values, records, strict=True):
        chosen = record["config"]
        if group == "model":
            assert chosen["model"]["net"]["arch"] == value
        if group == "logger":
            has_csv = (Path(record["output_dir"]) / "csv" / "metrics.csv").is_file()
            assert has_csv == (value in ("csv", "default")), value
            assert bool(record.get("wandb")) == (value in ("wandb", "default")), value
        if group == "debug" and value != "fdr":
            assert record["test"]["auroc"] is not None  # a real (if tiny) fit was tested


def test_options_that_run_elsewhere_still_exist() -> None:
    """The exemptions above name real options (a renamed option must not silently escape the sweep)."""
    for group, value in ELSEWHERE:
        assert value in options(group), (group, value)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_runs(experiment: str, tmp_path: Path, breastmnist_small: Path) -> None:
    run_dir = tmp_path / experiment
    cmd = [sys.executable, "-m", "train", f"experiment={experiment}", "logger=csv", "trainer=cpu",
           "trainer.precision=32-true", *TINY, f"data.path={breastmnist_small}", "data.md5=false",
           f"hydra.run.dir={run_dir}"]
    if experiment.endswith("_cv"):
        cmd.append("data.fold=1")  # one fold of the sweep, as the config's header shows
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["config"]["task_name"] == experiment
    if experiment.endswith("_cv"):
        assert record["data"]["fold"] == 1
