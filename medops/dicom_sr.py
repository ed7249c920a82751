"""A model's answer as DICOM: the aggregation rule, the Structured Report and the "NOT FOR DIAGNOSIS" overlay image
that go back to the PACS (``serve --dicomweb ... --store-results``, ``evaluation.pacs_overlay``). Made with
``highdicom``.

**Aggregation rule** (:data:`AGGREGATION_RULE`): a series' (and a study's) probability of the finding is the
**maximum** over its classified images of P(positive class); the series is positive when that maximum reaches the
model's operating point (the threshold chosen on validation and exported with the version). One suspicious image is
enough to call a series positive, as a reader would; the counts of images classified, failed and flagged out of
distribution travel with every answer.

**The Structured Report** (Comprehensive SR, one per classified series, in a new series of the source study): a root
CONTAINER "Diagnostic imaging report" (LOINC 18748-4) that CONTAINS

| concept | value type | value |
|---|---|---|
| Finding (DCM 121071) | CODE | the positive class by name (coding scheme ``99MEDOPS``) |
| Probability of finding (99MEDOPS) | NUM | the series' P(positive class), unit ``1`` (UCUM, no unit) |
| Decision threshold (99MEDOPS) | NUM | the operating point |
| Finding at operating point (99MEDOPS) | CODE | Present (SCT 52101004) or Absent (SCT 2667000) |
| Algorithm Name (DCM 111001) | TEXT | the model name |
| Algorithm Version (DCM 111003) | TEXT | the model version |
| Aggregation rule (99MEDOPS) | TEXT | the rule and the count, in words |
| Number of images (99MEDOPS) | NUM | images classified |
| Comment (DCM 121106) | TEXT | ``NOT FOR DIAGNOSIS: ...`` |
| Source of Measurement (DCM 121112) | IMAGE | one per source instance (SOP class and instance UID) |

Its patient and study modules are copied by highdicom from the source instances (so the report files under the same
patient and study in the PACS), then cut to :data:`RESULT_PATIENT_KEYWORDS` of the patient module
(:func:`keep_filing_identifiers`); CurrentRequestedProcedureEvidenceSequence lists every source instance. Which
identifiers a result carries and why: ``docs/privacy.md``.

Torch-free (numpy, pydicom, highdicom, Pillow).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom.datadict
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

__all__ = [
    "AGGREGATION_RULE",
    "NOT_FOR_DIAGNOSIS",
    "RESULT_PATIENT_KEYWORDS",
    "ModelAnswer",
    "aggregate",
    "burn_label",
    "content_tree",
    "keep_filing_identifiers",
    "overlay_capture",
    "read_result_sr",
    "result_sr",
]

AGGREGATION_RULE = "max"
RULE_TEXT = "maximum over the classified images of P({cls})"
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS"
MANUFACTURER = "medops"
SCHEME = "99MEDOPS"  # private coding scheme (the 99 prefix is reserved for local schemes, PS3.16 8.2)
REPORT = Code("18748-4", "LN", "Diagnostic imaging report")
FINDING = Code("121071", "DCM", "Finding")
PROBABILITY = Code("PFINDING", SCHEME, "Probability of finding")
THRESHOLD = Code("THRESHOLD", SCHEME, "Decision threshold")
DECISION = Code("DECISION", SCHEME, "Finding at operating point")
PRESENT, ABSENT = Code("52101004", "SCT", "Present"), Code("2667000", "SCT", "Absent")
ALGORITHM_NAME, ALGORITHM_VERSION = Code("111001", "DCM", "Algorithm Name"), Code("111003", "DCM", "Algorithm Version")
RULE = Code("AGGREGATION", SCHEME, "Aggregation rule")
IMAGES = Code("NIMAGES", SCHEME, "Number of images")
COMMENT = Code("121106", "DCM", "Comment")
SOURCE = Code("121112", "DCM", "Source of Measurement")
NO_UNIT = Code("1", "UCUM", "no units")
SR_COMMENT = f"{NOT_FOR_DIAGNOSIS}: output of a research model, to be read by a radiologist with the images"


# What a result keeps of the source's Patient module: the attributes a PACS files it by (Patient module type 1/2).
# Everything else of group 0010 that highdicom copies (OtherPatientIDsSequence, addresses, comments...) is removed.
RESULT_PATIENT_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")


def keep_filing_identifiers(ds: Dataset) -> Dataset:
    """Remove every Patient-module (group 0010) attribute of ``ds`` outside :data:`RESULT_PATIENT_KEYWORDS`."""
    keep = {pydicom.datadict.tag_for_keyword(k) for k in RESULT_PATIENT_KEYWORDS}
    for elem in list(ds):
        if elem.tag.group == 0x0010 and int(elem.tag) not in keep:
            del ds[elem.tag]
    return ds


@dataclass(frozen=True)
class ModelAnswer:
    """A series' (or study's) answer: P(positive class) by :data:`AGGREGATION_RULE` and the decision."""

    model: str
    version: str
    positive_class: str
    threshold: float
    probability: float
    images: int

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold

    @property
    def rule_text(self) -> str:
        return f"{RULE_TEXT.format(cls=self.positive_class)} ({self.images} image(s))"


def aggregate(probabilities: Sequence[float]) -> float | None:
    """The series/study P(positive class) from its images' (:data:`AGGREGATION_RULE`: the maximum); None if empty."""
    values = [float(p) for p in probabilities]
    return max(values) if values else None


