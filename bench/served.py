"""Serving figures as deployments run them: Triton on its own cores, its clients on others.

With the clients on the same cores as the server, a one-image-request benchmark measures the clients' Python as
much as the server: 16 gRPC client threads on 2 cores take most of the CPU time. Here the ``tritonserver`` process
(and its Python-backend stubs) is pinned to ``server_cpus`` (the last core by default) and this process, whose
threads are the clients, to the other cores. The figures per model and request size:

* **served ÷ in-process**: Triton's images/s against onnxruntime in this process with the same number of threads
  on the same cores (``server_cpus``), at the reference batch, timed right before and right after each served
  measurement (their mean: this VM's speed drifts by 10-20 % within a minute); the clients keep at least twice the
  reference batch in images in flight, so the dynamic batcher can form the reference batch from one-image requests;
* the client's own CPU cost per request: this process's CPU time (user + system, all threads) over the requests;
* Triton's per-request statistics (its statistics extension): queue, compute input, compute infer and compute
  output, each the change of the cumulative nanoseconds over the change of the request count, and the mean batch
  the dynamic batcher formed (inferences over executions);
* with one onnxruntime thread: the CPU time of Triton's processes per served image against in-process onnxruntime's,
  split into onnxruntime, the served model's Python and Triton, and the floor any Python-backend model pays per
  request beyond its compute, with the best ratio it leaves the model (``bench/serving_cost.py``).

The same is measured with server and clients sharing every core (the former figure), as a second, labelled line.
Pinning uses :func:`os.sched_setaffinity` on every thread of every process of the server tree and of this
process (Linux); the affinities are read back from ``/proc`` and reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from bench.serving_cost import FloorTwins, stub_counters, stub_figures
from medops.model_version import INPUT_NAME

STAT_KEYS = ("queue", "compute_input", "compute_infer", "compute_output")


# -- CPU affinity --------------------------------------------------------------------------------------------------
def split_cpus(server_count: int = 1) -> tuple[list[int], list[int]] | None:
    """(server CPUs, client CPUs): the last ``server_count`` CPUs this process may use for the server, the rest for
    the clients; None with fewer than two CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or server_count >= len(cpus):
        return None
    return cpus[-server_count:], cpus[:-server_count]


@contextlib.contextmanager
def pinned(cpus: Sequence[int]) -> Iterator[None]:
    """Run the calling thread on ``cpus`` (threads and processes it starts inherit them), then restore."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, ...), or None once it has ended."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from ``/proc/<pid>/stat``)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(entry.name)) and fields[1].isdigit():
            parents[int(entry.name)] = int(fields[1])
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def pin_threads(pids: Sequence[int], cpus: Sequence[int]) -> int:
    """Pin every thread of ``pids`` to ``cpus``; returns the number of threads pinned (vanished ones are skipped)."""
    count = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                os.sched_setaffinity(int(task.name), set(cpus))
                count += 1
    return count


def thread_cpus(pids: Sequence[int]) -> list[str]:
    """The distinct ``Cpus_allowed_list`` values over every thread of ``pids`` (one value: all pinned alike)."""
    seen = set()
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(OSError):
                seen.add(_task_cpus(pid, task.name))
    return sorted(seen)


def _task_cpus(pid: int, tid: str) -> str:
    """``Cpus_allowed_list`` of one thread, e.g. ``1`` or ``0-1``."""
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    return "?"


def process_cpu_seconds_of(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (every thread, ended ones included), or None once it has ended.

    Read from the process's POSIX CPU-time clock, to the nanosecond: Linux's clock id for a process is
    ``~pid << 3 | 2`` (CPUCLOCK_SCHED). ``/proc/<pid>/stat`` counts in 10 ms ticks, too coarse for a fraction of a
    millisecond per request over a few seconds of serving; it is the fallback where the clock cannot be read."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)
    except (OSError, OverflowError):
        fields = _stat_fields(pid)
        return None if fields is None else (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its descendants, every thread. CPU time leaves out the time a virtual
    CPU is stolen by its host, which wall-clock throughput on a shared VM does not."""
    return sum(seconds for child in process_tree(pid) if (seconds := process_cpu_seconds_of(child)) is not None)


def process_cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- Triton ----------------------------------------------------------------------------------------------------------
def start_server(repo: Path, names: list[str], cpus: Sequence[int] | None, python_shm_bytes: int) -> Any:
    """The bundled Triton with ``names`` loaded; with ``cpus`` started pinned to them (and every thread of its
    process tree pinned again once it is up)."""
    from bench.engines import start_triton

    if cpus is None:
        return start_triton(repo, names, python_shm_bytes)
    with pinned(cpus):
        server = start_triton(repo, names, python_shm_bytes)
    pin_threads(process_tree(server.process.pid), cpus)
    return server


