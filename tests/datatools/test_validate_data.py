"""Data validation: leakage, corrupt files, patient-level splits and the checks run before training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datatools.validate_data import dhash, hamming, run_validation
from tests.conftest import BREASTMNIST, FAST, REPO, run_cli, write_csv
from train.datamodules import FolderDataModule, MedMNISTDataModule


def _noise_png(path: Path, seed: int, size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(path)
    return path


def _split_csv(root: Path, leak: bool = False, extra: list[dict[str, str]] | None = None) -> Path:
    """4 noise PNGs per class and split; ``leak``: a copy of a train image listed in val."""
    rows = []
    seed = 0
    for split in ("train", "val", "test"):
        for label in ("a", "b"):
            for i in range(4):
                seed += 1
                p = _noise_png(root / split / label / f"{i}.png", seed)
                rows.append({"path": str(p.relative_to(root)), "label": label, "split": split})
    if leak:
        shutil.copy(root / "train" / "a" / "0.png", root / "val" / "a" / "leak.png")
        rows.append({"path": "val/a/leak.png", "label": "a", "split": "val"})
    return write_csv(root / "manifest.csv", rows + (extra or []))


def _validate_cli(*overrides: str, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "datatools.validate_data", f"hydra.run.dir={out}", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_real_breastmnist_has_cross_split_duplicates() -> None:
    report = run_validation(MedMNISTDataModule(str(BREASTMNIST)), {"allow_leakage": False})
    cross = report["duplicates"]["cross_split"]
    assert cross["groups"] >= 1  # train[115] == test[76] in the published file
    # independent check: identical pixel arrays across the published splits
    npz = np.load(BREASTMNIST)
    train = {npz["train_images"][i].tobytes() for i in range(len(npz["train_images"]))}
    others = [npz[f"{s}_images"][i].tobytes() for s in ("val", "test") for i in range(len(npz[f"{s}_images"]))]
    assert sum(b in train for b in others) >= cross["by_splits"].get("train/test", 0) >= 1
    assert any("leakage" in v for v in report["violations"])
    allowed = run_validation(MedMNISTDataModule(str(BREASTMNIST)), {"allow_leakage": True})
    assert not allowed["violations"] and any("leakage" in w for w in allowed["warnings"])
    assert set(allowed["intensity"]["per_split"]["train"]) == {"mean", "std", "p1", "p50", "p99"}
    assert allowed["counts"]["train"] == {"0": 147, "1": 399}


def test_crafted_leak_and_near_duplicate(tmp_path: Path) -> None:
    csv_path = _split_csv(tmp_path, leak=True)
    img = np.array(Image.open(tmp_path / "train" / "b" / "1.png")).astype(np.int16)
    img[0, 0] = (img[0, 0] + 1) % 256  # one pixel off: a near-duplicate, not an exact one
    Image.fromarray(img.astype(np.uint8)).save(tmp_path / "test" / "b" / "near.png")
    rows = (tmp_path / "manifest.csv").read_text() + "test/b/near.png,b,test\n"
    csv_path.write_text(rows)
    report = run_validation(FolderDataModule(str(csv_path), image_size=32), {})
    cross = report["duplicates"]["cross_split"]
    assert cross["groups"] == 1 and cross["by_splits"] == {"train/val": 1}
    assert any("leak.png" in p for p in cross["examples"][0]["images"])
    assert report["near_duplicates"]["by_splits"].get("train/test") == 1
    assert any("leakage" in v for v in report["violations"])


def test_dhash_hamming() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (3, 28, 28, 1), dtype=np.uint8)
    h = dhash(a)
    d = hamming(h, h)
    assert h.dtype == np.uint64 and (np.diag(d) == 0).all() and d[0, 1] > 10


def test_corrupt_files_reported_and_cli_exit_codes(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    root = tmp_path / "data"
    (root / "bad").mkdir(parents=True)
    (root / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "bad" / "empty.png").write_bytes(b"")
    ds = pydicom.dcmread(REPO / "tests" / "data" / "CT_small.dcm")
    del ds.PixelData
    ds.save_as(root / "bad" / "nopixels.dcm")
    extra = [{"path": f"bad/{n}", "label": "a", "split": "train"} for n in ("broken.png", "empty.png", "nopixels.dcm")]
    csv_path = _split_csv(root, extra=extra)
    report = run_validation(FolderDataModule(str(csv_path), image_size=32), {})
    bad = {Path(f["path"]).name: f["reason"] for f in report["corrupt"]["files"]}
    assert set(bad) == {"broken.png", "empty.png", "nopixels.dcm"} and "empty" in bad["empty.png"]
    assert report["geometry"]["original_sizes"] == {"32x32x1": 24}

    out = tmp_path / "v1"
    proc = _validate_cli("data=folder", f"data.path={csv_path}", "data.image_size=32", out=out)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "nopixels.dcm" in proc.stdout and "broken.png" in proc.stdout
    saved = json.loads((out / "report.json").read_text())
    assert any(f["path"].endswith("nopixels.dcm") for f in saved["corrupt"]["files"])
    assert "nopixels.dcm" in (out / "report.md").read_text() and "nopixels.dcm" in (out / "report.html").read_text()

    out2 = tmp_path / "v2"
    proc = _validate_cli("data=folder", f"data.path={csv_path}", "data.image_size=32",
                         "data.validation.allow_corrupt=true", f"output_dir={out2 / 'reports'}", out=out2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out2 / "reports" / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_lfs_pointer_reported_as_unreadable(tmp_path: Path) -> None:
    csv_path = _split_csv(tmp_path)
    (tmp_path / "train" / "a" / "0.png").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 123\n")
    report = run_validation(FolderDataModule(str(csv_path), image_size=32), {})
    (entry,) = report["corrupt"]["files"]
    assert entry["path"].endswith("0.png") and "LFS" in entry["reason"]


def test_patient_level_split(tmp_path: Path) -> None:
    rows = []
    for p in range(30):
        for k in range(3):
            path = _noise_png(tmp_path / f"p{p:02d}_{k}.png", p * 10 + k, size=16)
            rows.append({"path": path.name, "label": "pos" if p % 3 == 0 else "neg", "patient_id": f"P{p:02d}"})
    csv_path = write_csv(tmp_path / "manifest.csv", rows)
    dm = FolderDataModule(str(csv_path), image_size=16, val_fraction=0.2, test_fraction=0.2, split_seed=3)
    result = dm.scan()
    assert result.group_column == "patient_id" and not result.errors
    where: dict[str, set[str]] = {}
    for split, groups in result.groups.items():
        assert len(groups) > 0
        for g in groups:
            where.setdefault(g, set()).add(split)
    assert len(where) == 30 and all(len(s) == 1 for s in where.values())
    assert {len(result.groups[s]) for s in ("val", "test")} == {18}  # 6 patients x 3 images each
    report = run_validation(dm, {})
    assert report["patients"]["in_multiple_splits"] == 0 and not report["violations"]
    # seeded: the same assignment again; a sample-level split would mix patients
    again = FolderDataModule(str(csv_path), image_size=16, val_fraction=0.2, test_fraction=0.2, split_seed=3).scan()
    assert again.groups == result.groups
    mixed = FolderDataModule(str(csv_path), image_size=16, val_fraction=0.2, test_fraction=0.2, split_seed=3,
                             group_column=None).scan()
    flat = {}
    for split, paths in mixed.paths.items():
        for p in paths:
            flat.setdefault(Path(p).name.split("_")[0], set()).add(split)
    assert any(len(s) > 1 for s in flat.values())


def test_patient_in_two_given_splits_is_leakage(tmp_path: Path) -> None:
    rows = [{"path": _noise_png(tmp_path / f"{s}{i}.png", 100 * len(s) + i).name, "label": str(i % 2),
             "split": s, "study_id": "S1" if (s, i) in {("train", 0), ("test", 0)} else f"{s}{i}"}
            for s in ("train", "val", "test") for i in range(4)]
    dm = FolderDataModule(str(write_csv(tmp_path / "m.csv", rows)), image_size=32)
    report = run_validation(dm, {})
    assert report["patients"] == {"column": "study_id", "patients": 11, "in_multiple_splits": 1,
                                  "examples": [{"id": "S1", "splits": ["train", "test"]}]}
    assert any("study_id" in v for v in report["violations"])


def test_training_fails_on_leak_and_default_trains_with_record(tmp_path: Path) -> None:
    csv_path = _split_csv(tmp_path / "leaky", leak=True)
    proc = run_cli(*FAST, "debug=fdr", "data=folder", f"data.path={csv_path}", "data.image_size=32",
                   run_dir=tmp_path / "leak_run", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "leakage" in out and "leak.png" in out
    assert (tmp_path / "leak_run" / "data_validation.json").is_file()
    assert not (tmp_path / "leak_run" / "checkpoints").exists()

    run_dir = tmp_path / "fdr"
    run_cli("debug=fdr", "model=smallcnn", "model.net.width=8", "logger=csv", run_dir=run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed"
    dv = record["data_validation"]
    assert dv["enabled"] and dv["leakage_exact_duplicates"] >= 1 and dv["corrupt"] == 0 and not dv["violations"]
    assert "validation" not in record["config"]["data"]  # the data config stays instantiable (export)
    assert (run_dir / "data_validation.json").is_file()
    from datatools.data_version import fingerprint

    assert record["data"]["fingerprint"] == fingerprint(BREASTMNIST)
