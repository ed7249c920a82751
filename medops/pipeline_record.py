"""The pipeline run record (``pipeline.json``) and the tracked data version, owned here because several stages touch
them: every step of the continuous-training pipeline (``python -m pipeline``, the Airflow DAG) writes its part,
the pipeline CLI reads it for its summary, and training records the tracked data version in ``run.json``.

One record per pipeline run, ``<records_dir>/<pipeline run id>/pipeline.json`` (schema ``"medops.pipeline/1"``):

* ``trigger``: what started the run (manual, schedule, data version diff, drift alert) and its details;
* ``steps``: one entry per step (validate, train, evaluate, export, gate, trial, promote) with its status
  (``running``, ``done``, ``cached``, ``failed``, ``stopped``, ``skipped``), time, inputs, outputs and key figures;
* ``lineage``: data fingerprint (and the DVC / Git LFS version where the data is tracked) -> training run id ->
  model name and version -> rollout decision;
* ``status`` (``running``, ``completed``, ``stopped`` when a gate said no, ``failed``) and ``reason``.

Torch-free; writes are atomic (a reader never sees half a file).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medops.model_version import write_json

SCHEMA = "medops.pipeline/1"
KNOWN_SCHEMAS = frozenset({SCHEMA})
FILENAME = "pipeline.json"
STEPS = ("validate", "train", "evaluate", "export", "gate", "trial", "promote")
FINAL = ("completed", "stopped", "failed")


class PipelineRecordError(ValueError):
    """A pipeline record that is missing, unreadable or of an unknown schema; the message names the file."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id(prefix: str = "ct") -> str:
    """A pipeline run id: ``<prefix>-<UTC time>`` (sortable, no patient data)."""
    return f"{prefix}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S-%f')[:-3]}"


def record_path(records_dir: str | Path, run_id: str) -> Path:
    return Path(records_dir) / run_id / FILENAME


@dataclass
class PipelineRecord:
    """A parsed ``pipeline.json``: typed access to what the CLI and the tests read, and the document as ``raw``."""

    path: Path
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return str(self.raw.get("status"))

    @property
    def steps(self) -> dict[str, dict[str, Any]]:
        return dict(self.raw.get("steps") or {})

    @property
    def lineage(self) -> dict[str, Any]:
        return dict(self.raw.get("lineage") or {})

    @property
    def trigger(self) -> dict[str, Any]:
        return dict(self.raw.get("trigger") or {})


