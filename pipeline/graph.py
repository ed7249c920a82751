"""``python -m pipeline graph``: the pipeline's DAG drawn from the compiled IR (the same file a cluster runs).

Drawn with matplotlib (a project dependency) rather than graphviz, which would add a system binary for one figure;
the DAG is a chain with two conditions and an exit handler, so a column of boxes shows it fully.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

LABELS = {
    "begin-op": ("begin", "open the pipeline record: trigger, parameters"),
    "validate-op": ("validate", "datatools.validate_data -> Dataset (fingerprint, DVC/LFS version), HTML"),
    "train-op": ("train", "python -m train -> run folder (Model), Metrics"),
    "evaluate-op": ("evaluate", "evaluation.evaluate -> HTML report, Metrics, ClassificationMetrics (ROC, confusion)"),
    "export-op": ("export", "python -m export, parity gate -> model version (Model + lineage)"),
    "gate-op": ("promotion gate", "candidate vs production on the fixed evaluation set -> pass | refuse"),
    "trial-op": ("canary / shadow trial", "routed traffic, limits -> promote | wait for a person | refuse"),
    "promote-op": ("promote", "serve promote: production version, history.jsonl"),
    "finalize-op": ("record (exit handler)", "completed | stopped by a gate | failed -> pipeline.json"),
}


def dag_of(package: Path) -> tuple[list[tuple[str, str, str]], dict[str, dict[str, Any]]]:
    """(upstream, downstream, condition) edges between the component tasks of a compiled pipeline, and each task's
    settings (image, GPU, caching, retries)."""
    spec = yaml.safe_load(package.read_text())
    components, executors = spec["components"], spec["deploymentSpec"]["executors"]
    edges: list[tuple[str, str, str]] = []
    tasks: dict[str, dict[str, Any]] = {}

    def walk(dag: dict[str, Any], condition: str, parent_inputs: list[str]) -> None:
        for name, task in dag.get("tasks", {}).items():
            comp = components[task["componentRef"]["name"]]
            cond = (task.get("triggerPolicy") or {}).get("condition", "")
            if "dag" in comp:
                walk(comp["dag"], cond or condition, [*task.get("dependentTasks", []), *parent_inputs])
                continue
            container = executors[comp["executorLabel"]]["container"]
            tasks[name] = {"image": container["image"], "gpu": (container.get("resources") or {}).get("accelerator"),
                           "cached": (task.get("cachingOptions") or {}).get("enableCache", False),
                           "retries": (task.get("retryPolicy") or {}).get("maxRetryCount", 0)}
            for up in task.get("dependentTasks", []) or parent_inputs:
                edges.append((up, name, cond or condition))

    walk(spec["root"]["dag"], "", [])
    return edges, tasks


def _row(name: str) -> int:
    return list(LABELS).index(name) if name in LABELS else len(LABELS)


def draw(cfg: Any, out: str | Path) -> Path:
    """Compile the pipeline and draw its DAG to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.__main__ import compile_package

    with tempfile.TemporaryDirectory() as tmp:
        edges, tasks = dag_of(compile_package(cfg, Path(tmp) / "pipeline.yaml"))
    order = sorted(tasks, key=_row)
    fig, ax = plt.subplots(figsize=(11, 1.05 * len(order) + 0.6))
    ax.set_xlim(0, 11)
    ax.set_ylim(-len(order) + 0.4, 1.0)
    ax.axis("off")
    y = {name: -i for i, name in enumerate(order)}
    for name in order:
        title, text = LABELS.get(name, (name, ""))
        info = tasks[name]
        if info["gpu"]:
            title += f"  [{info['gpu'].get('resourceCount', 1)} x {info['gpu'].get('resourceType')}]"
        colour = "#fde2e2" if name == "finalize-op" else ("#e3f2fd" if info["cached"] else "#fff8e1")
        ax.add_patch(plt.Rectangle((0.2, y[name] - 0.32), 4.0, 0.64, facecolor=colour, edgecolor="#455a64"))
        ax.text(2.2, y[name] + 0.08, title, ha="center", va="center", fontsize=11, weight="bold")
        ax.text(2.2, y[name] - 0.17, f"{info['image']}" + (" | cached" if info["cached"] else "")
                + (f" | retries {info['retries']}" if info["retries"] else ""), ha="center", va="center", fontsize=7)
        ax.text(4.5, y[name], text, ha="left", va="center", fontsize=9)
    for up, down, cond in edges:
        if up in y and down in y and y[up] - y[down] == 1 and down != "finalize-op":  # the chain; skips overlap it
            ax.annotate("", xy=(2.2, y[down] + 0.32), xytext=(2.2, y[up] - 0.32),
                        arrowprops={"arrowstyle": "->", "color": "#37474f"})
            if cond:
                label = cond.replace("inputs.parameter_values['pipelinechannel--", "").replace("']", "")
                ax.text(2.35, (y[up] + y[down]) / 2, f"if {label.replace('-Output', '')}", fontsize=7,
                        color="#b71c1c", va="center")
    last = min(y[n] for n in order if n != "finalize-op")
    ax.plot([0.1, 0.1], [0.35, last - 0.35], color="#b71c1c", linestyle="--", linewidth=1)
    ax.text(0.05, 0.45, "exit handler scope", fontsize=7, color="#b71c1c")
    ax.set_title("medops continuous training (Kubeflow Pipelines; blue: cached steps, yellow: always run, "
                 "red: exit handler)", fontsize=10)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
