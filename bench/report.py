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


def served_table(result: dict[str, Any]) -> Table | None:
    """Served efficiency (bench/served.py): the pinned layout first, the shared-core one as the second line."""
    served = result.get("served")
    if not served:
        return None
    pinned = (f"pinned: Triton on CPU {','.join(map(str, served['server_cpus']))}, clients on CPU "
              f"{','.join(map(str, served['client_cpus']))}" if served.get("server_cpus") else
              f"pinned: skipped ({served.get('pinned_skipped')})")
    table = Table(title=f"Served efficiency, Triton {served['protocol']}, {_in_flight(served)}; "
                        f"{pinned}; shared: server and clients on every core. Served / in-process = Triton images/s "
                        f"over onnxruntime in this process, batch {served['reference_batch']}, same threads, same "
                        "cores (median of per-run ratios). CPU ms/img: CPU time of Triton's processes per served "
                        "image against in-process onnxruntime's per image, one thread (pinned layout only)")
    for col in ("layout", "model", "request", "in flight", "served img/s", "in-process img/s", "served / in-process",
                "client CPU ms/req", "CPU ms/img served / in-process (ratio)", "queue ms",
                "compute in / infer / out ms", "mean batch", "p50 / p99 ms"):
        table.add_column(col, justify="left" if col in ("layout", "model") else "right")
    for r in sorted(served["rows"], key=lambda r: (r["model"], r["request_batch"], r["layout"] != "pinned")):
        table.add_row(r["layout"], r["model"], f"{r['request_batch']} img", str(r.get("in_flight", "")),
                      _f(r["images_per_s"]),
                      _f(r["ort_images_per_s"]), _f(r["served_over_in_process"], ".2f"),
                      _f(r["client_cpu_ms_per_request"], ".2f"), _cpu_time(r), _f(r["queue_ms"], ".2f"),
                      f"{_f(r['compute_input_ms'], '.2f')} / {_f(r['compute_infer_ms'], '.2f')} / "
                      f"{_f(r['compute_output_ms'], '.2f')}", _f(r["mean_batch"]),
                      f"{_f(r['p50_ms'])} / {_f(r['p99_ms'])}")
    return table


def _cpu_time(row: dict[str, Any]) -> str:
    """Server and in-process CPU per image and their ratio, e.g. ``1.74 / 1.57 (0.90)``; ``-`` where not measured."""
    if row.get("cpu_time_ratio") is None:
        return "-"
    return (f"{_f(row['server_cpu_ms_per_image'], '.2f')} / {_f(row['ort_cpu_ms_per_image'], '.2f')} "
            f"({_f(row['cpu_time_ratio'], '.2f')})")


