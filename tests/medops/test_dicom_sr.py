"""medops.dicom_sr: the aggregation rule, the result SR's content tree and identifiers, the labelled overlay."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from medops.dicom_sr import (
    NOT_FOR_DIAGNOSIS,
    ModelAnswer,
    aggregate,
    burn_label,
    content_tree,
    overlay_capture,
    read_result_sr,
    result_sr,
)
from tests.pacs_data import SENTINEL_ID, SENTINEL_NAME, SENTINEL_NESTED, write_studies


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[pydicom.Dataset]:
    study = write_studies(tmp_path_factory.mktemp("sr"))["breast"]
    return [pydicom.dcmread(f) for f in study.files[:3]]


def round_trip(ds: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def test_aggregate_is_the_maximum() -> None:
    assert aggregate([0.1, 0.7, 0.3]) == 0.7
    assert aggregate([]) is None


@pytest.mark.parametrize(("probability", "decision"), [(0.41, "Present"), (0.2, "Absent")])
def test_result_sr_content_and_references(sources, tmp_path: Path, probability: float, decision: str) -> None:
    answer = ModelAnswer("breast", "3", "malignant", 0.276, probability, len(sources))
    sr = round_trip(result_sr(answer, sources), tmp_path / "sr.dcm")
    hd.sr.ComprehensiveSR.from_dataset(sr)  # highdicom accepts it as a Comprehensive SR
    content = read_result_sr(sr)
    assert content["finding"] == "malignant" and content["decision"] == decision
    assert content["probability"] == pytest.approx(probability) and content["threshold"] == pytest.approx(0.276)
    assert content["model"] == "breast" and content["version"] == "3" and content["images"] == 3
    assert "maximum over the classified images of P(malignant)" in content["rule"]
    assert content["sources"] == [s.SOPInstanceUID for s in sources]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == sources[0].StudyInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence} == \
        {s.SOPInstanceUID for s in sources}
    # the source's patient and study identifiers, so that the PACS files it with the study ...
    assert (sr.PatientID, str(sr.PatientName), sr.StudyInstanceUID) == \
        (SENTINEL_ID, SENTINEL_NAME, sources[0].StudyInstanceUID)
    # ... and nothing else of the source: not the nested other-patient ids
    assert SENTINEL_NESTED.encode() not in (tmp_path / "sr.dcm").read_bytes()
    assert sr.SeriesInstanceUID != sources[0].SeriesInstanceUID and sr.Manufacturer == "medops"
    tree = content_tree(sr)
    assert tree.splitlines()[0] == "CONTAINER Diagnostic imaging report (LN 18748-4)"
    assert f"CONTAINS CODE Finding at operating point: {decision}" in tree
    assert tree.count("CONTAINS IMAGE Source of Measurement: Ultrasound Image Storage instance") == 3


def test_result_sr_needs_sources() -> None:
    with pytest.raises(ValueError, match="at least one source"):
        result_sr(ModelAnswer("m", "1", "malignant", 0.5, 0.9, 0), [])


def test_read_result_sr_refuses_other_reports(sources, tmp_path: Path) -> None:
    sr = result_sr(ModelAnswer("m", "1", "malignant", 0.5, 0.9, 3), sources)
    sr.ConceptNameCodeSequence[0].CodeValue = "11528-7"
    with pytest.raises(ValueError, match="not a medops result SR"):
        read_result_sr(sr)


def test_overlay_capture_is_labelled(sources, tmp_path: Path) -> None:
    rgb = np.full((64, 160, 3), 128, np.uint8)
    labelled = burn_label(rgb, ["line one", "line two"])
    assert labelled.shape[1] == 160 and labelled.shape[0] > 64
    band = labelled[:5].reshape(-1, 3)
    assert (band == (200, 0, 0)).all(axis=1).mean() > 0.8  # the red NOT FOR DIAGNOSIS band
    assert (labelled[:12, :, 1] > 150).any()  # light text on the red band (which has no green)
    sc = round_trip(overlay_capture(sources[1], labelled, description="test overlay"), tmp_path / "sc.dcm")
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and sc.BurnedInAnnotation == "YES"
    assert NOT_FOR_DIAGNOSIS in sc.ImageComments
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == sources[1].SOPInstanceUID
    assert sc.StudyInstanceUID == sources[1].StudyInstanceUID and sc.PatientID == SENTINEL_ID
    assert sc.get("PatientOrientation", "") == (sources[1].get("PatientOrientation") or "")  # the source's, not made up
    assert np.array_equal(sc.pixel_array, labelled)
