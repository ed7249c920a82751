"""Classify a study (or one series) straight from a PACS over DICOMweb, and write the answer back as DICOM.

``python -m serve predict|batch --dicomweb URL --study UID [--series UID] [--store-results]``:

1. QIDO-RS lists the study's series (report-like series, e.g. SR/KO/PR/SEG, are skipped, and so are instances made by
   medops itself); WADO-RS fetches each series' instances.
2. Every instance is read with the model's own input contract (the same :func:`serve.predict.read_input` as files)
   and classified by the chosen backend (Triton HTTP/gRPC or local onnxruntime).
3. Per series and for the study, P(positive class) is aggregated by :data:`medops.dicom_sr.AGGREGATION_RULE` (the
   maximum over images) and compared with the version's operating point; the counts of images classified, failed
   and flagged out of distribution travel with the answer.
4. With ``--store-results``, one Comprehensive SR per classified series (:func:`medops.dicom_sr.result_sr`) goes back
   into the study with STOW-RS.

Privacy: the answer (printed, ``--json``, the batch CSV/JSON) names studies and series by :func:`medops.pacs.uid_key`
digests, series numbers and modalities only; no header value of the source is printed, logged or written to disk
(instances are decoded from private temporary files that are deleted at once). Only the SR sent back to the PACS
carries the source's patient and study identifiers.

Torch-free.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from rich.table import Table

from medops import ImageReadError
from medops.deid import quiet_pydicom
from medops.dicom import modality_warning
from medops.dicom_sr import AGGREGATION_RULE, RULE_TEXT, ModelAnswer, aggregate, result_sr
from medops.model_version import OOD_FLAG_OUTPUT, OUTPUT_NAME
from medops.pacs import (
    NON_IMAGE_MODALITIES,
    PacsError,
    SeriesRef,
    find_series,
    open_client,
    retrieve_series,
    store,
    uid_key,
)
from medops.pacs import as_file as instance_file
from serve.contract import Backend, ModelInfo, ServeError, infer_outputs
from serve.predict import read_input

__all__ = ["SeriesResult", "StudyResult", "classify_study", "store_results", "write_csv"]

_PIXELS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
CSV_COLUMNS = ["level", "study", "series", "series_number", "modality", "instance", "probability",
               "finding_present", "threshold", "images", "failed", "ood_flagged", "warning", "model", "version",
               "error"]


@dataclass
class SeriesResult:
    """One series' answer; ``sources`` (the classified datasets, with their identifiers) is kept out of
    :meth:`as_dict`: it only feeds the SR that goes back to the PACS."""

    key: str
    number: int | None
    modality: str
    instances: int
    probabilities: list[float] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    ood_flagged: int = 0
    warnings: list[str] = field(default_factory=list)
    probability: float | None = None
    present: bool | None = None
    sources: list[Dataset] = field(default_factory=list, repr=False)
    numbers: list[int] = field(default_factory=list)  # each probability's instance ordinal in the series

    def as_dict(self) -> dict[str, Any]:
        return {"series": self.key, "series_number": self.number, "modality": self.modality,
                "instances": self.instances, "classified": len(self.probabilities), "failed": self.failed,
                "ood_flagged": self.ood_flagged, "warnings": sorted(set(self.warnings)),
                "probabilities": [round(p, 6) for p in self.probabilities],
                "probability_instances": list(self.numbers),  # each probability's instance position in the series
                "probability": None if self.probability is None else round(self.probability, 6),
                "finding_present": self.present}


@dataclass
class StudyResult:
    """The study's answer over its series, with the model, operating point and rule it was reached with."""

    key: str
    model: str
    version: str
    positive_class: str
    threshold: float
    threshold_source: str
    series: list[SeriesResult] = field(default_factory=list)
    skipped_series: int = 0
    stored: list[dict[str, str]] = field(default_factory=list)

    @property
    def probability(self) -> float | None:
        return aggregate([s.probability for s in self.series if s.probability is not None])

    @property
    def present(self) -> bool | None:
        p = self.probability
        return None if p is None else p >= self.threshold

    @property
    def images(self) -> int:
        return sum(len(s.probabilities) for s in self.series)

    def as_dict(self) -> dict[str, Any]:
        p = self.probability
        return {"study": self.key, "model": self.model, "version": self.version,
                "positive_class": self.positive_class, "threshold": self.threshold,
                "threshold_source": self.threshold_source, "rule": AGGREGATION_RULE,
                "rule_text": RULE_TEXT.format(cls=self.positive_class) + " (series: maximum over its images; "
                             "study: maximum over its series)",
                "probability": None if p is None else round(p, 6), "finding_present": self.present,
                "images": self.images, "skipped_series": self.skipped_series,
                "series": [s.as_dict() for s in self.series], "stored": self.stored}

    def answer(self, series: SeriesResult) -> ModelAnswer:
        return ModelAnswer(self.model, self.version, self.positive_class, self.threshold,
                           float(series.probability or 0.0), len(series.probabilities))


