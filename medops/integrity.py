"""Signed model versions: the SHA-256 of every file of a version, and an optional HMAC signature over them.

Export records ``files`` (relative path -> SHA-256) in the version's ``metadata.json`` after every other file is
written; with ``MEDOPS_MODEL_SIGNING_KEY`` set it also records ``signature``, an HMAC-SHA256 over the model name,
version and file digests. Whoever loads a version (the Triton Python-backend model at ``initialize``,
``serve start``/``serve load`` before Triton sees the repository, the local backend, ``python -m serve verify``)
checks it with :func:`verify_version` and refuses a version whose files were changed, removed or added.

The digests alone catch accidental or careless changes (a copied-over ``model.onnx``, a half-written sync); the
signature also catches a deliberate change by someone who can write the repository but does not hold the key
(they could otherwise rewrite the digests too). A Python-backend ``model.py`` is code: Triton runs whatever is
there, so the check that covers ``model.py`` itself is the one ``serve`` runs before starting or loading.

Standard library only and self-contained (no package-relative imports): export copies this file next to the
Python-backend ``model.py`` as ``integrity.py``. Why not a library: the job is ``hashlib`` + ``hmac`` over a
file list, and the served model's stub environment has no medops package to import.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

KEY_ENV = "MEDOPS_MODEL_SIGNING_KEY"
MANIFEST_FIELD = "files"
SIGNATURE_FIELD = "signature"
METADATA = "metadata.json"
IGNORED_DIRS = frozenset({"__pycache__"})  # bytecode Python writes next to imported helpers


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def version_files(folder: str | os.PathLike[str]) -> list[str]:
    """Every file of a version folder (relative, ``/``-separated, sorted), ``metadata.json`` and bytecode left out."""
    root = Path(folder)
    out = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and rel.as_posix() != METADATA and not IGNORED_DIRS.intersection(rel.parts):
            out.append(rel.as_posix())
    return sorted(out)


def digests(folder: str | os.PathLike[str]) -> dict[str, str]:
    """``relative path -> SHA-256`` of every file of a version (:func:`version_files`)."""
    return {rel: sha256_of(Path(folder) / rel) for rel in version_files(folder)}


def signature(name: str, version: str | int, files: dict[str, str], key: str) -> str:
    """HMAC-SHA256 (hex) of the model name, version and file digests, canonical JSON."""
    message = json.dumps({"name": str(name), "version": str(version), "files": files}, sort_keys=True,
                         separators=(",", ":")).encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def seal(folder: str | os.PathLike[str], meta: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    """``meta`` with the digests of the folder's files (and their signature when ``key`` is given)."""
    files = digests(folder)
    sealed = {**meta, MANIFEST_FIELD: files}
    sealed.pop(SIGNATURE_FIELD, None)
    if key:
        sealed[SIGNATURE_FIELD] = {"method": "hmac-sha256", "key_env": KEY_ENV,
                                   "value": signature(meta["name"], meta["version"], files, key)}
    return sealed


def verify_version(folder: str | os.PathLike[str], key: str | None = None) -> list[str]:
    """What is wrong with a version's files, ``[]`` when they are exactly what export wrote (and signed).

    Without a recorded manifest the version predates signing: one problem says so. With ``key`` the signature
    must be present and match; without it a recorded signature cannot be checked (not a problem: the digests
    still are)."""
    root = Path(folder)
    try:
        meta = json.loads((root / METADATA).read_text())
    except (OSError, ValueError) as exc:
        return [f"{METADATA} unreadable ({type(exc).__name__})"]
    recorded = meta.get(MANIFEST_FIELD)
    if not isinstance(recorded, dict):
        return [f"no file digests in {METADATA} (exported before versions were signed): re-export it"]
    problems = [f"{rel}: missing" for rel in sorted(set(recorded) - set(version_files(root)))]
    problems += [f"{rel}: not written by export" for rel in sorted(set(version_files(root)) - set(recorded))]
    problems += [f"{rel}: SHA-256 differs from {METADATA}" for rel in sorted(set(recorded) & set(version_files(root)))
                 if sha256_of(root / rel) != recorded[rel]]
    if key:
        sig = (meta.get(SIGNATURE_FIELD) or {}).get("value")
        if not sig:
            problems.append(f"unsigned, but {KEY_ENV} is set: a signed version is required")
        elif not hmac.compare_digest(sig, signature(meta.get("name", ""), meta.get("version", ""), recorded, key)):
            problems.append(f"signature does not match (files, name or version changed, or another {KEY_ENV})")
    return problems
