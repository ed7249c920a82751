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