def model_stats(http_url: str, model: str) -> list[dict]:
    """Triton's statistics of ``model``, one entry per version (``model_stats`` of the statistics extension)."""
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(http_url) as client:
        return client.get_inference_statistics(model)["model_stats"]


def triton_stats(http_url: str, model: str) -> dict[str, float]:
    """Cumulative statistics of ``model`` (all versions): request count, nanoseconds per phase, executions."""
    stats = model_stats(http_url, model)
    out = {"requests": 0.0, "executions": 0.0, "inferences": 0.0, **{f"{k}_ns": 0.0 for k in STAT_KEYS}}
    for entry in stats:
        inference = entry.get("inference_stats") or {}
        out["requests"] += float((inference.get("success") or {}).get("count", 0))
        out["executions"] += float(entry.get("execution_count", 0))
        out["inferences"] += float(entry.get("inference_count", 0))
        for key in STAT_KEYS:
            out[f"{key}_ns"] += float((inference.get(key) or {}).get("ns", 0))
    return out


def batch_stats(http_url: str, model: str) -> dict[int, tuple[float, float]]:
    """Cumulative per batch size: (executions, nanoseconds of compute input + infer + output), all versions."""
    out: dict[int, tuple[float, float]] = {}
    for entry in model_stats(http_url, model):
        for row in entry.get("batch_stats") or []:
            size = int(row["batch_size"])
            count = float((row.get("compute_infer") or {}).get("count", 0))
            ns = sum(float((row.get(k) or {}).get("ns", 0)) for k in ("compute_input", "compute_infer",
                                                                       "compute_output"))
            c0, ns0 = out.get(size, (0.0, 0.0))
            out[size] = (c0 + count, ns0 + ns)
    return out


def per_request(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Triton's milliseconds per request in each phase and the mean batch executed, between two snapshots."""
    requests = after["requests"] - before["requests"]
    executions = after["executions"] - before["executions"]
    out: dict[str, float | None] = {"triton_requests": requests}
    for key in STAT_KEYS:
        out[f"{key}_ms"] = (after[f"{key}_ns"] - before[f"{key}_ns"]) / requests / 1e6 if requests else None
    out["mean_batch"] = (after["inferences"] - before["inferences"]) / executions if executions else None
    return out


def repository_with_threads(src: Path, dst: Path, threads: int) -> Path:
    """A copy of the model repository ``src`` (weights hard-linked when possible) whose models' root
    ``config.pbtxt`` run ``threads`` onnxruntime threads (``ort_intra_op_threads``; the version folders, whose
    files export sealed, are not touched)."""
    from medops.triton_config import parse_model_config, render_model_config

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)
    for config_path in dst.glob("*/config.pbtxt"):
        config = parse_model_config(config_path.read_text())
        config.parameters["ort_intra_op_threads"].string_value = str(threads)
        config_path.unlink()  # a hard link: do not write through it into the source
        config_path.write_text(render_model_config(config))
    return dst


# -- the measurement -------------------------------------------------------------------------------------------------
@dataclass
class ServedModel:
    """A model in the benchmark's repository: its Triton name, input shape and ONNX file."""

    name: str
    label: str
    channels: int
    size: int
    onnx_path: Path


def ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    from serve.local_backend import ort_session_options

    return ort.InferenceSession(str(path), ort_session_options(threads), providers=["CPUExecutionProvider"])


def measure_layout(layout: str, models: list[ServedModel], repo: Path, server_cpus: list[int] | None,
                   client_cpus: list[int] | None, cfg: Any, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every model's served ÷ in-process figures with one server layout (``pinned`` or ``shared``): Triton gRPC,
    ``max(cfg.concurrency)`` client threads, requests of each of ``cfg.batches`` images, ``cfg.repeats`` runs."""
    from bench.engines import ClientThreads

    threads = len(server_cpus) if server_cpus else cfg.threads
    work_repo = repository_with_threads(repo, repo.parent / f"repository_{layout}", threads)
    all_cpus = sorted(os.sched_getaffinity(0))
    # the floor is read in CPU time, so it needs one onnxruntime thread (as the CPU time figures)
    twins = FloorTwins.add(work_repo, [m.name for m in models]) if len(server_cpus or all_cpus) == 1 else None
    own = [os.getpid()]
    if client_cpus:
        pin_threads(own, client_cpus)  # this process's threads are the clients
    server = clients = None
    try:
        names = [m.name for m in models] + (list(twins.names.values()) if twins else [])
        server = start_server(work_repo, names, server_cpus, cfg.python_shm_bytes)
        tree = process_tree(server.process.pid)
        placement = {"server_cpus": thread_cpus(tree), "server_processes": len(tree),
                     "client_cpus": thread_cpus(own), "ort_threads": threads}
        log(f"{layout}: Triton ({len(tree)} processes) on CPUs {placement['server_cpus']}, clients on "
            f"{placement['client_cpus']}, {threads} onnxruntime thread(s)")
        clients = ClientThreads()
        with pinned(server_cpus or all_cpus):
            sessions = {m.name: ort_session(m.onnx_path, threads) for m in models}
        per_rep = _runs(models, sessions, server, clients, server_cpus or all_cpus, cfg, twins)
    finally:
        if clients is not None:
            clients.close()
        if server is not None:
            server.stop()
        pin_threads(own, all_cpus)
        shutil.rmtree(work_repo, ignore_errors=True)
    return [_row(layout, placement, key, runs) for key, runs in per_rep.items()]


def _runs(models: list[ServedModel], sessions: dict[str, Any], server: Any, clients: Any, ort_cpus: list[int],
          cfg: Any, twins: FloorTwins | None) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Per (model, request batch): one dict per run with Triton's and onnxruntime's figures of that run (with
    ``twins``, also the Python backend's floor per request, measured on the model's twin right after it)."""
    from bench.engines import Model

    ref_b = max(cfg.batches)
    rng = np.random.default_rng(0)
    per_rep: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for rep in range(cfg.repeats):
        for m in models:
            x_ref = rng.random((ref_b, m.channels, m.size, m.size), dtype=np.float32)
            session = sessions[m.name]

            def in_process(session: Any = session, x_ref: np.ndarray = x_ref) -> dict[str, float]:
                with pinned(ort_cpus):
                    cpu0 = process_cpu_seconds()
                    run = common.time_calls(lambda: session.run(None, {INPUT_NAME: x_ref}), ref_b,
                                            min_calls=cfg.min_calls, min_seconds=cfg.min_seconds)
                    cpu_ms = (process_cpu_seconds() - cpu0) / ((run["calls"] + 1) * ref_b) * 1e3  # + untimed call
                return run | {"cpu_ms_per_image": cpu_ms}

            ort_run = in_process()
            for b in cfg.batches:
                x = rng.random((b, m.channels, m.size, m.size), dtype=np.float32)
                model = Model(m.name, m.channels, m.size, None, m.onnx_path, 0)
                conc = in_flight(max(cfg.concurrency), b, ref_b)
                pool = clients.ensure(conc, "triton-grpc", server, model, x)
                n = min(cfg.max_requests, max(conc, int(cfg.min_seconds * ort_run["images_per_s"] / b)))
                n = -(-n // conc) * conc
                before, cpu0 = triton_stats(server.http_url, m.name), process_cpu_seconds()
                stub0, server0 = stub_counters(server.metrics_url, m.name), tree_cpu_seconds(server.process.pid)
                result = clients.closed_loop(pool, n, b)
                server1, stub1 = tree_cpu_seconds(server.process.pid), stub_counters(server.metrics_url, m.name)
                cpu1, after = process_cpu_seconds(), triton_stats(server.http_url, m.name)
                result |= per_request(before, after)
                # the reference brackets the served figure: this VM's speed drifts by 10-20 % within a minute
                ort_after = in_process()
                reference = (ort_run["images_per_s"] + ort_after["images_per_s"]) / 2
                ort_ms = (ort_run["cpu_ms_per_image"] + ort_after["cpu_ms_per_image"]) / 2
                result |= cpu_time_figures((server1 - server0) / (result["calls"] * b) * 1e3, ort_ms,
                                           single_thread=len(ort_cpus) == 1)
                result |= stub_figures(stub0, stub1, result["server_cpu_ms_per_image"], b)
                if twins is not None:
                    result |= twins.measure(clients, server, m.name, x, conc, n, ort_ms)
                ort_run = ort_after
                result |= {"rep": rep, "ort_images_per_s": reference, "in_flight": conc,
                           "client_cpu_ms_per_request": (cpu1 - cpu0) / result["calls"] * 1e3,
                           "client_cpu_share": (cpu1 - cpu0) / max(1e-9, result["calls"] * b / result["images_per_s"])}
                per_rep.setdefault((m.label, b), []).append(result)
    return per_rep


def cpu_time_figures(server_ms: float, ort_ms: float, single_thread: bool) -> dict[str, float | None]:
    """Server CPU per served image (Triton and its stubs, every thread) against in-process onnxruntime's CPU per
    image, and their ratio: the cost of serving an image, steadier than throughput on a VM whose host steals time.
    Only with one onnxruntime thread: a thread pool spins while it waits, which CPU time would count as work."""
    if not single_thread or server_ms <= 0:
        return {"server_cpu_ms_per_image": None, "ort_cpu_ms_per_image": None, "cpu_time_ratio": None}
    return {"server_cpu_ms_per_image": server_ms, "ort_cpu_ms_per_image": ort_ms,
            "cpu_time_ratio": common.ratio(ort_ms, server_ms)}


def in_flight(concurrency: int, request_batch: int, reference_batch: int) -> int:
    """Client threads (requests in flight) for requests of ``request_batch`` images: ``concurrency``, and at least
    twice the reference batch in images, so the dynamic batcher can form the batch in-process onnxruntime is timed
    at while the previous one runs (16 one-image clients let it form batches of about 8, which measures the client
    population rather than the server)."""
    return max(concurrency, -(-2 * reference_batch // request_batch))


def _row(layout: str, placement: dict[str, Any], key: tuple[str, int], runs: list[dict[str, Any]]) -> dict[str, Any]:
    label, b = key
    med = common.median
    row = {"layout": layout, "model": label, "request_batch": b, **placement, **common.combine_runs(runs),
           "ort_images_per_s": med([r["ort_images_per_s"] for r in runs]),
           "served_over_in_process": common.median_ratio([(r["images_per_s"], r["ort_images_per_s"]) for r in runs]),
           "client_cpu_ms_per_request": med([r["client_cpu_ms_per_request"] for r in runs]),
           "client_cpu_share": med([r["client_cpu_share"] for r in runs]), "in_flight": runs[0]["in_flight"]}
    for k in (*(f"{s}_ms" for s in STAT_KEYS), "mean_batch", "server_cpu_ms_per_image", "ort_cpu_ms_per_image",
              "cpu_time_ratio", "triton_floor_cpu_ms_per_request", "best_ratio", "stub_onnxruntime_cpu_ms_per_image",
              "stub_python_cpu_ms_per_image", "outside_execute_cpu_ms_per_request", "floor_images_per_s"):
        values = [r[k] for r in runs if r.get(k) is not None]
        row[k] = med(values) if values else None
    return row


def run_served(models: list[ServedModel], repo: Path, cfg: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """The pinned layout (when there are two CPUs or more) and the shared one; rows of both, labelled."""
    split = split_cpus(cfg.server_cpu_count)
    rows: list[dict[str, Any]] = []
    if split is None:
        skipped = "needs at least two CPUs (one for the server, one for the clients)"
        log(f"pinned layout skipped: {skipped}")
    else:
        skipped = None
        rows += measure_layout("pinned", models, repo, split[0], split[1], cfg, log)
    rows += measure_layout("shared", models, repo, None, None, cfg, log)
    return {"rows": rows, "pinned_skipped": skipped, "server_cpus": split[0] if split else None,
            "client_cpus": split[1] if split else None, "concurrency": max(cfg.concurrency),
            "in_flight": {b: in_flight(max(cfg.concurrency), b, max(cfg.batches)) for b in cfg.batches},
            "reference_batch": max(cfg.batches), "protocol": "gRPC",
            "method": "served images/s over in-process onnxruntime images/s at the reference batch with the server's "
                      "thread count on the server's CPUs, median of the per-run ratios; client CPU = this process's "
                      "CPU time over requests; Triton statistics extension deltas per request; CPU time ratio = "
                      "in-process onnxruntime CPU per image over the server process tree's CPU per served image "
                      "(pinned, one onnxruntime thread); Triton floor = the tree's CPU per request on the model's "
                      "twin (templates/floor_model.py: burns the in-process CPU per image, answers zeros) less the "
                      "burn; best ratio = in-process CPU / (in-process CPU + floor), per request; stub "
                      "onnxruntime / Python = the served model's medops_*_cpu_seconds_total counters per image"}


def newest_version(repository: str | Path, model: str, precision: str) -> Path | None:
    """The newest version folder of ``model`` whose metadata says ``precision`` (``fp32``: also versions exported
    before precision was recorded); None when there is none."""
    from medops.model_version import ModelVersionError, list_versions, read_metadata

    root = Path(repository) / model
    for version in reversed(list_versions(root)):
        try:
            if read_metadata(root / str(version)).precision == precision:
                return root / str(version)
        except ModelVersionError:
            continue
    return None


def export_model_copy(version_dir: Path, repo: Path) -> ServedModel:
    """Copy an exported version (``<repository>/<name>/<version>``) and its model's config into ``repo``."""
    version_dir = version_dir.resolve()
    model_dir = version_dir.parent
    meta = json.loads((version_dir / "metadata.json").read_text())
    dst = repo / model_dir.name
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.pbtxt", "labels.txt"):
        shutil.copyfile(model_dir / name, dst / name)
    shutil.copytree(version_dir, dst / version_dir.name)
    precision = (meta.get("precision") or {}).get("precision", "fp32")
    return ServedModel(model_dir.name, f"export {model_dir.name} v{version_dir.name} ({precision})",
                       int(meta["input"]["channels"]), int(meta["input"]["size"]), dst / version_dir.name /
                       "model.onnx")
