"""The architecture is enforced, not a convention: import-linter layers, a torch-free core and serving, one owner for
every shared file format, and short functions."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("medops", "datatools", "analysis", "train", "export", "evaluation", "serve", "bench", "pipeline")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(cwd / ".importlinter"), "--no-cache"], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept() -> None:
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 kept, 0 broken" in proc.stdout
    for name in ("Stages depend only downward", "The core (medops) never imports torch",
                 "Serving imports only the core", "Data tools and run analysis are torch-free"):
        assert name in proc.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("serve/predict.py", "import torch", "Serving imports only the core"),
    ("serve/predict.py", "from export import source", "Serving imports only the core"),
    ("medops/run_record.py", "from train import module", "Stages depend only downward"),
    ("train/module.py", "    from export import build", "Stages depend only downward"),  # lazy imports count too
    ("medops/metrics.py", "import lightning", "The core (medops) never imports torch"),
])
def test_a_violation_breaks_the_contracts(tmp_path: Path, module: str, line: str, contract: str) -> None:
    """The contracts bite: one forbidden import added to a copy of the code is reported, naming the contract."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copyfile(REPO / ".importlinter", tmp_path / ".importlinter")
    target = tmp_path / module
    text = target.read_text()
    if line.startswith(" "):  # inside the first function of the module
        head, _, rest = text.partition("\ndef ")
        name, _, body = rest.partition("\n")
        text = f"{head}\ndef {name}\n{line}\n{body}"
    else:
        text = f"{text}\n{line}\n"
    target.write_text(text)
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0
    assert "BROKEN" in proc.stdout and contract in proc.stdout.replace("\n", " ")


def _string_constants(path: Path) -> set[str]:
    """String literals of a module, docstrings and dict keys (JSON fields) left out."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    keys = {id(k) for node in ast.walk(tree) if isinstance(node, ast.Dict) for k in node.keys}  # JSON keys
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings and id(node) not in keys}


OWNED = {  # a file name or tensor name -> the core module that owns the format
    "run.json": "medops/run_record.py",
    "operating_point.json": "medops/run_record.py",
    "metadata.json": "medops/model_version.py",
    "rollout.json": "medops/model_version.py",
    "history.jsonl": "medops/model_version.py",
    "probabilities": "medops/model_version.py",
    "drift_reference.npz": "medops/model_version.py",
    "embedding.onnx": "medops/model_version.py",
    "medops.run/1": "medops/run_record.py",
    "medops.model/1": "medops/model_version.py",
}


def _package_files() -> list[Path]:
    """The project's modules outside bench/ (benchmarks may spell things out) and tests/."""
    return [path for package in PACKAGES if package != "bench" for path in sorted((REPO / package).rglob("*.py"))]


# core modules export copies verbatim next to the served model.py (no package imports there)
SELF_CONTAINED = {"medops/integrity.py", "medops/input_check.py", "medops/drift.py"}


def test_every_shared_format_has_one_owner() -> None:
    """No stage spells a shared file or tensor name itself: it imports the owner's constant."""
    offenders = []
    for path in _package_files():
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("export/templates/") or rel in SELF_CONTAINED:
            continue  # these run inside Triton's Python-backend stub, without the medops package
        for literal in _string_constants(path) & set(OWNED):
            if OWNED[literal] != rel:
                offenders.append(f"{rel}: {literal!r} (owner: {OWNED[literal]})")
    assert offenders == []


MAX_LINES = 60


def test_functions_are_short_or_say_why() -> None:
    """No function over 60 lines outside bench/ and tests/ unless its docstring says why it is long."""
    long = []
    for path in _package_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                doc = ast.get_docstring(node) or ""
                if lines > MAX_LINES and "long because" not in doc.lower():
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []
