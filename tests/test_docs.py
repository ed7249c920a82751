"""The documentation: the MkDocs site builds without warnings and shows what a reader looks for, and every
``python -m`` command in README.md and docs/ names a module that exists (and, for this repo's CLIs, answers --help).
"""

from __future__ import annotations

import ast
import html
import importlib.util
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.test_repo import RUN_CMD, TEST_CMD, quick_start_commands

DOCS = REPO / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
DOC_FILES = [REPO / "README.md", *PAGES]
REPO_PACKAGES = ("medops", "datatools", "analysis", "train", "export", "evaluation", "serve", "bench", "pipeline")
SKIP_LINES = ("wandb", "kubectl", "docker", "helm", "sbatch", "kustomize")
SUBCOMMAND_CLIS = ("serve", "datatools.data_version", "pipeline")  # argparse CLIs whose commands get their own --help
STALE = re.compile(r"train\.(validate_data|data_version|ingest_dicom|evaluate|explain|compare|cv)\b|medimg"
                   r"|(train|export|bench)/pipeline\.py")
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", flags=re.S | re.M)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")
PYTHON_M = re.compile(r"(?:^|[\s$(;&|])(?:\S*/)?python3?\s+-m\s+([A-Za-z_][\w.]*)(?:[ \t]+([A-Za-z][\w-]*))?")


# -- the built site --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "WARNING" not in proc.stderr, proc.stderr[-4000:]
    return out


def page_text(site: Path, page: str) -> str:
    """The visible text of a built page, tags dropped and whitespace collapsed."""
    path = site / page / "index.html" if page else site / "index.html"
    assert path.is_file(), f"{page or 'index'} was not built"
    text = re.sub(r"</?(?:p|div|h\d|li|ul|ol|table|tr|td|th|pre|br|section|article|nav|header|footer)\b[^>]*>", " ",
                  path.read_text())
    text = re.sub(r"<[^>]+>", "", text)
    return " ".join(html.unescape(text).split())


def plain(text: str) -> str:
    """Docstring or Markdown text as the page shows it: no reST roles or backticks, collapsed whitespace."""
    return " ".join(re.sub(r":\w+:`", "`", text).replace("`", "").split())


def first_line_of_docstring(path: Path, name: str | None = None) -> str:
    tree = ast.parse(path.read_text())
    if name is not None:
        tree = next(n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name)
    doc = ast.get_docstring(tree)
    assert doc, f"{path}:{name} has no docstring"
    return plain(doc.split("\n\n")[0])


def test_every_page_is_built_and_in_the_navigation(site: Path) -> None:
    nav = (REPO / "mkdocs.yml").read_text()
    for page in PAGES:
        rel = page.relative_to(DOCS).as_posix()
        assert rel in nav, f"docs/{rel} is not in the mkdocs.yml nav"
        built = "" if rel == "index.md" else rel.removesuffix(".md").removesuffix("/index")
        page_text(site, built)


def test_api_pages_render_the_docstrings(site: Path) -> None:
    text = page_text(site, "api/core")
    assert first_line_of_docstring(REPO / "medops/run_record.py", "read_record") in text
    assert first_line_of_docstring(REPO / "medops/run_record.py", "latest_run") in text
    for api in sorted((DOCS / "api").glob("*.md")):
        built = (site / "api" / api.stem / "index.html").read_text()
        for module in re.findall(r"^::: ([\w.]+)", api.read_text(), flags=re.M):
            assert f'id="{module}"' in built, f"{module} has no section on api/{api.stem}"
            source = REPO / (module.replace(".", "/") + ".py")
            source = source if source.is_file() else source.with_suffix("") / "__init__.py"
            summary = first_line_of_docstring(source)
            assert summary in page_text(site, f"api/{api.stem}"), f"{module}: docstring not rendered"


def test_architecture_page_names_the_layers_and_the_core_formats(site: Path) -> None:
    text = page_text(site, "architecture")
    for layer in REPO_PACKAGES:
        assert layer in text
    for phrase in ("medops.run/1", "medops.model/1", "torch-free", "Where to change what", "medops/run_record.py",
                   "medops/model_version.py", "medops/triton_config.py", "medops/datasets.py", "medops/io.py"):
        assert phrase in text, phrase


def test_performance_page_has_the_measured_tables(site: Path) -> None:
    built = (site / "performance" / "index.html").read_text()
    text = page_text(site, "performance")
    assert "CPU, measured 2026-11-27" in text and "GPU, measured 2026-11-27" in text
    tables = re.findall(r"<table>.*?</table>", built, flags=re.S)
    cpu = next(t for t in tables if "eager b32 img/s" in t)
    assert "209.9" in cpu and "58.5" in cpu
    assert any("Lightning" in t and "61.8" in t for t in tables)


