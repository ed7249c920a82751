"""Where a served request's CPU goes, for ``bench engines``: onnxruntime, the served model's Python, and Triton.

Served ÷ in-process counts everything between the client and onnxruntime. For a model as cheap as the default
export (about 1.6 ms per image on one core) a fixed cost per request weighs: Triton's gRPC front end, its dynamic
batcher and the Python backend's shared-memory round trip to its stub. Two measurements split the server's CPU:

* **the stub's own counters** (``export/templates/model.py``): CPU seconds in ``execute()`` and, within it, in
  onnxruntime, with the images they cover, read from Triton's metrics endpoint before and after a run
  (:func:`stub_counters`, :func:`stub_figures`). onnxruntime in the stub against in-process onnxruntime shows
  what sharing the core with Triton costs the model itself; ``execute()`` less onnxruntime is the served model's
  Python (input checks, drift window, responses); the server tree's CPU beyond ``execute()`` is Triton's.
* **the floor**, with a twin of each model (``<name>_floor``): the same ``config.pbtxt`` (inputs, outputs,
  batcher) with ``templates/floor_model.py``, which reads each request's input, burns the in-process onnxruntime
  CPU time per image (thread CPU time, so the request rate and the batches match the real model's) and answers
  zeros. The server tree's CPU per request less the burn is what any Python-backend model pays per request beyond
  its compute: Triton's work plus reading the input and building the responses (``triton_floor_cpu_ms_per_request``);
  ``best_ratio`` = in-process CPU / (in-process CPU + floor) is the best served ÷ in-process the Python backend
  leaves the model on these cores. A busy loop keeps the caches warmer than onnxruntime does, so a real model may
  pay a little more.

Written here rather than with a profiler: the question is what each part costs as a whole, per request, at the
real model's rate, across Triton's processes, which a sampling profiler of one process does not give.
"""

from __future__ import annotations

import os
import re
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TEMPLATE = Path(__file__).parent / "templates" / "floor_model.py"
BURN_FILE = "burn_ms_per_image.txt"  # templates/floor_model.py reads it
SUFFIX = "_floor"
COST_COUNTERS = {"execute": "medops_execute_cpu_seconds_total", "onnxruntime": "medops_onnxruntime_cpu_seconds_total",
            "images": "medops_execute_images_total"}  # names of export/templates/model.py's COST_COUNTERS


def stub_counters(metrics_url: str, model: str) -> dict[str, float]:
    """The served model's CPU-time counters from Triton's metrics endpoint, summed over its stubs (0 where absent)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    out = dict.fromkeys(COST_COUNTERS, 0.0)
    label = re.compile(rf'[{{,]model="{re.escape(model)}"[,}}]')
    for line in text.splitlines():
        for key, name in COST_COUNTERS.items():
            if line.startswith(name + "{") and label.search(line):
                out[key] += float(line.rsplit(" ", 1)[1])
    return out


def stub_figures(before: dict[str, float], after: dict[str, float], server_ms_per_image: float | None,
                 images_per_request: int) -> dict[str, float | None]:
    """Per image: onnxruntime's CPU in the stub and the served model's own Python (``execute()`` less onnxruntime);
    per request: the server tree's CPU outside ``execute()`` (Triton's). None where the model has no counters."""
    images = after["images"] - before["images"]
    if images <= 0:
        return {"stub_onnxruntime_cpu_ms_per_image": None, "stub_python_cpu_ms_per_image": None,
                "outside_execute_cpu_ms_per_request": None}
    execute = (after["execute"] - before["execute"]) / images * 1e3
    ort = (after["onnxruntime"] - before["onnxruntime"]) / images * 1e3
    outside = None if server_ms_per_image is None else (server_ms_per_image - execute) * images_per_request
    return {"stub_onnxruntime_cpu_ms_per_image": ort, "stub_python_cpu_ms_per_image": execute - ort,
            "outside_execute_cpu_ms_per_request": outside}


def floor_figures(tree_ms_per_request: float, burn_ms_per_image: float, images_per_request: int
                  ) -> dict[str, float | None]:
    """Triton's own CPU per request (the twin's tree CPU per request less its burn) and the best ratio it allows."""
    model_ms = burn_ms_per_image * images_per_request
    floor = tree_ms_per_request - model_ms
    if model_ms <= 0 or floor <= 0:  # nothing burned, or a tree CPU reading below the burn: no figure
        return {"triton_floor_cpu_ms_per_request": None, "best_ratio": None}
    return {"triton_floor_cpu_ms_per_request": floor, "best_ratio": model_ms / (model_ms + floor)}


@dataclass
class FloorTwins:
    """The twins of the served models in a benchmark repository: served name -> twin name."""

    repo: Path
    names: dict[str, str]

    @classmethod
    def add(cls, repo: Path, served: list[str]) -> FloorTwins:
        """A twin folder next to each served model: its config under the twin's name, version 1 = the template."""
        from medops.triton_config import parse_model_config, render_model_config

        names = {}
        for name in served:
            twin = f"{name}{SUFFIX}"
            config = parse_model_config((repo / name / "config.pbtxt").read_text())
            config.name = twin
            config.ClearField("version_policy")  # Triton's default: the latest version, here the only one
            (repo / twin / "1").mkdir(parents=True)
            (repo / twin / "config.pbtxt").write_text(render_model_config(config))
            if (repo / name / "labels.txt").is_file():
                shutil.copyfile(repo / name / "labels.txt", repo / twin / "labels.txt")
            shutil.copyfile(TEMPLATE, repo / twin / "1" / "model.py")
            names[name] = twin
        return cls(repo, names)

    def set_burn(self, name: str, ms_per_image: float) -> None:
        """Tell ``name``'s twin how much CPU to burn per image (replaced atomically: the stub may read it now)."""
        path = self.repo / self.names[name] / "1" / BURN_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{ms_per_image:.6f}")
        os.replace(tmp, path)

    def measure(self, clients: Any, server: Any, name: str, x: np.ndarray, in_flight: int, requests: int,
                burn_ms_per_image: float) -> dict[str, float | None]:
        """Drive ``name``'s twin like the model (same clients, batch, requests in flight and count) and return
        Triton's own CPU per request and the best ratio (:func:`floor_figures`)."""
        from bench.engines import Model
        from bench.served import tree_cpu_seconds

        self.set_burn(name, burn_ms_per_image)
        twin = Model(self.names[name], x.shape[1], x.shape[2], None, None, 0)
        pool = clients.ensure(in_flight, "triton-grpc", server, twin, x)  # connects and warms up the twin
        before = tree_cpu_seconds(server.process.pid)
        run = clients.closed_loop(pool, requests, len(x))
        cpu_ms = (tree_cpu_seconds(server.process.pid) - before) / run["calls"] * 1e3
        return floor_figures(cpu_ms, burn_ms_per_image, len(x)) | {"floor_images_per_s": run["images_per_s"]}
