"""python -m datatools.ingest_dicom end to end: the whole Annex E table (sentinels at every depth) never reaches an
output, UIDs and dates stay consistent per study and patient, and burned-in text is quarantined, masked or kept."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from medops.deid import RETAINED_CHARACTERISTICS, pseudonym, remap_uid, shift_days_for
from medops.deid_pixels import BAND
from tests.conftest import REPO
from tests.medops.test_deid_table import sentinel_dataset

DATA = REPO / "tests" / "data"
CT, MR = DATA / "CT_small.dcm", DATA / "MR_small.dcm"
SALT = "sentinel-salt"  # the salt of tests/medops/test_deid_table.py: the date shift there exceeds the date span


def _ingest(src: Path, dst: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDOPS_DEID_SALT": SALT}
    cmd = [sys.executable, "-m", "datatools.ingest_dicom", str(src), str(dst), "--no-progress", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def path_of(src: Path, entry: dict) -> str:
    from datatools.ingest_dicom import source_files

    return source_files(src)[entry["file"] - 1].relative_to(src).as_posix()


def _manifest(dst: Path) -> list[dict[str, str]]:
    with (dst / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def _png_metadata(path: Path) -> bytes:
    """All PNG chunks except the compressed pixel data (IDAT)."""
    data, out, pos = path.read_bytes(), bytearray(), 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] != b"IDAT":
            out += data[pos : pos + 12 + length]
        pos += 12 + length
    return bytes(out)


def _decoded_binaries(node: object) -> list[bytes]:
    """Every InlineBinary value of a DICOM JSON document, base64-decoded (a scan of the text would miss them)."""
    if isinstance(node, dict):
        found = [base64.b64decode(node["InlineBinary"])] if isinstance(node.get("InlineBinary"), str) else []
        return found + [b for v in node.values() for b in _decoded_binaries(v)]
    if isinstance(node, list):
        return [b for v in node for b in _decoded_binaries(v)]
    return []


def _haystacks(dst: Path, proc: subprocess.CompletedProcess) -> dict[str, bytes]:
    """What an output may carry, by where it was found: names, file contents (PNG: metadata; sidecars: decoded
    binaries too; npz: its string arrays) and the captured stdout/stderr."""
    out = {"stdout+stderr": (proc.stdout + proc.stderr).encode(), "names": "\n".join(
        p.relative_to(dst).as_posix() for p in dst.rglob("*")).encode()}
    for path in (p for p in dst.rglob("*") if p.is_file()):
        if path.suffix == ".png":
            out[path.name] = _png_metadata(path)
        elif path.suffix == ".npz":
            with np.load(path) as z:
                out[path.name] = b"\n".join(str(z[k].tolist()).encode() for k in z.files if z[k].dtype.kind == "U")
        else:
            out[path.name] = path.read_bytes()
            if path.suffix == ".json":
                out[path.name] += b"\n".join(_decoded_binaries(json.loads(path.read_text())))
    return out


@pytest.fixture(scope="module")
def sentinel_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("sentinels")
    ds, sentinels = sentinel_dataset(MR)
    (root / "src" / "a").mkdir(parents=True)
    ds.save_as(root / "src" / "a" / "everything.dcm")
    runs = {}
    for fmt in ("png", "npz"):
        proc = _ingest(root / "src", root / fmt, "--sidecar", "--format", fmt)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[fmt] = (root / fmt, proc)
    return runs, sentinels


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_no_table_sentinel_reaches_any_output(sentinel_run, fmt: str) -> None:
    runs, sentinels = sentinel_run
    dst, proc = runs[fmt]
    tokens = [s for s in sentinels if s.token and not s.retained]
    assert len(tokens) > 1000
    leaks = [(s.token, hex(s.tag), s.depth, where) for where, data in _haystacks(dst, proc).items() for s in tokens
             if s.token.lower().encode() in data.lower()]
    assert leaks == []
    report = json.loads((dst / "ingest_report.json").read_text())
    assert report["images_written"] == 1 and "2026c" in report["deidentification"]


def _elements(header: dict, depth: int) -> dict:
    if depth == 2:
        header = header["00081115"]["Value"][0]["0008114A"]["Value"][0]
    return header


def test_short_sentinels_retained_values_and_pseudonyms_in_the_sidecar(sentinel_run) -> None:
    """Sentinels too short to scan for (ages, numbers) checked element by element; the retained ones kept."""
    runs, sentinels = sentinel_run
    dst, _ = runs["png"]
    (sidecar,) = (dst / "headers").glob("*.json")
    header = json.loads(sidecar.read_text())
    for s in sentinels:
        value = _elements(header, s.depth).get(f"{s.tag:08X}", {}).get("Value")
        keyword = pydicom.datadict.keyword_for_tag(s.tag)
        if keyword in RETAINED_CHARACTERISTICS:
            assert value == [s.value], keyword
        elif not s.token and value is not None:
            assert value != [s.value], (keyword, s.depth)
    top_id = next(s.value for s in sentinels if s.tag == 0x00100020 and s.depth == 0)
    assert header["00100020"]["Value"] == [pseudonym(top_id, SALT)]
    assert header["00120062"]["Value"] == ["YES"]
    codes = [item["00080100"]["Value"][0] for item in header["00120064"]["Value"]]
    assert codes == ["113100", "113107", "113108"]


def _study_file(base: Path, sop: str, series_date: str, *, patient: str = "PAT-ONE") -> Dataset:
    ds = pydicom.dcmread(base)
    ds.PatientID = patient
    ds.PatientName = "Qwertyuiop^Asdfghjk"
    ds.StudyInstanceUID = "1.2.3.4.5.100"
    ds.SeriesInstanceUID = "1.2.3.4.5.100.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.StudyDate, ds.SeriesDate, ds.ContentDate = "20200102", series_date, series_date
    ds.ReasonForStudy = "LEAK-REASON"
    ds.PerformedStationName = "LEAK-STATION"
    ds.PerformedLocation = "LEAK-LOCATION"
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = "1.2.3.4.5.100.1.2"
    ref.PatientName = "Nested^Leak"
    ref.PatientID = "NESTED-LEAK-ID"
    ds.ReferencedImageSequence = [ref]
    return ds


def test_uids_and_dates_consistent_across_files_of_one_study(tmp_path: Path) -> None:
    """Two files of one study (and a third patient): one remapped StudyInstanceUID, distinct SOP instances, the
    reference between them kept, the same date shift for the patient; the reviewer's five leaked values gone."""
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    _study_file(MR, "1.2.3.4.5.100.1.1", "20200103").save_as(src / "one.dcm")
    _study_file(MR, "1.2.3.4.5.100.1.2", "20200110").save_as(src / "two.dcm")
    _study_file(MR, "1.2.3.4.5.200.1.1", "20200103", patient="PAT-TWO").save_as(src / "other.dcm")
    proc = _ingest(src.parent, tmp_path / "out", "--sidecar")
    assert proc.returncode == 0, proc.stderr[-3000:]
    headers = [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "headers").glob("*.json"))]
    assert len(headers) == 3
    by_pid = {}
    for h in headers:
        by_pid.setdefault(h["00100020"]["Value"][0], []).append(h)
    one = by_pid.pop(pseudonym("PAT-ONE", SALT))
    (other,) = by_pid.pop(pseudonym("PAT-TWO", SALT))
    assert {h["0020000D"]["Value"][0] for h in one} == {remap_uid("1.2.3.4.5.100", SALT)}
    assert len({h["00080018"]["Value"][0] for h in one}) == 2
    refs = {h["00081140"]["Value"][0]["00081155"]["Value"][0] for h in one}
    assert refs == {remap_uid("1.2.3.4.5.100.1.2", SALT)} and refs <= {h["00080018"]["Value"][0] for h in one}

    def day(value: str) -> dt.date:
        return dt.datetime.strptime(value, "%Y%m%d").date()

    shift = dt.timedelta(days=shift_days_for("PAT-ONE", SALT))
    for h in one:
        assert day("20200102") - day(h["00080020"]["Value"][0]) == shift
    series = sorted(day(h["00080021"]["Value"][0]) for h in one)
    assert series[1] - series[0] == dt.timedelta(days=7)  # the interval between the two series is kept
    assert day("20200102") - day(other["00080020"]["Value"][0]) == dt.timedelta(days=shift_days_for("PAT-TWO", SALT))
    outputs = b"".join(_haystacks(tmp_path / "out", proc).values()).lower()
    for word in ("leak-reason", "leak-station", "leak-location", "nested-leak-id", "qwertyuiop", "asdfghjk",
                 "pat-one"):
        assert word.encode() not in outputs, word


