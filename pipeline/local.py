"""``python -m pipeline run``: the pipeline definition run on this machine by kfp's own local runner.

``kfp.local`` with ``SubprocessRunner(use_venv=False)`` runs every step as a subprocess in this environment, with
kfp's local cache: a rerun after a failed step reuses the outputs of the steps that finished (their inputs are
unchanged), so only the failed step and those after it run again. The steps' own output goes to
``<records_dir>/<run>/steps.log``; the terminal shows a progress line per step and, at the end, a table of every
step (status, time, key figures) and the lineage from the pipeline record.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from medops import pipeline_record as pr
from pipeline.steps import RECORD_ENV

ANSI = re.compile(r"\x1b\[[0-9;]*m")
TASK = re.compile(r"(Executing task|Task) '([\w-]+)'(?: (finished with status (\w+)|cache hit))?")
EXIT_OK, EXIT_FAILED, EXIT_STOPPED = 0, 1, 3
STEP_ORDER = ("validate", "train", "evaluate", "export", "gate", "trial", "promote")
KEY_FIGURES = {
    "validate": ("images", "warnings"), "train": ("auroc", "acc", "epochs"),
    "evaluate": ("auroc", "sensitivity", "specificity", "ece"), "export": ("version", "parity_max_abs_diff"),
    "gate": ("candidate_auroc", "production_auroc", "production_version"),
    "trial": ("mode", "candidate_requests", "candidate_p95_ms", "shadow_agreement"),
    "promote": ("production_version", "previous_version"),
}


class _TaskEvents(logging.Handler):
    """kfp.local's log lines about tasks (start, cache hit, end) turned into progress updates."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(logging.INFO)
        self.progress, self.tasks = progress, {}

    def emit(self, record: logging.LogRecord) -> None:
        match = TASK.search(ANSI.sub("", record.getMessage()))
        if not match:
            return
        name = match.group(2).removesuffix("-op").replace("finalize", "record")
        if match.group(1) == "Executing task":
            self.tasks[name] = self.progress.add_task(f"{name}: running", total=1)
        elif name in self.tasks:
            how = "cached" if "cache hit" in match.group(0) else (match.group(4) or "").lower()
            self.progress.update(self.tasks[name], completed=1, description=f"{name}: {how}")


@contextlib.contextmanager
def _quiet_steps(log_file: Path):
    """Everything the steps print goes to ``log_file`` (the terminal keeps the progress display)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the local runner's notes on images and accelerators it does not use
        yield


def run_local(cfg: DictConfig, args: dict[str, Any], console: Console | None = None) -> tuple[int, Path]:
    """Run the pipeline with ``args`` through ``kfp.local``; returns the exit status (0 completed, 3 stopped by a
    gate, 1 failed) and the pipeline record's path."""
    from kfp import local

    from pipeline.definition import REPO, build

    console = console or Console()
    records_dir, run_id = args["records_dir"], args["pipeline_run"]
    os.environ.update({RECORD_ENV[0]: records_dir, RECORD_ENV[1]: run_id})  # the cached steps record themselves
    root = Path(str(cfg.local.pipeline_root))
    root = root if root.is_absolute() else REPO / root
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               enable_caching=bool(cfg.local.cache), raise_on_error=False)
    lifecycle = build(cfg, retries=int(cfg.local.retries))
    log_file = pr.record_path(records_dir, run_id).with_name("steps.log")
    console.print(f"pipeline run [bold]{run_id}[/] ({args['trigger'].get('kind')}): {args['data']} -> "
                  f"{args['model_name']} in {args['model_repository']}; step output: {log_file}", soft_wrap=True)
    started = time.perf_counter()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=False) as progress:
        handler = _TaskEvents(progress)
        root_logger = logging.getLogger()
        level = root_logger.level
        root_logger.addHandler(handler)
        root_logger.setLevel(logging.INFO)
        try:
            with _quiet_steps(log_file):
                lifecycle(**args)
        finally:
            root_logger.removeHandler(handler)
            root_logger.setLevel(level)
    elapsed = time.perf_counter() - started
    path = pr.record_path(records_dir, run_id)
    record = pr.read_pipeline_record(path)
    show(record, console, elapsed)
    return {"completed": EXIT_OK, "stopped": EXIT_STOPPED}.get(record.status, EXIT_FAILED), path


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def summary_table(record: pr.PipelineRecord, elapsed: float | None = None) -> Table:
    """Step, status, time and key figures of a pipeline run."""
    colour = {"done": "green", "cached": "cyan", "failed": "red", "stopped": "yellow", "skipped": "dim"}
    title = f"pipeline run {record.raw.get('pipeline_run')}: {record.status}"
    table = Table(title=title + (f" in {elapsed:.0f} s" if elapsed is not None else ""))
    for column in ("step", "status", "time", "key figures"):
        table.add_column(column, overflow="fold")
    steps = record.steps
    for name in STEP_ORDER:
        entry = steps.get(name)
        if entry is None:
            table.add_row(name, "[dim]not run[/]", "", "")
            continue
        status = entry.get("status", "?")
        figures = entry.get("figures") or {}
        shown = ", ".join(f"{k} {_figure(figures[k])}" for k in KEY_FIGURES[name] if figures.get(k) is not None)
        if status in ("failed", "stopped", "skipped") and entry.get("reason"):
            shown = (shown + "; " if shown else "") + str(entry["reason"])[:300]
        table.add_row(name, f"[{colour.get(status, 'white')}]{status}[/]", f"{entry.get('seconds') or 0:.1f} s", shown)
    return table


def lineage_line(record: pr.PipelineRecord) -> str:
    """data fingerprint (tracked version) -> run id -> model version -> decision, and how the run ended."""
    lin = record.lineage
    version = lin.get("data_version") or {}
    tracked = f" ({version.get('tool')} {version.get('md5') or version.get('oid')})" if version else ""
    text = (f"lineage: data {str(lin.get('data_fingerprint', '?'))[:19]}{tracked} -> run {lin.get('run_id', '?')} -> "
            f"{lin.get('model', '?')} v{lin.get('model_version', '?')} -> {lin.get('decision', '-')}")
    if record.raw.get("reason"):
        text += f"\n{record.status}: {record.raw['reason']}"
    return text + f"\nrecord: {record.path}"


def show(record: pr.PipelineRecord, console: Console, elapsed: float | None = None) -> None:
    console.print(summary_table(record, elapsed))
    console.print(lineage_line(record), soft_wrap=True, markup=False, highlight=False)


def print_record(path: str | Path, console: Console | None = None) -> int:
    """The summary of a finished run's record (``python -m pipeline show``)."""
    record = pr.read_pipeline_record(path)
    show(record, console or Console())
    return {"completed": EXIT_OK, "stopped": EXIT_STOPPED}.get(record.status, EXIT_FAILED)
