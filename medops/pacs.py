"""A PACS over DICOMweb (QIDO-RS search, WADO-RS retrieve, STOW-RS store) with ``dicomweb-client``: the few calls
that ``serve`` (classify a study), ``datatools.pacs_query`` (pull a query result) and ``evaluation.pacs_overlay``
(Grad-CAM overlays) share.

Privacy: errors name the operation and the HTTP status, never a header value; a UID that has to appear in output
(logs, CSV, JSON) appears as :func:`uid_key`, a one-way digest, so that results can be matched without exposing the
study's identifiers. Retrieved datasets hold the source identifiers: callers keep them in memory or in private
temporary files and never write them to their outputs.

Torch-free.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from medops.deid import quiet_pydicom
from medops.dicom import modality_term

__all__ = [
    "PacsError",
    "SeriesRef",
    "as_file",
    "find_series",
    "find_studies",
    "open_client",
    "retrieve_instance",
    "retrieve_series",
    "store",
    "uid_key",
]

# Series that hold no images to classify (reports, key objects, presentation states, segmentations...)
NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "SEG", "RTSTRUCT", "REG", "DOC"})


class PacsError(RuntimeError):
    """A DICOMweb request failed or found nothing; the message says which operation and why."""


@dataclass(frozen=True)
class SeriesRef:
    """One series of a study, from QIDO-RS: its UIDs, modality, number and instance count."""

    study_uid: str
    series_uid: str
    modality: str
    number: int | None
    instances: int | None

    @property
    def key(self) -> str:
        return uid_key(self.series_uid)


def uid_key(uid: str) -> str:
    """A 12-hex-digit digest of a UID: stable, one-way; what outputs show instead of the UID. Keyed (HMAC-SHA-256)
    with ``MEDOPS_DEID_SALT`` when it is set, so that a guessed UID (an organisation root and a timestamp) cannot
    be checked against an output without the site's secret; a plain SHA-256 otherwise."""
    data = str(uid).encode("ascii", "ignore")
    salt = os.environ.get("MEDOPS_DEID_SALT", "")
    if salt:
        return hmac.new(salt.encode(), data, hashlib.sha256).hexdigest()[:12]
    return hashlib.sha256(data).hexdigest()[:12]


def open_client(url: str, timeout: float = 30.0, attempts: int = 3) -> Any:
    """A ``dicomweb_client.DICOMwebClient`` for the DICOMweb root ``url`` (e.g. ``http://pacs:8042/dicom-web``); a
    request that fails to connect or gets 408/429/503/504 is tried ``attempts`` times with exponential backoff from
    0.5 s (dicomweb-client's default, 5 attempts from 1 s, keeps a user waiting 30 s for a PACS that is down)."""
    from dicomweb_client.api import DICOMwebClient

    if not url.startswith(("http://", "https://")):
        raise PacsError(f"DICOMweb URL must start with http:// or https://, got {url!r}")
    client = DICOMwebClient(url.rstrip("/"), timeout=timeout)
    client.set_http_retry_params(max_attempts=attempts, wait_exponential_multiplier=500)
    return client


def _value(record: dict[str, Any], tag: str) -> Any:
    values = (record.get(tag) or {}).get("Value") or []
    return values[0] if values else None


@contextmanager
def _request(what: str) -> Iterator[None]:
    """Turn a failed request into a PacsError naming ``what`` and the HTTP status (never a header value)."""
    try:
        with quiet_pydicom():
            yield
    except PacsError:
        raise
    except Exception as exc:  # requests.HTTPError, connection errors, decoding errors
        status = getattr(getattr(exc, "response", None), "status_code", None)
        reason = f"HTTP {status}" if status else type(exc).__name__
        raise PacsError(f"{what} failed ({reason})") from None


PAGE = 500


