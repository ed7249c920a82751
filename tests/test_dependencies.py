"""pyproject.toml says what the code needs: every third-party package the project's code imports is declared."""

from __future__ import annotations

import ast
import os
import re
import sys
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

SKIPPED_DIRS = {"tests", "docs", "data", "logs", "model_repository", "build", "dist", "node_modules"}
PROVIDED_ELSEWHERE = {
    "triton_python_backend_utils": "Triton's Python backend provides it to export/templates/model.py",
    "tensorrt": "NVIDIA's container provides it; export.tensorrt says how to get it when it is missing",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_files() -> list[Path]:
    """The project's Python files: tests, docs, data and hidden folders (.venv, .git) left out."""
    files = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.startswith(".") and not d.endswith(".egg-info")]
        files += [Path(root) / n for n in names if n.endswith(".py")]
    return files


def imported_modules(path: Path) -> set[str]:
    """Absolute imports of a file, lazy ones inside functions included, as dotted names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def distributions_of(module: str, top_level: dict[str, list[str]]) -> set[str]:
    """The installed distributions that provide ``module``; for a namespace package shared by several (``google``),
    the ones whose files hold the sub-package imported (``google.protobuf``)."""
    candidates = top_level.get(module.split(".")[0], [])
    if len(candidates) > 1 and "." in module:
        prefix = "/".join(module.split(".")[:2]) + "/"
        narrowed = [d for d in candidates if any(str(f).startswith(prefix) for f in distribution(d).files or [])]
        candidates = narrowed or candidates
    return {canonical(d) for d in candidates}


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + [r for group in project.get("optional-dependencies", {}).values()
                                            for r in group]
    return {canonical(Requirement(r).name) for r in reqs}


def test_every_imported_third_party_package_is_declared() -> None:
    local = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    top_level = packages_distributions()
    names = declared()
    missing: dict[str, set[str]] = {}
    for path in project_files():
        for module in imported_modules(path):
            root = module.split(".")[0]
            if root in sys.stdlib_module_names or root in local or root in PROVIDED_ELSEWHERE or root == "__future__":
                continue
            dists = distributions_of(module, top_level)
            if not dists:
                missing.setdefault(f"{module} (no installed distribution provides it)", set()).add(
                    str(path.relative_to(REPO)))
            elif not dists & names:
                missing.setdefault(f"{module} -> {sorted(dists)}", set()).add(str(path.relative_to(REPO)))
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(
        f"  {k}: {sorted(v)[:3]}" for k, v in sorted(missing.items()))


def test_the_declared_ranges_hold_the_installed_versions_and_cap_no_patch_release() -> None:
    """The environment the tests run in satisfies pyproject's ranges, and no range caps with ``<=`` (which would
    block the next patch release)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"]:
        req = Requirement(text)
        assert not any(spec.operator == "<=" for spec in req.specifier), f"{text}: use <NEXT_MAJOR, not <="
        try:
            installed = distribution(req.name).version
        except PackageNotFoundError:
            raise AssertionError(f"{req.name} is declared but not installed") from None
        assert req.specifier.contains(installed, prereleases=True), (text, installed)


def package_source(package: str, relative: str) -> str:
    """The text of a file of an installed package, read without importing it (torch and lightning are slow to)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
    return (Path(next(iter(spec.submodule_search_locations))) / relative).read_text()


def test_the_floors_cover_the_apis_the_code_calls() -> None:
    """The features that set the floors exist in the installed versions (a floor lowered below them would lie)."""
    export = package_source("torch", "onnx/__init__.py")
    signature = export[export.index("def export("):export.index(") ->", export.index("def export("))]
    assert "dynamo:" in signature and "optimize:" in signature and "dynamic_shapes:" in signature
    assert "class EMAWeightAveraging" in package_source("lightning", "pytorch/callbacks/weight_averaging.py")
    assert "class StratifiedGroupKFold" in package_source("sklearn", "model_selection/_split.py")
