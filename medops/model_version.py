"""The model version: one owner for the layout of a model in the Triton repository and what it holds.

``<repository>/<name>/`` holds ``config.pbtxt`` and ``labels.txt`` (what Triton serves), the rollout state
(``rollout.json``, ``history.jsonl``) and one folder per version ``<version>/`` with the model file(s),
``metadata.json`` (schema ``medops.model/1``: input contract, classes, lineage, metrics, parity, operating
point, drift settings), the model card and the drift reference. Export writes it; serving, rollouts, drift
checks and evaluation read it, all through this module. Torch-free.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

INPUT_NAME = "image"  # FP32 [N, C, H, W] in [0, 1]
OUTPUT_NAME = "probabilities"  # FP32 [N, classes]
EMBEDDING_OUTPUT = "embedding"  # FP32 [N, D] of embedding.onnx (penultimate features)
OOD_SCORE_OUTPUT = "ood_score"  # FP32 [N, 1]: out-of-distribution score (medops.ood), when the version has one
OOD_FLAG_OUTPUT = "ood_flag"  # BOOL [N, 1]: ood_score above the threshold set on validation
OOD_OUTPUTS = (OOD_SCORE_OUTPUT, OOD_FLAG_OUTPUT)
METADATA_SCHEMA = "medops.model/1"
KNOWN_METADATA_SCHEMAS = frozenset({METADATA_SCHEMA})
METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
ONNX_FILE = "model.onnx"
EMBEDDING_FILE = "embedding.onnx"
DRIFT_REFERENCE_FILE = "drift_reference.npz"
INPUT_CHECK_FILE = "input_check.py"  # medops/input_check.py, copied for the Triton Python-backend model
INTEGRITY_FILE = "integrity.py"  # medops/integrity.py, copied for the Triton Python-backend model
ROLLOUT_FILE = "rollout.json"
HISTORY_FILE = "history.jsonl"
MODEL_FILES = {"python": ONNX_FILE, "onnxruntime": ONNX_FILE, "tensorrt": "model.plan"}


class ModelVersionError(ValueError):
    """A model or version that is not in the repository, or whose files are not what export writes."""


def list_versions(model_dir: str | Path) -> list[int]:
    """The version numbers present under a model folder, ascending (none when it does not exist)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def version_dir(repository: str | Path, name: str, version: str | int | None = None) -> Path:
    """The folder of ``version`` of model ``name`` (the highest version when ``version`` is ``None``)."""
    versions = list_versions(Path(repository) / name)
    if not versions:
        raise ModelVersionError(f"model {name!r} not found in {repository} (no version folders)")
    folder = Path(repository) / name / str(version or versions[-1])
    if not folder.is_dir():
        raise ModelVersionError(f"{folder} not found (versions: {versions})")
    return folder


@dataclass(frozen=True)
class InputContract:
    """What the model takes: ``name`` FP32 [N, channels, size, size] in [0, 1]; DICOM ``window`` if fixed."""

    name: str
    channels: int
    size: int
    window: tuple[float, float] | None = None


@dataclass
class VersionMetadata:
    """A parsed ``metadata.json``: typed access to what clients need and the whole document as ``raw``."""

    folder: Path
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.folder.name

    @property
    def class_names(self) -> list[str]:
        return list(self.raw["class_names"])

    @property
    def input(self) -> InputContract:
        c = self.raw["input"]
        window = tuple(float(v) for v in c["window"]) if c.get("window") else None
        return InputContract(str(c.get("name", INPUT_NAME)), int(c["channels"]), int(c["size"]), window)  # type: ignore[arg-type]

    @property
    def max_batch_size(self) -> int:
        return int(self.raw.get("max_batch_size", 64))

    @property
    def operating_point(self) -> dict[str, Any]:
        return dict(self.raw.get("operating_point") or {})

    @property
    def drift(self) -> dict[str, Any]:
        return dict(self.raw.get("drift") or {})

    @property
    def ood(self) -> dict[str, Any]:
        """The out-of-distribution score's summary (``medops.ood``; threshold, pass rate), ``{}`` without one."""
        return dict(self.raw.get("ood") or {})

    @property
    def modalities(self) -> list[str]:
        """The DICOM Modality values of the training data (``US``, ``CT``...), ``[]`` when unknown."""
        return [str(m) for m in (self.raw["input"].get("modalities") or [])]

    @property
    def precision(self) -> str:
        """``fp32`` or ``int8`` (``precision`` written by export; versions exported before it was recorded are FP32)."""
        return str((self.raw.get("precision") or {}).get("precision", "fp32"))

    @property
    def parity(self) -> list[dict[str, Any]]:
        return list(self.raw.get("parity") or [])

    @property
    def lineage(self) -> dict[str, Any]:
        return dict(self.raw.get("lineage") or {})


def read_metadata(folder: str | Path) -> VersionMetadata:
    """Read and check ``metadata.json`` of a version folder."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise ModelVersionError(f"{folder}: no {METADATA_FILE} (not a version written by python -m export)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelVersionError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    schema = raw.get("schema") if isinstance(raw, dict) else None
    if schema not in KNOWN_METADATA_SCHEMAS:
        raise ModelVersionError(f"{path}: metadata schema {schema!r} is not supported (known: "
                                f"{sorted(KNOWN_METADATA_SCHEMAS)}); re-export the model")
    missing = [k for k in ("class_names", "input") if k not in raw]
    if missing:
        raise ModelVersionError(f"{path}: metadata lacks {missing}")
    return VersionMetadata(Path(folder), raw)


def write_json(path: Path, document: Any, default: Any = None) -> Path:
    """Write JSON atomically (a reader, Triton's poller included, never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document, indent=2, default=default) + "\n")
    os.replace(tmp, path)
    return path


# -- rollout state -----------------------------------------------------------------------------------------------
@dataclass
class RolloutState:
    """Which versions serve: production, the previous productions (for rollback) and a running trial."""

    production: int | None = None
    previous: list[int] = field(default_factory=list)
    candidate: int | None = None
    mode: str | None = None
    canary_share: float = 0.0
    updated: str | None = None

    @property
    def served_versions(self) -> list[int]:
        return sorted({v for v in (self.production, self.candidate) if v is not None})


def under_rollout(repository: str | Path, name: str) -> bool:
    """Is this model's serving controlled by ``serve promote``/``rollback`` (a new version is only a candidate)?"""
    return (Path(repository) / name / ROLLOUT_FILE).is_file()


def read_rollout_state(model_dir: str | Path) -> RolloutState:
    path = Path(model_dir) / ROLLOUT_FILE
    return RolloutState(**json.loads(path.read_text())) if path.is_file() else RolloutState()


def write_rollout_state(model_dir: str | Path, state: RolloutState) -> None:
    state.updated = now()
    write_json(Path(model_dir) / ROLLOUT_FILE, asdict(state))


def read_history(model_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(model_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_history(model_dir: str | Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Append one decision (with its time and model) to ``history.jsonl``."""
    entry = {"time": now(), "model": Path(model_dir).name, **entry}
    with (Path(model_dir) / HISTORY_FILE).open("a") as fh:
        fh.write(json.dumps(entry) + "\n")
    return entry


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