def _content(answer: ModelAnswer, sources: Sequence[Dataset]) -> Any:
    import highdicom as hd

    rel = hd.sr.RelationshipTypeValues.CONTAINS
    finding = Code(answer.positive_class, SCHEME, answer.positive_class)
    items = [
        hd.sr.CodeContentItem(FINDING, finding, relationship_type=rel),
        hd.sr.NumContentItem(PROBABILITY, round(answer.probability, 6), NO_UNIT, relationship_type=rel),
        hd.sr.NumContentItem(THRESHOLD, round(answer.threshold, 6), NO_UNIT, relationship_type=rel),
        hd.sr.CodeContentItem(DECISION, PRESENT if answer.present else ABSENT, relationship_type=rel),
        hd.sr.TextContentItem(ALGORITHM_NAME, answer.model, relationship_type=rel),
        hd.sr.TextContentItem(ALGORITHM_VERSION, str(answer.version), relationship_type=rel),
        hd.sr.TextContentItem(RULE, answer.rule_text, relationship_type=rel),
        hd.sr.NumContentItem(IMAGES, answer.images, NO_UNIT, relationship_type=rel),
        hd.sr.TextContentItem(COMMENT, SR_COMMENT, relationship_type=rel),
    ]
    items += [hd.sr.ImageContentItem(SOURCE, s.SOPClassUID, s.SOPInstanceUID, relationship_type=rel)
              for s in sources]
    root = hd.sr.ContainerContentItem(REPORT)
    root.ContentSequence = hd.sr.ContentSequence(items)
    return root


def result_sr(answer: ModelAnswer, sources: Sequence[Dataset], *, series_uid: str | None = None,
              series_number: int = 9001, instance_number: int = 1) -> Dataset:
    """The Comprehensive SR of one series' answer (see the module docstring), in the source study.

    ``sources``: the series' instances that were classified (their identifiers are copied by highdicom into the
    report's patient and study modules; nothing else of them is).
    """
    import highdicom as hd

    if not sources:
        raise ValueError("a result SR needs at least one source instance")
    sr = hd.sr.ComprehensiveSR(
        evidence=list(sources), content=_content(answer, sources), series_instance_uid=series_uid or generate_uid(),
        series_number=series_number, sop_instance_uid=generate_uid(), instance_number=instance_number,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description=f"{MANUFACTURER} {answer.model} v{answer.version} result - {NOT_FOR_DIAGNOSIS}",
    )
    return keep_filing_identifiers(sr)


def _walk(items: Sequence[Dataset], depth: int = 0) -> list[tuple[int, Dataset]]:
    out = []
    for item in items:
        out.append((depth, item))
        out += _walk(item.get("ContentSequence", []), depth + 1)
    return out


def _item_value(item: Dataset) -> Any:
    kind = item.ValueType
    if kind == "CODE":
        return item.ConceptCodeSequence[0].CodeMeaning
    if kind == "NUM":
        return float(item.MeasuredValueSequence[0].NumericValue)
    if kind == "TEXT":
        return str(item.TextValue)
    if kind == "IMAGE":
        return str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return None


