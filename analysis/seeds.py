"""``python -m analysis.seeds``: how far a result moves with the seed (or the machine), measured over N runs.

Two ways in::

    python -m analysis.seeds experiment=breastmnist --seeds 5   # trains seeds 1..5 (one Hydra multirun), then sums up
    python -m analysis.seeds logs/seeds/<time>                  # sums up runs already made (any folders of run.json)

With Hydra overrides, it runs ``python -m train -m seed=1,2,...,N <overrides> hydra.sweep.dir=<--out>`` (default
``logs/seeds/<time>``; ``--first-seed`` moves the seeds), showing its output, then reads the runs. With folders, it
reads every ``run.json`` below them (analysis.compare's loader): a sweep over seeds, or the same seed run on several
machines (``deterministic=true``) to see the machine-to-machine spread.

For every val and test metric of the runs (the best checkpoint's figures in ``run.json``) and the fit time: n, mean,
sample sd (ddof=1), standard error and the 95 % (``--confidence``) confidence interval of the mean from the
t-distribution with n-1 degrees of freedom, ``mean ± t * sd / sqrt(n)``. Prints a table, writes ``seeds.json`` and
``seeds.png`` (each run's value per metric, the mean and its interval) into the first folder (``--out``). Warns when
the runs differ in more than the seed (the config keys that differ), used different data (fingerprints), did not
complete, or ran on different machines or thread counts.

Exit status 0; 2 for bad input (no runs, a folder without ``run.json``, an argument that is neither a folder nor a
Hydra override, ``seed=`` among the overrides); the training's status when it fails before any run completes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from analysis.compare import CompareError, RunInfo, differing_keys, fingerprint_warning, load_local_runs
from medops.run_record import RunRecordError, read_record, record_path

SUMMARY_FILE = "seeds.json"
PLOT_FILE = "seeds.png"
FIRST = ("auroc", "acc", "f1", "precision", "recall", "kappa", "loss")  # table order; other metrics follow, sorted
SEED_KEYS = ("seed",)


class SeedsError(Exception):
    """Bad input: one line on stderr, exit status 2."""


# ------------------------------------------------------------------------------------------------ statistics


def t_quantile(confidence: float, df: int) -> float:
    """The two-sided ``confidence`` quantile of Student's t with ``df`` degrees of freedom (scipy)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


def interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """n, mean, sample sd (ddof=1), standard error and the t-interval of the mean (``None`` where n < 2)."""
    n = len(values)
    mean = statistics.fmean(values) if n else None
    out: dict[str, Any] = {"n": n, "mean": mean, "sd": None, "sem": None, "t": None, "ci_low": None,
                           "ci_high": None, "half_width": None, "min": min(values) if n else None,
                           "max": max(values) if n else None, "values": list(values)}
    if n >= 2 and mean is not None:
        sd = statistics.stdev(values)
        sem = sd / math.sqrt(n)
        t = t_quantile(confidence, n - 1)
        out |= {"sd": sd, "sem": sem, "t": t, "half_width": t * sem, "ci_low": mean - t * sem,
                "ci_high": mean + t * sem}
    return out


def _ordered(names: set[str]) -> list[str]:
    def key(name: str) -> tuple[int, int, str]:
        split, _, metric = name.partition("/")
        return ({"val": 0, "test": 1}.get(split, 2), FIRST.index(metric) if metric in FIRST else len(FIRST), metric)

    return sorted(names, key=key)


def metric_values(runs: Sequence[RunInfo]) -> dict[str, list[float]]:
    """``val/<name>``, ``test/<name>`` and ``fit_seconds`` -> the finite values of the runs that have them."""
    names = {f"val/{k}" for r in runs for k in r.val} | {f"test/{k}" for r in runs for k in r.test}
    out: dict[str, list[float]] = {}
    for name in _ordered(names):
        split, _, metric = name.partition("/")
        values = [getattr(r, split).get(metric) for r in runs]
        out[name] = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    out["fit_seconds"] = [float(r.fit_seconds) for r in runs if isinstance(r.fit_seconds, (int, float))]
    return out