def operating_point(info: ModelInfo) -> tuple[str, float, str]:
    """``(positive class, threshold, where the threshold comes from)`` of a binary model.

    Raises:
        ServeError: the model is not binary (the SR reports one finding: the positive class) or its version has no
            operating point.
    """
    if len(info.class_names) != 2:
        raise ServeError(f"model {info.name} has {len(info.class_names)} classes; DICOMweb results need a binary "
                         "model (one finding, the positive class)")
    positive = info.extra.get("positive_class")
    if positive not in info.class_names or info.extra.get("threshold") is None:
        raise ServeError(f"model {info.name} v{info.version} has no operating point (positive class and threshold); "
                         "the SR must name the finding and the threshold: re-export the version from a run that "
                         "chose one (python -m export), or run python -m evaluation.evaluate first")
    return positive, float(info.extra["threshold"]), "operating point exported with the version"


def classify_study(url: str, study_uid: str, backend: Backend, *, series_uid: str | None = None,
                   timeout: float = 30.0, progress: Any = None) -> StudyResult:
    """Fetch and classify every image series of the study (or only ``series_uid``); see the module docstring.

    Raises:
        ServeError: the PACS is unreachable or has no such study/series, or the model is not binary.
    """
    info = backend.info
    positive, threshold, source = operating_point(info)
    result = StudyResult(uid_key(study_uid), info.name, str(info.version), positive, threshold, source)
    try:
        client = open_client(url, timeout=timeout)
        refs = find_series(client, study_uid, series_uid)
        for ref in refs:
            if ref.modality.upper() in NON_IMAGE_MODALITIES:
                result.skipped_series += 1
                continue
            series = _classify_series(ref, retrieve_series(client, ref), backend, positive)
            if series.instances == 0:  # only results medops wrote back earlier
                result.skipped_series += 1
                continue
            if series.probabilities:
                series.probability = aggregate(series.probabilities)
                series.present = bool(series.probability is not None and series.probability >= threshold)
            result.series.append(series)
            if progress is not None:
                progress(series)
    except PacsError as exc:
        raise ServeError(f"DICOMweb {url}: {exc}") from None
    return result


def _classify_series(ref: SeriesRef, datasets: list[Dataset], backend: Backend, positive: str) -> SeriesResult:
    """Read every instance of a series with the model's contract and classify them in one request."""
    info = backend.info
    series = SeriesResult(ref.key, ref.number, ref.modality, len(datasets))
    images, kept = [], []
    for number, ds in enumerate(datasets, start=1):
        if str(ds.get("Manufacturer", "")) == "medops":  # a result written back earlier: not an input
            series.instances -= 1
            continue
        if not any(k in ds for k in _PIXELS):
            series.failed.append({"instance": number, "reason": "no pixel data"})
            continue
        try:
            with quiet_pydicom(), instance_file(ds) as path:
                images.append(read_input(path, info))
                warning = modality_warning(path, info.modalities)
        except ImageReadError as exc:  # its reason never holds a header value
            series.failed.append({"instance": number, "reason": exc.reason})
            continue
        except Exception as exc:  # noqa: BLE001 - e.g. a dataset pydicom cannot write back: report it, go on
            series.failed.append({"instance": number, "reason": f"unreadable instance ({type(exc).__name__})"})
            continue
        if warning:
            series.warnings.append(warning)
        kept.append(ds)
        series.numbers.append(number)
    if images:
        outputs = infer_outputs(backend, np.stack(images))
        column = info.class_names.index(positive)
        series.probabilities = [float(p) for p in np.asarray(outputs[OUTPUT_NAME])[:, column]]
        if OOD_FLAG_OUTPUT in outputs:
            series.ood_flagged = int(np.asarray(outputs[OOD_FLAG_OUTPUT]).reshape(-1).astype(bool).sum())
    series.sources = kept
    return series


