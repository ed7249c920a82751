"""k-fold cross-validation: fold splits in the DataModule, a real fold multirun, its aggregation, sweep configs."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from analysis import cv
from medops.datasets import stratified_folds
from tests.conftest import FAST, REPO
from train.datamodules import DataError, FolderDataModule, MedMNISTDataModule

CONF = REPO / "conf"


def sample_keys(dm: MedMNISTDataModule, split: str) -> list[str]:
    """One hash per sample (image bytes + label), to compare splits by content."""
    data = dm.prepare()
    return [hashlib.sha256(img.tobytes() + int(lab).to_bytes(8, "little")).hexdigest()
            for img, lab in zip(data.images[split], data.labels[split], strict=True)]


def test_folds_partition_train_and_val(breastmnist_small: Path) -> None:
    plain = MedMNISTDataModule(str(breastmnist_small))
    plain.setup()
    pool = sample_keys(plain, "train") + sample_keys(plain, "val")
    assert len(set(pool)) == len(pool) == 270  # no duplicate images, so hashes identify samples
    labels = np.concatenate([plain.data.labels["train"], plain.data.labels["val"]])
    class_totals = np.bincount(labels, minlength=2)

    vals, summaries = [], []
    for fold in range(3):
        dm = MedMNISTDataModule(str(breastmnist_small), fold=fold, num_folds=3, fold_seed=0)
        dm.setup()
        train, val = sample_keys(dm, "train"), sample_keys(dm, "val")
        assert not set(train) & set(val)
        assert sorted(train + val) == sorted(pool)  # every sample of train+val is used, once
        assert sample_keys(dm, "test") == sample_keys(plain, "test")  # test untouched, same order
        counts = np.array(dm.class_counts("val"))
        assert np.all(np.abs(counts - class_totals / 3) <= 1), (counts, class_totals)
        assert len(dm.datasets["val"]) == len(val) and len(dm.datasets["train"]) == len(train)
        vals.append(set(val))
        summaries.append(dm.summary())

    assert all(not vals[i] & vals[j] for i in range(3) for j in range(i + 1, 3))
    assert set().union(*vals) == set(pool)
    assert {s["fingerprint"] for s in summaries} == {plain.fingerprint}  # the original data's fingerprint
    assert len({s["split_fingerprint"] for s in summaries}) == 3
    assert [(s["fold"], s["num_folds"], s["fold_seed"]) for s in summaries] == [(0, 3, 0), (1, 3, 0), (2, 3, 0)]
    assert plain.summary()["fold"] is None and plain.summary()["split_fingerprint"] == plain.fingerprint
    # statistics come from the fold's own training split
    dm0 = MedMNISTDataModule(str(breastmnist_small), fold=0, num_folds=3)
    dm0.setup()
    assert dm0.mean == pytest.approx([dm0.data.images["train"].mean() / 255.0], abs=1e-5)


def test_folds_are_seeded_and_deterministic(breastmnist_small: Path) -> None:
    def val_set(seed: int) -> set[str]:
        dm = MedMNISTDataModule(str(breastmnist_small), fold=1, num_folds=3, fold_seed=seed)
        dm.setup()
        return set(sample_keys(dm, "val"))

    assert val_set(0) == val_set(0)
    assert val_set(0) != val_set(1)


def test_stratified_folds_balance() -> None:
    labels = np.array([0] * 7 + [1] * 11 + [2] * 5)
    folds = stratified_folds(labels, 4, seed=3)
    sizes = np.bincount(folds, minlength=4)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == len(labels)
    for c in range(3):
        per_fold = np.bincount(folds[labels == c], minlength=4)
        assert per_fold.max() - per_fold.min() <= 1


@pytest.mark.parametrize(("fold", "num_folds", "match"), [
    (3, 3, r"data\.fold must be an integer in 0\.\.2"),
    (-1, 3, r"data\.fold must be an integer in 0\.\.2"),
    (0, 1, r"data\.num_folds must be an integer >= 2"),
    ("1", 3, r"data\.fold must be an integer"),
])
def test_bad_fold_settings(breastmnist_small: Path, fold, num_folds: int, match: str) -> None:
    with pytest.raises(DataError, match=match):
        MedMNISTDataModule(str(breastmnist_small), fold=fold, num_folds=num_folds).setup()


def test_folder_datamodule_folds(png_folder: Path) -> None:
    dms = [FolderDataModule(str(png_folder), image_size=16, fold=f, num_folds=2, val_fraction=0.2,
                            test_fraction=0.2) for f in range(2)]
    for dm in dms:
        dm.setup()
    assert len(dms[0].datasets["val"]) + len(dms[1].datasets["val"]) == 32  # 40 images, 8 in test
    assert dms[0].fingerprint == dms[1].fingerprint
    assert dms[0].summary()["fold"] == 0 and dms[1].summary()["fold"] == 1


def run_multirun(*overrides: str, sweep_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    env.pop("WANDB_API_KEY", None)
    cmd = [sys.executable, "-m", "train", "-m", f"hydra.sweep.dir={sweep_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.mark.slow
def test_three_fold_multirun_and_aggregation(tmp_path: Path, breastmnist_small: Path) -> None:
    sweep = tmp_path / "cv"
    run_multirun(*FAST, "data.fold=0,1,2", "data.num_folds=3", f"data.path={breastmnist_small}", "data.md5=false",
                 "trainer.max_epochs=1", "trainer.limit_train_batches=2", "data.batch_size=32", sweep_dir=sweep)
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/run.json"))]
    assert len(records) == 3
    assert sorted(r["data"]["fold"] for r in records) == [0, 1, 2]
    assert all(r["status"] == "completed" and r["data"]["num_folds"] == 3 for r in records)
    assert len({r["data"]["fingerprint"] for r in records}) == 1
    assert sum(sum(r["data"]["counts"]["val"]) for r in records) == 270  # 192 train + 78 val, each once

    proc = subprocess.run([sys.executable, "-m", "analysis.cv", str(sweep)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test/auroc" in proc.stdout
    summary = json.loads((sweep / "cv_summary.json").read_text())
    values = [r["test"]["auroc"] for r in records]
    auroc = summary["metrics"]["test/auroc"]
    assert auroc["n"] == 3 and summary["n_runs"] == 3
    assert auroc["mean"] == pytest.approx(sum(values) / 3)
    assert auroc["std"] == pytest.approx(float(np.std(values, ddof=1)))
    assert summary["metrics"]["val/acc"]["n"] == 3
    assert summary["folds"] == [0, 1, 2] and summary["warnings"] == []


def fake_run(folder: Path, fold: int | None, auroc: float, fingerprint: str = "sha256:aa", num_folds: int = 3) -> None:
    folder.mkdir(parents=True)
    record = {"schema": "medops.run/1", "run_id": folder.name, "status": "completed",
              "data": {"fold": fold, "num_folds": num_folds, "fold_seed": 0, "fingerprint": fingerprint},
              "val": {"auroc": auroc - 0.05, "loss": 0.5}, "test": {"auroc": auroc, "acc": 0.8}}
    (folder / "run.json").write_text(json.dumps(record))


def test_aggregate_statistics_and_warnings(tmp_path: Path) -> None:
    fake_run(tmp_path / "0", 0, 0.8)
    fake_run(tmp_path / "1", 1, 0.9)
    fake_run(tmp_path / "2", 2, 0.7)
    records = cv.collect_runs(tmp_path)
    assert [r["data"]["fold"] for r in records] == [0, 1, 2]
    summary = cv.aggregate(records)
    s = summary["metrics"]["test/auroc"]
    assert (s["n"], s["mean"], s["std"]) == (3, pytest.approx(0.8), pytest.approx(statistics.stdev([0.8, 0.9, 0.7])))
    assert s["std"] == pytest.approx(0.1)  # sample std, not population (0.0816)
    assert summary["warnings"] == []
    assert set(cv.aggregate(records, splits=("test",))["metrics"]) == {"test/auroc", "test/acc"}

    fake_run(tmp_path / "3", 2, 0.75, fingerprint="sha256:bb")
    warnings = cv.aggregate(cv.collect_runs(tmp_path))["warnings"]
    assert any("different datasets" in w for w in warnings)
    assert any("folds [2] appear in more than one run" in w for w in warnings)


def test_cv_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert cv.main([str(tmp_path / "empty")]) == 2
    assert "empty: no run.json found" in capsys.readouterr().err
    assert cv.main([str(tmp_path / "missing")]) == 2
    assert "missing: not a folder" in capsys.readouterr().err
    fake_run(tmp_path / "sweep" / "0", 0, 0.8)
    fake_run(tmp_path / "sweep" / "1", 1, 0.9)
    assert cv.main([str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out
    assert "test/auroc" in out and "folds [2] of 3 have no run" in out
    summary = json.loads((tmp_path / "sweep" / "cv_summary.json").read_text())
    assert summary["metrics"]["test/auroc"]["n"] == 2


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_data_configs_have_fold_keys() -> None:
    for name in ("breastmnist", "medmnist", "folder"):
        cfg = OmegaConf.load(CONF / "data" / f"{name}.yaml")
        assert (cfg.fold, cfg.num_folds, cfg.fold_seed) == (None, 5, 0), name


def test_cv_experiment_sweeps_all_folds() -> None:
    cfg = compose_train(["experiment=breastmnist_cv"])
    assert cfg.task_name == "breastmnist_cv" and cfg.data.num_folds == 5 and cfg.data.fold is None
    assert cfg.hydra.sweeper.params["data.fold"] == "range(0,5)"
    assert "BasicSweeper" in cfg.hydra.sweeper._target_
    base = compose_train(["experiment=breastmnist"])
    assert cfg.model == base.model and cfg.trainer.max_epochs == base.trainer.max_epochs  # the same recipe


def test_wandb_sweep_spec_matches_the_hydra_config() -> None:
    spec = yaml.safe_load((CONF / "sweeps" / "wandb_sweep.yaml").read_text())
    assert spec["method"] == "bayes"
    assert spec["metric"] == {"name": "val/auroc", "goal": "maximize"}
    assert set(spec["parameters"]) == {"model.optimizer.lr", "model.net.width", "data.batch_size"}
    command = spec["command"]
    assert command[0] == "${env}" and "${interpreter}" in command and command[-1] == "${args_no_hyphens}"
    i = command.index("${interpreter}")
    assert command[i + 1 : i + 3] == ["-m", "train"]
    fixed = [c for c in command[i + 3 : -1] if "=" in c]  # literal Hydra overrides, e.g. experiment=...
    cfg = compose_train(fixed)
    missing = object()
    sampled = {}
    for name, param in spec["parameters"].items():
        assert OmegaConf.select(cfg, name, default=missing) is not missing, f"{name} is not in the config"
        sampled[name] = param["values"][-1] if "values" in param else param.get("min", param.get("value"))
    # the overrides exactly as the W&B agent formats them for ${args_no_hyphens}
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    args = create_sweep_command_args({"args": {k: {"value": v} for k, v in sampled.items()}})["args_no_hyphens"]
    composed = compose_train([*fixed, *args])
    assert {name: OmegaConf.select(composed, name) for name in sampled} == sampled
