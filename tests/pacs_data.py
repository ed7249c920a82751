"""Test studies for the PACS tests, built from the repository's data (no network): BreastMNIST test images written
as ultrasound DICOM with pydicom, and tests/data/CT_small.dcm and MR_small.dcm, every one carrying sentinel patient
identifiers (also nested in a sequence) that no medops output may contain."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

from tests.conftest import BREASTMNIST, REPO

SENTINEL_NAME = "SENTINEL^PATIENT"
SENTINEL_ID = "SENTINEL-ID-123"
SENTINEL_NESTED = "SENTINEL-NESTED-456"
SENTINELS = ("SENTINEL", SENTINEL_ID, SENTINEL_NESTED, "PATIENT^SENTINEL")


@dataclass
class Study:
    uid: str
    series: list[str]
    files: list[Path] = field(default_factory=list)
    labels: dict[str, list[int]] = field(default_factory=dict)  # series UID -> BreastMNIST labels of its images


def _identify(ds: Dataset, study_uid: str, series_uid: str, number: int, instance: int, date: str) -> None:
    ds.PatientName, ds.PatientID = SENTINEL_NAME, SENTINEL_ID
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID = SENTINEL_NESTED, "SENTINEL-HOSPITAL"
    ds.OtherPatientIDsSequence = [other]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SeriesNumber, ds.InstanceNumber = number, instance
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = date, "101500", "SENTINEL-ACC", "SENT1"
    ds.ReferringPhysicianName = "SENTINEL^DOCTOR"


def _ultrasound(image: np.ndarray, study_uid: str, series_uid: str, number: int, instance: int, date: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UltrasoundImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BurnedInAnnotation, ds.Manufacturer = "US", "NO", "TEST"
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(image, np.uint8).tobytes()
    _identify(ds, study_uid, series_uid, number, instance, date)
    return ds


def write_studies(folder: Path, per_series: int = 3, study_date: str = "20240315") -> dict[str, Study]:
    """``breast``: one US study with a series of malignant and one of benign BreastMNIST test images (label 0 and
    1); ``ctmr``: one study with the CT and the MR slice as two series. Every file carries the sentinels; both studies
    are dated ``study_date`` (a test that queries by date gives its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = np.load(BREASTMNIST)
    images, labels = data["test_images"], data["test_labels"].reshape(-1)
    breast = Study(generate_uid(), [generate_uid(), generate_uid()])
    for number, (series_uid, wanted) in enumerate(zip(breast.series, (0, 1), strict=True), start=1):
        picks = np.flatnonzero(labels == wanted)[:per_series]
        breast.labels[series_uid] = [int(labels[i]) for i in picks]
        for instance, index in enumerate(picks, start=1):
            ds = _ultrasound(images[index], breast.uid, series_uid, number, instance, study_date)
            path = folder / f"breast_{number}_{instance}.dcm"
            ds.save_as(path, enforce_file_format=True)
            breast.files.append(path)
    ctmr = Study(generate_uid(), [generate_uid(), generate_uid()])
    for number, (series_uid, name) in enumerate(zip(ctmr.series, ("CT_small", "MR_small"), strict=True), start=1):
        ds = pydicom.dcmread(REPO / "tests" / "data" / f"{name}.dcm")
        _identify(ds, ctmr.uid, series_uid, number, 1, study_date)
        path = folder / f"{name}.dcm"
        ds.save_as(path)
        ctmr.files.append(path)
    return {"breast": breast, "ctmr": ctmr}