# ------------------------------------------------------------------------------------------------ the runs


def machine_of(run: RunInfo) -> str:
    """The machine a run trained on, from its record's ``environment``: CPU/GPU, threads, platform."""
    try:
        env = read_record(record_path(run.source)).raw.get("environment") or {}
    except RunRecordError:
        return "unknown"
    gpus = ", ".join(env.get("gpus") or []) or "no GPU"
    return f"{env.get('platform', '?')}, {env.get('cpu_count', '?')} CPUs, {env.get('torch_threads', '?')} " \
           f"torch threads, {gpus}"


def warnings_for(runs: Sequence[RunInfo]) -> list[str]:
    """What makes the spread more than a seed's: other config differences, other data, unfinished runs, machines."""
    warnings = []
    other = [k for k in differing_keys(runs) if k not in SEED_KEYS]
    if other:
        warnings.append(f"the runs differ in more than the seed: {', '.join(other)}")
    fingerprints = fingerprint_warning(runs)
    if fingerprints:
        warnings.append(fingerprints)
    unfinished = [r.source for r in runs if r.status != "completed"]
    if unfinished:
        warnings.append(f"{len(unfinished)} runs did not complete: {', '.join(unfinished)}")
    machines = sorted({machine_of(r) for r in runs})
    if len(machines) > 1:
        warnings.append(f"the runs ran on {len(machines)} machines: the spread includes the machine's: "
                        + "; ".join(machines))
    return warnings


def summarise(runs: Sequence[RunInfo], confidence: float = 0.95) -> dict[str, Any]:
    """The report: per metric the interval statistics, the runs (seed, folder, status) and the warnings."""
    return {
        "n_runs": len(runs),
        "confidence": confidence,
        "runs": [{"source": r.source, "seed": r.config.get("seed"), "status": r.status, "machine": machine_of(r)}
                 for r in runs],
        "metrics": {name: interval(values, confidence) for name, values in metric_values(runs).items() if values},
        "warnings": warnings_for(runs),
    }


