"""Signed model versions: export records every file's SHA-256 (and an HMAC with MEDOPS_MODEL_SIGNING_KEY); a
tampered version is refused by ``serve verify``, ``serve start``, the local backend and the served model itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from medops.integrity import KEY_ENV, digests, sha256_of, verify_version
from serve.contract import ServeError
from serve.local_backend import LocalBackend
from serve.triton_server import TritonServer, free_port
from tests.conftest import REPO

pytestmark = pytest.mark.slow
KEY = "signing-key-for-tests-" + "z" * 16


def run_serve(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    full |= {"COLUMNS": "250", **(env or {})}
    return subprocess.run([sys.executable, "-m", "serve", *args], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def repo_copy(exported_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the exported repository (the session's one stays untouched)."""
    copy = tmp_path / "model_repository"
    shutil.copytree(exported_repo, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_export_records_the_digest_of_every_file(exported_repo: Path) -> None:
    folder = exported_repo / "breast" / "1"
    meta = json.loads((folder / "metadata.json").read_text())
    files = meta["files"]
    assert {"model.onnx", "model.py", "integrity.py", "input_check.py", "config.pbtxt", "labels.txt",
            "MODEL_CARD.md", "model_card.json", "drift_reference.npz", "embedding.onnx"} <= set(files)
    assert "metadata.json" not in files
    assert files["model.onnx"] == sha256_of(folder / "model.onnx")
    assert files == {k: v for k, v in digests(folder).items() if k in files}
    assert "signature" not in meta  # no key at export: digests only
    assert verify_version(folder) == []


def test_serve_verify_passes_a_clean_copy_and_refuses_a_tampered_one(repo_copy: Path) -> None:
    clean = run_serve("verify", "breast", "--model-repository", str(repo_copy))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "ok" in clean.stdout and "digests only" in clean.stdout
    onnx = repo_copy / "breast" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    (repo_copy / "breast" / "1" / "extra.py").write_text("print('not from export')\n")
    tampered = run_serve("verify", "--model-repository", str(repo_copy))
    assert tampered.returncode == 1
    text = tampered.stdout + tampered.stderr
    assert "model.onnx: SHA-256 differs" in text and "extra.py: not written by export" in text
    assert "1 of 1 version(s) refused" in text
    with pytest.raises(ServeError, match="breast v1 refused: .*model.onnx"):
        LocalBackend(repo_copy, "breast")
    start = run_serve("start", "--model-repository", str(repo_copy), "--load", "breast", "--http-port",
                      str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(free_port()))
    assert start.returncode == 1 and "breast v1 refused" in start.stderr
    assert "starting Triton" not in start.stderr  # refused before Triton sees the repository


def test_the_served_model_refuses_a_tampered_version_itself(repo_copy: Path) -> None:
    """The container path: tritonserver started directly (no serve pre-check) still refuses to load it."""
    folder = repo_copy / "breast" / "1"
    (folder / "input_check.py").write_text((folder / "input_check.py").read_text() + "\n# edited\n")
    server = TritonServer(repo_copy, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          model_control="explicit", load_models=["breast"])
    with pytest.raises(RuntimeError):
        server.start(timeout=120)
    log = server.log_text()
    server.stop()
    assert "breast v1 refused: its files are not what export wrote: input_check.py: SHA-256 differs" in log


def test_signed_export_needs_the_key_to_pass(trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    from export.build import export_model

    repo = tmp_path / "signed"
    monkeypatch.setenv(KEY_ENV, KEY)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="export", overrides=[f"run={trained_run}", "name=breast", f"model_repository={repo}",
                                                       "drift.enabled=false", "ood.enabled=false"])
    export_model(cfg)
    folder = repo / "breast" / "1"
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["signature"]["method"] == "hmac-sha256" and len(meta["signature"]["value"]) == 64
    assert verify_version(folder, KEY) == []
    assert any("signature does not match" in p for p in verify_version(folder, "another-key-" + "q" * 16))
    # a tamperer who rewrites the digest too passes the digest check, but not the signature
    onnx = folder / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    meta["files"]["model.onnx"] = sha256_of(onnx)
    (folder / "metadata.json").write_text(json.dumps(meta))
    assert verify_version(folder) == []
    assert verify_version(folder, KEY) == ["signature does not match (files, name or version changed, or another "
                                           f"{KEY_ENV})"]
    proc = run_serve("verify", "--model-repository", str(repo), env={KEY_ENV: KEY})
    assert proc.returncode == 1 and "signature does not match" in proc.stdout + proc.stderr
    assert KEY not in proc.stdout + proc.stderr
