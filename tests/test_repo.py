"""Repository contracts: the two README commands, CI, the config groups, and torch-free packages."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import REPO

RUN_CMD = ('python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && '
           ".venv/bin/python -m train experiment=breastmnist && .venv/bin/python -m export run=latest name=breastmnist "
           "&& .venv/bin/python -m serve batch data/breastmnist.npz --start-server --model breastmnist "
           "--compare-run latest --out logs/breastmnist/predictions_test.csv --no-resume")
TEST_CMD = ('python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/ruff check . '
            "&& scripts/install_test_services.sh && .venv/bin/python -m pytest")


def quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(?:bash|sh)?\n(.*?)\n```", section, flags=re.S)


def test_readme_quick_start_has_exactly_the_two_commands() -> None:
    assert quick_start_commands() == [RUN_CMD, TEST_CMD]


def test_ci_runs_the_readme_test_command() -> None:
    assert TEST_CMD in (REPO / ".ci" / "run").read_text()


def test_top_level_layout() -> None:
    for name in ("medops", "datatools", "analysis", "train", "export", "evaluation", "serve", "bench",
                 "model_repository", "conf", "tests", "Dockerfile.gpu", "pyproject.toml", "README.md",
                 "mkdocs.yml", "docs/index.md", "docs/architecture.md", "data/breastmnist.npz", "data/README.md"):
        assert (REPO / name).exists(), name
    groups = {p.name for p in (REPO / "conf").iterdir() if p.is_dir()}
    assert {"data", "model", "trainer", "logger", "callbacks", "experiment", "hparams_search", "debug"} <= groups
    assert {"cpu.yaml", "gpu.yaml", "ddp.yaml", "ddp_sim.yaml"} <= {p.name for p in (REPO / "conf/trainer").iterdir()}


BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision', 'lightning', 'pytorch_lightning'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import {module}
print('ok')
"""


@pytest.mark.parametrize("module", ["medops", "medops.drift", "serve", "serve.__main__", "serve.batch",
                                    "serve.drift", "serve.rollout", "medops.triton_config"])
def test_packages_import_without_torch(module: str) -> None:
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH.format(module=module)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("overrides", [
    ["experiment=breastmnist"],
    ["debug=fdr"], ["debug=overfit"], ["debug=limit"],
    ["trainer=gpu"], ["trainer=ddp"], ["trainer=ddp_sim"], ["trainer=cpu"],
    ["model=resnet34"], ["model=resnet50"], ["model=smallcnn"],
    ["data=medmnist", "data.path=/x/pathmnist.npz"], ["data=folder", "data.path=/x/manifest.csv"],
    ["logger=none"], ["logger=wandb"], ["callbacks=none"],
    ["hparams_search=breastmnist_optuna", "experiment=breastmnist"],
])
def test_configs_compose(overrides: list[str]) -> None:
    cfg = compose_cfg(*overrides)
    assert cfg.data._target_.startswith("train.datamodules.")
    assert cfg.trainer._target_ == "lightning.pytorch.trainer.Trainer"
    if "experiment=breastmnist" in overrides:
        assert cfg.model.net.width == 32 and cfg.trainer.max_epochs == 32
        assert cfg.callbacks.ema._target_ == "train.averaging.BatchNormEMA"
    if overrides[0].startswith("hparams_search"):
        assert cfg.hydra.sweeper.direction == "maximize" and cfg.optimized_metric == "val/auroc"


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "medops-train"
    assert script.is_file(), "pip install -e . should install the medops-train console script"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "experiment" in proc.stdout
