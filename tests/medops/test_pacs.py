"""``medops.pacs``: what outputs show instead of a DICOM UID."""

from __future__ import annotations

import pytest

from medops.pacs import uid_key


def test_uid_key_is_one_way_and_keyed_by_the_site_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    uid = "1.2.826.0.1.3680043.8.498.20240101120000.1"
    monkeypatch.delenv("MEDOPS_DEID_SALT", raising=False)
    plain = uid_key(uid)
    assert len(plain) == 12 and uid not in plain and plain == uid_key(uid)
    monkeypatch.setenv("MEDOPS_DEID_SALT", "site-secret-a")
    keyed_a = uid_key(uid)
    monkeypatch.setenv("MEDOPS_DEID_SALT", "site-secret-b")
    assert len({plain, keyed_a, uid_key(uid)}) == 3  # without the secret, a guessed UID cannot be checked
    assert uid_key(uid) != uid_key(uid[:-1] + "2")


def test_series_modality_from_the_pacs_is_a_defined_term_or_nothing_of_it() -> None:
    """QIDO-RS answers carry the series' Modality as the PACS holds it: free text there (a site's own note) is
    never passed on to tables, CSVs or JSON, only a DICOM defined term."""
    from medops.dicom import UNRECOGNISED_MODALITY
    from medops.pacs import find_series

    def record(uid: str, modality: str, number: int) -> dict:
        return {"0020000E": {"vr": "UI", "Value": [uid]}, "00080060": {"vr": "CS", "Value": [modality]},
                "00200011": {"vr": "IS", "Value": [number]}}

    answers = [record("1.2.3", "us", 1), record("1.2.4", "SENTINEL_JOHN_DOE", 2), record("1.2.5", "", 3)]
    client = type("Client", (), {"search_for_series": staticmethod(
        lambda limit, offset, **kw: answers[offset:offset + limit])})()
    refs = find_series(client, "1.2")
    assert [r.modality for r in refs] == ["US", UNRECOGNISED_MODALITY, ""]
