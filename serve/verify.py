"""``python -m serve verify``: are a repository's model versions exactly what export wrote (and signed)?

Checks every version folder of the named models (all models without a name) with :mod:`medops.integrity`; the
same check ``serve start`` runs before Triton sees the repository, the local backend runs before it loads a
version, and the served Python-backend model runs at ``initialize``. Torch-free.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from medops.integrity import KEY_ENV, MANIFEST_FIELD, verify_version
from medops.model_version import METADATA_FILE, list_versions


@dataclass
class VersionCheck:
    """One version's verdict: ``problems`` empty means its files match their digests (and signature)."""

    model: str
    version: int
    problems: list[str] = field(default_factory=list)
    sealed: bool = True
    signed: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def signing_key() -> str | None:
    """The HMAC key from ``MEDOPS_MODEL_SIGNING_KEY`` (None when unset or empty)."""
    return os.environ.get(KEY_ENV) or None


def check_version(repository: str | Path, name: str, version: int, key: str | None = None,
                  allow_unsealed: bool = False) -> VersionCheck:
    """The verdict on one version; ``allow_unsealed``: a version exported before signing passes (with
    ``sealed=False``) unless a key is set."""
    folder = Path(repository) / name / str(version)
    try:
        meta = json.loads((folder / METADATA_FILE).read_text())
    except (OSError, ValueError):
        meta = {}
    sealed = isinstance(meta.get(MANIFEST_FIELD), dict)
    problems = verify_version(folder, key)
    if allow_unsealed and not sealed and not key:
        problems = []
    return VersionCheck(name, version, problems, sealed, bool((meta.get("signature") or {}).get("value")))


def check_repository(repository: str | Path, names: list[str] | None = None, key: str | None = None,
                     allow_unsealed: bool = False) -> list[VersionCheck]:
    """Every version of ``names`` (default: every model folder) in ``repository``."""
    root = Path(repository)
    models = list(names or [])
    if not models and root.is_dir():
        models = sorted(p.name for p in root.iterdir() if p.is_dir() and list_versions(p))
    return [check_version(root, name, v, key, allow_unsealed) for name in models
            for v in list_versions(root / name)]


def refused(checks: list[VersionCheck]) -> list[str]:
    """One line per refused version: ``NAME vVERSION refused: problem; problem``."""
    return [f"{c.model} v{c.version} refused: {'; '.join(c.problems)}" for c in checks if not c.ok]


def render(checks: list[VersionCheck], key: str | None) -> Table:
    """The verdicts as a table (model, version, signed, verdict)."""
    table = Table(title=f"Model versions ({'signature checked' if key else f'digests only; {KEY_ENV} unset'})",
                  title_justify="left")
    for column in ("model", "version", "signed", "verdict"):
        table.add_column(column)
    for c in checks:
        verdict = "[green]ok[/green]" if c.ok else "[red]" + escape("; ".join(c.problems)) + "[/red]"
        table.add_row(escape(c.model), str(c.version), "yes" if c.signed else "no", verdict)
    return table
