"""The run record (``run.json``): metrics, data fingerprint, code version, environment and paths of a run."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "numpy", "wandb", "onnx", "onnxruntime")


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
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment() -> dict[str, Any]:
    """Host, platform and accelerator facts worth keeping with a result."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if cuda else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }


def new_record(output_dir: Path, run_id: str) -> dict[str, Any]:
    return {
        "schema": "medops.run/1",
        "run_id": run_id,
        "status": "running",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "output_dir": str(output_dir.resolve()),
        "command": [Path(sys.executable).name, *sys.argv],
        "git": git_info(),
        "versions": package_versions(),
        "environment": environment(),
    }


def write_record(record: dict[str, Any], output_dir: Path) -> Path:
    """Write ``run.json`` atomically (a reader never sees half a file)."""
    path = output_dir / "run.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def read_record(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "run.json").read_text())


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
