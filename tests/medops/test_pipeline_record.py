"""The pipeline run record (medops/pipeline_record.py) and the data version a tracker names (DVC, Git LFS)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from medops import pipeline_record as pr


def test_record_links_data_run_model_and_decision(tmp_path: Path) -> None:
    pr.start_record(tmp_path, "ct-1", engine="local", trigger={"kind": "drift_alert", "model": "m"},
                    parameters={"model_name": "m"})
    pr.record_step(tmp_path, "ct-1", "train", status="running")
    pr.record_step(tmp_path, "ct-1", "train", status="done", seconds=12.5, figures={"auroc": 0.9})
    pr.record_lineage(tmp_path, "ct-1", data_fingerprint="sha256:ab", run_id="2026-01-01_00-00-00", model="m",
                      model_version=3, decision="promoted: v3 is production", ignored=None)
    pr.finish_record(tmp_path, "ct-1", "completed")
    record = pr.read_pipeline_record(tmp_path / "ct-1")
    assert record.raw["schema"] == "medops.pipeline/1" and record.status == "completed"
    assert record.trigger == {"kind": "drift_alert", "model": "m"}
    assert record.steps["train"]["status"] == "done" and record.steps["train"]["seconds"] == 12.5
    assert record.steps["train"]["figures"] == {"auroc": 0.9}
    assert record.lineage == {"data_fingerprint": "sha256:ab", "run_id": "2026-01-01_00-00-00", "model": "m",
                              "model_version": 3, "decision": "promoted: v3 is production"}
    pr.start_record(tmp_path, "ct-1", engine="local")  # a resumed run keeps what it had
    again = pr.read_pipeline_record(tmp_path / "ct-1")
    assert again.status == "running" and again.lineage["model_version"] == 3 and len(again.raw["attempts"]) == 2


def test_unknown_files_and_statuses_are_refused(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "pipeline.json").write_text(json.dumps({"schema": "other/1"}))
    with pytest.raises(pr.PipelineRecordError, match="not a medops pipeline record"):
        pr.read_pipeline_record(tmp_path / "x")
    with pytest.raises(pr.PipelineRecordError, match="not found"):
        pr.read_pipeline_record(tmp_path / "missing")
    with pytest.raises(pr.PipelineRecordError, match="final status"):
        pr.finish_record(tmp_path, "ct-2", "great")


def test_dvc_file_version(tmp_path: Path) -> None:
    data = tmp_path / "scans.npz"
    data.write_bytes(b"pixels")
    (tmp_path / "scans.npz.dvc").write_text("outs:\n- md5: 3f2a9c7b1e0d4a5b6c7d8e9f00112233\n  size: 6\n"
                                            "  hash: md5\n  path: scans.npz\n")
    version = pr.tracked_version(data)
    assert version == {"tool": "dvc", "file": str(tmp_path / "scans.npz.dvc"),
                       "md5": "3f2a9c7b1e0d4a5b6c7d8e9f00112233", "size": 6}


def test_dvc_lock_version(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    data = tmp_path / "data" / "prepared.npz"
    data.write_bytes(b"pixels")
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    cmd: python prepare.py\n    outs:\n    - path: data/prepared.npz\n"
        "      hash: md5\n      md5: aa11bb22cc33dd44ee55ff6677889900\n      size: 6\n")
    version = pr.tracked_version(data)
    assert version["tool"] == "dvc" and version["stage"] == "prepare"
    assert version["md5"] == "aa11bb22cc33dd44ee55ff6677889900"
    assert pr.tracked_version(tmp_path / "dvc.lock") is None  # not an output of any stage


def test_git_lfs_version_is_the_object_id(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitattributes").write_text("*.npz filter=lfs diff=lfs merge=lfs -text\n")
    data = tmp_path / "scans.npz"
    data.write_bytes(b"pixels of a fetched LFS object")
    version = pr.tracked_version(data)
    assert version == {"tool": "git-lfs", "oid": "sha256:" + hashlib.sha256(data.read_bytes()).hexdigest(),
                       "fetched": True}
    oid = "4d7a2146" * 8
    data.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize 12345\n")
    assert pr.tracked_version(data) == {"tool": "git-lfs", "oid": f"sha256:{oid}", "fetched": False}
    (tmp_path / "plain.csv").write_text("a,b\n")
    assert pr.tracked_version(tmp_path / "plain.csv") is None