# -- burned-in text ----------------------------------------------------------------------------------------------

GLYPH = (slice(30, 33), slice(30, 33))  # a 3 x 3 "character" in the middle of a 64 x 64 image


def _burned(base: Path, modality: str, flag: str | None, *, sop_class: str | None = None) -> Dataset:
    ds = pydicom.dcmread(base)
    ds.Modality = modality
    if flag is not None:
        ds.BurnedInAnnotation = flag
    if sop_class:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    pixels = ds.pixel_array.copy()
    pixels[:3, 4:40] = np.iinfo(pixels.dtype).max  # a line of text in the top band
    pixels[GLYPH] = np.iinfo(pixels.dtype).max
    ds.PixelData = pixels.tobytes()
    return ds


@pytest.fixture(scope="module")
def burned_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("burned") / "src"
    (src / "us").mkdir(parents=True)
    (src / "other").mkdir()
    _burned(MR, "US", "YES").save_as(src / "us" / "us_yes.dcm")
    _burned(CT, "US", None).save_as(src / "us" / "us_absent.dcm")
    _burned(MR, "US", "NO").save_as(src / "us" / "us_no.dcm")
    _burned(CT, "CT", None).save_as(src / "other" / "ct_absent.dcm")
    _burned(CT, "CT", None, sop_class="1.2.840.10008.5.1.4.1.1.7").save_as(src / "other" / "sc_as_ct.dcm")
    return src


