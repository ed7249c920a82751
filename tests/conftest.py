"""Shared fixtures: the embedded dataset, small MedMNIST-format files, and a runner for the real CLI."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
BREASTMNIST = REPO / "data" / "breastmnist.npz"

from tests.orthanc import orthanc  # noqa: E402, F401  (session fixture: a real Orthanc PACS, started on first use)


def write_medmnist(path: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """Write a MedMNIST-format .npz (labels as N x 1, like the real files)."""
    arrays = {}
    for split, (images, labels) in splits.items():
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)
    np.savez_compressed(path, **arrays)
    return path


def synthetic_rgb_splits(n: dict[str, int], num_classes: int = 3, size: int = 28, seed: int = 0):
    """Learnable RGB images: class c has a bright square in a class-specific corner and colour channel."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, count in n.items():
        labels = rng.integers(0, num_classes, count)
        images = rng.integers(0, 60, (count, size, size, 3)).astype(np.uint8)
        half = size // 2
        for i, c in enumerate(labels):
            r0, c0 = (c // 2 % 2) * half, (c % 2) * half
            images[i, r0 : r0 + half, c0 : c0 + half, c % 3] = rng.integers(170, 255)
        out[split] = (images, labels.astype(np.int64))
    return out


@pytest.fixture(scope="session")
def breastmnist() -> Path:
    assert BREASTMNIST.is_file(), "the embedded dataset data/breastmnist.npz is missing"
    return BREASTMNIST


@pytest.fixture(scope="session")
def breastmnist_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-stratified slice of BreastMNIST: 192 train, all 78 val, 64 test images."""
    src = np.load(BREASTMNIST)
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 192), ("val", 78), ("test", 64)):
        images, labels = src[f"{split}_images"], src[f"{split}_labels"].reshape(-1)
        idx = np.sort(rng.permutation(len(labels))[:n])
        splits[split] = (images[idx], labels[idx])
    return write_medmnist(tmp_path_factory.mktemp("data") / "breast_small.npz", splits)


@pytest.fixture(scope="session")
def rgb_multiclass(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic 3-class RGB 28 px dataset in MedMNIST format."""
    splits = synthetic_rgb_splits({"train": 240, "val": 60, "test": 60})
    return write_medmnist(tmp_path_factory.mktemp("data") / "rgb3.npz", splits)


@pytest.fixture
def png_folder(tmp_path: Path) -> Path:
    """class sub-folders of grey PNGs (two learnable classes)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    for cls, level in (("benign", 60), ("malignant", 190)):
        (root / cls).mkdir(parents=True)
        for i in range(20):
            img = np.clip(rng.normal(level, 20, (40, 40)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / cls / f"{i:03d}.png")
    return root


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def run_cli(*overrides: str, run_dir: Path, timeout: float = 900, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m train`` for real in a subprocess, its Hydra run folder set to ``run_dir``."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1",
                **(env or {})}
    full_env.pop("WANDB_API_KEY", None)
    cmd = [sys.executable, "-m", "train", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


# Small, quick settings shared by the CLI tests.
FAST = ("logger=csv", "model=smallcnn", "model.net.width=8", "trainer=cpu", "trainer.precision=32-true",
        "callbacks.model_summary=null")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, breastmnist_small: Path) -> Path:
    """A briefly trained real run (2 epochs of a small CNN on a BreastMNIST slice), shared by export/serve tests."""
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    run_cli(*FAST, f"data.path={breastmnist_small}", "data.md5=false", "trainer.max_epochs=2",
            "model.net.width=8", run_dir=run_dir)
    return run_dir