def read_pipeline_record(path: str | Path) -> PipelineRecord:
    """Read and check a ``pipeline.json`` (or the one in a pipeline run folder)."""
    path = Path(path)
    path = path / FILENAME if path.is_dir() else path
    if not path.is_file():
        raise PipelineRecordError(f"{path}: pipeline record not found")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineRecordError(f"{path}: not a readable pipeline record ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict) or raw.get("schema") not in KNOWN_SCHEMAS:
        raise PipelineRecordError(f"{path}: not a medops pipeline record (schema {SCHEMA} expected)")
    return PipelineRecord(path, raw)


def _write(records_dir: str | Path, run_id: str, raw: dict[str, Any]) -> Path:
    path = record_path(records_dir, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json(path, raw, default=str)


def _load(records_dir: str | Path, run_id: str) -> dict[str, Any]:
    path = record_path(records_dir, run_id)
    if path.is_file():
        return read_pipeline_record(path).raw
    return {"schema": SCHEMA, "pipeline_run": run_id, "status": "running", "created": now(), "trigger": {},
            "parameters": {}, "steps": {}, "lineage": {}}


def start_record(records_dir: str | Path, run_id: str, *, engine: str, trigger: dict[str, Any] | None = None,
                 parameters: dict[str, Any] | None = None) -> Path:
    """Create (or reopen, for a resumed run) the record of a pipeline run that is starting."""
    raw = _load(records_dir, run_id)
    raw.update(engine=engine, status="running", reason=None)
    raw["trigger"] = trigger or raw.get("trigger") or {"kind": "manual"}
    raw["parameters"] = parameters or raw.get("parameters") or {}
    raw.setdefault("attempts", []).append(now())
    return _write(records_dir, run_id, raw)


def record_step(records_dir: str | Path, run_id: str, step: str, **entry: Any) -> Path:
    """Set one step's entry (status, seconds, inputs, outputs, figures, reason ...); keys not given are kept."""
    raw = _load(records_dir, run_id)
    raw["steps"][step] = {**(raw["steps"].get(step) or {}), **entry, "updated": now()}
    return _write(records_dir, run_id, raw)


def record_lineage(records_dir: str | Path, pipeline_run: str, **links: Any) -> Path:
    """Add links of the chain data fingerprint -> training run id -> model version -> rollout decision."""
    raw = _load(records_dir, pipeline_run)
    raw["lineage"].update({k: v for k, v in links.items() if v is not None})
    return _write(records_dir, pipeline_run, raw)


def finish_record(records_dir: str | Path, run_id: str, status: str, reason: str | None = None) -> Path:
    """The run's end: ``completed``, ``stopped`` (a gate said no; nothing promoted) or ``failed``."""
    if status not in FINAL:
        raise PipelineRecordError(f"final status must be one of {FINAL}, got {status!r}")
    raw = _load(records_dir, run_id)
    raw.update(status=status, reason=reason, finished=now())
    return _write(records_dir, run_id, raw)


# -- the tracked data version (DVC, Git LFS) ------------------------------------------------------------------------
def _dvc_file_version(data: Path) -> dict[str, Any] | None:
    """The hash of ``<data>.dvc`` (``dvc add``), for the output that names ``data``."""
    dvc_file = data.with_name(data.name + ".dvc")
    if not dvc_file.is_file():
        return None
    import yaml  # PyYAML: a dependency of omegaconf, installed with the project

    doc = yaml.safe_load(dvc_file.read_text()) or {}
    for out in doc.get("outs") or []:
        if Path(str(out.get("path", ""))).name == data.name:
            return {"tool": "dvc", "file": str(dvc_file), "md5": out.get("md5") or out.get("etag"),
                    "size": out.get("size")}
    return None


def _dvc_lock_version(data: Path) -> dict[str, Any] | None:
    """The hash of ``data`` as an output (or dependency) of a stage in the nearest ``dvc.lock`` above it."""
    import yaml

    resolved = data.resolve()
    for folder in resolved.parents:
        lock = folder / "dvc.lock"
        if not lock.is_file():
            continue
        doc = yaml.safe_load(lock.read_text()) or {}
        for stage, spec in (doc.get("stages") or {}).items():
            for kind in ("outs", "deps"):
                for item in spec.get(kind) or []:
                    if (folder / str(item.get("path", ""))).resolve() == resolved:
                        return {"tool": "dvc", "file": str(lock), "stage": stage, "md5": item.get("md5"),
                                "size": item.get("size")}
        return None
    return None


def _git_lfs_version(data: Path) -> dict[str, Any] | None:
    """The Git LFS object id (the SHA-256 of the content) when ``.gitattributes`` routes ``data`` through LFS."""
    try:
        out = subprocess.run(["git", "check-attr", "filter", "--", data.name], cwd=data.parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip().endswith(": lfs") or not data.is_file():
        return None
    head = data.read_bytes()[:100]
    if head.startswith(b"version https://git-lfs"):  # a pointer: the object id is written in it
        oid = next((line.split(":", 1)[1] for line in data.read_text().splitlines() if line.startswith("oid sha256:")),
                   None)
        return {"tool": "git-lfs", "oid": f"sha256:{oid}", "fetched": False}
    digest = hashlib.sha256()
    with data.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return {"tool": "git-lfs", "oid": f"sha256:{digest.hexdigest()}", "fetched": True}


def tracked_version(data: str | Path) -> dict[str, Any] | None:
    """The version the data's tracker names: DVC (``<file>.dvc``, else ``dvc.lock``) or Git LFS; ``None`` when the
    data is not tracked (or not a local path)."""
    path = Path(str(data))
    if not str(data) or not path.exists() or not path.name:
        return None
    for probe in (_dvc_file_version, _dvc_lock_version, _git_lfs_version):
        found = probe(path)
        if found:
            return found
    return None
