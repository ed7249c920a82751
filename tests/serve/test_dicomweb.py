"""``serve predict|batch --dicomweb``: a real Orthanc PACS in, the answer per series and study, SRs back in with
STOW-RS and read back; the source's sentinel identifiers reach none of medops's outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from medops.dicom_sr import read_result_sr
from medops.pacs import open_client, uid_key
from serve.client import open_backend
from serve.contract import ModelInfo, ServeError
from serve.dicomweb import operating_point
from serve.predict import predict_files
from tests.pacs_data import SENTINEL_ID, SENTINELS, Study, write_studies
from tests.serve.test_predict import run_serve


@pytest.fixture(scope="module")
def studies(orthanc, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Study]:
    """The test studies, stored in Orthanc through its REST API."""
    made = write_studies(tmp_path_factory.mktemp("pacs_studies"))
    for study in made.values():
        orthanc.store(study.files)
    return made


def no_sentinels(*texts: str | bytes) -> None:
    for text in texts:
        data = text.decode("latin-1") if isinstance(text, bytes) else text
        hits = [s for s in SENTINELS if s.lower() in data.lower()]
        assert not hits, f"identifiers {hits} leaked into: {data[:400]}"


def file_probabilities(repository: Path, files: list[Path], positive: str) -> np.ndarray:
    backend = open_backend("local", model="breast", model_repository=repository)
    try:
        column = backend.info.class_names.index(positive)
        return np.array([r["probabilities"][column] for r in predict_files(files, backend)])
    finally:
        backend.close()


@pytest.mark.slow
def test_predict_study_and_store_srs(orthanc, studies, exported_repo: Path) -> None:
    """Local backend: per-image probabilities equal those of the same files; series and study by the max rule; one
    SR per series stored, read back from Orthanc and validated."""
    study = studies["breast"]
    proc = run_serve("predict", "--backend", "local", "--model-repository", str(exported_repo), "--model", "breast",
                     "--dicomweb", orthanc.dicomweb, "--study", study.uid, "--store-results", "--json")
    assert proc.returncode == 0, proc.stderr
    no_sentinels(proc.stdout, proc.stderr)
    answer = json.loads(proc.stdout)
    assert answer["rule"] == "max" and answer["positive_class"] == "malignant"
    assert answer["study"] == uid_key(study.uid) and answer["images"] == 6
    assert [s["series"] for s in answer["series"]] == [uid_key(u) for u in study.series]
    threshold = answer["threshold"]
    for series, files in zip(answer["series"], (study.files[:3], study.files[3:]), strict=True):
        expected = file_probabilities(exported_repo, files, "malignant")
        assert np.allclose(series["probabilities"], expected, atol=1e-5)
        assert series["probability"] == pytest.approx(expected.max(), abs=1e-5)
        assert series["finding_present"] == bool(expected.max() >= threshold)
    assert answer["probability"] == pytest.approx(max(s["probability"] for s in answer["series"]))
    assert "stored 2 result SR(s)" in proc.stderr

    client = open_client(orthanc.dicomweb)
    sr_series = client.search_for_series(study.uid, search_filters={"Modality": "SR"})
    assert len(sr_series) == 1
    reports = client.retrieve_series(study.uid, sr_series[0]["0020000E"]["Value"][0])
    assert len(reports) == 2
    by_sources = {}
    for ds in reports:
        hd.sr.ComprehensiveSR.from_dataset(ds)  # a valid Comprehensive SR for highdicom
        assert ds.PatientID == SENTINEL_ID and ds.StudyInstanceUID == study.uid  # back to the same patient/study
        content = read_result_sr(ds)
        by_sources[frozenset(content["sources"])] = content
        evidence = {ref.ReferencedSOPInstanceUID for item in ds.CurrentRequestedProcedureEvidenceSequence
                    for s in item.ReferencedSeriesSequence for ref in s.ReferencedSOPSequence}
        assert evidence == set(content["sources"])
    for series, files in zip(answer["series"], (study.files[:3], study.files[3:]), strict=True):
        uids = frozenset(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files)
        content = by_sources[uids]
        assert content["finding"] == "malignant" and content["model"] == "breast" and content["version"] == "1"
        assert content["probability"] == pytest.approx(series["probability"], abs=1e-6)
        assert content["threshold"] == pytest.approx(threshold, abs=1e-6)
        assert content["decision"] == ("Present" if series["finding_present"] else "Absent")
        assert content["images"] == 3 and "NOT FOR DIAGNOSIS" in content["comment"]

    # a rerun does not classify the SRs it wrote (SR series are skipped)
    again = run_serve("predict", "--backend", "local", "--model-repository", str(exported_repo), "--model", "breast",
                      "--dicomweb", orthanc.dicomweb, "--study", study.uid, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["skipped_series"] == 1 and json.loads(again.stdout)["images"] == 6
    for path in exported_repo.rglob("*"):
        if path.is_file():
            no_sentinels(path.read_bytes())


@pytest.mark.slow
def test_batch_series_through_triton(orthanc, studies, served, tmp_path: Path) -> None:
    """Triton over HTTP, one series (--series) of the CT/MR study: CSV and JSON rows, warnings, no identifiers."""
    study = studies["ctmr"]
    out = tmp_path / "pacs.csv"
    proc = run_serve("batch", "--url", served.server.http_url, "--model", served.model, "--dicomweb",
                     orthanc.dicomweb, "--study", study.uid, "--series", study.series[0], "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["level"] for r in rows] == ["image", "series", "study"]
    assert rows[1]["series"] == uid_key(study.series[0]) and rows[1]["modality"] == "CT"
    assert float(rows[1]["probability"]) == pytest.approx(float(rows[0]["probability"]))
    expected = file_probabilities(served.repository, study.files[:1], "malignant")
    assert float(rows[0]["probability"]) == pytest.approx(float(expected[0]), abs=1e-5)
    summary = json.loads(Path(f"{out}.json").read_text())
    assert summary["images"] == 1 and summary["series"][0]["modality"] == "CT"
    no_sentinels(proc.stdout, proc.stderr, out.read_text(), Path(f"{out}.json").read_text())


@pytest.mark.slow
def test_bad_pacs_requests_fail_clearly(orthanc, studies, exported_repo: Path) -> None:
    """An unknown study, an unreachable PACS and a missing --study: exit 2 with a reason, no traceback."""
    base = ("predict", "--backend", "local", "--model-repository", str(exported_repo), "--model", "breast")
    unknown = run_serve(*base, "--dicomweb", orthanc.dicomweb, "--study", "1.2.3.4.5.6.7")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "the PACS has no study with the UID given (--study)" in " ".join(unknown.stderr.split())
    down = run_serve(*base, "--dicomweb", "http://127.0.0.1:9/dicom-web", "--study", studies["breast"].uid)
    assert down.returncode == 2 and "DICOMweb" in down.stderr and "Traceback" not in down.stderr
    missing = run_serve(*base, "--dicomweb", orthanc.dicomweb)
    assert missing.returncode == 2 and "--study" in missing.stderr


def _info(class_names: list[str], **extra) -> ModelInfo:
    return ModelInfo(name="m", version="2", input_name="image", output_name="probabilities", channels=1, size=28,
                     max_batch_size=8, class_names=class_names, extra=extra)


@pytest.mark.parametrize(("info", "reason"), [
    (_info(["malignant", "benign"]), "has no operating point"),  # exported before operating points
    (_info(["a", "b", "c"], threshold=0.3, positive_class="a"), "need a binary model"),
])
def test_results_need_a_binary_model_with_an_operating_point(info: ModelInfo, reason: str) -> None:
    with pytest.raises(ServeError, match=reason):
        operating_point(info)


def test_operating_point_is_the_exported_one() -> None:
    info = _info(["malignant", "normal_or_benign"], threshold=0.42, positive_class="malignant")
    assert operating_point(info)[:2] == ("malignant", 0.42)


def test_csv_rows_name_each_image_by_its_place_in_the_series(tmp_path: Path) -> None:
    """A failed instance between two classified ones: every image row keeps its own instance number."""
    from serve.dicomweb import SeriesResult, StudyResult, write_csv

    series = SeriesResult("s1", 1, "CT", 3, probabilities=[0.2, 0.7], numbers=[1, 3],
                          failed=[{"instance": 2, "reason": "no pixel data"}], probability=0.7, present=True)
    result = StudyResult("k", "m", "1", "malignant", 0.5, "test", series=[series])
    path, _ = write_csv(result, tmp_path / "r.csv")
    rows = [r for r in csv.DictReader(path.open()) if r["level"] == "image"]
    by_instance = {r["instance"]: r for r in rows}
    assert sorted(by_instance) == ["1", "2", "3"] and len(rows) == 3
    assert float(by_instance["3"]["probability"]) == 0.7 and by_instance["2"]["error"] == "no pixel data"
    assert result.as_dict()["series"][0]["probability_instances"] == [1, 3]
