"""Dataset manifests, diffs and fingerprints (python -m datatools.data_version)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datatools.data_version import main
from tests.conftest import write_csv, write_medmnist
from train.datamodules import MedMNISTDataModule


def _csv_dataset(root: Path, n: int = 8) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"path": f"{i}.png", "label": "a" if i % 2 else "b", "split": "train" if i < 6 else "test"})
    return write_csv(root / "manifest.csv", rows)


def test_diff_reports_exactly_the_changes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = _csv_dataset(tmp_path)
    assert main(["write", str(csv_path), "--out", str(tmp_path / "old.csv")]) == 0
    rows = [line.split(",") for line in csv_path.read_text().splitlines()[1:]]
    rows = [{"path": p, "label": lab, "split": s} for p, lab, s in rows]
    rows[1]["label"] = "b"  # changed label
    rows[2]["split"] = "val"  # moved split
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "3.png")  # changed content
    del rows[4]  # removed
    shutil.copy(tmp_path / "0.png", tmp_path / "new.png")
    rows.append({"path": "new.png", "label": "a", "split": "train"})  # added
    write_csv(csv_path, rows)
    assert main(["write", str(csv_path), "--out", str(tmp_path / "new.csv")]) == 0
    capsys.readouterr()
    assert main(["diff", str(tmp_path / "old.csv"), str(tmp_path / "new.csv"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["counts"] == {"added": 1, "removed": 1, "changed_label": 1, "moved_split": 1, "changed_content": 1}
    ch = result["changes"]
    assert [e["path"] for e in ch["added"]] == ["new.png"] and [e["path"] for e in ch["removed"]] == ["4.png"]
    assert ch["changed_label"] == [{"path": "1.png", "old": "a", "new": "b"}]
    assert ch["moved_split"] == [{"path": "2.png", "old": "train", "new": "val"}]
    assert [e["path"] for e in ch["changed_content"]] == ["3.png"]
    assert result["unchanged"] == 4
    assert main(["diff", str(tmp_path / "old.csv"), str(tmp_path / "new.csv")]) == 0
    assert "changed_label" in capsys.readouterr().out


def test_npz_manifest_and_fingerprint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    splits = {s: (rng.integers(0, 255, (n, 28, 28), dtype=np.uint8), rng.integers(0, 2, n))
              for s, n in (("train", 12), ("val", 4), ("test", 4))}
    base = write_medmnist(tmp_path / "a.npz", splits)
    order = np.arange(12)[::-1]
    shuffled = write_medmnist(tmp_path / "b.npz", {**splits, "train": (splits["train"][0][order],
                                                                     splits["train"][1][order])})
    flipped_labels = splits["val"][1].copy()
    flipped_labels[0] = 1 - flipped_labels[0]
    flipped = write_medmnist(tmp_path / "c.npz", {**splits, "val": (splits["val"][0], flipped_labels)})

    def fp(path: Path) -> str:
        capsys.readouterr()
        assert main(["fingerprint", str(path)]) == 0
        return capsys.readouterr().out.strip()

    f_base = fp(base)
    dm = MedMNISTDataModule(str(base), md5=False)
    dm.prepare()
    assert f_base == dm.fingerprint and f_base.startswith("sha256:")  # what run.json records
    assert fp(shuffled) == f_base
    assert fp(flipped) != f_base

    assert main(["write", str(base), "--out", str(tmp_path / "a.csv")]) == 0
    assert main(["write", str(flipped), "--out", str(tmp_path / "c.csv")]) == 0
    capsys.readouterr()
    assert main(["diff", str(tmp_path / "a.csv"), str(tmp_path / "c.csv"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["counts"]["changed_label"] == 1 and sum(result["counts"].values()) == 1
    assert result["changes"]["changed_label"][0]["path"] == "npz:val:0"


def test_folder_fingerprint_matches_datamodule(tmp_path: Path, png_folder: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from train.datamodules import FolderDataModule

    dm = FolderDataModule(str(png_folder), image_size=32)
    dm.prepare()
    capsys.readouterr()
    assert main(["fingerprint", str(png_folder), "--image-size", "32"]) == 0
    assert capsys.readouterr().out.strip() == dm.fingerprint


def test_lfs_pointer_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = _csv_dataset(tmp_path)
    pointer = "version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 999\n"
    (tmp_path / "5.png").write_text(pointer)
    assert main(["write", str(csv_path), "--out", str(tmp_path / "m.csv")]) == 1
    err = capsys.readouterr().err
    assert "5.png" in err and "LFS object is not fetched" in err
    assert not (tmp_path / "m.csv").exists()
    (tmp_path / "data.npz").write_text(pointer)
    assert main(["write", str(tmp_path / "data.npz"), "--out", str(tmp_path / "n.csv")]) == 1
    assert "data.npz" in capsys.readouterr().err