def _search_all(search: Any, uid_tag: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Every page of a QIDO-RS search (``limit``/``offset``), each record once.

    Written here rather than with dicomweb-client's ``get_remaining=True``, which loops forever on a server that
    ignores ``offset`` for some filters (Orthanc 1.7's DICOMweb plugin with ModalitiesInStudy): paging stops at a
    short page or at a page with nothing new."""
    records: dict[str, dict[str, Any]] = {}
    offset = 0
    while True:
        page = search(limit=PAGE, offset=offset, **kwargs)
        fresh = {str(_value(r, uid_tag)): r for r in page if str(_value(r, uid_tag)) not in records}
        records.update(fresh)
        if not fresh or len(page) < PAGE:
            return list(records.values())
        offset += len(page)


def find_studies(client: Any, filters: dict[str, str]) -> list[str]:
    """StudyInstanceUIDs of the studies matching QIDO-RS ``filters`` (e.g. ``{"ModalitiesInStudy": "CT",
    "StudyDate": "20240101-20241231"}``), every page."""
    with _request("QIDO-RS study search"):
        found = _search_all(client.search_for_studies, "0020000D", search_filters=dict(filters))
    return [str(_value(s, "0020000D")) for s in found if _value(s, "0020000D")]


def find_series(client: Any, study_uid: str, series_uid: str | None = None) -> list[SeriesRef]:
    """The series of a study (QIDO-RS), or the one series ``series_uid``; ordered by series number.

    Raises:
        PacsError: the request failed, the study has no series or ``series_uid`` is not in it.
    """
    filters = {"SeriesInstanceUID": series_uid} if series_uid else None
    with _request("QIDO-RS series search of the study given"):
        found = _search_all(client.search_for_series, "0020000E", study_instance_uid=study_uid,
                            search_filters=filters)
    refs = []
    for s in found:
        number, count = _value(s, "00200011"), _value(s, "00201209")
        refs.append(SeriesRef(study_uid, str(_value(s, "0020000E")), modality_term(_value(s, "00080060")),
                              int(number) if number not in (None, "") else None,
                              int(count) if count not in (None, "") else None))
    if not refs:
        raise PacsError("the series given (--series) is not in the study given (--study)" if series_uid
                        else "the PACS has no study with the UID given (--study), or it has no series")
    return sorted(refs, key=lambda r: (r.number is None, r.number or 0, r.key))


def find_instances(client: Any, study_uid: str, series_uid: str) -> list[str]:
    """SOPInstanceUIDs of one series (QIDO-RS)."""
    with _request("QIDO-RS instance search"):
        found = _search_all(client.search_for_instances, "00080018", study_instance_uid=study_uid,
                            series_instance_uid=series_uid)
    return [str(_value(i, "00080018")) for i in found if _value(i, "00080018")]


def retrieve_series(client: Any, ref: SeriesRef) -> list[Dataset]:
    """Every instance of a series (WADO-RS), ordered by InstanceNumber."""
    with _request(f"WADO-RS retrieval of series {ref.key}"):
        datasets = client.retrieve_series(ref.study_uid, ref.series_uid)
    return sorted(datasets, key=lambda d: (_int(d.get("InstanceNumber")), str(d.get("SOPInstanceUID", ""))))


def retrieve_instance(client: Any, study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
    """One instance (WADO-RS)."""
    with _request(f"WADO-RS retrieval of instance {uid_key(sop_uid)}"):
        return client.retrieve_instance(study_uid, series_uid, sop_uid)


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 1 << 30


def store(client: Any, datasets: Sequence[Dataset], study_uid: str) -> None:
    """Store instances into their study (STOW-RS); a PacsError when the PACS refuses any of them."""
    with _request("STOW-RS store of the results"):
        reply = client.store_instances(list(datasets), study_instance_uid=study_uid)
    failed = reply.get("FailedSOPSequence") if reply is not None else None
    if failed:
        raise PacsError(f"STOW-RS: the PACS refused {len(failed)} of {len(datasets)} instance(s)")


@contextmanager
def as_file(ds: Dataset) -> Iterator[Path]:
    """``ds`` written to a private temporary file (mode 0600, deleted afterwards) for file-based readers such as
    :func:`medops.read_image`; its name carries nothing from the dataset."""
    with tempfile.TemporaryDirectory(prefix="medops-pacs-") as folder:
        path = Path(folder) / "instance.dcm"
        with quiet_pydicom():
            ds.save_as(path, enforce_file_format=True)
        os.chmod(path, 0o600)
        yield path
