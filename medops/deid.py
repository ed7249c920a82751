"""DICOM de-identification: a subset of the PS3.15 Annex E Basic Application Level Confidentiality Profile.

What :func:`deidentify` does to a (deep) copy of the dataset:

* private tags removed; free-text elements (LT/ST/UT, descriptions, comments) and every person
  name (PN) other than PatientName removed or emptied;
* PatientID replaced by a salted pseudonym ``"P" + sha256(salt + original id)[:12]`` (deterministic,
  so patient-level splits still work); PatientName set to the same pseudonym;
* birth date, addresses, telephone numbers, other patient IDs/names, ethnic group, institution,
  physicians, operators, station name, accession number, study ID, device serial number, protocol
  name... removed or emptied (type 2 elements are kept zero-length);
* every DA/DT value shifted back by a whole number of days derived from the salted patient id
  (0..3650, the same for every file of a patient, so intervals between studies are kept); TM
  values stay (a whole-day shift leaves the time of day unchanged);
* every UID that is not a registered DICOM UID (SOP class, transfer syntax...) remapped to
  ``2.25.<uuid5(salt | original)>``: same input -> same output,
  so Study/Series/Frame of Reference/referenced UIDs stay consistent across files;
* PatientIdentityRemoved = YES, DeidentificationMethod and its code sequence set.

It is torch-free and never logs. Burned-in annotations in the pixel data are NOT handled.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import hashlib
import logging
import re
import uuid
import warnings
from collections.abc import Iterable, Iterator

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

__all__ = [
    "MAX_SHIFT_DAYS",
    "deidentify",
    "identifiers_of",
    "pseudonym",
    "quiet_pydicom",
    "remap_uid",
    "scan_for_identifiers",
    "shift_days_for",
]

MAX_SHIFT_DAYS = 3650
METHOD = "medops PS3.15 E Basic; pseudonym; dates shifted; UIDs remapped"  # LO: <= 64 chars

# Removed outright (X / X/Z/D actions of the Basic Profile that are type 3 here or free text).
_REMOVE = frozenset(
    {
        "PatientBirthDate", "PatientBirthTime", "PatientBirthName", "PatientAddress", "PatientTelephoneNumbers",
        "PatientTelecomInformation", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
        "PatientMotherBirthName", "MilitaryRank", "BranchOfService", "MedicalRecordLocator", "EthnicGroup",
        "Occupation", "AdditionalPatientHistory", "PatientComments", "PatientReligiousPreference", "PatientAge",
        "PatientSize", "PatientWeight", "CountryOfResidence", "RegionOfResidence", "ResponsiblePerson",
        "ResponsibleOrganization", "PatientInsurancePlanCodeSequence", "MedicalAlerts", "Allergies",
        "PregnancyStatus", "SmokingStatus", "LastMenstrualDate", "SpecialNeeds", "PatientState",
        "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionCodeSequence",
        "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers", "ReferringPhysicianIdentificationSequence",
        "PerformingPhysicianName", "PerformingPhysicianIdentificationSequence", "NameOfPhysiciansReadingStudy",
        "PhysiciansReadingStudyIdentificationSequence", "PhysiciansOfRecord",
        "PhysiciansOfRecordIdentificationSequence",
        "OperatorsName", "OperatorIdentificationSequence", "RequestingPhysician", "ScheduledPerformingPhysicianName",
        "StationName", "DeviceSerialNumber", "ProtocolName", "StudyDescription", "SeriesDescription",
        "ImageComments", "RequestedProcedureDescription", "PerformedProcedureStepDescription",
        "PerformedProcedureStepID", "ScheduledProcedureStepDescription", "AdmittingDiagnosesDescription",
        "AdmittingDiagnosesCodeSequence", "DerivationDescription", "AcquisitionComments", "StudyComments",
        "InterpretationText", "TextValue", "TextString", "ContentCreatorName", "AdmissionID", "IssuerOfAdmissionID",
        "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "CurrentPatientLocation",
        "PatientInstitutionResidence", "VisitComments", "RequestAttributesSequence", "ReferencedPatientSequence",
        "ReferencedStudySequence", "ReferencedPerformedProcedureStepSequence", "RequestedProcedureID",
        "PlacerOrderNumberImagingServiceRequest", "FillerOrderNumberImagingServiceRequest", "DetectorID",
        "GantryID", "PersonName", "PersonAddress", "PersonTelephoneNumbers", "VerifyingObserverName",
        "VerifyingOrganization", "ModifiedAttributesSequence", "OriginalAttributesSequence",
        "SourceApplicationEntityTitle", "SendingApplicationEntityTitle", "ReceivingApplicationEntityTitle",
        "ImplementationVersionName", "StorageMediaFileSetID", "FrameComments", "ResultsComments",
        "ClinicalTrialSponsorName", "ClinicalTrialSiteName", "ClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    }
)
# Type 1/2 attributes: kept present but zero-length (Z).
_EMPTY = frozenset({"AccessionNumber", "StudyID", "ReferringPhysicianName"})
# Free-text VRs kept only when in this allow-list of technical attributes.
_TEXT_VRS = frozenset({"LT", "ST", "UT"})
_TEXT_KEEP = frozenset()
# Elements carrying PHI strings worth scanning outputs for.
_IDENTIFIER_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthName", "PatientMotherBirthName", "PatientAddress",
    "PatientTelephoneNumbers", "OtherPatientIDs", "OtherPatientNames", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord", "OperatorsName", "RequestingPhysician", "StationName", "AccessionNumber", "StudyID",
    "DeviceSerialNumber", "MedicalRecordLocator", "AdmissionID",
)
_MIN_IDENTIFIER_LEN = 3
_UID_NAMESPACE = uuid.UUID("6f1c9a52-3d1e-5b7a-9c1e-6d6564726f70")  # fixed, medops-specific


def pseudonym(patient_id: str, salt: str) -> str:
    """``"P" + sha256(salt + patient_id)[:12]``: stable per (salt, patient id)."""
    return "P" + hashlib.sha256((salt + str(patient_id)).encode("utf-8")).hexdigest()[:12]


def shift_days_for(patient_id: str, salt: str) -> int:
    """Days (0..MAX_SHIFT_DAYS) to move this patient's dates back; derived from the salted id."""
    digest = hashlib.sha256(("date-shift|" + salt + "|" + str(patient_id)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % (MAX_SHIFT_DAYS + 1)


def remap_uid(uid: str, salt: str) -> str:
    """A new 2.25 UID derived from (salt, uid); registered DICOM UIDs (SOP classes...) are kept."""
    uid = str(uid).strip().rstrip("\x00")
    if not uid or UID(uid).name != uid:  # a named (registered) UID
        return uid
    # NB: pydicom's generate_uid(prefix=None, entropy_srcs=...) ignores entropy_srcs (a random
    # uuid4), so the deterministic 2.25 UID is built here from a name-based (SHA-1) UUID.
    return "2.25." + str(uuid.uuid5(_UID_NAMESPACE, salt + "|" + uid).int)


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings *and* its logger (``warn_and_log`` quotes element values) for a block."""
    logger = logging.getLogger("pydicom")
    was_disabled = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = was_disabled


def deidentify(ds: Dataset, *, salt: str, date_shift_days: int | None = None) -> Dataset:
    """A de-identified deep copy of ``ds`` (the input is not modified). See the module docstring.

    ``date_shift_days`` overrides the per-patient shift (days to move dates back); by default it
    is :func:`shift_days_for` of the original PatientID. Raises ValueError for an empty salt.
    """
    if not salt:
        raise ValueError("a non-empty salt is required (e.g. from MEDOPS_DEID_SALT)")
    with quiet_pydicom():
        return _deidentify(ds, salt, date_shift_days)


def _deidentify(ds: Dataset, salt: str, date_shift_days: int | None) -> Dataset:
    out = copy.deepcopy(ds)
    original_id = str(out.get("PatientID", "") or "")
    shift = shift_days_for(original_id, salt) if date_shift_days is None else int(date_shift_days)
    out.remove_private_tags()
    _clean(out, salt, shift)
    meta = getattr(out, "file_meta", None)
    if meta is not None:
        for keyword in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                        "ReceivingApplicationEntityTitle", "PrivateInformation", "PrivateInformationCreatorUID"):
            if keyword in meta:
                delattr(meta, keyword)
        if "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = remap_uid(meta.MediaStorageSOPInstanceUID, salt)
    alias = pseudonym(original_id, salt)
    out.PatientID = alias
    out.PatientName = alias
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = METHOD
    out.DeidentificationMethodCodeSequence = Sequence(
        [_code("113100", "Basic Application Confidentiality Profile"),
         _code("113107", "Retain Longitudinal Temporal Information Modified Dates Option")]
    )
    out.LongitudinalTemporalInformationModified = "MODIFIED" if shift else "UNMODIFIED"
    return out


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def _clean(ds: Dataset, salt: str, shift: int) -> None:
    for tag in list(ds.keys()):
        elem = ds[tag]
        keyword, vr = elem.keyword, elem.VR
        if keyword in _REMOVE or (vr in _TEXT_VRS and keyword not in _TEXT_KEEP):
            del ds[tag]
        elif keyword in _EMPTY or (vr == "PN" and keyword != "PatientName"):
            elem.value = ""
        elif vr == "SQ":
            for item in elem.value or []:
                _clean(item, salt, shift)
        elif vr == "UI":
            elem.value = _map_values(elem.value, lambda v: remap_uid(v, salt))
        elif vr == "DA":
            elem.value = _map_values(elem.value, lambda v: _shift_date(v, shift))
        elif vr == "DT":
            elem.value = _map_values(elem.value, lambda v: _shift_datetime(v, shift))
        elif vr in ("OB", "OW", "UN") and not _is_pixel_tag(tag) and keyword == "":
            del ds[tag]  # unknown binary blobs may hide identifiers


def _is_pixel_tag(tag: int) -> bool:
    return int(tag) >> 16 == 0x7FE0 or int(tag) >> 16 in (0x6000, 0x5400)


def _map_values(value: object, fn) -> object:
    if value is None or value == "":
        return value
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [fn(str(v)) for v in value]
    return fn(str(value))


def _shift_date(value: str, shift: int) -> str:
    value = value.strip()
    try:
        day = dt.datetime.strptime(value[:8], "%Y%m%d").date() if len(value) >= 8 else None
    except ValueError:
        day = None
    if day is None:
        return ""  # unparseable or partial date: drop rather than keep it verbatim
    try:
        return (day - dt.timedelta(days=shift)).strftime("%Y%m%d")
    except OverflowError:
        return ""


def _shift_datetime(value: str, shift: int) -> str:
    value = value.strip()
    shifted = _shift_date(value[:8], shift) if len(value) >= 8 else ""
    return shifted + value[8:] if shifted else ""


def identifiers_of(ds: Dataset) -> list[str]:
    """The original PHI strings of ``ds`` worth scanning outputs for (name parts, ids, birth date, institution...).

    Values and fragments with fewer than 3 letters/digits are left out (they would match by chance),
    and so are those contained in the (retained) Manufacturer, e.g. InstitutionName ``TOSHIBA`` of a
    ``TOSHIBA_MEC`` scanner: an equipment vendor name is not a patient identifier.
    """
    found: list[str] = []
    vendor = str(ds.get("Manufacturer", "") or "").lower()

    def keep(text: str) -> bool:
        return len(re.sub(r"[^0-9A-Za-z]", "", text)) >= _MIN_IDENTIFIER_LEN and text.lower() not in vendor

    def add(value: object) -> None:
        for v in _as_list(value):
            text = str(v).strip()
            if not keep(text):
                continue
            found.append(text)
            for part in re.split(r"[\^=\s,]+", text):
                if keep(part):
                    found.append(part)

    for item in _walk_items(ds):
        for keyword in _IDENTIFIER_KEYWORDS:
            if keyword in item:
                add(item.get(keyword))
    return list(dict.fromkeys(found))


def _walk_items(ds: Dataset) -> Iterable[Dataset]:
    yield ds
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or []:
                yield from _walk_items(item)


def _as_list(value: object) -> list[object]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


def scan_for_identifiers(data: str | bytes, identifiers: Iterable[str]) -> list[str]:
    """The ``identifiers`` that occur in ``data`` (case-insensitive; bytes searched as latin-1 and UTF-16-LE)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data).lower()
        hay_bytes = True
    else:
        text = str(data).lower()
        hay_bytes = False
    hits = []
    for ident in identifiers:
        needle = str(ident).strip().lower()
        if not needle:
            continue
        if hay_bytes:
            found = any(
                enc in raw
                for enc in {needle.encode("utf-8"), needle.encode("latin-1", "ignore"), needle.encode("utf-16-le")}
                if enc
            )
        else:
            found = needle in text
        if found:
            hits.append(str(ident))
    return hits
