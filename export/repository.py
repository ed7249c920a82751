"""Versioned, atomic writes into a Triton model repository.

A version is built in a staging folder beside the repository (same file system, outside Triton's view)
and renamed into place in one step, so a failed or killed export never leaves half a model.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medops.model_version import ROLLOUT_FILE, list_versions

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RepositoryError(ValueError):
    """A repository operation that would damage or misuse the repository."""


def validate_model_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise RepositoryError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or "
            "digit (no path characters)"
        )
    return name


def next_version(repository: Path, name: str, requested: int | None = None) -> int:
    """The version to write: ``requested`` if free, else one above the highest existing version."""
    versions = list_versions(repository / validate_model_name(name))
    if requested is not None:
        if requested < 1:
            raise RepositoryError(f"version must be >= 1, got {requested}")
        if requested in versions:
            raise RepositoryError(
                f"{repository / name / str(requested)} already exists; versions are never overwritten"
            )
        return requested
    return (versions[-1] + 1) if versions else 1


@contextmanager
def staged_version(repository: Path, name: str, version: int) -> Iterator[tuple[Path, Path]]:
    """Yield ``(staging model dir, staging version dir)``; on success publish them, on any error remove them.

    Files for the model root (``config.pbtxt``, ``labels.txt``) go in the staging model dir; the model
    files in the staging version dir.
    """
    repository.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{repository.name}-staging-", dir=repository.parent))
    try:
        model_stage = staging / name
        version_stage = model_stage / str(version)
        version_stage.mkdir(parents=True)
        yield model_stage, version_stage
        publish(repository, name, version, model_stage)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(repository: Path, name: str, version: int, model_stage: Path) -> Path:
    """Move a staged version into the repository, then replace the model-level files atomically."""
    model_dir = repository / name
    target = model_dir / str(version)
    if target.exists():
        raise RepositoryError(f"{target} appeared during the export; not overwriting it")
    if not model_dir.exists():
        os.rename(model_stage, model_dir)  # a brand-new model: one rename publishes everything
        return target
    os.rename(model_stage / str(version), target)
    served_by_rollout = (model_dir / ROLLOUT_FILE).is_file()
    for item in model_stage.iterdir():
        if item.is_file():
            if served_by_rollout and item.name == "config.pbtxt":
                continue  # keep serving production: a new version waits for `serve promote` (its config is inside)
            os.replace(item, model_dir / item.name)  # atomic per file
    return target