FLAGGED = {"us/us_yes.dcm", "us/us_absent.dcm", "other/sc_as_ct.dcm"}
UNFLAGGED = {"us/us_no.dcm", "other/ct_absent.dcm"}


def _images_by_source(dst: Path) -> dict[str, tuple[dict[str, str], np.ndarray]]:
    """Manifest rows with their image, keyed by the output path."""
    rows = _manifest(dst)
    return {r["path"]: (r, np.array(Image.open(dst / r["path"]))) for r in rows}


@pytest.mark.parametrize("mode", ["quarantine", "clean", "keep"])
def test_burned_in_text_modes(burned_tree: Path, tmp_path: Path, mode: str) -> None:
    extra = [] if mode == "quarantine" else ["--pixels", mode]  # quarantine is the default
    dst = tmp_path / mode
    proc = _ingest(burned_tree, dst, "--sidecar", *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((dst / "ingest_report.json").read_text())
    log = (dst / "ingest.log").read_text()
    images = _images_by_source(dst)
    states = sorted(r["pixels"] for r, _ in images.values())
    assert report["pixels"]["mode"] == mode
    if mode == "quarantine":
        reasons = {path_of(burned_tree, q): q["reason"] for q in report["quarantined"]}
        assert set(reasons) == FLAGGED
        assert reasons["us/us_yes.dcm"] == "BurnedInAnnotation is YES"
        assert "modality US" in reasons["us/us_absent.dcm"] and "secondary capture" in reasons["other/sc_as_ct.dcm"]
        assert states == ["as_is", "as_is"] and report["images_written"] == 2
        assert len(list((dst / "headers").glob("*.json"))) == 2  # nothing at all is written from a quarantined file
        for q in report["quarantined"]:
            line = f"quarantined file {q['file']} of 5 (source {q['source']}): {q['reason']}"
            assert line in proc.stderr and line in log
        return
    assert report["quarantined"] == [] and report["images_written"] == 5
    files = {path_of(burned_tree, f): f for f in report["pixels"]["files"]}
    assert set(files) == FLAGGED
    expected = "masked" if mode == "clean" else "kept"
    assert states == sorted(["as_is", "as_is", expected, expected, expected])
    for row, img in images.values():
        if row["pixels"] == "as_is":
            assert img[GLYPH].min() == 255  # unflagged images are never touched
        elif mode == "clean":
            band = int(np.ceil(BAND * img.shape[0]))
            assert img[:band].max() == 0 and img[-band:].max() == 0 and img[GLYPH].max() == 0
        else:
            assert img[GLYPH].min() == 255 and img[0, 4:40].min() == 255
    if mode == "clean":
        assert all(f["action"] == "masked" and 0 < f["masked_fraction"] < 1 for f in files.values())
        assert report["pixels"]["mask_rule"].startswith("top and bottom")
        codes = sorted({item["00080100"]["Value"][0] for p in (dst / "headers").glob("*.json")
                        for item in json.loads(p.read_text())["00120064"]["Value"]})
        assert "113101" in codes  # the masked files' sidecars declare the Clean Pixel Data Option
    else:
        assert all(f["action"].startswith("kept") for f in files.values())
        assert "--pixels keep" in proc.stderr and "written unmasked" in log
