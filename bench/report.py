"""Tables (rich) and charts (matplotlib, Agg) of the benchmark results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _f(value: Any, fmt: str = ".1f", none: str = "-") -> str:
    return none if value is None else format(value, fmt)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


# -- tables --------------------------------------------------------------------------------------------------------
def engines_table(result: dict[str, Any]) -> Table:
    peak = result["peak"]["peak_flops"]
    table = Table(title=f"Inference engines ({result['config']['arch']}): median of {result['config']['repeats']} "
                        f"interleaved runs; peak {peak / 1e9:.0f} GFLOP/s (float32 matmul, same run)")
    for col in ("engine", "ch", "px", "batch", "conc", "images/s", "p50 ms", "p95 ms", "p99 ms", "GFLOP/img",
                "of peak", "ratio", "ratio to"):
        table.add_column(col, justify="left" if col in ("engine", "ratio to") else "right")
    order = {e: i for i, e in enumerate(("eager", "onnxruntime", "triton-http", "triton-grpc", "triton-grpc-shm"))}
    rows = sorted(result["rows"], key=lambda r: (r["channels"], r["size"], r["batch"], r["concurrency"],
                                                 order.get(r["engine"], 9)))
    for r in rows:
        table.add_row(r["engine"], str(r["channels"]), str(r["size"]), str(r["batch"]), str(r["concurrency"]),
                      _f(r["images_per_s"]), _f(r["p50_ms"]), _f(r["p95_ms"]), _f(r["p99_ms"]),
                      _f(r["flops_per_image"] / 1e9, ".2f"), _pct(r["fraction_of_peak"]),
                      _f(r.get("ratio"), ".2f"), r.get("ratio_to") or "")
    return table


def pipeline_table(result: dict[str, Any]) -> Table:
    table = Table(title=f"serve batch end to end vs model only: median of {result['config']['repeats']} runs, "
                        f"{result['config']['images']} images, batch {result['config']['batch_size']}")
    for col in ("backend", "format", "px", "end-to-end img/s", "model-only img/s", "e2e / model",
                "decode ms/img", "decode share", "p50 / p95 / p99 ms"):
        table.add_column(col, justify="left" if col in ("backend", "format") else "right")
    for r in result["rows"]:
        table.add_row(r["backend"], r["format"], str(r["size"]), _f(r["end_to_end_images_per_s"]),
                      _f(r["model_only_images_per_s"]), _f(r["end_to_end_over_model_only"], ".2f"),
                      _f(r["decode_ms_per_image"], ".3f"), _pct(r["decode_share"]),
                      f"{_f(r['p50_ms'])} / {_f(r['p95_ms'])} / {_f(r['p99_ms'])}")
    return table


def training_table(result: dict[str, Any]) -> Table:
    cfg = result["config"]
    table = Table(title=f"Training ({cfg['arch']}, {cfg['size']} px, batch {cfg['batch_size']}, "
                        f"{result['images']} images/epoch): median of {cfg['repeats']} interleaved runs")
    for col in ("loop", "images/s", "epoch s", "data wait", "step ms (median)", "ratio to plain"):
        table.add_column(col, justify="left" if col == "loop" else "right")
    for r in result["rows"]:
        table.add_row(r["loop"], _f(r["images_per_s"]), _f(r["epoch_seconds"], ".2f"), _pct(r["data_wait_share"]),
                      _f(r["step_ms_median"]), _f(r.get("ratio_to_plain"), ".3f"))
    return table


def gpu_table(result: dict[str, Any]) -> Table:
    if result.get("skipped"):
        table = Table(title="GPU")
        table.add_column("status")
        table.add_row(f"skipped: {result['skipped']}")
        return table
    table = Table(title=f"GPU {result['gpu']['name']}: bf16 matmul peak {result['peak_bf16_flops'] / 1e12:.0f} "
                        "TFLOP/s")
    for col in ("what", "images/s", "notes"):
        table.add_column(col, justify="right" if col == "images/s" else "left")
    for r in result["training"]:
        note = f"{_pct(r['fraction_of_bf16_peak'])} of bf16 peak"
        if r.get("ratio_to_eager") is not None:
            note += f", {r['ratio_to_eager']:.2f}x eager"
        table.add_row(f"train {r['arch']} {r['size']} px b{r['batch']} bf16 channels_last "
                      f"{'compiled' if r['compiled'] else 'eager'}", _f(r["images_per_s"], ".0f"), note)
    for r in result["dataloader"]:
        table.add_row(f"train {r['arch']} with DataLoader ({r['workers']} workers)", _f(r["images_per_s"], ".0f"),
                      f"GPU busy {_pct(r['gpu_busy_share'])}")
    for r in result["inference"]:
        table.add_row(f"inference {r['engine']}", _f(r.get("images_per_s"), ".0f"), r.get("skipped") or
                      f"batch {r['batch']}")
    return table


def targets_table(result: dict[str, Any]) -> Table | None:
    targets = result.get("targets") or []
    if not targets:
        return None
    table = Table(title=f"{result['case']}: targets")
    for col in ("target", "measured", "needed", "met"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for t in targets:
        value = t["value"]
        percent = t["unit"] in ("of peak", "share")
        shown = "not measured" if value is None else (f"{100 * value:.1f}%" if percent else
                                                      f"{value:#.3g}{'x' if t['unit'] == 'x' else ''}")
        need = f"{100 * t['target']:g}%" if percent else f"{t['target']:g}{'x' if t['unit'] == 'x' else ''}"
        met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
        table.add_row(t["name"], shown, f"{t['comparison']} {need}", met)
    return table


TABLES = {"engines": engines_table, "pipeline": pipeline_table, "training": training_table, "gpu": gpu_table}


def print_result(console: Console, result: dict[str, Any]) -> None:
    print(result["machine_line"], flush=True)  # plain print: never wrapped or styled
    console.print(TABLES[result["case"]](result))
    targets = targets_table(result)
    if targets is not None:
        console.print(targets)


# -- charts --------------------------------------------------------------------------------------------------------
def _figure(n: int, width: float = 6.0, height: float = 4.0, cols: int | None = None) -> tuple[Any, list[Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = cols or n
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, [ax for row in axes for ax in row][:n]


def _save(fig: Any, path: Path, title: str) -> Path:
    import textwrap

    import matplotlib.pyplot as plt

    fig.suptitle(textwrap.fill(title, int(fig.get_figwidth() * 17)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(ax: Any, groups: list[str], series: dict[str, list[float | None]], ylabel: str, log: bool = False) -> None:
    import numpy as np

    x = np.arange(len(groups))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        heights = [v if v is not None else 0.0 for v in values]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def engines_chart(result: dict[str, Any], path: Path) -> Path:
    rows = result["rows"]
    cfg = result["config"]
    top = max(cfg["concurrency"])
    panels = [(c, b) for c in cfg["channels"] for b in cfg["batches"]]
    fig, axes = _figure(len(panels), cols=len(cfg["batches"]))
    for ax, (c, b) in zip(axes, panels, strict=True):
        groups = [f"{s} px" for s in cfg["sizes"]]
        series: dict[str, list[float | None]] = {}
        for engine in cfg["engines"]:
            conc = 1 if engine in ("eager", "onnxruntime") else top
            values = [next((r["images_per_s"] for r in rows if r["engine"] == engine and r["channels"] == c
                            and r["size"] == s and r["batch"] == b and r["concurrency"] == conc), None)
                      for s in cfg["sizes"]]
            if any(v is not None for v in values):
                series[engine if conc == 1 else f"{engine} c{conc}"] = values
        _bars(ax, groups, series, "images/s")
        ax.set_title(f"{c} channel(s), batch {b} (Triton: requests of {b} from {top} client threads)", fontsize=9)
    return _save(fig, path, result["machine_line"])


def pipeline_chart(result: dict[str, Any], path: Path) -> Path:
    rows = result["rows"]
    fig, axes = _figure(1, width=8.0)
    groups = [f"{r['backend']}\n{r['format']}\n{r['size']} px" for r in rows]
    _bars(axes[0], groups, {"end to end (serve batch)": [r["end_to_end_images_per_s"] for r in rows],
                            "model only": [r["model_only_images_per_s"] for r in rows]}, "images/s")
    return _save(fig, path, result["machine_line"])


def training_chart(result: dict[str, Any], path: Path) -> Path:
    rows = result["rows"]
    fig, axes = _figure(2, width=4.5)
    _bars(axes[0], [r["loop"] for r in rows], {"images/s": [r["images_per_s"] for r in rows]}, "images/s")
    _bars(axes[1], [r["loop"] for r in rows], {"data wait share": [r["data_wait_share"] for r in rows]},
          "share of step time")
    return _save(fig, path, result["machine_line"])


def gpu_chart(result: dict[str, Any], path: Path) -> Path:
    fig, axes = _figure(1, width=7.0)
    ax = axes[0]
    if result.get("skipped"):
        ax.axis("off")
        ax.text(0.5, 0.5, f"GPU case skipped:\n{result['skipped']}", ha="center", va="center", fontsize=9, wrap=True)
    else:
        rows = result["training"]
        groups = [f"{r['arch']}\n{'compiled' if r['compiled'] else 'eager'}" for r in rows]
        _bars(ax, groups, {"training images/s (bf16, channels_last)": [r["images_per_s"] for r in rows]},
              "images/s")
    return _save(fig, path, result["machine_line"])


CHARTS = {"engines": engines_chart, "pipeline": pipeline_chart, "training": training_chart, "gpu": gpu_chart}