def test_overview_shows_the_flow_and_the_quick_start(site: Path) -> None:
    text = page_text(site, "")
    for phrase in ("python -m train", "parity gate", "model_repository", "python -m serve", "serve drift",
                   "rollouts", "run.json"):
        assert phrase in text, phrase
    assert plain(RUN_CMD) in text and plain(TEST_CMD) in text


# -- README ----------------------------------------------------------------------------------------------------------

def test_readme_is_a_first_visit_page() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert quick_start_commands() == [RUN_CMD, TEST_CMD]
    for section in ("## Quick start", "## Results on the embedded default", "## Layout", "## Documentation",
                    "## Data licence and citation"):
        assert section in readme, section
    assert "parity gate" in readme and "model_repository/" in readme  # the flow diagram
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert len(links) >= 10
    for link in links:
        assert (REPO / link).is_file(), link


def test_readme_results_are_the_training_page_results() -> None:
    section = (REPO / "README.md").read_text().split("## Results on the embedded default", 1)[1].split("\n## ")[0]
    assert section.strip() in (DOCS / "training.md").read_text()
    # the summary rows are the per-seed rows' mean ± sd and t interval (3 df), not figures typed separately
    seeds = re.findall(r"^\| (?:\d+|42 \(default\)) \| (0\.\d{3}) \| (0\.\d{3}) \| \d+ s \|$", section, re.M)
    assert len(seeds) == 4, seeds
    summary = re.search(r"^\| mean ± sd \| \*\*(0\.\d{3}) ± (0\.\d{3})\*\* \| \*\*(0\.\d{3}) ± (0\.\d{3})\*\*",
                        section, re.M)
    interval = re.search(r"^\| 95 % CI of the mean \(t, 3 df\) \| (0\.\d{3})–(0\.\d{3}) \| (0\.\d{3})–(0\.\d{3}) \|",
                         section, re.M)
    assert summary and interval
    for column in range(2):
        values = [float(row[column]) for row in seeds]
        mean, sd = statistics.fmean(values), statistics.stdev(values)
        half = 3.182 * sd / 2  # t(0.975, 3 df) x sd / sqrt(4)
        # the table rounds each seed to 3 decimals; the summary was computed from the unrounded figures
        assert float(summary[2 * column + 1]) == pytest.approx(mean, abs=1.5e-3)
        assert float(summary[2 * column + 2]) == pytest.approx(sd, abs=1.5e-3)
        assert float(interval[2 * column + 1]) == pytest.approx(mean - half, abs=3e-3)
        assert float(interval[2 * column + 2]) == pytest.approx(mean + half, abs=3e-3)


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_stale_module_names(path: Path) -> None:
    stale = [f"{i}: {line}" for i, line in enumerate(path.read_text().splitlines(), 1) if STALE.search(line)]
    assert not stale, stale


# -- python -m commands ----------------------------------------------------------------------------------------------

def shown_commands() -> dict[str, set[str]]:
    """Module -> the subcommands shown with it, from every fenced code block and inline code span."""
    found: dict[str, set[str]] = {}
    for path in DOC_FILES:
        text = path.read_text()
        snippets = [body for _, body in FENCE.findall(text)]
        snippets += INLINE.findall(FENCE.sub("", text))
        for snippet in snippets:
            for line in snippet.replace("\\\n", " ").splitlines():
                words = line.split()
                if not words or words[0] in SKIP_LINES:
                    continue
                for module, sub in PYTHON_M.findall(line):
                    found.setdefault(module, set())
                    if sub and module in SUBCOMMAND_CLIS:
                        found[module].add(sub)
    return found


COMMANDS = shown_commands()
REPO_CLIS = sorted(m for m in COMMANDS if m.split(".")[0] in REPO_PACKAGES)


def test_commands_were_found() -> None:
    assert {"train", "export", "serve", "bench", "datatools.validate_data", "datatools.data_version",
            "datatools.ingest_dicom", "evaluation.evaluate", "evaluation.explain", "analysis.compare",
            "analysis.cv"} <= set(COMMANDS)
    assert {"start", "predict", "batch", "drift", "promote", "rollback"} <= COMMANDS["serve"]


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_shown_module_exists(module: str) -> None:
    assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"


def run_help(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("module", REPO_CLIS)
def test_shown_cli_answers_help(module: str) -> None:
    proc = run_help(module)
    assert proc.returncode == 0, f"python -m {module} --help:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("module,command", sorted((m, c) for m in SUBCOMMAND_CLIS for c in COMMANDS.get(m, ())))
def test_shown_subcommand_answers_help(module: str, command: str) -> None:
    proc = run_help(module, command)
    assert proc.returncode == 0, f"python -m {module} {command} --help:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
