"""The run record (``run.json``): the one reader and writer of a training run's lineage and results.

Training writes it; export, evaluation, serving (``serve batch --compare-run``), cross-validation and run
comparison read it, all through :func:`read_record` / :func:`latest_run`. The file carries a schema version
(``"schema": "medops.run/1"``); a file without one, or with one this code does not know, is refused with a
clear :class:`RunRecordError` instead of failing later on a missing key.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from medops.model_version import write_json

SCHEMA = "medops.run/1"
KNOWN_SCHEMAS = frozenset({SCHEMA})
FILENAME = "run.json"
COMPLETED = "completed"
PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "numpy", "wandb", "onnx", "onnxruntime")


class RunRecordError(ValueError):
    """A run record that is missing, unreadable or of an unknown schema; the message names the file."""


@dataclass
class RunRecord:
    """A parsed ``run.json``: typed access to what other stages read, and the whole document as ``raw``."""

    path: Path | None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path | None:
        return self.path.parent if self.path else None

    @property
    def run_id(self) -> str | None:
        return self.raw.get("run_id")

    @property
    def status(self) -> str | None:
        return self.raw.get("status")

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.raw.get("config") or {})

    @property
    def data(self) -> dict[str, Any]:
        """The data summary (source, geometry, classes, counts, fingerprint)."""
        return dict(self.raw.get("data") or {})

    @property
    def val(self) -> dict[str, Any]:
        return dict(self.raw.get("val") or {})

    @property
    def test(self) -> dict[str, Any]:
        return dict(self.raw.get("test") or {})

    @property
    def fold(self) -> int | None:
        fold = self.data.get("fold")
        return fold if isinstance(fold, int) else None

    def best_checkpoint(self) -> Path:
        """The best checkpoint, preferring the copy inside this run folder (runs get moved and copied)."""
        best = (self.raw.get("checkpoints") or {}).get("best")
        if not best:
            raise RunRecordError(f"{self.path} names no best checkpoint (status: {self.status})")
        if self.run_dir is not None:
            local = self.run_dir / "checkpoints" / Path(best).name
            if local.is_file():
                return local
        return Path(best)


def record_path(run: str | Path) -> Path:
    """``run.json`` of a run folder, or the file itself when ``run`` names it."""
    path = Path(run)
    return path if path.name == FILENAME or path.is_file() else path / FILENAME


def parse_record(raw: Any, where: str | Path | None = None) -> RunRecord:
    """Check a loaded ``run.json`` document against the known schemas."""
    name = str(where or "run record")
    if not isinstance(raw, dict):
        raise RunRecordError(f"{name}: not a medops run record (a JSON object is expected)")
    schema = raw.get("schema")
    if schema is None:
        raise RunRecordError(f"{name}: no 'schema' field: not a medops run record, or written before {SCHEMA}")
    if schema not in KNOWN_SCHEMAS:
        raise RunRecordError(f"{name}: run record schema {schema!r} is not supported (known: {sorted(KNOWN_SCHEMAS)}); "
                             "upgrade medops to read it")
    return RunRecord(Path(where) if where else None, raw)


def read_record(run: str | Path) -> RunRecord:
    """Read and check the run record of a run folder (or of a ``run.json`` path)."""
    path = record_path(run)
    if not path.is_file():
        raise RunRecordError(f"{path}: run record not found (not a training run folder)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunRecordError(f"{path}: not a readable run record ({type(exc).__name__}: {exc})") from None
    return parse_record(raw, path)


def find_records(folder: str | Path) -> list[Path]:
    """Every ``run.json`` at or below ``folder``, sorted by path."""
    root = Path(folder)
    if (root / FILENAME).is_file():
        return [root / FILENAME]
    return sorted(root.rglob(FILENAME)) if root.is_dir() else []


def latest_run(log_dir: str | Path) -> Path:
    """The folder of the most recently written completed run under ``log_dir`` (``run=latest``)."""
    best: tuple[float, Path] | None = None
    for path in find_records(log_dir):
        try:
            if not read_record(path).completed:
                continue
            mtime = path.stat().st_mtime
        except (RunRecordError, OSError):
            continue
        if best is None or mtime > best[0]:
            best = (mtime, path.parent)
    if best is None:
        raise RunRecordError(f"{log_dir}: no completed training run (run.json with status '{COMPLETED}') found")
    return best[1]


def git_info(cwd: str | Path | None = None) -> dict[str, Any]:
    """Commit hash and whether the work tree had uncommitted changes (``None`` outside a git checkout)."""
    cwd = Path(cwd or Path(__file__).resolve().parent)

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Python and the versions of the packages a result depends on (``None`` when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def new_record(output_dir: Path, run_id: str, environment: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of a run that has just started (status ``running``)."""
    return {
        "schema": SCHEMA,
        "run_id": run_id,
        "status": "running",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "output_dir": str(output_dir.resolve()),
        "command": [Path(sys.executable).name, *sys.argv],
        "git": git_info(),
        "versions": package_versions(),
        "environment": environment or {},
    }


def write_record(record: dict[str, Any], output_dir: Path) -> Path:
    """Write ``run.json`` atomically (a reader never sees half a file)."""
    return write_json(output_dir / FILENAME, record, default=_jsonable)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# -- the operating point chosen by evaluation, read by export ------------------------------------------------------
OPERATING_POINT_FILE = "operating_point.json"


def read_operating_point(run_dir: str | Path) -> dict[str, Any]:
    """``operating_point.json`` of a run folder (threshold, positive class, temperature), or ``{}`` if none."""
    path = Path(run_dir) / OPERATING_POINT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_operating_point(run_dir: str | Path, operating_point: dict[str, Any]) -> Path:
    """Write ``operating_point.json`` atomically into a run folder."""
    return write_json(Path(run_dir) / OPERATING_POINT_FILE, operating_point, default=_jsonable)
