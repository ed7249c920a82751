"""DICOM de-identification: the whole PS3.15 Annex E Basic Application Level Confidentiality Profile.

The action of every attribute comes from Table E.1-1 of the DICOM standard, generated into
:mod:`medops.deid_table` (edition and source named there; ``scripts/gen_deid_table.py`` regenerates it), and is
applied at every sequence depth. What :func:`deidentify` does to a (deep) copy of the dataset, element by element:

* **X** (remove): removed, including every curve (50xx), every overlay group (60xx: the table's Overlay Data and
  Overlay Comments, and with them the rest of the overlay plane), digital signatures and trailing padding;
* **Z** (zero length): kept present and emptied (a sequence keeps no item), e.g. PatientBirthDate, AccessionNumber,
  StudyID, ReferringPhysicianName;
* **D** (dummy): ``ANONYMIZED`` / ``0`` / ``000Y`` / two zero bytes by VR; a sequence becomes one empty item;
* **U** (new UID): remapped to ``2.25.<uuid5(salt | original)>``, the same input giving the same output, so that
  Study/Series/Frame of Reference/referenced UIDs stay consistent across files; registered DICOM UIDs (SOP classes,
  transfer syntaxes...) are kept. Every other UI value is remapped the same way;
* **A/B** (A unless B is needed for conformance; the IOD is not known here): X/Z and X/Z/D empty (type 2 safe),
  Z/D empties, X/D removes; **X/Z/U*** (Referenced/Source Image Sequence) keeps the sequence and cleans its items
  (UIDs remapped, every other attribute by this same table);
* PatientID (Z/D, at any depth) becomes the salted pseudonym ``"P" + sha256(salt + original id)[:12]``
  (deterministic, so patient-level splits still work) and PatientName (Z) the pseudonym of the same item's
  PatientID (empty in an item without one);
* private attributes are removed (no safe-private list); outside the table, free text (LT/ST/UT) is removed, person
  names (PN) emptied, keyword-less binary blobs removed, DA/DT shifted (below) and everything else kept.

Options (PS3.15 E.3), declared in DeidentificationMethodCodeSequence (0012,0064) with their DCM codes:

* 113100 Basic Application Confidentiality Profile, always;
* 113107 Retain Longitudinal Temporal Information Modified Dates: the dates and times that the basic profile would
  empty, replace or (X/D) remove are kept *shifted* instead: every DA/DT value moves back by a whole number of days
  derived from the salted patient id (1..3650, the same for every file of a patient, so intervals between studies
  are kept) and TM values stay (a whole-day shift leaves the time of day unchanged). PatientBirthDate is not
  covered (emptied); dates and times whose action is X are removed. With ``date_shift_days=0``: 113106 (full dates);
* 113108 Retain Patient Characteristics: PatientSex and PatientAge are kept (ages of 90 years and more become
  ``090Y``); the other characteristics (size, weight, ethnic group, smoking, pregnancy...) follow the table;
* 113101 Clean Pixel Data, only when the caller says the pixels were cleaned (``pixels_cleaned=True``; medops masks
  text regions by a heuristic, see :mod:`medops.deid_pixels`).

PatientIdentityRemoved = YES, DeidentificationMethod names the profile, edition and options, and
LongitudinalTemporalInformationModified = MODIFIED. It is torch-free and never logs. Burned-in text in the pixel
data is not touched here (:mod:`medops.deid_pixels` flags and masks it).
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

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

from medops.deid_table import ACTIONS, EDITION, MASKED, SOURCE

__all__ = [
    "MAX_SHIFT_DAYS",
    "PROFILE",
    "RETAINED_CHARACTERISTICS",
    "deidentify",
    "identifiers_of",
    "pseudonym",
    "quiet_pydicom",
    "remap_uid",
    "scan_for_identifiers",
    "shift_days_for",
    "table_action",
]

MAX_SHIFT_DAYS = 3650
PROFILE = f"DICOM PS3.15 Annex E Table E.1-1, edition {EDITION} (via {SOURCE})"
# Retain Patient Characteristics Option (113108): these table attributes are kept (K).
RETAINED_CHARACTERISTICS = frozenset({"PatientSex", "PatientAge"})
_PATIENT_ID, _PATIENT_NAME, _PATIENT_AGE, _BIRTH_DATE = 0x00100020, 0x00100010, 0x00101010, 0x00100030
_NOT_SHIFTED = frozenset({_BIRTH_DATE})  # not covered by the modified-dates option: its table action applies
_DATE_VRS = frozenset({"DA", "DT", "TM"})
_KEEP_AS_DATE = frozenset({"Z", "D", "Z/D", "X/Z", "X/D", "X/Z/D"})  # actions that 113107 turns into "shift"
_STRING_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI",
                         "UR", "UT"})
_TEXT_VRS = frozenset({"LT", "ST", "UT"})  # free text outside the table: removed
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_DUMMY = "ANONYMIZED"
_CODES = {
    "113100": "Basic Application Confidentiality Profile",
    "113101": "Clean Pixel Data Option",
    "113106": "Retain Longitudinal Temporal Information Full Dates Option",
    "113107": "Retain Longitudinal Temporal Information Modified Dates Option",
    "113108": "Retain Patient Characteristics Option",
}
# Elements carrying PHI strings worth scanning outputs for: the table's text attributes, plus the birth date.
_SCANNED_VRS = frozenset({"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_MIN_IDENTIFIER_LEN = 3
_UID_NAMESPACE = uuid.UUID("6f1c9a52-3d1e-5b7a-9c1e-6d6564726f70")  # fixed, medops-specific


def pseudonym(patient_id: str, salt: str) -> str:
    """``"P" + sha256(salt + patient_id)[:12]``: stable per (salt, patient id)."""
    return "P" + hashlib.sha256((salt + str(patient_id)).encode("utf-8")).hexdigest()[:12]


def shift_days_for(patient_id: str, salt: str) -> int:
    """Days (1..MAX_SHIFT_DAYS) to move this patient's dates back; derived from the salted id (never 0)."""
    digest = hashlib.sha256(("date-shift|" + salt + "|" + str(patient_id)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % (MAX_SHIFT_DAYS + 1) or MAX_SHIFT_DAYS


def remap_uid(uid: str, salt: str) -> str:
    """A new 2.25 UID derived from (salt, uid); registered DICOM UIDs (SOP classes...) are kept."""
    uid = str(uid).strip().rstrip("\x00")
    if not uid or UID(uid).name != uid:  # a named (registered) UID
        return uid
    # NB: pydicom's generate_uid(prefix=None, entropy_srcs=...) ignores entropy_srcs (a random
    # uuid4), so the deterministic 2.25 UID is built here from a name-based (SHA-1) UUID.
    return "2.25." + str(uuid.uuid5(_UID_NAMESPACE, salt + "|" + uid).int)


def table_action(tag: int) -> str | None:
    """The Basic Profile action of Table E.1-1 for ``tag`` (``X``, ``Z``, ``D``, ``U``, ``X/Z``...); None: unlisted."""
    action = ACTIONS.get(int(tag))
    if action is None:
        action = next((act for value, mask, act in MASKED if int(tag) & mask == value), None)
    return action


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


def deidentify(ds: Dataset, *, salt: str, date_shift_days: int | None = None, pixels_cleaned: bool = False) -> Dataset:
    """A de-identified deep copy of ``ds`` (the input is not modified). See the module docstring.

    ``date_shift_days`` overrides the per-patient shift (days to move dates back); by default it
    is :func:`shift_days_for` of the original PatientID. ``pixels_cleaned`` declares the Clean Pixel
    Data Option (the caller cleaned the pixels). Raises ValueError for an empty salt.
    """
    if not salt:
        raise ValueError("a non-empty salt is required (e.g. from MEDOPS_DEID_SALT)")
    with quiet_pydicom():
        return _deidentify(ds, salt, date_shift_days, pixels_cleaned)


def _deidentify(ds: Dataset, salt: str, date_shift_days: int | None, pixels_cleaned: bool) -> Dataset:
    out = copy.deepcopy(ds)
    original_id = str(out.get("PatientID", "") or "")
    shift = shift_days_for(original_id, salt) if date_shift_days is None else int(date_shift_days)
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
    codes = ["113100", *(["113101"] if pixels_cleaned else []), "113107" if shift else "113106", "113108"]
    out.DeidentificationMethod = _method_text(shift, pixels_cleaned)
    out.DeidentificationMethodCodeSequence = Sequence([_code(code) for code in codes])
    out.LongitudinalTemporalInformationModified = "MODIFIED" if shift else "UNMODIFIED"
    return out


def _method_text(shift: int, pixels_cleaned: bool) -> list[str]:
    """DeidentificationMethod (0012,0063), LO 1-n: each value at most 64 characters."""
    text = [f"PS3.15 E.1-1 Basic Profile, DICOM {EDITION} table",
            "medops: salted pseudonym; UIDs remapped; private tags removed",
            "dates shifted per patient" if shift else "dates kept",
            "sex and age retained"]
    return text + (["pixels: text regions masked (heuristic)"] if pixels_cleaned else [])


def _code(value: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", _CODES[value]
    return item


def _clean(ds: Dataset, salt: str, shift: int) -> None:
    """Apply the table (and the options) to every element of ``ds``, recursing into the sequences it keeps."""
    own_id = str(ds.get("PatientID", "") or "")
    for tag in list(ds.keys()):
        elem = ds[tag]
        operation = _operation(tag, elem.keyword, elem.VR)
        if operation == "remove":
            del ds[tag]
        elif operation == "recurse":
            for item in elem.value or []:
                _clean(item, salt, shift)
        elif operation == "patient_name":
            elem.value = pseudonym(own_id, salt) if own_id else ""
        else:
            _transform(elem, operation, salt, shift)


def _operation(tag: int, keyword: str, vr: str) -> str:
    """What happens to one element: remove, empty, dummy, uid, date, pseudonym, patient_name, age, keep, recurse."""
    tag = int(tag)
    if tag >> 16 & 1 or tag >> 16 & 0xFF00 in (0x5000, 0x6000):  # private; curves and overlay planes
        return "remove"
    if tag == _PATIENT_ID:
        return "pseudonym"
    if tag == _PATIENT_NAME:
        return "patient_name"
    if keyword in RETAINED_CHARACTERISTICS:
        return "age" if tag == _PATIENT_AGE else "keep"
    action = table_action(tag)
    if action is not None:
        return _resolve(action, tag, vr)
    if vr == "SQ":
        return "recurse"
    if vr == "UI":
        return "uid"
    if vr in ("DA", "DT"):
        return "date"
    if vr in _TEXT_VRS or (vr in _BINARY_VRS and not keyword and tag >> 16 != 0x7FE0):
        return "remove"  # free text; unknown binary blobs may hide identifiers
    return "empty" if vr == "PN" else "keep"


def _resolve(action: str, tag: int, vr: str) -> str:
    """The operation for a table action (see the module docstring)."""
    if action == "X":
        return "remove"
    if action == "X/Z/U*":
        return "recurse" if vr == "SQ" else "uid" if vr == "UI" else "empty"
    if vr in _DATE_VRS and action in _KEEP_AS_DATE and tag not in _NOT_SHIFTED:
        return "date"  # Retain Longitudinal Temporal Information Modified Dates Option
    if vr == "UI" and action in ("U", "D", "Z/D", "X/D", "X/Z/D"):
        return "uid"
    if action == "D":
        return "dummy"
    if action in ("X/D", "U"):
        return "remove"
    return "empty"  # Z, Z/D, X/Z, X/Z/D


def _transform(elem: DataElement, operation: str, salt: str, shift: int) -> None:
    vr = elem.VR
    if operation == "empty":
        elem.value = Sequence() if vr == "SQ" else "" if vr in _STRING_VRS else None
    elif operation == "dummy":
        elem.value = _dummy(vr)
    elif operation == "uid":
        elem.value = _map_values(elem.value, lambda v: remap_uid(v, salt))
    elif operation == "pseudonym":
        elem.value = _map_values(elem.value, lambda v: pseudonym(v, salt) if v.strip() else "")
    elif operation == "age":
        elem.value = _map_values(elem.value, _cap_age)
    elif operation == "date" and vr == "DA":
        elem.value = _map_values(elem.value, lambda v: _shift_date(v, shift))
    elif operation == "date" and vr == "DT":
        elem.value = _map_values(elem.value, lambda v: _shift_datetime(v, shift))
    # "keep", and "date" for TM (a whole-day shift keeps the time of day): unchanged


def _dummy(vr: str) -> object:
    """A non-empty dummy value of the VR (action D)."""
    if vr == "SQ":
        return Sequence([Dataset()])
    if vr in ("DS", "IS"):
        return "0"
    if vr in ("FD", "FL", "SL", "SS", "SV", "UL", "US", "UV", "AT"):
        return 0
    if vr in _BINARY_VRS:
        return b"\x00\x00"
    return {"AS": "000Y", "UR": "http://anonymized.invalid", "DA": "19000101", "TM": "000000",
            "DT": "19000101000000", "UI": "2.25.0"}.get(vr, _DUMMY)


def _cap_age(value: str) -> str:
    """An age string (AS) as is, or ``090Y`` from 90 years on (HIPAA safe harbour)."""
    match = re.fullmatch(r"(\d{3})([DWMY])", value.strip())
    if match is None:
        return ""
    return "090Y" if match.group(2) == "Y" and int(match.group(1)) >= 90 else value.strip()


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
    """The original PHI strings of ``ds`` worth scanning outputs for: the values (and their name parts) of every text
    attribute of Table E.1-1 (names, ids, addresses, institution, station, free text...), of every person name, and
    the birth date, at any depth.

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
        for elem in item:
            if int(elem.tag) in _SCANNED_TAGS or elem.VR == "PN":
                add(elem.value)
    return list(dict.fromkeys(found))


def _scanned_tags() -> frozenset[int]:
    tags = {_BIRTH_DATE}
    for tag in ACTIONS:
        with contextlib.suppress(KeyError):  # attributes newer than pydicom's dictionary are left out
            if dictionary_VR(tag) in _SCANNED_VRS:
                tags.add(tag)
    return frozenset(tags)


_SCANNED_TAGS = _scanned_tags()


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