def store_results(url: str, study_uid: str, result: StudyResult, timeout: float = 30.0) -> list[Dataset]:
    """One result SR per classified series, in one new series of the study, stored with STOW-RS; the SRs.

    Raises:
        ServeError: the PACS refused them or could not be reached.
    """
    series_uid = generate_uid()
    reports = [result_sr(result.answer(s), s.sources, series_uid=series_uid, instance_number=i)
               for i, s in enumerate((s for s in result.series if s.probabilities), start=1)]
    if not reports:
        return []
    try:
        store(open_client(url, timeout=timeout), reports, study_uid)
    except PacsError as exc:
        raise ServeError(f"DICOMweb {url}: {exc}") from None
    done = [s for s in result.series if s.probabilities]
    result.stored = [{"series": s.key, "sr_sop_instance_uid": str(r.SOPInstanceUID)}
                     for s, r in zip(done, reports, strict=True)]
    return reports


def render_table(result: StudyResult, backend_label: str = "") -> Table:
    """The answer per series and for the study, with the rule, counts and operating point in the title."""
    where = f" via {backend_label}" if backend_label else ""
    table = Table(title=f"{result.model} v{result.version}{where}: P({result.positive_class}) = max over images, "
                        f"positive at >= {result.threshold:.3f} ({result.threshold_source})", title_justify="left")
    for column in ("level", "series", "#", "modality", "images", "failed", "OOD", f"P({result.positive_class})",
                   "decision"):
        table.add_column(column, justify="right" if column in ("#", "images", "failed", "OOD") else "left")

    def decision(present: bool | None) -> str:
        if present is None:
            return "no image classified"
        return f"[bold red]{result.positive_class}[/]" if present else f"not {result.positive_class}"

    for s in result.series:
        table.add_row("series", s.key, "" if s.number is None else str(s.number), s.modality,
                      str(len(s.probabilities)), str(len(s.failed)), str(s.ood_flagged),
                      "-" if s.probability is None else f"{s.probability:.4f}", decision(s.present))
    p = result.probability
    table.add_row("study", result.key, "", "", str(result.images), str(sum(len(s.failed) for s in result.series)),
                  str(sum(s.ood_flagged for s in result.series)), "-" if p is None else f"{p:.4f}",
                  decision(result.present), style="bold", end_section=True)
    return table


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def write_csv(result: StudyResult, path: str | Path) -> tuple[Path, Path]:
    """``path``: one row per image, series and the study (column ``level``); beside it ``<path>.json`` with
    :meth:`StudyResult.as_dict`. Neither holds a header value of the source."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    common = {"study": result.key, "threshold": result.threshold, "model": result.model, "version": result.version}
    rows = []
    for s in result.series:
        series = {**common, "series": s.key, "series_number": s.number, "modality": s.modality}
        rows += [{**series, "level": "image", "instance": i, "probability": round(p, 6),
                  "finding_present": p >= result.threshold}
                 for i, p in zip(s.numbers or range(1, len(s.probabilities) + 1), s.probabilities, strict=True)]
        rows += [{**series, "level": "image", "instance": f["instance"], "error": f["reason"]} for f in s.failed]
        rows.append({**series, "level": "series", "probability": _round(s.probability), "finding_present": s.present,
                     "images": len(s.probabilities), "failed": len(s.failed), "ood_flagged": s.ood_flagged,
                     "warning": "; ".join(sorted(set(s.warnings)))})
    rows.append({**common, "level": "study", "probability": _round(result.probability),
                 "finding_present": result.present,
                 "images": result.images, "failed": sum(len(s.failed) for s in result.series),
                 "ood_flagged": sum(s.ood_flagged for s in result.series)})
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    summary = out.with_name(out.name + ".json")
    summary.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
    return out, summary