def server_cpu_table(result: dict[str, Any]) -> Table | None:
    """Where the serving core's CPU goes (bench/serving_cost.py), pinned rows with one onnxruntime thread."""
    rows = [r for r in (result.get("served") or {}).get("rows", [])
            if r["layout"] == "pinned" and r.get("cpu_time_ratio") is not None]
    if not rows:
        return None
    table = Table(title="Server CPU, pinned, one onnxruntime thread: CPU time of Triton's processes per served image, "
                        "split by the served model's counters into onnxruntime and its own Python (execute() less "
                        "onnxruntime) per image and Triton outside execute() per request; floor: what any "
                        "Python-backend model pays per request beyond its compute (Triton, reading the input, "
                        "building the responses), on a twin of the model that only burns the in-process CPU per "
                        "image; best ratio: in-process CPU / (in-process CPU + floor)")
    for col in ("model", "request", "served ms/img", "in-process ms/img", "ratio", "onnxruntime in server ms/img",
                "model.py Python ms/img", "Triton outside execute() ms/req", "floor ms/req", "best ratio"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in sorted(rows, key=lambda r: (r["model"], r["request_batch"])):
        table.add_row(r["model"], f"{r['request_batch']} img", _f(r["server_cpu_ms_per_image"], ".3f"),
                      _f(r["ort_cpu_ms_per_image"], ".3f"), _f(r["cpu_time_ratio"], ".2f"),
                      _f(r.get("stub_onnxruntime_cpu_ms_per_image"), ".3f"),
                      _f(r.get("stub_python_cpu_ms_per_image"), ".3f"),
                      _f(r.get("outside_execute_cpu_ms_per_request"), ".3f"),
                      _f(r.get("triton_floor_cpu_ms_per_request"), ".3f"), _f(r.get("best_ratio"), ".2f"))
    return table


def _fraction(value: float | None) -> str:
    return "no measured load" if value is None else f"{value:.0%}"


def latency_table(result: dict[str, Any]) -> Table:
    choice = result["choice"]
    goal = result["targets"][0]["target"]
    table = Table(title=f"Latency under load, {result['model']}: one-image requests, open loop "
                        f"({result['config']['arrival']} arrivals, {result['config']['seconds']:g} s per load), Triton "
                        f"on CPU {result['placement']['server_cpus']}, load generator on "
                        f"{result['placement']['client_cpus']}; maximum throughput "
                        f"{result['max_throughput_per_s']:.0f} requests/s. Chosen: max_queue_delay "
                        f"{choice['max_queue_delay_us']} us, preferred sizes "
                        f"{choice['preferred_batch_sizes'] or 'none'}; p99 within {goal:g}x the idle p50 up "
                        f"to {_fraction(choice.get('highest_load_within_goal'))} of the maximum")
    if result.get("queueing_model"):
        from bench.latency import queueing_summary

        table.caption = queueing_summary(result["queueing_model"])
    for col in ("max_queue_delay us", "preferred", "load", "offered /s", "achieved /s", "p50 ms", "p95 ms", "p99 ms",
                "send lag p99 ms", "errors"):
        table.add_column(col, justify="right")
    for cand in result["candidates"]:
        c = cand["candidate"]
        for pt in cand["points"]:
            table.add_row(str(c["max_queue_delay_us"]), str(c["preferred_batch_sizes"] or "-"),
                          f"{pt['fraction']:.0%}", _f(pt["offered_per_s"], ".0f"), _f(pt["achieved_per_s"], ".0f"),
                          _f(pt["p50_ms"]), _f(pt["p95_ms"]), _f(pt["p99_ms"]), _f(pt["send_lag_p99_ms"]),
                          str(int(pt["errors"])))
    return table


def int8_table(result: dict[str, Any]) -> Table:
    cfg = result["config"]
    table = Table(title=f"INT8 (QDQ, per-channel) vs FP32, onnxruntime in-process, {cfg['threads']} thread(s): median "
                        f"of {cfg['repeats']} interleaved runs")
    for col in ("model", "batch", "FP32 img/s", "INT8 img/s", "INT8 / FP32", "max |prob diff|", "size FP32 / INT8",
                "clinical gate (export)"):
        table.add_column(col, justify="left" if col in ("model", "clinical gate (export)") else "right")
    for r in result["rows"]:
        g = r.get("gate")
        gate = (f"AUROC {g['auroc_fp32']:.4f}->{g['auroc_int8']:.4f}, acc {g['accuracy_fp32']:.3f}->"
                f"{g['accuracy_int8']:.3f}, same decision {g['decision_agreement']:.1%}" if g else "-")
        table.add_row(r["model"], str(r["batch"]), _f(r["fp32"]["images_per_s"]), _f(r["int8"]["images_per_s"]),
                      _f(r["int8_over_fp32"], ".2f"), _f(r["max_abs_prob_diff"], ".2e"),
                      f"{r['fp32_bytes'] / 2**20:.1f} / {r['int8_bytes'] / 2**20:.1f} MiB", gate)
    return table


TABLES = {"engines": engines_table, "pipeline": pipeline_table, "training-loop": training_table, "gpu": gpu_table,
          "latency": latency_table, "int8": int8_table}


def print_result(console: Console, result: dict[str, Any]) -> None:
    print(result["machine_line"], flush=True)  # plain print: never wrapped or styled
    console.print(TABLES[result["case"]](result))
    if result["case"] == "engines":
        for table in (served_table(result), server_cpu_table(result)):
            if table is not None:
                console.print(table)
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
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


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
    served = result.get("served")
    split = _split_rows(served)
    fig, axes = _figure(len(panels) + (1 if served else 0) + (1 if split else 0), cols=len(cfg["batches"]))
    if split:
        _split_panel(axes.pop(), split)
    if served:
        _served_panel(axes.pop(), served)
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


def _short_model(label: str) -> str:
    """A served model's label short enough for an x tick: 'breastmnist v9 (fp32)', 'resnet18 28 px'."""
    return (label.replace(" (random weights)", "").replace("export ", "").replace(" 1 ch ", " ")
            .replace(" 3 ch ", " 3ch "))


def _served_panel(ax: Any, served: dict[str, Any]) -> None:
    """Served / in-process per model and request size, pinned and shared, with the 0.90 goal."""
    keys = sorted({(r["model"], r["request_batch"]) for r in served["rows"]})

    def per_key(field: str, layout: str) -> list[float | None]:
        return [next((r.get(field) for r in served["rows"] if r["layout"] == layout
                      and (r["model"], r["request_batch"]) == k), None) for k in keys]

    candidates = {"pinned": per_key("served_over_in_process", "pinned"),
                  "shared": per_key("served_over_in_process", "shared"),
                  "pinned, by CPU time": per_key("cpu_time_ratio", "pinned"),
                  "best the Python backend allows (floor)": per_key("best_ratio", "pinned")}
    series = {name: values for name, values in candidates.items() if any(v is not None for v in values)}
    short = [_short_model(m) for m, _ in keys]
    _bars(ax, [f"{m}\n{b} img/req" for m, (_, b) in zip(short, keys, strict=True)], series,
          f"Triton / in-process onnxruntime b{served['reference_batch']}")
    ax.axhline(0.9, color="red", ls=":", lw=1)
    top = max([v for values in series.values() for v in values if v is not None] + [1.0])
    ax.set_ylim(0, top * 1.3)  # room for the legend above the bars
    ax.legend(fontsize=7, ncol=min(len(series), 2), loc="upper center")
    ax.tick_params(axis="x", labelsize=6, labelrotation=30)
    cpus = (f"pinned: server CPU {served['server_cpus']}, clients {served['client_cpus']}"
            if served.get("server_cpus") else "pinned: skipped")
    ax.set_title(f"served efficiency ({cpus}); dotted: goal 0.90\n{_in_flight(served)}\nby CPU time: in-process "
                 "CPU per image / server CPU per image\nbest: in-process CPU / (in-process CPU + the Python "
                 "backend's floor)",
                 fontsize=8)


def _split_rows(served: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Pinned rows whose server CPU was split (the served model's counters and the process tree's CPU)."""
    return [r for r in (served or {}).get("rows", []) if r["layout"] == "pinned"
            and r.get("outside_execute_cpu_ms_per_request") is not None and r.get("ort_cpu_ms_per_image")]


def _split_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    """The serving core's CPU per served image in parts, each over in-process onnxruntime's CPU per image: 1.0 is
    the in-process cost, 1/0.9 the most that still meets the served / in-process goal of 0.90."""
    import numpy as np

    rows = sorted(rows, key=lambda r: (r["model"], r["request_batch"]))
    ref = np.array([r["ort_cpu_ms_per_image"] for r in rows])
    parts = {
        "onnxruntime in the server": np.array([r["stub_onnxruntime_cpu_ms_per_image"] for r in rows]),
        "model.py's Python (checks, drift, responses)": [r["stub_python_cpu_ms_per_image"] for r in rows],
        "Triton outside execute()": [r["outside_execute_cpu_ms_per_request"] / r["request_batch"] for r in rows],
    }
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for (name, values), color in zip(parts.items(), ("tab:blue", "tab:orange", "tab:gray"), strict=True):
        share = np.maximum(np.array(values), 0) / ref  # each part is a median of its own: a small one can be < 0
        ax.bar(x, share, 0.6, bottom=bottom, label=name, color=color)
        bottom += share
    floors = [(i, r["triton_floor_cpu_ms_per_request"] / r["request_batch"] / r["ort_cpu_ms_per_image"])
              for i, r in enumerate(rows) if r.get("triton_floor_cpu_ms_per_request") is not None]
    for i, floor in floors:  # what any Python-backend model pays beyond its compute, on the in-process cost
        ax.hlines(1 + floor, i - 0.3, i + 0.3, colors="black", linestyles="--", lw=1.2,
                  label="in-process + floor (twin)" if i == floors[0][0] else None)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(1 / 0.9, color="red", ls=":", lw=1)
    short = [_short_model(r["model"]) for r in rows]
    ax.set_xticks(x)
    ax.set_xticklabels([f"{m}\n{r['request_batch']} img/req" for m, r in zip(short, rows, strict=True)], fontsize=6,
                       rotation=30)
    ax.set_ylabel("server CPU per image / in-process CPU per image")
    low = min(0.8, float(min(parts["onnxruntime in the server"] / ref)) - 0.05)
    top = max(1 / 0.9, float(bottom.max()))
    ax.set_ylim(low, top + (top - low) * 0.45)  # zoomed on the parts above the in-process cost; legend room
    ax.legend(fontsize=7, ncol=2, loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"where the serving core's CPU goes (pinned, one onnxruntime thread; axis from {low:.2f})\n"
                 "solid: in-process cost; dotted: 1/0.9, the most that meets served / in-process >= 0.90",
                 fontsize=8)


def _in_flight(served: dict[str, Any]) -> str:
    """'64 / 16 gRPC client threads for requests of 1 / 32 images' (older results: one concurrency for all)."""
    per = served.get("in_flight")
    if not per:
        return f"{served['concurrency']} gRPC client threads"
    sizes = sorted(per, key=int)
    return (f"{' / '.join(str(per[b]) for b in sizes)} gRPC client threads for requests of "
            f"{' / '.join(str(b) for b in sizes)} images")


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


def latency_chart(result: dict[str, Any], path: Path) -> Path:
    """Latency percentiles and achieved throughput against offered load, one line per batcher candidate."""
    queue = result.get("queueing_model")
    fig, axes = _figure(3 if queue else 2, width=6.5, height=4.5, cols=2)
    chosen = result["choice"]
    for cand in result["candidates"]:
        c = cand["candidate"]
        is_chosen = (c["max_queue_delay_us"], c["preferred_batch_sizes"]) == (chosen["max_queue_delay_us"],
                                                                             chosen["preferred_batch_sizes"])
        label = (f"delay {c['max_queue_delay_us']} us, preferred {c['preferred_batch_sizes'] or 'none'}"
                 + (" (chosen)" if is_chosen else ""))
        pts = [p for p in cand["points"] if p["p50_ms"] is not None]
        x = [p["offered_per_s"] for p in pts]
        line = axes[0].plot(x, [p["p99_ms"] for p in pts], marker="o", lw=2.5 if is_chosen else 1.2,
                            label=f"p99, {label}")[0]
        axes[0].plot(x, [p["p50_ms"] for p in pts], ls="--", marker=".", color=line.get_color(), lw=1,
                     label=f"p50, {label}")
        axes[1].plot(x, [p["achieved_per_s"] for p in pts], marker="o", color=line.get_color(), label=label)
    top = result["max_throughput_per_s"]
    for ax in axes[:2]:
        ax.axvline(0.8 * top, color="grey", ls=":", lw=1)
        ax.set_xlabel("offered load (one-image requests/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    low = result.get("idle_p50_ms") or chosen.get("low_load_p50_ms")
    if queue:
        modelled = [c for c in queue["compared"] if c.get("model_p99_ms") is not None]
        axes[0].plot([c["fraction"] * top for c in modelled], [c["model_p99_ms"] for c in modelled], color="black",
                     ls="-.", lw=1.2, label="p99 of the queueing model (chosen setting, ideal server)")
        _sizing_panel(axes[2], queue)
    if low:
        axes[0].axhline(4 * low, color="red", ls=":", lw=1, label="goal: 4 x idle p50 (best setting's p50 at low load)")
    axes[0].legend(fontsize=6)
    axes[0].set_ylabel("latency (ms)")
    axes[0].set_yscale("log")
    axes[0].set_title(f"latency vs offered load; dotted: 80 % of max ({top:.0f}/s)", fontsize=9)
    axes[1].plot([0, 1.1 * top], [0, 1.1 * top], color="black", lw=0.8, ls="--", label="achieved = offered")
    axes[1].set_ylabel("achieved throughput (requests/s)")
    axes[1].set_title("achieved vs offered throughput", fontsize=9)
    axes[1].legend(fontsize=6)
    return _save(fig, path, f"{result['model']}. {result['machine_line']}")


def _sizing_panel(ax: Any, queue: dict[str, Any]) -> None:
    """The queueing model's best p99 at 80 % / idle p50 per number of serving cores, against the goal."""
    best = queue["best_per_instances"]
    x = [b["instances"] for b in best]
    ax.plot(x, [b["ratio"] for b in best], marker="o", color="tab:purple",
            label="best setting of the grid; annotated: the load it serves with p99 within 4 x idle p50")
    for b in best:
        ax.annotate(f"batch {b['max_batch']}, delay {b['delay_us']:g} us\n"
                    f"{b['rate_within_goal_per_s']:.0f} req/s within 4 x", (b["instances"], b["ratio"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=6)
    ax.axhline(4, color="red", ls=":", lw=1, label="goal: 4 x")
    ax.set_xscale("log", base=2)
    ax.set_xlim(0.8, 2.2 * max(x))  # room for the last point's annotation
    ax.set_xticks(x, [str(v) for v in x])
    ax.set_ylim(0, max([4.5] + [1.15 * b["ratio"] for b in best]))
    ax.set_xlabel("serving cores (one model instance each); offered: 80 % of cores x the one-core maximum")
    ax.set_ylabel("p99 at 80 % load / p50 when idle")
    s = queue["service"]
    ax.set_title(f"queueing model: {s['fixed_ms']:.2f} ms + {s['per_image_ms']:.2f} ms/image per execution,\n"
                 f"{s['overhead_ms']:.2f} ms per request outside (fitted to Triton's batch statistics)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def int8_chart(result: dict[str, Any], path: Path) -> Path:
    rows = result["rows"]
    fig, axes = _figure(1, width=8.0)
    groups = [f"{r['model']}\nbatch {r['batch']}" for r in rows]
    _bars(axes[0], groups, {"FP32": [r["fp32"]["images_per_s"] for r in rows],
                            "INT8": [r["int8"]["images_per_s"] for r in rows]}, "images/s (onnxruntime, in-process)")
    axes[0].tick_params(axis="x", labelsize=6)
    return _save(fig, path, result["machine_line"])


CHARTS = {"engines": engines_chart, "pipeline": pipeline_chart, "training-loop": training_chart, "gpu": gpu_chart,
          "latency": latency_chart, "int8": int8_chart}
