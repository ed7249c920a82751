"""The whole PS3.15 Annex E table, at every depth: every attribute of medops.deid_table set to a unique sentinel, at
the top level and two sequence levels deep, and each one checked after medops.deid.deidentify.

:func:`sentinel_dataset` is also used by tests/datatools/test_ingest_deid.py (the real ingest CLI).
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from medops.deid import PROFILE, RETAINED_CHARACTERISTICS, deidentify, pseudonym, remap_uid, shift_days_for
from medops.deid_table import ACTIONS, EDITION, MASKED

DATA = Path(__file__).resolve().parents[1] / "data"
MR = DATA / "MR_small.dcm"
SALT = "sentinel-salt"
TOP_ID = "SNTLPATIENTTOPQ"  # the top-level PatientID sentinel (its shift decides every date)
FIRST_DAY = dt.date(1901, 1, 1)
_STRING_VRS = ("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT")
_BINARY_VRS = ("OB", "OD", "OF", "OL", "OV", "OW", "UN")
_NUMBER_VRS = ("FD", "FL", "SL", "SS", "SV", "UL", "US", "UV")
_NESTED = (0x00081115, 0x0008114A)  # ReferencedSeriesSequence > ReferencedInstanceSequence: not in the table
EXTRA = {  # outside the table's plain tags: curves, overlays, a private creator and element (all removed)
    0x50003000: "OB", 0x60003000: "OW", 0x60004000: "LT", 0x00290010: "LO", 0x00291010: "LO",
}


@dataclass
class Sentinel:
    tag: int
    vr: str
    value: object
    token: str  # what must not appear in an output (substring scan); "" when too short to scan safely
    depth: int  # 0: top level, 2: ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    action: str  # the table's action, "" for EXTRA

    @property
    def retained(self) -> bool:
        """Kept by policy: Retain Patient Characteristics (K), and times of day under modified dates (whole days)."""
        keyword = pydicom.datadict.keyword_for_tag(self.tag)
        return keyword in RETAINED_CHARACTERISTICS or (self.vr == "TM" and self.action not in ("X", ""))


def vr_of(tag: int) -> str:
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "LO"  # newer than pydicom's dictionary: written as LO, the table still removes it (X)
    return vr.split(" or ")[0]


class _Counter:
    def __init__(self) -> None:
        self.n = 0
        self.day = 0

    def next(self) -> int:
        self.n += 1
        return self.n


def _value(vr: str, tag: int, action: str, c: _Counter) -> tuple[object, str]:
    """(a VR-valid value that is a unique sentinel, the token to scan outputs for)."""
    n = c.next()
    token = f"SNTL{n:05d}Q"
    if vr in ("DA", "DT"):
        c.day += 1
        day = (FIRST_DAY + dt.timedelta(days=c.day)).strftime("%Y%m%d")
        return (day, day) if vr == "DA" else (day + "120000", day + "120000")
    if vr == "TM":
        return f"120000.{900000 + n}", f"120000.{900000 + n}"
    if vr == "UI":
        return f"1.2.3.999.{n}.7", f"1.2.3.999.{n}.7"
    if vr == "DS":
        return f"8{n:05d}.25", f"8{n:05d}.25"
    if vr == "IS":
        return f"9{n:05d}7", f"9{n:05d}7"
    if vr == "AS":
        return f"0{n % 89:02d}Y", ""
    if vr == "UR":
        return f"http://{token}.example", token
    if vr in _NUMBER_VRS:
        return 50000 + n, ""
    if vr in _BINARY_VRS:
        return token.encode("ascii").ljust(16, b"_"), token
    if vr == "SQ":
        item = Dataset()
        if action == "X/Z/U*":  # a kept image reference: only its UIDs could identify
            item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
            item.ReferencedSOPInstanceUID = f"1.2.3.999.{n}.7"
            return Sequence([item]), f"1.2.3.999.{n}.7"
        item.CodeMeaning = token
        return Sequence([item]), token
    return token, token  # AE CS LO LT PN SH ST UC UT: at most 16 characters, upper case


def _fill(ds: Dataset, depth: int, c: _Counter) -> list[Sentinel]:
    out = []
    for tag, action in sorted(ACTIONS.items()):
        if tag >> 16 in (0x0000, 0x0002):
            continue  # command / file meta groups: not in a dataset body (MediaStorageSOPInstanceUID: file meta)
        vr = vr_of(tag)
        value, token = _value(vr, tag, action, c)
        if tag == 0x00100020:
            value = token = TOP_ID if depth == 0 else f"SNTLPATIENT{c.n:04d}Q"
        ds.add_new(tag, vr, value)
        out.append(Sentinel(tag, vr, value, token, depth, action))
    for tag, vr in EXTRA.items():
        value, token = _value(vr, tag, "", c)
        ds.add_new(tag, vr, value)
        out.append(Sentinel(tag, vr, value, token, depth, ""))
    return out


def sentinel_dataset(base: Path = MR) -> tuple[Dataset, list[Sentinel]]:
    """``base`` with every table attribute (and EXTRA) set to a sentinel at depth 0 and depth 2."""
    ds = pydicom.dcmread(base)
    c = _Counter()
    inner = Dataset()
    sentinels = _fill(inner, 2, c)
    outer = Dataset()
    outer.add_new(_NESTED[1], "SQ", Sequence([inner]))
    pixel_data = ds.PixelData
    sentinels += _fill(ds, 0, c)
    ds.PixelData = pixel_data  # (the table does not touch the pixels)
    ds.add_new(_NESTED[0], "SQ", Sequence([outer]))
    meta = ds.file_meta if hasattr(ds, "file_meta") else FileMetaDataset()
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds, sentinels


def element_at(ds: Dataset, depth: int, tag: int):
    """The element of ``tag`` at ``depth`` (None when absent)."""
    if depth == 2:
        ds = ds[_NESTED[0]].value[0][_NESTED[1]].value[0]
    return ds.get(tag)


def saved(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def deidentified() -> tuple[Dataset, Dataset, list[Sentinel]]:
    ds, sentinels = sentinel_dataset()
    ds = pydicom.dcmread(io.BytesIO(saved(ds)))  # as a file gives it (unknown tags, VRs as written)
    return ds, deidentify(ds, salt=SALT), sentinels


def test_the_table_is_the_standards_whole_table() -> None:
    assert EDITION == "2026c" and len(ACTIONS) > 600 and len(MASKED) == 3
    assert "dicom-anonymizer" in PROFILE and EDITION in PROFILE
    assert set(ACTIONS.values()) == {"D", "Z", "X", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
    for keyword, action in (("PatientBirthDate", "Z"), ("ReasonForStudy", "X"), ("PerformedStationName", "X"),
                            ("PerformedLocation", "X"), ("PatientID", "Z/D"), ("ReferencedImageSequence", "X/Z/U*"),
                            ("StudyInstanceUID", "U"), ("InstitutionName", "X/Z/D")):
        assert ACTIONS[pydicom.datadict.tag_for_keyword(keyword)] == action, keyword


def test_no_sentinel_survives_at_any_depth(deidentified) -> None:
    original, out, sentinels = deidentified
    dates = sum(s.vr in ("DA", "DT") for s in sentinels)  # one day each, from FIRST_DAY on
    assert shift_days_for(TOP_ID, SALT) > dates  # so a shifted date cannot hit another sentinel's date
    text, raw = str(out), saved(out)
    leaked = [s for s in sentinels if s.token and not s.retained and (s.token in text or s.token.encode() in raw)]
    assert leaked == []
    assert {s.depth for s in sentinels} == {0, 2} and len(sentinels) > 1200
    assert not any(e.tag.is_private or e.tag.group & 0xFF00 in (0x5000, 0x6000) for e in out.iterall())


def _empty(value: object) -> bool:
    return value is None or value == "" or (isinstance(value, (list, Sequence)) and len(value) == 0)


def test_each_action_at_each_depth(deidentified) -> None:
    original, out, sentinels = deidentified
    shift = shift_days_for(TOP_ID, SALT)
    seen = set()
    for s in sentinels:
        elem = element_at(out, s.depth, s.tag)
        keyword = pydicom.datadict.keyword_for_tag(s.tag)
        if s.tag in (0x00100010, 0x00100020):  # the pseudonym (PatientName: that of the item's PatientID)
            pid = TOP_ID if s.depth == 0 else str(element_at(original, s.depth, 0x00100020).value)
            assert elem.value == pseudonym(pid, SALT)
        elif keyword in RETAINED_CHARACTERISTICS:
            assert elem.value == s.value, keyword  # K: Retain Patient Characteristics
        elif s.action in ("X", "") or (s.action == "X/D" and s.vr not in ("DA", "DT", "TM", "UI")):
            assert elem is None, (keyword, s.action)
        elif s.vr == "DA" and s.tag != 0x00100030:
            days = dt.datetime.strptime(s.value, "%Y%m%d") - dt.datetime.strptime(elem.value, "%Y%m%d")
            assert days.days == shift, keyword  # modified dates: the same shift everywhere
        elif s.vr == "DT":
            assert elem.value[8:] == s.value[8:] and elem.value[:8] != s.value[:8]
        elif s.vr == "TM":
            assert elem.value == s.value  # a whole-day shift keeps the time of day
        elif s.vr == "UI":
            assert elem.value == remap_uid(s.value, SALT) != s.value
        elif s.action == "X/Z/U*":
            assert elem.value[0].ReferencedSOPInstanceUID == remap_uid(s.token, SALT)
        elif s.action == "D":
            assert not _empty(elem.value) and elem.value != s.value, keyword
        else:  # Z, Z/D, X/Z, X/Z/D: present and empty
            assert elem is not None and _empty(elem.value), (keyword, s.action, elem.value)
        seen.add(s.action)
    assert seen == {"D", "Z", "X", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*", ""}


def test_type_2_attributes_are_emptied_not_removed(deidentified) -> None:
    _, out, _ = deidentified
    for keyword in ("PatientBirthDate", "AccessionNumber", "StudyID", "ReferringPhysicianName", "InstitutionName",
                    "StationName", "DeviceSerialNumber", "OperatorsName", "ContrastBolusAgent"):
        for depth in (0, 2):
            elem = element_at(out, depth, pydicom.datadict.tag_for_keyword(keyword))
            assert elem is not None and _empty(elem.value), (keyword, depth)


def test_options_are_declared(deidentified) -> None:
    _, out, _ = deidentified
    codes = [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113107", "113108"]
    assert all(item.CodingSchemeDesignator == "DCM" and item.CodeMeaning for item in
               out.DeidentificationMethodCodeSequence)
    assert out.PatientIdentityRemoved == "YES" and out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert all(len(v) <= 64 for v in out.DeidentificationMethod) and EDITION in out.DeidentificationMethod[0]
    cleaned = deidentify(pydicom.dcmread(MR), salt=SALT, pixels_cleaned=True, date_shift_days=0)
    assert [i.CodeValue for i in cleaned.DeidentificationMethodCodeSequence] == ["113100", "113101", "113106",
                                                                                 "113108"]
    assert cleaned.LongitudinalTemporalInformationModified == "UNMODIFIED"


def test_patient_age_is_capped_at_90() -> None:
    ds = pydicom.dcmread(MR)
    ds.PatientAge = "093Y"
    assert deidentify(ds, salt=SALT).PatientAge == "090Y"
    ds.PatientAge = "045Y"
    assert deidentify(ds, salt=SALT).PatientAge == "045Y"
