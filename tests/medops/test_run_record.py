"""medops.run_record: the one reader and writer of run.json, its schema check and ``latest``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from medops.run_record import (
    SCHEMA,
    RunRecordError,
    find_records,
    latest_run,
    new_record,
    read_operating_point,
    read_record,
    write_operating_point,
    write_record,
)


def _run(folder: Path, status: str = "completed", mtime: float | None = None, **extra: object) -> Path:
    folder.mkdir(parents=True)
    record = {**new_record(folder, folder.name), "status": status, **extra}
    path = write_record(record, folder)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return folder


def test_written_record_reads_back_typed(tmp_path: Path) -> None:
    run = _run(tmp_path / "r1", test={"auroc": 0.91, "acc": 0.86}, data={"fold": 2, "fingerprint": "sha256:ab"},
               checkpoints={"best": "/elsewhere/checkpoints/epoch3.ckpt"})
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "epoch3.ckpt").write_bytes(b"x")
    record = read_record(run)
    assert record.raw["schema"] == SCHEMA and record.run_id == "r1" and record.completed
    assert record.test == {"auroc": 0.91, "acc": 0.86} and record.fold == 2
    assert record.data["fingerprint"] == "sha256:ab"
    assert record.best_checkpoint() == run / "checkpoints" / "epoch3.ckpt"  # the copy inside the folder wins
    assert read_record(run / "run.json").run_id == "r1"
    assert record.raw["git"].keys() == {"commit", "dirty"} and "python" in record.raw["versions"]


@pytest.mark.parametrize(("content", "message"), [
    ({"run_id": "old", "status": "completed"}, "no 'schema' field"),
    ({"schema": "medops.run/99", "run_id": "new"}, "schema 'medops.run/99' is not supported"),
    ([1, 2], "a JSON object is expected"),
])
def test_old_or_foreign_records_get_a_clear_error(tmp_path: Path, content: object, message: str) -> None:
    (tmp_path / "run.json").write_text(json.dumps(content))
    with pytest.raises(RunRecordError, match=message) as err:
        read_record(tmp_path)
    assert str(tmp_path / "run.json") in str(err.value)


def test_missing_and_broken_records_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(RunRecordError, match="run record not found"):
        read_record(tmp_path / "nowhere")
    (tmp_path / "run.json").write_text("{broken")
    with pytest.raises(RunRecordError, match="not a readable run record"):
        read_record(tmp_path)
    with pytest.raises(RunRecordError, match="names no best checkpoint"):
        _run(tmp_path / "nockpt")
        read_record(tmp_path / "nockpt").best_checkpoint()


def test_latest_is_the_newest_completed_run(tmp_path: Path) -> None:
    _run(tmp_path / "a" / "old", mtime=1_000)
    _run(tmp_path / "a" / "new", mtime=2_000)
    _run(tmp_path / "b" / "running", status="running", mtime=3_000)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "run.json").write_text(json.dumps({"status": "completed"}))  # no schema: skipped
    os.utime(tmp_path / "c" / "run.json", (4_000, 4_000))
    assert latest_run(tmp_path) == tmp_path / "a" / "new"
    assert sorted(p.parent.name for p in find_records(tmp_path)) == ["c", "new", "old", "running"]
    assert find_records(tmp_path / "a" / "old") == [tmp_path / "a" / "old" / "run.json"]
    with pytest.raises(RunRecordError, match="no completed training run"):
        latest_run(tmp_path / "b")


def test_operating_point_round_trip(tmp_path: Path) -> None:
    assert read_operating_point(tmp_path) == {}
    write_operating_point(tmp_path, {"threshold": 0.42, "positive_class": "malignant"})
    assert read_operating_point(tmp_path) == {"threshold": 0.42, "positive_class": "malignant"}
    assert not list(tmp_path.glob(".*.tmp"))