def read_result_sr(ds: Dataset) -> dict[str, Any]:
    """The answer held by a result SR read back from the PACS: ``finding``, ``probability``, ``threshold``,
    ``decision`` (Present/Absent), ``model``, ``version``, ``rule``, ``images``, ``comment`` and ``sources`` (the
    referenced SOP instance UIDs). Raises ValueError for an SR that is not a medops result."""
    names = {FINDING.meaning: "finding", PROBABILITY.meaning: "probability", THRESHOLD.meaning: "threshold",
             DECISION.meaning: "decision", ALGORITHM_NAME.meaning: "model", ALGORITHM_VERSION.meaning: "version",
             RULE.meaning: "rule", IMAGES.meaning: "images", COMMENT.meaning: "comment"}
    title = ds.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in ds else None
    if title is None or title.CodeValue != REPORT.value:
        raise ValueError("not a medops result SR (its document title is not 'Diagnostic imaging report')")
    out: dict[str, Any] = {"sources": []}
    for _depth, item in _walk(ds.get("ContentSequence", [])):
        meaning = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "IMAGE":
            out["sources"].append(_item_value(item))
        elif meaning in names:
            out[names[meaning]] = _item_value(item)
    return out


def content_tree(ds: Dataset) -> str:
    """The SR content tree as indented text (what a viewer's SR panel lists), one line per content item."""
    title = ds.ConceptNameCodeSequence[0]
    lines = [f"CONTAINER {title.CodeMeaning} ({title.CodingSchemeDesignator} {title.CodeValue})"]
    for depth, item in _walk(ds.get("ContentSequence", [])):
        name = item.ConceptNameCodeSequence[0]
        value = _item_value(item)
        if item.ValueType == "IMAGE":
            value = f"{item.ReferencedSOPSequence[0].ReferencedSOPClassUID.name} instance"
        elif item.ValueType == "NUM":
            value = f"{value:g}"
        rel = item.get("RelationshipType", "")
        lines.append(f"{'  ' * (depth + 1)}{rel} {item.ValueType} {name.CodeMeaning}: {value}")
    return "\n".join(lines)


def burn_label(rgb: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """``rgb`` (HxWx3 uint8) with a red band at the top saying :data:`NOT_FOR_DIAGNOSIS` and a black band at the
    bottom holding ``lines``, burned into the pixels (a viewer shows them whatever its overlays settings)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    width = image.width
    size = max(8, width // 24)
    longest = max([NOT_FOR_DIAGNOSIS, *lines], key=len)
    font = ImageFont.load_default(size=size)
    while size > 8 and ImageDraw.Draw(image).textlength(longest, font=font) > 0.96 * width:  # fit the width
        size -= 1
        font = ImageFont.load_default(size=size)
    band = int(size * 1.6)
    canvas = Image.new("RGB", (width, image.height + band * (1 + len(lines))), (0, 0, 0))
    canvas.paste(image, (0, band))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, width, band - 1), fill=(200, 0, 0))
    draw.text((width // 2, band // 2), NOT_FOR_DIAGNOSIS, fill=(255, 255, 255), font=font, anchor="mm")
    for i, text in enumerate(lines):
        y = image.height + band * (i + 1) + band // 2
        draw.text((width // 2, y), text, fill=(255, 255, 0), font=font, anchor="mm")
    return np.asarray(canvas, dtype=np.uint8)


def overlay_capture(source: Dataset, rgb: np.ndarray, *, description: str, series_uid: str | None = None,
                    series_number: int = 9002, instance_number: int = 1) -> Dataset:
    """A Secondary Capture of ``rgb`` (HxWx3 uint8, the label already burned in) in the source's study, with
    BurnedInAnnotation YES, the source image in SourceImageSequence and ``description`` as SeriesDescription."""
    import highdicom as hd

    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", series_instance_uid=series_uid or generate_uid(),
        series_number=series_number, sop_instance_uid=generate_uid(), instance_number=instance_number,
        manufacturer=MANUFACTURER, patient_orientation=("L", "P"),
    )
    # the overlay is the source image enlarged: its orientation is the source's (empty, type 2, when unknown),
    # not the placeholder highdicom needs for a PATIENT coordinate system
    sc.PatientOrientation = source.get("PatientOrientation") or ""
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = description
    sc.ImageComments = f"{NOT_FOR_DIAGNOSIS}: {description}"
    sc.DerivationDescription = "Grad-CAM heat map of a research model blended over the source image"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    now = dt.datetime.now()
    sc.ContentDate, sc.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    return keep_filing_identifiers(sc)