# ------------------------------------------------------------------------------------------------ output


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(report: dict[str, Any], console: Console | None = None, title: str = "") -> None:
    """Per metric: n, mean ± sd, the interval of the mean, min and max; then the warnings."""
    console = console or Console()
    pct = f"{100 * report['confidence']:g} %"
    table = Table(title=title or f"{report['n_runs']} runs: mean ± sample sd, {pct} t-interval of the mean")
    for col in ("metric", "n", "mean ± sd", f"{pct} CI of the mean", "min", "max"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name, s in report["metrics"].items():
        digits = 1 if name == "fit_seconds" else 4
        spread = f"{_fmt(s['mean'], digits)} ± {_fmt(s['sd'], digits)}"
        ci = f"{_fmt(s['ci_low'], digits)} – {_fmt(s['ci_high'], digits)}" if s["ci_low"] is not None else "-"
        table.add_row(name, str(s["n"]), spread, ci, _fmt(s["min"], digits), _fmt(s["max"], digits))
    console.print(table)
    seeds = [r["seed"] for r in report["runs"]]
    console.print(f"seeds: {seeds}", soft_wrap=True)
    for warning in report["warnings"]:
        console.print(f"[bold yellow]warning:[/] {warning}", soft_wrap=True)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Each run's value of every val and test metric in [0, 1] (dots), with the mean and its interval (bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {split: [(n, s) for n, s in report["metrics"].items() if n.startswith(f"{split}/")
                      and all(0.0 <= v <= 1.0 for v in s["values"])] for split in ("val", "test")}
    panels = {k: v for k, v in panels.items() if v} or {"no metric in [0, 1]": []}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.5 + 0.45 * max(
        [len(v) for v in panels.values()] + [3])), squeeze=False)
    for ax, (split, rows) in zip(axes[0], panels.items(), strict=True):
        for i, (_, s) in enumerate(rows):
            ax.scatter(s["values"], [i] * len(s["values"]), s=18, alpha=0.6, color="tab:blue")
            if s["ci_low"] is not None:
                ax.errorbar([s["mean"]], [i], xerr=[[s["mean"] - s["ci_low"]], [s["ci_high"] - s["mean"]]],
                            fmt="D", color="black", capsize=4, markersize=5)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([n for n, _ in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{split}: {report['n_runs']} runs; mean and {100 * report['confidence']:g} % CI", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlim(-0.02, 1.02)  # the metrics' range; a wider interval runs to the edge
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ CLI


def train_seeds(overrides: Sequence[str], seeds: Sequence[int], out: Path) -> int:
    """``python -m train -m seed=... <overrides> hydra.sweep.dir=<out>``, its output shown; its exit status."""
    cmd = [sys.executable, "-m", "train", "-m", f"seed={','.join(map(str, seeds))}", *overrides,
           f"hydra.sweep.dir={out}"]
    print("running: " + " ".join(cmd[1:]), flush=True)
    return subprocess.run(cmd, check=False).returncode


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.seeds", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Seed (or machine) spread: mean ± sd and the t-interval of the mean for every metric, over "
                    "runs made here (Hydra overrides) or found in folders.",
        epilog="e.g. python -m analysis.seeds experiment=breastmnist --seeds 5\n"
               "     python -m analysis.seeds logs/seeds/<time>")
    parser.add_argument("sources", nargs="+", metavar="OVERRIDE|FOLDER",
                        help="Hydra overrides for python -m train (runs the seeds), or folders of run.json")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds to train (default 3)")
    parser.add_argument("--first-seed", type=int, default=1, help="the first seed (default 1: seeds 1..N)")
    parser.add_argument("--out", type=Path, default=None,
                        help="sweep folder for the runs, and where seeds.json/png go (default logs/seeds/<time>, "
                             "or the first folder given)")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    return parser.parse_intermixed_args(argv)  # overrides and options in any order


def sources_to_folders(args: argparse.Namespace) -> tuple[list[Path], list[str]]:
    """(folders to read, overrides to train with): all arguments are folders, or all are Hydra overrides."""
    folders = [Path(s) for s in args.sources if Path(s).exists()]
    overrides = [s for s in args.sources if not Path(s).exists()]
    if folders and overrides:
        raise SeedsError(f"give folders of runs or Hydra overrides, not both: {', '.join(overrides)}")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SeedsError(f"{', '.join(bad)}: neither a folder nor a Hydra override (key=value)")
    if any(o.lstrip("+~").split("=", 1)[0] == "seed" for o in overrides):
        raise SeedsError("seed= is set by --seeds/--first-seed; leave it out of the overrides")
    if overrides and args.seeds < 2:
        raise SeedsError("--seeds must be at least 2 (a spread needs two runs)")
    return folders, overrides


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not 0 < args.confidence < 1:
            raise SeedsError(f"--confidence must lie between 0 and 1, not {args.confidence}")
        folders, overrides = sources_to_folders(args)
        status = 0
        if overrides:
            out = args.out or Path("logs/seeds") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            status = train_seeds(overrides, range(args.first_seed, args.first_seed + args.seeds), out)
            if not out.is_dir():
                print(f"seeds: error: the training exited {status} and made no runs in {out}", file=sys.stderr)
                return status or 2
            folders = [out]
        runs = load_local_runs(folders)
        report = {"folders": [str(f.resolve()) for f in folders], **summarise(runs, args.confidence)}
        out_dir = args.out or folders[0]
        report["outputs"] = {"json": str(out_dir / SUMMARY_FILE), "png": str(out_dir / PLOT_FILE)}
        plot(report, out_dir / PLOT_FILE)
        (out_dir / SUMMARY_FILE).write_text(json.dumps(report, indent=2) + "\n")
    except (SeedsError, CompareError) as exc:
        print(f"seeds: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
        Console(highlight=False, soft_wrap=True).print(f"wrote {report['outputs']['json']}, {report['outputs']['png']}")
    return status


if __name__ == "__main__":
    sys.exit(main())
