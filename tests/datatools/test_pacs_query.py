"""``python -m datatools.pacs_query``: a QIDO-RS query result pulled from a real Orthanc through the ingest's
de-identification, resumed after a partial pull without retrieving anything twice; no identifier in the output."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medops.deid import pseudonym
from medops.dicom import read_dicom
from tests.conftest import REPO
from tests.pacs_data import SENTINEL_ID, SENTINELS, write_studies

pytestmark = pytest.mark.slow
SALT = "pacs-test-salt"


def run_pull(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "MEDOPS_DEID_SALT": SALT}
    return subprocess.run([sys.executable, "-m", "datatools.pacs_query", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def tree_text(folder: Path) -> str:
    """Every file name and content under ``folder`` (bytes as latin-1)."""
    parts = []
    for path in sorted(folder.rglob("*")):
        parts.append(str(path.relative_to(folder)))
        if path.is_file():
            parts.append(path.read_bytes().decode("latin-1"))
    return "\n".join(parts)


def test_pull_is_deidentified_and_resumes(orthanc, tmp_path: Path) -> None:
    studies = write_studies(tmp_path / "src", study_date="20230607")  # a date no other test's study has
    for study in studies.values():
        orthanc.store(study.files)
    dst = tmp_path / "pulled"
    query = (orthanc.dicomweb, str(dst), "--modality", "US", "--study-date", "20230601-20230630", "--no-progress")

    first = run_pull(*query, "--max-instances", "2")
    assert first.returncode == 3, first.stderr  # stopped early: instances left
    state = json.loads((dst / "pull_state.json").read_text())
    assert len(state["done"]) == 2 and "2 to pull now" in first.stderr
    done_before = dict(state["done"])

    second = run_pull(*query)
    assert second.returncode == 0, second.stderr
    assert "2 pulled before, 4 to pull now" in second.stderr  # the done instances are not retrieved again
    state = json.loads((dst / "pull_state.json").read_text())
    assert len(state["done"]) == 6 and all(state["done"][k] == v for k, v in done_before.items())

    rows = list(csv.DictReader((dst / "manifest.csv").open()))
    assert len(rows) == 6 and len({r["path"] for r in rows}) == 6  # only the US study, no duplicates
    assert {r["patient_id"] for r in rows} == {pseudonym(SENTINEL_ID, SALT)}
    report = json.loads((dst / "ingest_report.json").read_text())
    assert report["images_written"] == 6 and report["errors"] == [] and report["quarantined"] == []
    # the pixels are those the ingest reads from the files that were stored (the same medops.read_dicom)
    expected = [read_dicom(f)[:, :, 0] for f in studies["breast"].files]
    pulled = [np.asarray(Image.open(dst / r["path"])) for r in rows]
    assert sorted(p.tobytes() for p in pulled) == sorted(e.tobytes() for e in expected)
    for text in (first.stdout, first.stderr, second.stdout, second.stderr, tree_text(dst)):
        hits = [s for s in SENTINELS if s.lower() in text.lower()]
        assert not hits, f"identifiers {hits} in the pull's output"
    for study in studies.values():
        assert study.uid not in tree_text(dst)

    other = run_pull(orthanc.dicomweb, str(dst), "--modality", "CT", "--no-progress")
    assert other.returncode == 1 and "holds a pull of another query" in other.stderr


def test_killed_pull_resumes(orthanc, tmp_path: Path) -> None:
    """SIGKILL in the middle of a pull: the rerun keeps what was done, retrieves only the rest, and the dataset has
    every instance once."""
    study = write_studies(tmp_path / "src", per_series=20, study_date="20230808")["breast"]
    orthanc.store(study.files)
    dst = tmp_path / "pulled"
    args = [sys.executable, "-m", "datatools.pacs_query", orthanc.dicomweb, str(dst), "--study-date", "20230808",
            "--modality", "US", "--no-progress"]
    env = {**os.environ, "MEDOPS_DEID_SALT": SALT}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file, deadline = dst / "pull_state.json", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if state_file.is_file() and json.loads(state_file.read_text() or "{}").get("done"):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait(30) == -signal.SIGKILL, "the pull ended before it could be killed"
    done_before = json.loads(state_file.read_text())["done"]
    assert 1 <= len(done_before) < 40

    resumed = run_pull(orthanc.dicomweb, str(dst), "--study-date", "20230808", "--modality", "US", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(done_before)} pulled before, {40 - len(done_before)} to pull now" in resumed.stderr
    state = json.loads(state_file.read_text())["done"]
    assert len(state) == 40 and all(state[k] == v for k, v in done_before.items())
    rows = list(csv.DictReader((dst / "manifest.csv").open()))
    assert len(rows) == 40 and len({r["path"] for r in rows}) == 40
    assert len(list((dst / "images").glob("*.png"))) == 40
