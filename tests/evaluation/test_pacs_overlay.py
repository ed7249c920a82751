"""``python -m evaluation.pacs_overlay``: Grad-CAM overlays of a study in a real Orthanc, stored back as Secondary
Captures labelled NOT FOR DIAGNOSIS, read back and checked; no identifier in the command's output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medops.pacs import open_client
from tests.conftest import REPO
from tests.pacs_data import SENTINEL_ID, SENTINELS, write_studies

pytestmark = pytest.mark.slow


def test_overlay_capture_round_trip(orthanc, trained_run: Path, tmp_path: Path) -> None:
    study = write_studies(tmp_path / "src")["breast"]
    orthanc.store(study.files)
    png_dir = tmp_path / "png"
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "evaluation.pacs_overlay", "--dicomweb", orthanc.dicomweb,
                           "--study", study.uid, "--run", str(trained_run), "--store", "--png-dir", str(png_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "stored 2 overlay secondary capture(s)" in proc.stdout
    for text in (proc.stdout, proc.stderr):
        assert not [s for s in SENTINELS if s.lower() in text.lower()], text

    client = open_client(orthanc.dicomweb)
    found = client.search_for_series(study.uid, search_filters={"Modality": "OT"}) or \
        [s for s in client.search_for_series(study.uid) if s["0020000E"]["Value"][0] not in study.series]
    assert len(found) == 1
    captures = client.retrieve_series(study.uid, found[0]["0020000E"]["Value"][0])
    assert len(captures) == 2
    sources = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: n
               for n, f in enumerate(study.files)}
    for sc in sorted(captures, key=lambda d: int(d.InstanceNumber)):
        assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert sc.BurnedInAnnotation == "YES" and "NOT FOR DIAGNOSIS" in sc.SeriesDescription
        assert sc.PatientID == SENTINEL_ID and sc.StudyInstanceUID == study.uid  # back into the source study
        source = sc.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert source in sources  # the overlay says which source image it explains
        pixels = sc.pixel_array
        assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.shape[1] >= 512
        band = pixels[:8].reshape(-1, 3).astype(int)  # the red NOT FOR DIAGNOSIS band burned in at the top
        assert np.mean((band[:, 0] > 150) & (band[:, 1] < 60)) > 0.9
        png = np.asarray(Image.open(png_dir / f"overlay_{int(sc.InstanceNumber)}.png"))
        assert np.array_equal(png, pixels)  # the PNG is the stored image
        assert pixels[:, :, 0].std() > 0  # not blank
