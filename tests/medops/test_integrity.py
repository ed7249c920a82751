"""File digests and the HMAC signature of a model version (medops.integrity)."""

from __future__ import annotations

import json
from pathlib import Path

from medops.integrity import seal, verify_version

KEY = "k" * 32


def version(tmp_path: Path, key: str | None = None) -> Path:
    folder = tmp_path / "m" / "3"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"graph")
    (folder / "sub" / "labels.txt").write_text("a\nb\n")
    meta = seal(folder, {"name": "m", "version": 3}, key)
    (folder / "metadata.json").write_text(json.dumps(meta))
    return folder


def test_untouched_version_passes_and_bytecode_is_ignored(tmp_path: Path) -> None:
    folder = version(tmp_path)
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "x.pyc").write_bytes(b"\0")
    assert json.loads((folder / "metadata.json").read_text())["files"].keys() == {"model.onnx", "sub/labels.txt"}
    assert verify_version(folder) == []


def test_changed_missing_and_added_files_are_named(tmp_path: Path) -> None:
    folder = version(tmp_path)
    (folder / "model.onnx").write_bytes(b"graph!")
    (folder / "sub" / "labels.txt").unlink()
    (folder / "model.py").write_text("import os\n")
    assert verify_version(folder) == ["sub/labels.txt: missing", "model.py: not written by export",
                                      "model.onnx: SHA-256 differs from metadata.json"]


def test_signature_binds_files_name_and_version(tmp_path: Path) -> None:
    folder = version(tmp_path, KEY)
    assert verify_version(folder, KEY) == []
    meta = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**meta, "version": 4}))  # a version relabelled
    assert "signature does not match" in verify_version(folder, KEY)[0]
    unsigned = version(tmp_path / "u")
    assert "unsigned" in verify_version(unsigned, KEY)[0]
    (unsigned / "metadata.json").write_text(json.dumps({"name": "m", "version": 3}))
    assert "no file digests" in verify_version(unsigned)[0]
